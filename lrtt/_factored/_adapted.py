"""Views: an adapted value as :func:`lrtt.factored`'s interpreter carries it through a model.

An adapted leaf (:mod:`lrtt._leaves`) enters the interpreter as a :class:`View`: its frozen
``w0`` as the model has transformed it so far, with each part of the adapter kept in step.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import jax
import jax.numpy as jnp

from lrtt._leaves import AdaptedLeaf, LowRankLeaf, QuantizedLeaf
from lrtt._paths import is_quantized
from lrtt._quant import dequantize_leaf
from lrtt._targets import IN, LAYER, OUT

__all__ = ["IN", "LAYER", "OUT", "LeafKind", "Meta", "View"]


class LeafKind(enum.Enum):
    """What an adapted leaf carries, as the interpreter's rules tell them apart."""

    LOW_RANK = "low_rank"  # W0 + scale·A·B (LoRA, LorettaRep)
    ADAPTER = "adapter"  # a LoRETTA_adp bottleneck before or after x·W0
    QUANTIZED = "quantized"  # a quantized W0 alone, dequantized at each use




@dataclasses.dataclass(frozen=True)
class Meta:
    """What the interpreter needs to know of the leaf a view came from (all static)."""

    kind: LeafKind
    path: str
    scale: float
    dropout: float = 0.0
    position: str = ""
    activation: str = ""


@dataclasses.dataclass(frozen=True)
class View:
    """The current form of an adapted value: ``w0`` as the model has transformed it so far.

    ``kinds[k]`` says what axis ``k`` of ``w0`` is: ``LAYER`` (stack), ``IN`` or ``OUT``
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
            return cls(Meta(LeafKind.QUANTIZED, leaf.path, 1.0), leaf.w0, (LAYER,) * leaf.ndim, {}, {})
        layout = leaf.layout
        parts = leaf.parts()
        if isinstance(leaf, LowRankLeaf):
            meta = Meta(LeafKind.LOW_RANK, leaf.path, leaf.scale, dropout=leaf.dropout if leaf.key is not None else 0.0)
        else:
            meta = Meta(LeafKind.ADAPTER, leaf.path, leaf.scale, position=leaf.position, activation=leaf.activation)
        kinds = tuple(layout.kinds)
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
        n_s, n_g = len(self.axes(LAYER)), len(self.axes(group)) if group else 0
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
            parts[name] = part.reshape(new.group_shape(LAYER) + pre + gshape + post)
        return dataclasses.replace(new, parts=parts)

    def transpose(self, w0, perm: tuple[int, ...]) -> "View":
        kinds = tuple(self.kinds[p] for p in perm)

        def order(kind):  # new order of this kind's axes, as positions among the old ones
            old = self.axes(kind)
            return [old.index(p) for p in perm if self.kinds[p] == kind]

        parts = {}
        for name, part in self.parts.items():
            group, pre, post = self.roles[name]
            s = order(LAYER)
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
        kinds = self.kinds[1:] if unstack else (LAYER,) + self.kinds if restack else self.kinds

        def rebuild(arrays):
            w0 = jax.tree.unflatten(w0_def, arrays[:n])
            return dataclasses.replace(self, w0=w0, kinds=kinds, parts=dict(zip(names, arrays[n:])))

        return arrays, rebuild

    def dense(self):
        """``W0 + scale·A·B`` in the view's current form (low-rank views; a quantized W0 alone
        is its float value)."""
        if self.meta.kind is LeafKind.QUANTIZED:
            return dequantize_leaf(self.w0)
        if self.meta.kind is not LeafKind.LOW_RANK:
            raise ValueError(NOT_DENSE.format(path=self.meta.path))
        if "rows" in self.parts:
            raise ValueError(NOT_DENSE_ROWS.format(path=self.meta.path))
        s_shape, i_shape, o_shape = self.group_shape(LAYER), self.group_shape(IN), self.group_shape(OUT)
        a = self.parts["a"].reshape(*s_shape, math.prod(i_shape), -1)
        b = self.parts["b"].reshape(*s_shape, -1, math.prod(o_shape))
        delta = self.meta.scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
        delta = delta.reshape(s_shape + i_shape + o_shape)
        order = self.axes(LAYER) + self.axes(IN) + self.axes(OUT)
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
