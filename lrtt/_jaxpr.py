"""The jaxpr toolkit :func:`lrtt.discover` and :func:`lrtt.factored` share: what counts as an
array leaf, the abstract placeholder a leaf is traced as, opening a (closed) sub-jaxpr, and facts
about equations (how a ``scan`` groups its operands, how a ``reshape`` groups its axes).

Kept in one place so that the discovery of layouts and the factored interpreter cannot disagree.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore


def is_array(x: Any, *, abstract: bool = False) -> bool:
    """A leaf traced as an input (an array; with ``abstract``, a ``jax.ShapeDtypeStruct`` too),
    as opposed to a static Python value."""
    kinds = (jax.Array, np.ndarray, np.generic) + ((jax.ShapeDtypeStruct,) if abstract else ())
    return isinstance(x, kinds)


def placeholder(x: Any) -> jax.ShapeDtypeStruct:
    """The ``jax.ShapeDtypeStruct`` an array leaf is traced as (its weak type kept)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=getattr(x, "weak_type", False))
    if isinstance(x, jax.Array):
        aval = jax.typeof(x) if hasattr(jax, "typeof") else x.aval
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def is_jaxpr(x: Any) -> bool:
    return isinstance(x, (jcore.Jaxpr, jcore.ClosedJaxpr))


def open_jaxpr(jaxpr: Any) -> tuple[Any, tuple]:
    """``(jaxpr, consts)`` of a ``ClosedJaxpr`` (its consts) or a plain ``Jaxpr`` (none)."""
    if isinstance(jaxpr, jcore.ClosedJaxpr):
        return jaxpr.jaxpr, tuple(jaxpr.consts)
    return jaxpr, ()


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
