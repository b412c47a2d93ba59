"""Adapted leaves: a frozen kernel and its adapter held apart, standing in for the dense kernel.

:func:`wrap` replaces each adapted kernel of the params by an *adapted leaf*, a registered pytree
node that holds the frozen ``W0`` and the (small) factors and presents the dense leaf's
``shape``, ``dtype`` and ``ndim``. :func:`lrtt.factored` runs a model on such params without
ever forming ``W0 + ΔW``.

=================  ===========================================  ================================
leaf               arrays (``*stack`` = leading layer axes)     stands for
=================  ===========================================  ================================
``LowRankLeaf``    ``w0``, ``a: (*stack, in, r)``,               ``W0 + scale·A·B`` (LoRA, rep)
                   ``b: (*stack, r, out)``, dropout ``key``
``AdapterLeaf``    ``w0``, ``b0`` (sibling bias), ``D``, ``d``,  ``x·W0`` followed (``"after"``)
                   ``U``, ``u`` (``f(h) = s·(act(hD+d)U+u)``)     or preceded (``"before"``) by f
=================  ===========================================  ================================
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lrtt._adapter import BottleneckAdapter, LoraFactors, Trainable, TTFactors, TTKernel, entries
from lrtt._merge import _leaf_targets, check_covers
from lrtt._paths import is_quantized, named_leaves, quantized_array, replace_leaves
from lrtt._quant import dequantize_leaf
from lrtt._stack import AdapterStack, check_ids, per_row_factors
from lrtt._targets import Layout, Target


class AdaptedLeaf:
    """Base of the adapted leaves: a frozen ``w0`` plus trainable parts; looks like ``w0``."""

    w0: Any
    layout: Layout
    path: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w0.shape)

    @property
    def dtype(self):
        return self.w0.dtype

    @property
    def ndim(self) -> int:
        return len(self.w0.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def parts(self) -> dict[str, tuple[Any, tuple[str | None, int, int]]]:
        """``{name: (array, (group, pre, post))}``: each part as ``(*stack, *pre, *group, *post)``.

        ``group`` is ``"i"`` (the kernel's in axes, in the layout's own shape), ``"o"`` (its out
        axes) or None; ``pre``/``post`` count the fixed axes before and after the group.
        """
        raise NotImplementedError


def _register(data: tuple[str, ...], meta: tuple[str, ...]):
    def register(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))

    return register


@_register(("w0", "a", "b", "key", "rows"), ("scale", "layout", "path", "dropout"))
class LowRankLeaf(AdaptedLeaf):
    """``W0 + scale·A·B`` kept factored: ``a: (*stack, in, r)``, ``b: (*stack, r, out)``.

    ``key`` (optional): typed PRNG keys of shape ``stack`` for dropout on the adapter's input
    at rate ``dropout``.

    ``rows`` (optional, a stack of adapters): int32 ``(batch,)``, the slot of each batch row;
    then ``a: (*stack, S, in, r)``, ``b: (*stack, S, r, out)`` hold ``S`` slots and row ``i``
    computes ``x[i]·W0 + scale·(x[i]·A[rows[i]])·B[rows[i]]`` (``rows[i] = -1``: ``x[i]·W0``).
    """

    w0: Any
    a: Any
    b: Any
    key: Any
    scale: float
    layout: Layout
    path: str
    dropout: float = 0.0
    rows: Any = None

    def parts(self):
        stack, ins, outs = self.layout.split(self.w0.shape)
        rank = self.a.shape[-1]
        slots = () if self.rows is None else (self.a.shape[len(stack)],)  # a stack's slot axis, before the groups
        out = {
            "a": (self.a.reshape(*stack, *slots, *ins, rank), ("i", len(slots), 1)),
            "b": (self.b.reshape(*stack, *slots, rank, *outs), ("o", len(slots) + 1, 0)),
        }
        if self.rows is not None:  # the row ids, repeated over the stack axes
            out["rows"] = (jnp.broadcast_to(self.rows, (*stack, *self.rows.shape)), (None, 0, 1))
        if self.key is not None:
            out["key"] = (self.key, (None, 0, 0))
        return out


@_register(("w0",), ("path",))
class QuantizedLeaf(AdaptedLeaf):
    """A quantized frozen kernel (a ``qwix.QArray``) that no adapter touches; looks like the
    float array it stands for. ``lrtt.factored`` dequantizes it at each ``dot_general`` that
    consumes it."""

    w0: Any
    path: str

    def parts(self):
        return {}


@_register(
    ("w0", "b0", "down", "down_bias", "up", "up_bias"),
    ("position", "scale", "activation", "layout", "path"),
)
class AdapterLeaf(AdaptedLeaf):
    """A frozen kernel with a LoRETTA_adp bottleneck ``f(h) = s·(act(h·D + d)·U + u)``.

    ``position="after"``: the dot ``x·W0`` becomes ``x·W0 + f(x·W0 + b0)``, so that the model's
    own ``+ b0`` afterwards gives ``h + f(h)`` with ``h = x·W0 + b0`` (``b0``: the sibling
    ``bias`` leaf, or None). Features are the kernel's out axes: ``D: (*stack, out, m)``.
    ``position="before"``: ``x·W0`` becomes ``(x + f(x))·W0``; features are the in axes.
    """

    w0: Any
    b0: Any
    down: Any
    down_bias: Any
    up: Any
    up_bias: Any
    position: str
    scale: float
    activation: str
    layout: Layout
    path: str

    def parts(self):
        stack, ins, outs = self.layout.split(self.w0.shape)
        group, feats = ("o", outs) if self.position == "after" else ("i", ins)
        m = self.down.shape[-1]
        out = {
            "down": (self.down.reshape(*stack, *feats, m), (group, 0, 1)),
            "down_bias": (self.down_bias.reshape(*stack, m), (None, 0, 1)),
            "up": (self.up.reshape(*stack, m, *feats), (group, 1, 0)),
            "up_bias": (self.up_bias.reshape(*stack, *feats), (group, 0, 0)),
        }
        if self.b0 is not None:
            out["b0"] = (self.b0.reshape(*stack, *feats), (group, 0, 0))
        return out


def _as_typed_key(rng):
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)


def _check_factors(a, b, target: Target, slots: bool = False) -> None:
    stack = tuple(a.shape[:-3] if slots else a.shape[:-2])
    if a.shape[-2] != target.n_in or b.shape[-1] != target.n_out or stack != target.stack:
        raise ValueError(
            f"adapter factors of {target.path!r} are {tuple(a.shape)}·{tuple(b.shape)} but the leaf "
            f"is a {target.stack + (target.n_in, target.n_out)} (*stack, in, out) matrix (layout "
            f"{str(target.layout)!r}): the adapter was made for another model or layout; "
            "re-create it with method.init(key, params)."
        )


def _sibling_bias(path: str, base: dict[str, Any], target: Target):
    parent, _, _ = path.rpartition("/")
    bias = base.get(f"{parent}/bias" if parent else "bias")
    if bias is None:
        return None
    if math.prod(bias.shape) != math.prod(target.stack) * target.n_out:
        raise ValueError(
            f"the bias {parent + '/bias'!r} of shape {tuple(bias.shape)} does not fit the kernel "
            f"{path!r} ({target.stack} stack, {target.n_out} outputs), so it cannot be folded into "
            "the after-linear adapter; rename it or adapt another leaf."
        )
    return bias


def wrap(method: Any, params: Any, adapter: Any, *, rng: jax.Array | None = None, adapter_ids: Any = None) -> Any:
    """The params with every adapted leaf replaced by an adapted leaf (factors kept apart).

    Call it *inside* the function you differentiate, so that gradients reach the adapter::

        def loss(adapter):
            wrapped = lrtt.wrap(method, params, adapter)
            return lrtt.factored(model_fn)(wrapped, batch)

    ========================  ================================================================
    adapter entry             leaf in the result
    ========================  ================================================================
    ``LoraFactors``           ``LowRankLeaf(w0, a, b)``
    ``TTFactors``             ``LowRankLeaf(w0, TT_A, TT_B)`` (the small matrices, not ``ΔW``)
    ``BottleneckAdapter``     ``AdapterLeaf(w0, b0, D, d, U, u)``
    ``TTKernel``              the dense TT matrix, in the leaf's layout and dtype
    ``Trainable``             its value, in the leaf's dtype
    (none, quantized ``W0``)  ``QuantizedLeaf(w0)``: dequantized at each use
    ========================  ================================================================

    Args:
      method: the method that made ``adapter`` (its ``layouts`` and ``dropout`` are used).
      params: the frozen params (any pytree: linen dict, ``nnx.State``, transformers params).
      adapter: the adapter tree from ``method.init``.
      rng: a PRNG key for dropout on the adapter's input (used when ``method.dropout > 0``);
        each target gets its own keys, one per stacked layer. None: no dropout (evaluation).
      adapter_ids: with an :class:`lrtt.AdapterStack` (``lrtt.stack``) as ``adapter``: int32
        ``(batch,)``, the member each batch row runs with (``-1``: the base alone). The model's
        activations at each adapted product must have the batch as their first axis (outside
        the axes the product contracts), as ``(batch, seq, features)`` has.

    Returns:
      A tree with the structure of ``params``.

    Raises:
      ValueError: the adapter names leaves the params lack, its factors do not fit them, or it
        has no entry for a leaf the method selects in ``params`` (``method.plan(params)``): an
        adapter made for a model with fewer layers.
    """
    ids = None
    if isinstance(adapter, AdapterStack):
        if adapter_ids is None:
            raise ValueError("the adapter is a stack of adapters (lrtt.stack): give adapter_ids=, one member id "
                             "per batch row (-1: the base alone), or wrap one member (lrtt.member(stacked, k)).")
        ids = check_ids(adapter_ids, adapter.size)
        adapter = adapter.tree
    elif adapter_ids is not None:
        raise ValueError("adapter_ids= was given but the adapter is a single adapter: stack several with "
                         "lrtt.stack(method, adapters) to run each row with its own.")
    flat = entries(adapter)
    shaped = {p for p, e in flat.items() if not isinstance(e, Trainable)}
    targets = _leaf_targets(params, shaped, method.layouts)
    check_covers(method, params, set(flat))
    base = dict(named_leaves(params))
    rate = float(method.dropout)
    low_rank = [p for p, e in flat.items() if isinstance(e, (LoraFactors, TTFactors))]
    keys = {}
    if rng is not None and rate > 0.0 and low_rank:
        for path, k in zip(low_rank, jax.random.split(_as_typed_key(rng), len(low_rank))):
            stack = targets[path].stack  # one key per stacked layer: scan slices them
            keys[path] = jax.random.split(k, math.prod(stack)).reshape(stack)
    replacements = {}
    for path, entry in flat.items():
        if path not in base:
            raise ValueError(f"the adapter names {path!r}, which is not a leaf of the params.")
        w0 = base[path]
        if is_quantized(w0):
            w0 = quantized_array(w0)
        if isinstance(entry, (LoraFactors, TTFactors)):
            target = targets[path]
            if ids is None:
                a, b = entry.factor_matrices()
                rows = None
            else:
                a, b, rows = per_row_factors(entry, ids, len(target.stack))
            _check_factors(a, b, target, slots=rows is not None)
            replacements[path] = LowRankLeaf(
                w0, a, b, keys.get(path), scale=float(entry.scale), layout=target.layout, path=path,
                dropout=rate if path in keys else 0.0, rows=rows,
            )
        elif isinstance(entry, BottleneckAdapter):
            target = targets[path]
            b0 = _sibling_bias(path, base, target) if entry.position == "after" else None
            down, d, up, u = entry.matrices()
            replacements[path] = AdapterLeaf(
                w0, b0, down, d, up, u, position=entry.position, scale=float(entry.scale),
                activation=entry.activation, layout=target.layout, path=path,
            )
        elif isinstance(entry, TTKernel):
            target = targets[path]
            matrix = entry.matrix().reshape(*target.stack, target.n_in, target.n_out)
            replacements[path] = target.layout.from_matrix(matrix, w0.shape).astype(w0.dtype)
        elif isinstance(entry, Trainable):
            replacements[path] = entry.value.astype(w0.dtype)
    for path, w0 in base.items():  # quantized kernels no adapter touches: dequantized at use
        if path not in replacements and is_quantized(w0):
            replacements[path] = QuantizedLeaf(quantized_array(w0), path=path)
    return replace_leaves(params, replacements)


# --- views: an adapted value inside lrtt.factored's interpreter ---------------------------------
STACK, IN, OUT = "s", "i", "o"


@dataclasses.dataclass(frozen=True)
class Meta:
    """What the interpreter needs to know of the leaf a view came from (all static)."""

    kind: str  # "low_rank", "adapter" or "quantized" (a quantized W0 alone)
    path: str
    scale: float
    dropout: float = 0.0
    position: str = ""
    activation: str = ""


@dataclasses.dataclass(frozen=True)
class View:
    """The current form of an adapted value: ``w0`` as the model has transformed it so far.

    ``kinds[k]`` says what axis ``k`` of ``w0`` is: ``"s"`` (stack), ``"i"`` (in) or ``"o"``
    (out). Every part is kept as ``(*S, *pre, *G, *post)`` with ``S`` the stack axes and ``G``
    the axes of its group, each in the order they have in ``w0``: any transpose, reshape or
    slice of ``w0`` that keeps the groups apart is mirrored on the parts without densifying.
    """

    meta: Meta
    w0: Any
    kinds: tuple[str, ...]
    parts: dict
    roles: dict

    @classmethod
    def of(cls, leaf: AdaptedLeaf) -> "View":
        if isinstance(leaf, QuantizedLeaf):  # no parts: every axis may be sliced or reshaped freely
            return cls(Meta("quantized", leaf.path, 1.0), leaf.w0, (STACK,) * leaf.ndim, {}, {})
        layout = leaf.layout
        parts = leaf.parts()
        if isinstance(leaf, LowRankLeaf):
            meta = Meta("low_rank", leaf.path, leaf.scale, dropout=leaf.dropout if leaf.key is not None else 0.0)
        else:
            meta = Meta("adapter", leaf.path, leaf.scale, position=leaf.position, activation=leaf.activation)
        kinds = tuple({"layer": STACK, "in": IN, "out": OUT}[k] for k in layout.kinds)
        return cls(meta, leaf.w0, kinds,
                   {k: v[0] for k, v in parts.items()}, {k: v[1] for k, v in parts.items()})

    # -- axis bookkeeping
    def axes(self, kind: str) -> list[int]:
        return [k for k, kk in enumerate(self.kinds) if kk == kind]

    def group_shape(self, kind: str) -> tuple[int, ...]:
        return tuple(self.w0.shape[k] for k in self.axes(kind))

    def _split(self, name: str):
        """``(stack, pre, group, post)`` shapes of one part."""
        group, pre, post = self.roles[name]
        shape = tuple(self.parts[name].shape)
        n_s, n_g = len(self.axes(STACK)), len(self.axes(group)) if group else 0
        return shape[:n_s], shape[n_s:n_s + pre], shape[n_s + pre:n_s + pre + n_g], shape[n_s + pre + n_g:]

    def with_w0(self, w0) -> "View":
        """The same view over a converted ``w0`` (same shape)."""
        return dataclasses.replace(self, w0=w0)

    def relayout(self, w0, kinds: tuple[str, ...]) -> "View":
        """The view of a reshaped ``w0`` whose groups keep their order (reshape, squeeze)."""
        new = dataclasses.replace(self, w0=w0, kinds=tuple(kinds))
        parts = {}
        for name, part in self.parts.items():
            group, _, _ = self.roles[name]
            _, pre, _, post = self._split(name)
            gshape = new.group_shape(group) if group else ()
            parts[name] = part.reshape(new.group_shape(STACK) + pre + gshape + post)
        return dataclasses.replace(new, parts=parts)

    def transpose(self, w0, perm: tuple[int, ...]) -> "View":
        kinds = tuple(self.kinds[p] for p in perm)

        def order(kind):  # new order of this kind's axes, as positions among the old ones
            old = self.axes(kind)
            return [old.index(p) for p in perm if self.kinds[p] == kind]

        parts = {}
        for name, part in self.parts.items():
            group, pre, post = self.roles[name]
            s = order(STACK)
            n_s = len(s)
            g = order(group) if group else []
            full = s + list(range(n_s, n_s + pre)) + [n_s + pre + j for j in g]
            full += list(range(len(full), part.ndim))
            parts[name] = part.transpose(full) if full != list(range(part.ndim)) else part
        return dataclasses.replace(self, w0=w0, kinds=kinds, parts=parts)

    @property
    def signature(self) -> tuple:
        """What a rebuilt view takes from this one besides its arrays (static, hashable)."""
        return self.meta, self.kinds, tuple(sorted(self.roles.items()))

    def map_stack(self, w0, kinds: tuple[str, ...], fn) -> "View":
        """A view whose parts are ``fn(part)`` (a slice along the stack axes)."""
        parts = {name: fn(part) for name, part in self.parts.items()}
        return dataclasses.replace(self, w0=w0, kinds=tuple(kinds), parts=parts)

    def flatten(self, *, unstack: bool = False, restack: bool = False):
        """``(arrays, rebuild)``: the view's arrays, and a function that makes a view of new ones.

        ``unstack``: the rebuilt view lacks the leading stack axis (a scan slices it off);
        ``restack``: it gains a leading stack axis (a scan stacks its outputs).
        """
        names = sorted(self.parts)
        w0_leaves, w0_def = jax.tree.flatten(self.w0)  # a quantized W0: its values and scales
        n = len(w0_leaves)
        arrays = w0_leaves + [self.parts[name] for name in names]
        kinds = self.kinds[1:] if unstack else (STACK,) + self.kinds if restack else self.kinds

        def rebuild(arrays):
            w0 = jax.tree.unflatten(w0_def, arrays[:n])
            return dataclasses.replace(self, w0=w0, kinds=kinds, parts=dict(zip(names, arrays[n:])))

        return arrays, rebuild

    def dense(self):
        """``W0 + scale·A·B`` in the view's current form (low-rank views; a quantized W0 alone
        is its float value)."""
        if self.meta.kind == "quantized":
            return dequantize_leaf(self.w0)
        if self.meta.kind != "low_rank":
            raise ValueError(NOT_DENSE.format(path=self.meta.path))
        if "rows" in self.parts:
            raise ValueError(NOT_DENSE_ROWS.format(path=self.meta.path))
        s_shape, i_shape, o_shape = self.group_shape(STACK), self.group_shape(IN), self.group_shape(OUT)
        a = self.parts["a"].reshape(*s_shape, math.prod(i_shape), -1)
        b = self.parts["b"].reshape(*s_shape, -1, math.prod(o_shape))
        delta = self.meta.scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
        delta = delta.reshape(s_shape + i_shape + o_shape)
        order = self.axes(STACK) + self.axes(IN) + self.axes(OUT)
        delta = delta.transpose([order.index(k) for k in range(len(order))])
        w0 = dequantize_leaf(self.w0) if is_quantized(self.w0) else self.w0
        return (w0.astype(jnp.float32) + delta.astype(jnp.float32)).astype(w0.dtype)


NOT_DENSE = (
    "the adapted leaf {path!r} carries a LoRETTA_adp adapter f(h) = s·U(act(D(h))), which is "
    "non-linear: no dense weight reproduces it, so it cannot be materialized even with "
    "materialize=True. Only a dot_general with this kernel can apply it; exclude the leaf from "
    "`after`/`before` if the model uses it otherwise."
)

NOT_DENSE_ROWS = (
    "the adapted leaf {path!r} runs a stack of adapters, one per batch row (adapter_ids=): no one "
    "dense weight stands for it, so only a dot_general of the batch's activations with this kernel "
    "can apply it. Merge one member (lrtt.merge(method, params, lrtt.member(stacked, k))) where the "
    "model uses the kernel otherwise."
)
