"""Adapted leaves: a frozen kernel and its adapter held apart, standing in for the dense kernel.

:func:`lrtt.wrap` replaces each adapted kernel of the params by an *adapted leaf*, a registered
pytree node that holds the frozen ``W0`` and the (small) factors and presents the dense leaf's
``shape``, ``dtype`` and ``ndim``. :func:`lrtt.factored` runs a model on such params without
ever forming ``W0 + ΔW``. Each adapter entry makes its own leaf (``Entry.factored``).

=================  ===========================================  ================================
leaf               arrays (``*stack`` = leading layer axes)     stands for
=================  ===========================================  ================================
``LowRankLeaf``    ``w0``, ``a: (*stack, in, r)``,               ``W0 + scale·A·B`` (LoRA, rep)
                   ``b: (*stack, r, out)``, dropout ``key``
``AdapterLeaf``    ``w0``, ``b0`` (sibling bias), ``D``, ``d``,  ``x·W0`` followed (``"after"``)
                   ``U``, ``u`` (``f(h) = s·(act(hD+d)U+u)``)     or preceded (``"before"``) by f
``QuantizedLeaf``  ``w0`` (a ``qwix.QArray``)                   its float value, dequantized at use
=================  ===========================================  ================================
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lrtt._targets import IN, OUT, Layout


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

        ``group`` is ``IN`` (the kernel's in axes, in the layout's own shape), ``OUT`` (its out
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
            "a": (self.a.reshape(*stack, *slots, *ins, rank), (IN, len(slots), 1)),
            "b": (self.b.reshape(*stack, *slots, rank, *outs), (OUT, len(slots) + 1, 0)),
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
        group, feats = (OUT, outs) if self.position == "after" else (IN, ins)
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
