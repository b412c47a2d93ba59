"""Tracked values: how a value of the traced function relates to the parameter leaves it views.

A tracked value's *view* is a tuple of :class:`Part` (one per leaf it holds: several after a
``concatenate`` of kernels). Each part says, per axis of the value, which leaf axes it covers,
and which leaf axes were consumed before (indexed away, scanned over: ``layer`` axes). The
structural primitives move these axes (:func:`structural`, one transform per primitive in
:data:`PART_RULES`); at a ``dot_general`` they become the leaf's layout (:func:`layout`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

from lrtt._jaxpr import aval_shape, reshape_groups

NONE = frozenset()


@dataclasses.dataclass(frozen=True)
class Part:
    """A value's relation to one leaf of shape ``shape``: per value axis, the leaf axes it covers
    (in row-major order); and the leaf axes consumed (indexed away, or scanned over), which are
    ``layer`` axes."""

    leaf: int
    shape: tuple[int, ...]
    axes: tuple[tuple[int, ...], ...]
    layer: frozenset = NONE

    @classmethod
    def whole(cls, leaf: int, shape: tuple[int, ...]) -> "Part":
        """Leaf number ``leaf`` itself: value axis ``a`` covers leaf axis ``a``."""
        return cls(leaf, tuple(shape), tuple((a,) for a in range(len(shape))))

    def moved(self, axes, gone: Iterable[int] = ()) -> "Part":
        """This part with new value axes; leaf axes of ``gone`` no longer covered are layers."""
        covered = {a for ax in axes for a in ax}
        return Part(self.leaf, self.shape, tuple(axes), self.layer | frozenset(a for a in gone if a not in covered))


class Untracked(Exception):
    """A structural primitive that cannot keep the leaf's axes apart: a use of kind other."""


def _cat(axes: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(a for ax in axes for a in ax))


def reshape_part(part: Part, old: tuple, new: tuple) -> Part:
    """Each new axis covers the leaf axes of the old axes of its group (unit axes aside); a
    group whose new axes have exactly the sizes of the leaf axes it covers maps them one to one
    (a merge undone)."""
    groups = reshape_groups(old, new)
    if groups is None:
        raise Untracked
    axes: list = [()] * len(new)
    gone: list = []
    for seg_old, seg_new in groups:
        if len(seg_old) == len(seg_new) == 1 and old[seg_old[0]] == 1:
            axes[seg_new[0]] = part.axes[seg_old[0]]  # a unit axis kept as it is
            continue
        covered = _cat(part.axes[k] for k in seg_old if old[k] != 1)
        gone += [a for k in seg_old if old[k] == 1 for a in part.axes[k]]  # an indexed layer dropped
        big = [k for k in seg_new if new[k] != 1]
        if len(covered) == len(big) > 1 and [new[k] for k in big] == [part.shape[a] for a in covered]:
            for k, a in zip(big, covered):
                axes[k] = (a,)
        else:
            for k in big:
                axes[k] = covered
    return part.moved(axes, gone)


# --- one transform per structural primitive: (eqn, part) -> the part of its (first) output -----
def _transpose(eqn, part: Part) -> Part:
    return part.moved([part.axes[a] for a in eqn.params["permutation"]])


def _reshape(eqn, part: Part) -> Part:
    if len(eqn.invars) > 1 or eqn.params.get("dimensions") is not None:
        raise Untracked
    return reshape_part(part, aval_shape(eqn.invars[0]), aval_shape(eqn.outvars[0]))


def _squeeze(eqn, part: Part) -> Part:
    dims = {d % len(part.axes) for d in eqn.params["dimensions"]}
    axes = [a for d, a in enumerate(part.axes) if d not in dims]
    return part.moved(axes, _cat(part.axes[d] for d in dims))


def _broadcast_in_dim(eqn, part: Part) -> Part:
    if len(eqn.invars) > 1:
        raise Untracked
    old, new = aval_shape(eqn.invars[0]), aval_shape(eqn.outvars[0])
    dims = tuple(eqn.params["broadcast_dimensions"])
    if any(old[i] != new[d] for i, d in enumerate(dims)) or any(
            new[d] != 1 for d in range(len(new)) if d not in dims):
        raise Untracked  # a real broadcast, not added unit axes
    axes = [()] * len(new)
    for i, d in enumerate(dims):
        axes[d] = part.axes[i]
    return part.moved(axes)


def _gather(eqn, part: Part) -> Part:
    """Indexing by scalars: the collapsed axes are layers."""
    dn = eqn.params["dimension_numbers"]
    if getattr(dn, "operand_batching_dims", ()):
        raise Untracked
    collapsed = set(dn.collapsed_slice_dims)
    kept = [a for a in range(len(part.axes)) if a not in collapsed]
    axes = [()] * len(aval_shape(eqn.outvars[0]))
    for pos, a in zip(dn.offset_dims, kept):
        axes[pos] = part.axes[a]
    return part.moved(axes, _cat(part.axes[a] for a in collapsed))


def _same(eqn, part: Part) -> Part:
    """Axes unchanged: casts, copies, slices, pads, flips."""
    return part


PART_RULES: dict[str, Callable[[Any, Part], Part]] = {
    "transpose": _transpose,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "broadcast_in_dim": _broadcast_in_dim,
    "gather": _gather,
}
"""Primitive name -> how it moves a part's axes; a structural primitive not named keeps them."""


def structural(eqn, view: tuple[Part, ...]) -> tuple[Part, ...]:
    """The view of the (first) output of a structural primitive applied to ``view``; raises
    :class:`Untracked` where the primitive mixes the leaf's axes."""
    move = PART_RULES.get(eqn.primitive.name, _same)
    return tuple(move(eqn, part) for part in view)


def layout(part: Part, words: list[str], ndim: int) -> str | None:
    """The words of the leaf's axes, given the word of each axis of the value ``part`` views;
    None when a leaf axis gets two words (or none)."""
    found: list[set] = [set() for _ in range(ndim)]
    for axis, covered in enumerate(part.axes):
        for a in covered:
            found[a].add(words[axis])
    for a in part.layer:
        found[a].add("layer")
    if any(len(f) != 1 for f in found):
        return None
    return " ".join(f.pop() for f in found)
