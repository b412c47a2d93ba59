"""Layout discovery: read how a model uses each parameter leaf off the model itself.

:func:`discover` traces ``fn(params, *args)`` abstractly (``jax.make_jaxpr`` on
``jax.ShapeDtypeStruct`` placeholders: no FLOPs, no memory for the weights) and follows every
parameter leaf through the jaxpr. A leaf stays *tracked* through the structural primitives
models apply to their kernels (dtype casts, ``transpose``, ``reshape``, ``squeeze``, unit
``broadcast_in_dim``, slicing and scalar indexing, ``concatenate``, ``jit``, ``checkpoint``,
``cond``, ``scan``/``while`` bodies, ``custom_jvp``/``custom_vjp``), each axis of each tracked
value remembering the set of leaf axes it covers. Where a tracked value meets a
``dot_general``

.. math::

    y = \\operatorname{dot\\_general}(x, W'), \\qquad W' = T(W) \\text{ (a view of the leaf } W),

each leaf axis of ``W`` gets the word of the axes of ``W'`` that cover it: ``in`` when
contracted, ``layer`` when a batch axis (or a ``ragged_dot`` group axis, or consumed earlier by
indexing / by ``scan`` over it), ``out`` otherwise. The words, in leaf-axis order, are the
leaf's *layout* (``"in out"`` for a Flax ``Dense`` kernel ``(in, out)``, ``"out in"`` for
GPT-2's ``Conv1D`` or a tied embedding ``(vocab, d)`` used as ``h @ E.T``, ``"layer in out"``
for an ``nn.scan``-stacked kernel ``(L, in, out)``, ``"out in out"`` for Gemma's
``q_einsum`` ``(N, D, H)``).

A ``gather`` reading a leaf of two or more axes with a batch of indices (token ids ``(B, T)``)
is an embedding lookup. Any other primitive touching a tracked value is a use of kind
``other`` (a norm scale, a bias, ...). The output head is found by propagating a mark from
every kernel's ``dot_general`` output through every non-dot primitive: a kernel whose mark
reaches an output of ``fn`` is the head (e.g. ``lm_head``), as is the embedding reused there.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
from typing import Any, Callable, Iterable

import jax
from jax.extend import core as jcore

from lrtt._jaxpr import is_array, is_jaxpr, open_jaxpr, placeholder, reshape_groups, scan_counts
from lrtt._paths import exact_patterns, path_str
from lrtt._private import source_summary

__all__ = ["Discovery", "LeafInfo", "LeafUse", "discover"]

DOTS = ("dot_general", "ragged_dot_general")
ROLES = ("linear", "embedding", "tied_head", "other", "conflict", "unused")


@dataclasses.dataclass(frozen=True)
class LeafUse:
    """One use of a parameter leaf in the traced function.

    Attributes:
      primitive: ``"dot_general"``, ``"ragged_dot_general"``, ``"gather"`` (an embedding
        lookup) or the name of the other primitive that consumed the leaf (``"mul"``,
        ``"add"``, ``"output"`` when ``fn`` returns the leaf itself, ...).
      layout: for a dot use, one word per leaf axis (``"layer"``/``"in"``/``"out"``); None
        otherwise, or when the dot mixes the roles of one leaf axis.
      where: the source line of the use (when JAX recorded one) and the primitive with its
        operand shapes.
    """

    primitive: str
    layout: str | None
    where: str


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """What :func:`discover` found about one leaf.

    Attributes:
      path: lrtt's name of the leaf (key path joined with ``/``).
      shape: the leaf's shape.
      role: ``"linear"`` (only ``dot_general`` kernels, all with one layout), ``"embedding"``
        (only gathered), ``"tied_head"`` (gathered and used as a dot kernel),
        ``"other"`` (norms, biases, ...), ``"conflict"`` (dot kernels of two layouts, or a dot
        kernel that is also used otherwise) or ``"unused"``.
      layout: the layout for ``linear`` and ``tied_head`` leaves, else None.
      head: the leaf is an output-head kernel (its ``dot_general`` output reaches an output of
        ``fn`` through no other ``dot_general``).
      uses: every distinct use, in trace order.
    """

    path: str
    shape: tuple[int, ...]
    role: str
    layout: str | None
    head: bool
    uses: tuple[LeafUse, ...]


class Discovery(collections.abc.Mapping):
    """The result of :func:`discover`: ``path -> layout`` for every leaf that has a layout.

    As a mapping it holds the ``linear`` and ``tied_head`` leaves (``"in out"``,
    ``"layer in out"``, ...); :attr:`leaves` holds a :class:`LeafInfo` for every array leaf of
    the params, in tree order. Immutable.
    """

    __slots__ = ("leaves", "_layouts")

    def __init__(self, leaves: dict[str, LeafInfo]):
        object.__setattr__(self, "leaves", dict(leaves))
        object.__setattr__(self, "_layouts", {
            p: i.layout for p, i in leaves.items() if i.role in ("linear", "tied_head") and i.layout})

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"Discovery is immutable (cannot set {name!r})")

    def __delattr__(self, name):
        raise dataclasses.FrozenInstanceError(f"Discovery is immutable (cannot delete {name!r})")

    def __reduce__(self):
        return (Discovery, (self.leaves,))

    def __getitem__(self, path: str) -> str:
        return self._layouts[path]

    def __iter__(self):
        return iter(self._layouts)

    def __len__(self) -> int:
        return len(self._layouts)

    def linear(self, *, include_head: bool = False) -> list[str]:
        """Paths of the ``linear`` kernels, in tree order, the output head left out.

        With ``include_head=True``: the ``linear`` kernels, the head included, and the
        ``tied_head`` leaves (an embedding reused as a kernel).
        """
        roles = ("linear", "tied_head") if include_head else ("linear",)
        return [p for p, i in self.leaves.items() if i.role in roles and (include_head or not i.head)]

    def conflicts(self) -> list[LeafInfo]:
        """The leaves used with two layouts, or as a dot kernel and in some other way."""
        return [i for i in self.leaves.values() if i.role == "conflict"]

    def as_layouts(self) -> dict[str, str]:
        """``{regex: layout}`` with one anchored, escaped regex per leaf of this mapping, ready
        for a method's ``layouts=`` argument."""
        return dict(zip(exact_patterns(self._layouts), self._layouts.values()))

    def __repr__(self) -> str:
        counts = collections.Counter(i.role for i in self.leaves.values())
        roles = ", ".join(f"{counts[r]} {r}" for r in ROLES if counts[r])
        heads = [p for p, i in self.leaves.items() if i.head]
        return f"<Discovery of {len(self.leaves)} leaves: {roles}; head: {heads or 'none'}>"

    def __str__(self) -> str:
        rows = [("path", "shape", "role", "layout", "head")]
        for p, i in self.leaves.items():
            rows.append((p, str(i.shape), i.role, i.layout or "-", "head" if i.head else ""))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        lines = []
        for r in rows:
            lines.append("  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4])
            info = self.leaves.get(r[0])
            if info is not None and info.role == "conflict":
                for u in info.uses:
                    what = f"{u.primitive} {u.layout!r}" if u.layout else u.primitive
                    lines.append(f"    - {what} at {u.where}")
        return "\n".join(line.rstrip() for line in lines)


# --- tracked values ------------------------------------------------------------------------------
_NONE = frozenset()


@dataclasses.dataclass(frozen=True)
class _Part:
    """A value's relation to one leaf of shape ``shape``: per value axis, the leaf axes it covers
    (in row-major order); and the leaf axes consumed (indexed away, or scanned over), which are
    ``layer`` axes."""

    leaf: int
    shape: tuple[int, ...]
    axes: tuple[tuple[int, ...], ...]
    layer: frozenset = _NONE

    def moved(self, axes, gone: Iterable[int] = ()) -> "_Part":
        """This part with new value axes; leaf axes of ``gone`` no longer covered are layers."""
        covered = {a for ax in axes for a in ax}
        return _Part(self.leaf, self.shape, tuple(axes), self.layer | frozenset(a for a in gone if a not in covered))


class _Untracked(Exception):
    """A structural primitive that cannot keep the leaf's axes apart: a use of kind other."""


def _ndim(var) -> int:
    return len(getattr(var.aval, "shape", ()))


def _shape(var) -> tuple[int, ...]:
    return tuple(getattr(var.aval, "shape", ()))


def _cat(axes: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(a for ax in axes for a in ax))


def _reshape_part(part: _Part, old: tuple, new: tuple) -> _Part:
    """Each new axis covers the leaf axes of the old axes of its group (unit axes aside); a
    group whose new axes have exactly the sizes of the leaf axes it covers maps them one to one
    (a merge undone)."""
    groups = reshape_groups(old, new)
    if groups is None:
        raise _Untracked
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


def _structural(eqn, view: tuple[_Part, ...]) -> tuple[_Part, ...]:
    """The view of the (first) output of a structural primitive applied to ``view``."""
    name, p = eqn.primitive.name, eqn.params
    out = []
    for part in view:
        if name == "transpose":
            out.append(part.moved([part.axes[a] for a in p["permutation"]]))
        elif name == "reshape":
            if len(eqn.invars) > 1 or p.get("dimensions") is not None:
                raise _Untracked
            out.append(_reshape_part(part, _shape(eqn.invars[0]), _shape(eqn.outvars[0])))
        elif name == "squeeze":
            dims = {d % len(part.axes) for d in p["dimensions"]}
            axes = [a for d, a in enumerate(part.axes) if d not in dims]
            out.append(part.moved(axes, _cat(part.axes[d] for d in dims)))
        elif name == "broadcast_in_dim":
            if len(eqn.invars) > 1:
                raise _Untracked
            old, new = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
            dims = tuple(p["broadcast_dimensions"])
            if any(old[i] != new[d] for i, d in enumerate(dims)) or any(
                    new[d] != 1 for d in range(len(new)) if d not in dims):
                raise _Untracked  # a real broadcast, not added unit axes
            axes = [()] * len(new)
            for i, d in enumerate(dims):
                axes[d] = part.axes[i]
            out.append(part.moved(axes))
        elif name == "gather":  # indexing by scalars: the collapsed axes are layers
            dn = p["dimension_numbers"]
            if getattr(dn, "operand_batching_dims", ()):
                raise _Untracked
            collapsed = set(dn.collapsed_slice_dims)
            kept = [a for a in range(len(part.axes)) if a not in collapsed]
            axes = [()] * _ndim(eqn.outvars[0])
            for pos, a in zip(dn.offset_dims, kept):
                axes[pos] = part.axes[a]
            out.append(part.moved(axes, _cat(part.axes[a] for a in collapsed)))
        else:  # axes unchanged: casts, copies, slices, pads, flips, concatenation
            out.append(part)
    return tuple(out)


# Primitives whose outputs keep the axes of their tracked operand(s).
_SAME_AXES = {
    "convert_element_type", "copy", "copy_p", "sharding_constraint", "reduce_precision",
    "stop_gradient", "mesh_cast", "reshard", "pvary", "slice", "rev", "transpose", "reshape",
    "squeeze", "broadcast_in_dim",
}
# Primitives applied operand by operand (several results).
_PER_OPERAND = {"optimization_barrier", "device_put"}
# Tracked operand positions for primitives with index / value operands.
_TRACKED_OPERANDS = {"dynamic_slice": (0,), "pad": (0,), "gather": (0,)}
_SUB_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _open(jaxpr) -> jcore.Jaxpr:
    return open_jaxpr(jaxpr)[0]


def _where(eqn) -> str:
    shapes = " x ".join(_aval_str(v) for v in eqn.invars)
    text = f"{eqn.primitive.name} {shapes}"
    src = source_summary(eqn.source_info)
    if src and src != "unknown":
        head, _, rest = src.partition(":")
        text = f"{os.path.basename(head)}:{rest}: {text}"
    return text


def _aval_str(v) -> str:
    aval = getattr(v, "aval", None)
    try:
        return aval.str_short(short_dtypes=True)
    except Exception:  # noqa: BLE001
        return str(aval)


class _Walker:
    def __init__(self, ndims: list[int]):
        self.ndims = ndims
        self.uses: list[list[LeafUse]] = [[] for _ in ndims]

    def use(self, view: Iterable[_Part], primitive: str, layout: str | None, where: str):
        for part in view:
            u = LeafUse(primitive, layout, where)
            if u not in self.uses[part.leaf]:
                self.uses[part.leaf].append(u)

    def other(self, view, eqn, primitive: str | None = None):
        self.use(view, primitive or eqn.primitive.name, None, _where(eqn))

    # The walk: returns (views, marks) of the outvars.
    def walk(self, jaxpr, in_views: list, in_marks: list) -> tuple[list, list]:
        jaxpr = _open(jaxpr)
        views: dict = {}
        marks: dict = {}
        for var, v, m in zip(jaxpr.invars, in_views, in_marks):
            if v:
                views[var] = v
            if m:
                marks[var] = m

        def read_view(x):
            return None if isinstance(x, jcore.Literal) else views.get(x)

        def read_marks(x):
            return _NONE if isinstance(x, jcore.Literal) else marks.get(x, _NONE)

        for eqn in jaxpr.eqns:
            vin = [read_view(x) for x in eqn.invars]
            min_ = [read_marks(x) for x in eqn.invars]
            vout, mout = self.eqn(eqn, vin, min_)
            for var, v, m in zip(eqn.outvars, vout, mout):
                if v:
                    views[var] = v
                if m:
                    marks[var] = m
        return [read_view(x) for x in jaxpr.outvars], [read_marks(x) for x in jaxpr.outvars]

    def eqn(self, eqn, vin: list, min_: list) -> tuple[list, list]:
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        if name in DOTS:
            return self.dot(eqn, vin)
        if name == "scan":
            return self.scan(eqn, vin, min_)
        if name == "while":
            return self.while_(eqn, vin, min_)
        if name == "cond":
            return self.cond(eqn, vin, min_)
        sub = next((eqn.params[k] for k in _SUB_KEYS if is_jaxpr(eqn.params.get(k))), None)
        if sub is not None and len(_open(sub).invars) == len(eqn.invars) and len(_open(sub).outvars) == n_out:
            # jit, checkpoint, custom_jvp/vjp and other calls: operands map onto the body's inputs
            return self.walk(sub, vin, min_)
        merged = frozenset().union(*(m for m, v in zip(min_, vin) if not v))
        if not any(vin):
            return [None] * n_out, [merged] * n_out
        if name == "gather" and vin[0] and not vin[1]:
            dn = eqn.params["dimension_numbers"]
            n_batch = _ndim(eqn.outvars[0]) - len(dn.offset_dims)
            if n_batch > 0:
                if _ndim(eqn.invars[0]) >= 2:  # many indices into a table: an embedding lookup
                    self.use(vin[0], "gather", None, _where(eqn))
                else:
                    self.other(vin[0], eqn)
                return [None], [merged]
        if name in _PER_OPERAND and n_out == len(vin):
            return list(vin), [_NONE if v else m for v, m in zip(vin, min_)]
        tracked = _TRACKED_OPERANDS.get(name)
        if name in _SAME_AXES or tracked is not None:
            bad = [v for i, v in enumerate(vin) if v and tracked is not None and i not in tracked]
            for v in bad:
                self.other(v, eqn)
            if vin[0]:
                try:
                    return [_structural(eqn, vin[0])], [merged]
                except _Untracked:
                    self.other(vin[0], eqn)
            return [None] * n_out, [merged] * n_out
        if name == "concatenate":  # e.g. q, k, v kernels fused: each part keeps its axes
            return [tuple(p for v in vin if v for p in v)], [merged]
        if name == "stack":  # a new axis in front of `axis`, covering no leaf axis
            axis = eqn.params["axis"]
            return [tuple(p.moved(p.axes[:axis] + ((),) + p.axes[axis:]) for v in vin if v for p in v)], [merged]
        if name == "split" and vin[0]:  # pieces of one axis: each piece keeps the axes
            return [vin[0]] * n_out, [merged] * n_out
        for v in vin:
            if v:
                self.other(v, eqn)
        return [None] * n_out, [merged] * n_out

    def dot(self, eqn, vin: list) -> tuple[list, list]:
        p = eqn.params
        group = ((), ())
        if eqn.primitive.name == "ragged_dot_general":
            rdn = p["ragged_dot_dimension_numbers"]
            dn = rdn.dot_dimension_numbers
            group = ((), tuple(rdn.rhs_group_dimensions))
            for v in vin[2:]:
                if v:
                    self.other(v, eqn, "ragged_dot_general (group sizes)")
        else:
            dn = p["dimension_numbers"]
        (lc, rc), (lb, rb) = dn
        head = set()
        where = _where(eqn)
        for side, (view, c, b, g) in enumerate(((vin[0], lc, lb, group[0]), (vin[1], rc, rb, group[1]))):
            if not view:
                continue
            n = _ndim(eqn.invars[side])
            words = ["out"] * n
            for a in c:
                words[a] = "in"
            for a in (*b, *g):
                words[a] = "layer"
            for part in view:
                layout = _layout(part, words, self.ndims[part.leaf])
                self.use([part], eqn.primitive.name, layout, where)
                head.add(part.leaf)
        return [None], [frozenset(head)]

    def scan(self, eqn, vin: list, min_: list) -> tuple[list, list]:
        p = eqn.params
        n_c, n_carry = scan_counts(p)
        body = p["jaxpr"]
        consts, carry, xs = vin[:n_c], vin[n_c:n_c + n_carry], vin[n_c + n_carry:]
        for v in carry:
            if v:
                self.other(v, eqn, "scan (carry)")
        xs_in = []
        for v in xs:
            if v:
                v = tuple(q.moved(q.axes[1:], q.axes[0]) for q in v)
            xs_in.append(v)
        in_views = list(consts) + [None] * n_carry + xs_in
        return self._loop(eqn, body, in_views, min_, n_c, n_carry, lambda outs: outs[:n_carry])

    def while_(self, eqn, vin: list, min_: list) -> tuple[list, list]:
        p = eqn.params
        n_cc, n_bc = p["cond_nconsts"], p["body_nconsts"]
        cond_c, body_c, carry = vin[:n_cc], vin[n_cc:n_cc + n_bc], vin[n_cc + n_bc:]
        for v in carry:
            if v:
                self.other(v, eqn, "while (carry)")
        self.walk(p["cond_jaxpr"], list(cond_c) + [None] * len(carry), list(min_[:n_cc]) + [_NONE] * len(carry))
        in_views = list(body_c) + [None] * len(carry)
        body_min = list(min_[n_cc:])
        return self._loop(eqn, p["body_jaxpr"], in_views, body_min, n_bc, len(carry), lambda outs: outs)

    def _loop(self, eqn, body, in_views, in_marks, n_c, n_carry, carry_out):
        """Walk a loop body until the marks of its carry stop growing."""
        in_marks = list(in_marks)
        while True:
            out_views, out_marks = self.walk(body, in_views, in_marks)
            grown = False
            for k, m in enumerate(carry_out(out_marks)):
                if not m <= in_marks[n_c + k]:
                    in_marks[n_c + k] = in_marks[n_c + k] | m
                    grown = True
            if not grown:
                break
        for v in out_views:
            if v:
                self.other(v, eqn, f"{eqn.primitive.name} (output)")
        return [None] * len(eqn.outvars), out_marks

    def cond(self, eqn, vin: list, min_: list) -> tuple[list, list]:
        if vin[0]:
            self.other(vin[0], eqn, "cond (predicate)")
        results = [self.walk(b, vin[1:], min_[1:]) for b in eqn.params["branches"]]
        views, marks = [], []
        for k in range(len(eqn.outvars)):
            vs = [r[0][k] for r in results]
            if vs[0] and all(v == vs[0] for v in vs):
                views.append(vs[0])
            else:
                for v in vs:
                    if v:
                        self.other(v, eqn, "cond (output)")
                views.append(None)
            marks.append(frozenset().union(*(r[1][k] for r in results)))
        return views, marks


def _layout(part: _Part, words: list[str], ndim: int) -> str | None:
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


# --- roles -----------------------------------------------------------------------------------------
def _role(uses: list[LeafUse]) -> tuple[str, str | None]:
    if not uses:
        return "unused", None
    dots = [u for u in uses if u.primitive in DOTS]
    gathers = [u for u in uses if u.primitive == "gather" and u.layout is None]
    others = [u for u in uses if u not in dots and u not in gathers]
    layouts = {u.layout for u in dots}
    if dots and (others or len(layouts) != 1 or None in layouts):
        return "conflict", None
    if dots:
        return ("tied_head" if gathers else "linear"), layouts.pop()
    if gathers and not others:
        return "embedding", None
    return "other", None


# --- the entry point -------------------------------------------------------------------------------
def discover(fn: Callable, params: Any, *example_args: Any, **example_kwargs: Any) -> Discovery:
    """Reads the role and the kernel layout of every leaf of ``params`` off ``fn`` itself.

    ``fn(params, *example_args, **example_kwargs)`` is traced once with ``jax.ShapeDtypeStruct``
    placeholders for every array leaf (``params`` may itself be a tree of
    ``ShapeDtypeStruct``; nothing is computed). For each leaf ``W`` of shape
    ``(d_0, ..., d_{k-1})`` used as a ``dot_general`` operand, possibly after casts,
    transposes, reshapes, indexing or a ``scan`` over one of its axes, the layout names each
    ``d_i``: ``in`` (contracted with the activations), ``out`` (a free axis of the result) or
    ``layer`` (a batch / expert-group axis, or one indexed or scanned away before the dot). So
    ``x @ W`` with ``W: (in, out)`` gives ``"in out"``, ``x @ W.T`` gives ``"out in"``, and
    ``jnp.einsum("BTD,NDH->BTNH", x, W)`` gives ``"out in out"``.

    Args:
      fn: the model function, called as ``fn(params, *example_args, **example_kwargs)``, e.g.
        ``lambda p, ids: model(ids, params=p).logits``.
      params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``); its array leaves are
        the ones analysed, named as everywhere in lrtt (key path joined with ``/``).
      *example_args: example inputs (arrays or ``ShapeDtypeStruct``) of the shapes ``fn``
        expects; use more than one token for token ids, so that an embedding lookup reads as
        one. Non-array leaves are passed as they are (static).
      **example_kwargs: keyword inputs, likewise.

    Returns:
      A :class:`Discovery`: ``path -> layout`` for the ``linear`` and ``tied_head`` leaves, with
      a :class:`LeafInfo` for every leaf in ``.leaves``, ``.linear()`` (the kernels to adapt,
      the output head left out) and ``.conflicts()``.

    Raises:
      ValueError: ``params`` holds no array leaf.
      Exception: whatever tracing ``fn`` raised, with a note that the example inputs must match
        what ``fn`` expects.

    Example:
      >>> import jax.numpy as jnp, lrtt
      >>> params = {"up": {"kernel": jnp.ones((8, 16))}, "down": {"kernel": jnp.ones((8, 16))},
      ...           "scale": jnp.ones((8,))}
      >>> fn = lambda p, x: (x * p["scale"]) @ p["up"]["kernel"] @ p["down"]["kernel"].T
      >>> found = lrtt.discover(fn, params, jnp.ones((2, 8)))
      >>> dict(found)
      {'down/kernel': 'out in', 'up/kernel': 'in out'}
      >>> found.leaves["down/kernel"].head, found.leaves["scale"].role
      (True, 'other')
      >>> found.linear()
      ['up/kernel']
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    names, leaves = [], []
    for kp, leaf in flat:
        if is_array(leaf, abstract=True):
            names.append(path_str(kp))
            leaves.append(leaf)
    if not leaves:
        raise ValueError(
            "lrtt.discover: the params argument holds no array leaf (got "
            f"{type(params).__name__}); pass the parameter pytree (arrays or "
            "jax.ShapeDtypeStruct) as the first argument after fn, and the model inputs after it.")
    p_flat, p_def = jax.tree_util.tree_flatten(params)
    a_flat, a_def = jax.tree_util.tree_flatten((example_args, example_kwargs))
    p_dyn = [is_array(x, abstract=True) for x in p_flat]
    a_dyn = [is_array(x, abstract=True) for x in a_flat]
    placeholders = [placeholder(x) for x, d in zip(p_flat + a_flat, p_dyn + a_dyn) if d]

    def flat_fn(*values):
        it = iter(values)
        p_full = [next(it) if d else x for x, d in zip(p_flat, p_dyn)]
        a_full = [next(it) if d else x for x, d in zip(a_flat, a_dyn)]
        args, kwargs = jax.tree_util.tree_unflatten(a_def, a_full)
        return fn(jax.tree_util.tree_unflatten(p_def, p_full), *args, **kwargs)

    try:
        closed = jax.make_jaxpr(flat_fn)(*placeholders)
    except Exception as err:
        shapes = jax.tree_util.tree_map(
            lambda x: f"{tuple(x.shape)} {x.dtype}" if is_array(x, abstract=True) else repr(x), (example_args, example_kwargs))
        err.add_note(
            "lrtt.discover: tracing fn(params, *example_args, **example_kwargs) failed; the example "
            f"inputs must match what fn expects (got args/kwargs {shapes}).")
        raise

    walker = _Walker([len(leaf.shape) for leaf in leaves])
    in_views = [(_Part(i, tuple(leaf.shape), tuple((a,) for a in range(len(leaf.shape)))),)
                for i, leaf in enumerate(leaves)]
    in_views += [None] * (len(placeholders) - len(leaves))
    out_views, out_marks = walker.walk(closed.jaxpr, in_views, [_NONE] * len(placeholders))
    for v in out_views:
        if v:
            walker.use(v, "output", None, "returned by fn")
    heads = frozenset().union(*out_marks)

    infos = {}
    for i, (name, leaf) in enumerate(zip(names, leaves)):
        role, layout = _role(walker.uses[i])
        infos[name] = LeafInfo(
            path=name, shape=tuple(int(d) for d in leaf.shape), role=role, layout=layout,
            head=i in heads and role in ("linear", "tied_head"), uses=tuple(walker.uses[i]))
    return Discovery(infos)
