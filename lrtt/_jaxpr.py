"""Facts about jaxpr equations that :func:`lrtt.discover` and :func:`lrtt.factored` both read.

Kept in one place so that the discovery of layouts and the factored interpreter cannot disagree
on how a ``scan`` groups its operands or how a ``reshape`` groups its axes.
"""

from __future__ import annotations


def scan_counts(params) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a ``scan`` equation, on every supported JAX.

    jax <= 0.10 stores the counts; jax >= 0.12 stores ``ft_in``, a flat tree with one group of
    operands each for the consts, the carry and the scanned inputs.
    """
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    ft_in = params["ft_in"]
    consts, carry, _ = ft_in.unpack() if hasattr(ft_in, "unpack") else ft_in
    return len(consts), len(carry)


def reshape_groups(old: tuple, new: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Minimal groups ``(old axes, new axes)`` of equal product, in order (None: the reshape
    does not split into such groups). """
    groups, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        seg_old, seg_new, p_old, p_new = [], [], 1, 1
        if i < len(old):
            seg_old.append(i)
            p_old *= old[i]
            i += 1
        if j < len(new):
            seg_new.append(j)
            p_new *= new[j]
            j += 1
        while p_old != p_new:
            if p_old < p_new and i < len(old):
                seg_old.append(i)
                p_old *= old[i]
                i += 1
            elif j < len(new):
                seg_new.append(j)
                p_new *= new[j]
                j += 1
            else:
                return None
        groups.append((seg_old, seg_new))
    return groups
