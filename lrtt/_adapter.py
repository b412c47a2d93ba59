"""The adapter tree: the trainable leaves a method adds, keyed like the params they adapt.

An adapter is a nested dict that mirrors the params' paths; at each adapted path sits one
*entry*, a small frozen dataclass registered as a pytree node. Its array fields are the
trainable leaves; its static fields (scale, sizes) ride in the tree structure, so an adapter is
self-describing and two adapters of different configs never share a tree structure.

Each entry type owns its math (:class:`Entry`): whether it fits the leaf it sits at
(``misfit``), the leaf :func:`lrtt.wrap` puts there (``factored``), its dense update and merged
value (``delta``, ``merged``, ``unmerged``) and its sharding (``partition_specs``). A new method
with a new entry type is one module: subclass :class:`Entry`, register it with :func:`register_entry`.

=================  ==========================================  ==============================
entry              arrays (``*stack`` = leading layer axes)    meaning at the adapted leaf
=================  ==========================================  ==============================
``LoraFactors``    ``a: (*stack, in, r)``, ``b: (*stack, r, out)``   ``W0 + scale·A·B``
``TTFactors``      TT cores of ``A (in, r)`` and ``B (r, out)``      ``W0 + scale·TT_A·TT_B``
``BottleneckAdapter``  TT cores of ``D (n, m)``, ``U (m, n)``, biases   ``h + f(h)`` / ``(x + f(x))·W0``
``TTKernel``       TT cores of the whole kernel ``(in, out)``   the kernel itself, tensorized
``Trainable``      ``value`` (the leaf's shape)                 the leaf itself, trained in full
=================  ==========================================  ==============================
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from lrtt._errors import Error
from lrtt._leaves import AdapterLeaf, LowRankLeaf
from lrtt._paths import named_leaves
from lrtt._targets import AXIS_KINDS
from lrtt.tt import _core as _tt

NOT_MERGEABLE = (
    "{method} cannot be merged into the base weights: its adapter f(h) = s·U(act(D(h))) is "
    "non-linear, so no dense ΔW reproduces it. Run the model through lrtt.factored(fn) with "
    "lrtt.wrap(method, params, adapter) instead (zero-overhead export exists for LoRA and "
    "LorettaRep only)."
)


class NotMergeableError(Error, ValueError):
    """The adapter has no dense ``ΔW`` (a non-linear bottleneck): run it factored instead."""


@dataclasses.dataclass(frozen=True)
class Site:
    """Where :func:`lrtt.wrap` applies an entry: the leaf and what ``wrap`` knows about it.

    Attributes:
      path: the leaf's ``/``-joined path.
      w0: the frozen leaf (a quantized one as its ``qwix.QArray``).
      target: the leaf read as ``(*stack, in, out)`` matrices (a ``Target``: path, shape, layout); None for
        an entry that takes its leaf as it is (``Entry.matrix_target = False``).
      leaves: every leaf of the params by path (a bottleneck folds its sibling ``bias``).
      key: typed PRNG keys of shape ``target.stack`` for dropout on the entry's input, or None.
      dropout: the dropout rate that goes with ``key``.
      ids: int32 ``(batch,)`` member ids when the adapter is a stack (:func:`lrtt.stack`).
    """

    path: str
    w0: Any
    target: Any
    leaves: Mapping[str, Any]
    key: Any = None
    dropout: float = 0.0
    ids: Any = None


class Entry:
    """Base of the adapter entries: what one entry means at the leaf it adapts.

    Subclasses are frozen dataclasses registered as pytrees (:func:`entry`); they override the
    methods below that apply to them. ``target`` is a ``Target``, the leaf read as
    ``(*stack, in, out)`` matrices through the method's layout.
    """

    matrix_target: ClassVar[bool] = True
    """True: the entry reads its leaf as ``(*stack, in, out)`` matrices and gets a ``target``;
    False: it takes the leaf as it is (a leaf trained in full)."""
    low_rank: ClassVar[bool] = False
    """True: ``ΔW = scale · A·B`` with ``(A, B) = factor_matrices()`` (PEFT's LoRA form; stacks)."""
    whole_leaf: ClassVar[bool] = False
    """True: the entry is its leaf, trained in full (PEFT's ``modules_to_save``); ``value``."""
    mergeable: ClassVar[bool] = True
    """False: no dense ``ΔW`` reproduces the entry (``merged`` raises)."""

    def misfit(self, target: Any, leaf: Any) -> str | None:
        """None when the entry fits its leaf; otherwise what differs, in words."""
        raise NotImplementedError(f"{type(self).__name__} does not say whether it fits its leaf (misfit)")

    def factored(self, site: Site) -> Any:
        """The leaf :func:`lrtt.wrap` puts at ``site``: an adapted leaf or a dense array."""
        raise NotImplementedError(f"{type(self).__name__} has no factored form")

    def delta(self, target: Any) -> jax.Array | None:
        """``ΔW`` in the leaf's own layout and shape, or None when the entry is no additive update."""
        return None

    def merged(self, w0: jax.Array, target: Any) -> jax.Array:
        """The leaf's merged value from its float ``w0`` (float32 sums; the caller casts)."""
        raise NotImplementedError(f"{type(self).__name__} has no merged form")

    def unmerged(self, w: jax.Array, target: Any) -> jax.Array:
        """The inverse of :meth:`merged`: ``w`` as found when the base cannot be recovered."""
        return w

    def partition_specs(self, kernel_spec: Any, target: Any) -> Any:
        """A ``PartitionSpec`` per array of the entry, given its kernel's (default: replicated)."""
        return jax.tree.map(lambda _: P(), self)


def register_entry(data: tuple[str, ...], meta: tuple[str, ...] = ()):
    """Class decorator: a frozen dataclass pytree whose ``data`` fields are its arrays (the
    trainable leaves) and ``meta`` fields static (they ride in the tree structure)."""

    def register(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))

    return register


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def as_dtype(x: jax.Array, dtype) -> jax.Array:
    """``x`` in ``dtype``; no conversion is traced when it already is."""
    return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def scaled_product(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale · A @ B`` over the stack axes, in the promoted dtype of the factors.

    Written with ``lax`` primitives: under a trace each ``jnp`` operator is a nested ``jit`` of its
    own, which on LLaMA-2-70B's 560 targets costs more than the whole rest of ``merge``.
    """
    dtype = jnp.promote_types(a.dtype, b.dtype)
    a, b = as_dtype(a, dtype), as_dtype(b, dtype)
    stack = tuple(range(a.ndim - 2))
    dw = lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 2,)), (stack, stack)), precision=lax.Precision.HIGHEST)
    return lax.mul(dw, np.asarray(scale, dtype))


def _matrix_misfit(what: str, stack: tuple, n_in: int, n_out: int, target: Any) -> str | None:
    if (tuple(stack), n_in, n_out) == (tuple(target.stack), target.n_in, target.n_out):
        return None
    return (f"{what} is a {tuple(stack) + (n_in, n_out)} (*stack, in, out) matrix but the leaf is a "
            f"{tuple(target.stack) + (target.n_in, target.n_out)} one (layout {str(target.layout)!r})")


def _group_spec(specs: tuple) -> Any:
    """The spec of a flattened axis group: its first axis's spec if only that one is sharded."""
    if all(s is None for s in specs[1:]):
        return specs[0] if specs else None
    return None  # an inner axis is sharded: not expressible on the flattened axis; replicate


class _LowRank(Entry):
    """An entry whose update is ``ΔW = scale · A·B`` (LoRA, LoRETTA_rep)."""

    low_rank = True
    scale: float

    def factor_matrices(self):
        raise NotImplementedError

    def factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of :meth:`factor_matrices`' ``(A, B)``, without forming them."""
        a, b = jax.eval_shape(type(self).factor_matrices, self)
        return tuple(a.shape), tuple(b.shape)

    def misfit(self, target, leaf):
        a, b = self.factor_shapes()
        if a[:-2] != b[:-2] or a[-1] != b[-2]:
            return f"its factors {a}·{b} do not multiply"
        return _matrix_misfit(f"its ΔW (A {a}·B {b})", a[:-2], a[-2], b[-1], target)

    def factored(self, site):
        if site.ids is None:
            a, b = self.factor_matrices()
            rows = None
        else:
            a, b, rows = per_row_factors(self, site.ids, len(site.target.stack))
        return LowRankLeaf(site.w0, a, b, site.key, scale=float(self.scale), layout=site.target.layout,
                           path=site.path, dropout=site.dropout if site.key is not None else 0.0, rows=rows)

    def delta(self, target):
        a, b = self.factor_matrices()
        return target.layout.from_matrix(scaled_product(a, b, self.scale), target.shape)

    def merged(self, w0, target):
        return lax.add(as_dtype(w0, jnp.float32), as_dtype(self.delta(target), jnp.float32))

    def unmerged(self, w, target):
        return lax.sub(as_dtype(w, jnp.float32), as_dtype(self.delta(target), jnp.float32))

    # --- a stack of adapters (lrtt.stack): members of one entry type, one slot each ---
    @classmethod
    def aligned(cls, members: list, path: str) -> list:
        """``members`` made stackable (equal structure and shapes), or an error naming the difference."""
        first = members[0]
        for k, e in enumerate(members):
            same = (jax.tree.structure(e) == jax.tree.structure(first)
                    and [x.shape for x in jax.tree.leaves(e)] == [x.shape for x in jax.tree.leaves(first)])
            if not same:
                raise ValueError(
                    f"adapter {k}'s {cls.__name__} at {path!r} differ from adapter 0's (shapes, ranks or "
                    f"scale): {[tuple(x.shape) for x in jax.tree.leaves(e)]} vs "
                    f"{[tuple(x.shape) for x in jax.tree.leaves(first)]}. Stack adapters of one "
                    "configuration, or convert them to LoRA first (lrtt.combine(method, [adapter], [1.0], how='cat')).")
        return members

    def fitted_to(self, slot: "_LowRank", path: str) -> "_LowRank":
        """This member in the form of a stack's ``slot`` (its arrays without the slot axis)."""
        return self


@register_entry(("a", "b"), ("scale",))
class LoraFactors(_LowRank):
    """LoRA factors: ``ΔW = scale · a @ b`` with ``a: (*stack, in, r)``, ``b: (*stack, r, out)``."""

    a: Any
    b: Any
    scale: float

    def factor_matrices(self):
        return self.a, self.b

    def factor_shapes(self):
        return tuple(self.a.shape), tuple(self.b.shape)

    def padded(self, rank: int, scale: float) -> "LoraFactors":
        """The same ``ΔW`` at a higher ``rank`` (zero columns of ``A``, zero rows of ``B``: exact)
        and another ``scale`` (folded into ``B``: ``s_k·A·B = scale·A·(s_k/scale·B)``)."""
        a, b = jnp.asarray(self.a), jnp.asarray(self.b)
        extra = rank - a.shape[-1]
        if extra:
            a = jnp.concatenate([a, jnp.zeros((*a.shape[:-1], extra), a.dtype)], axis=-1)
            b = jnp.concatenate([b, jnp.zeros((*b.shape[:-2], extra, b.shape[-1]), b.dtype)], axis=-2)
        if scale != self.scale:
            b = b * jnp.asarray(self.scale / scale, b.dtype)
        return LoraFactors(a, b, scale=scale)

    @classmethod
    def aligned(cls, members, path):
        """Members padded to the largest rank; one scale (folded into ``B`` where they differ)."""
        shapes = {(tuple(e.a.shape[:-1]), tuple(e.b.shape[:-2]), e.b.shape[-1]) for e in members}
        if len(shapes) > 1:
            raise ValueError(f"the adapters' factors at {path!r} fit different leaves ({sorted(shapes)}): "
                             "stack adapters made for one model.")
        rank = max(e.a.shape[-1] for e in members)
        scales = {float(e.scale) for e in members}
        scale = scales.pop() if len(scales) == 1 else 1.0
        return [e.padded(rank, scale) for e in members]

    def fitted_to(self, slot, path):
        rank = slot.a.shape[-1]
        if self.a.shape[-1] > rank:
            raise ValueError(f"the adapter's rank at {path!r} is {self.a.shape[-1]}, more than the stack's {rank}: "
                             f"stack(method, adapters) with this adapter among them (the stack pads to the largest rank).")
        return self.padded(rank, float(slot.scale))

    def partition_specs(self, kernel_spec, target):
        """``A: (*stack, in, r)`` takes the kernel's stack specs and its in-axis spec, ``B`` the
        stack specs and the out-axis spec (a flattened group keeps its first axis's spec)."""
        layout = target.layout
        spec = tuple(kernel_spec) if kernel_spec is not None else ()
        spec = spec + (None,) * (layout.ndim - len(spec))
        stack, ins, outs = (tuple(spec[a] for a in layout.axes(k)) for k in AXIS_KINDS)
        return LoraFactors(P(*stack, _group_spec(ins), None), P(*stack, None, _group_spec(outs)), scale=self.scale)


@register_entry(("a", "b"), ("scale", "n_in", "rank", "n_out"))
class TTFactors(_LowRank):
    """LoRETTA_rep factors: ``ΔW = scale · TT_A @ TT_B``, each matrix held as TT cores.

    ``a``: cores of ``TT_A: (in, rank)``; ``b``: cores of ``TT_B: (rank, out)``; each core
    ``(*stack, r_{i-1}, k_i, r_i)``.
    """

    a: tuple
    b: tuple
    scale: float
    n_in: int
    rank: int
    n_out: int

    def factor_matrices(self):
        """``(A, B)`` materialized from the cores: ``(*stack, in, r)``, ``(*stack, r, out)``."""
        return (
            _tt.materialize(self.a, self.n_in, self.rank),
            _tt.materialize(self.b, self.rank, self.n_out),
        )

    def factor_shapes(self):
        return _tt.matrix_shape(self.a, self.n_in, self.rank), _tt.matrix_shape(self.b, self.rank, self.n_out)


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


@register_entry(("down", "down_bias", "up", "up_bias"), ("position", "scale", "activation", "features", "bottleneck"))
class BottleneckAdapter(Entry):
    """LoRETTA_adp tensorized bottleneck: ``f(h) = scale · (act(h @ D + d) @ U + u)``.

    ``down``: TT cores of ``D: (features, bottleneck)``; ``up``: TT cores of
    ``U: (bottleneck, features)``; biases ``d: (*stack, bottleneck)``, ``u: (*stack, features)``.
    ``position`` is ``"after"`` (``y = h + f(h)`` with ``h = x @ W0 + b0``) or ``"before"``
    (``y = (x + f(x)) @ W0 + b0``).
    """

    down: tuple
    down_bias: Any
    up: tuple
    up_bias: Any
    position: str
    scale: float
    activation: str
    features: int
    bottleneck: int
    mergeable = False

    def matrices(self):
        """``(D, d, U, u)`` with ``D``, ``U`` materialized from their cores."""
        down = _tt.materialize(self.down, self.features, self.bottleneck)
        up = _tt.materialize(self.up, self.bottleneck, self.features)
        return down, self.down_bias, up, self.up_bias

    def __call__(self, h):
        """``f(h)`` for ``h: (..., features)`` (no stack axes: slice a stacked adapter first)."""
        down, d, up, u = self.matrices()
        z = ACTIVATIONS[self.activation](h @ down.astype(h.dtype) + d.astype(h.dtype))
        return self.scale * (z @ up.astype(h.dtype) + u.astype(h.dtype))

    def misfit(self, target, leaf):
        down = _tt.matrix_shape(self.down, self.features, self.bottleneck)
        up = _tt.matrix_shape(self.up, self.bottleneck, self.features)
        n = target.n_out if self.position == "after" else target.n_in
        side = "out" if self.position == "after" else "in"
        stack = tuple(target.stack)
        if down[:-2] != stack or down[-2] != n or up[:-2] != stack or up[-1] != n:
            return (f"its bottleneck ({self.position} the product) maps {down} then {up} but the leaf "
                    f"has {stack} stacks of {n} {side} features (layout {str(target.layout)!r})")
        return None

    def _sibling_bias(self, site: Site):
        parent, _, _ = site.path.rpartition("/")
        bias = site.leaves.get(f"{parent}/bias" if parent else "bias")
        target = site.target
        if bias is None:
            return None
        if math.prod(bias.shape) != math.prod(target.stack) * target.n_out:
            raise ValueError(
                f"the bias {parent + '/bias'!r} of shape {tuple(bias.shape)} does not fit the kernel "
                f"{site.path!r} ({target.stack} stack, {target.n_out} outputs), so it cannot be folded into "
                "the after-linear adapter; rename it or adapt another leaf."
            )
        return bias

    def factored(self, site):
        b0 = self._sibling_bias(site) if self.position == "after" else None
        down, d, up, u = self.matrices()
        return AdapterLeaf(site.w0, b0, down, d, up, u, position=self.position, scale=float(self.scale),
                           activation=self.activation, layout=site.target.layout, path=site.path)

    def merged(self, w0, target):
        raise NotMergeableError(NOT_MERGEABLE.format(method="LorettaAdp"))


@register_entry(("cores",), ("n_in", "n_out"))
class TTKernel(Entry):
    """A kernel replaced by a trainable TT matrix ``(in, out)`` (LoRETTA's tensorized classifier)."""

    cores: tuple
    n_in: int
    n_out: int

    def matrix(self):
        return _tt.materialize(self.cores, self.n_in, self.n_out)

    def misfit(self, target, leaf):
        shape = _tt.matrix_shape(self.cores, self.n_in, self.n_out)
        if shape[-2:] != (target.n_in, target.n_out) or math.prod(shape) != math.prod(target.shape):
            return (f"its TT matrix is {shape} but the leaf is a {tuple(target.stack) + (target.n_in, target.n_out)} "
                    f"(*stack, in, out) matrix (layout {str(target.layout)!r})")
        return None

    def _in_layout(self, target, dtype):
        matrix = self.matrix().reshape(*target.stack, target.n_in, target.n_out)
        return target.layout.from_matrix(matrix, target.shape).astype(dtype)

    def factored(self, site):
        return self._in_layout(site.target, site.w0.dtype)

    def merged(self, w0, target):
        return self._in_layout(target, jnp.float32)


@register_entry(("value",))
class Trainable(Entry):
    """A leaf trained in full (layer norms, a classification head: PEFT's ``modules_to_save``)."""

    value: Any
    matrix_target = False
    whole_leaf = True

    def misfit(self, target, leaf):
        if _shape_of(self.value) != _shape_of(leaf):
            return f"its value is {_shape_of(self.value)} but the leaf is {_shape_of(leaf)}"
        return None

    def factored(self, site):
        return self.value.astype(site.w0.dtype)

    def merged(self, w0, target):
        return self.value

    def partition_specs(self, kernel_spec, target):
        return Trainable(kernel_spec if kernel_spec is not None else P())


def per_row_factors(entry: _LowRank, ids: jax.Array, n_stack: int):
    """``(a, b, rows)`` of one stacked low-rank entry for a batch: ``a: (*stack, S, in, R)``,
    ``b: (*stack, S, R, out)`` and ``rows: (batch,)`` (the slot of each row, ``-1``: none).

    The members the batch uses are gathered first — ``S = min(K, batch)`` slots, so the cost of
    a call does not grow with the stack's size — and, for LorettaRep, each slot's ``A``/``B``
    formed from its cores once, never per row.
    """
    size = jax.tree.leaves(entry)[0].shape[0]
    n_slots = min(size, ids.shape[0])
    valid = jnp.maximum(ids, 0)
    used = jnp.unique(valid, size=n_slots, fill_value=jnp.max(valid))  # sorted, padded with the largest
    rows = jnp.where(ids < 0, -1, jnp.searchsorted(used, valid).astype(jnp.int32))
    members = jax.tree.map(lambda x: x[used], entry)
    a, b = jax.vmap(lambda e: e.factor_matrices())(members)
    return jnp.moveaxis(a, 0, n_stack), jnp.moveaxis(b, 0, n_stack), rows


ENTRY_TYPES = (LoraFactors, TTFactors, BottleneckAdapter, TTKernel, Trainable)
"""lrtt's own entry types (any :class:`Entry` subclass is an entry)."""


def is_entry(x: Any) -> bool:
    return isinstance(x, Entry)


def entries(adapter: Any) -> dict[str, Any]:
    """``{path: entry}`` of an adapter tree (the inverse of :func:`lrtt._paths.nest`)."""
    return dict(named_leaves(adapter, is_leaf=is_entry))
