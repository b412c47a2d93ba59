"""The adapter tree: the trainable leaves a method adds, keyed like the params they adapt.

An adapter is a nested dict that mirrors the params' paths; at each adapted path sits one
*entry*, a small frozen dataclass registered as a pytree node. Its array fields are the
trainable leaves; its static fields (scale, sizes) ride in the tree structure, so an adapter is
self-describing and two adapters of different configs never share a tree structure.

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
from typing import Any

import jax
import jax.numpy as jnp

from lrtt._paths import named_leaves
from lrtt.tt import _core as _tt


def _entry(data: tuple[str, ...], meta: tuple[str, ...] = ()):
    def register(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))

    return register


@_entry(("a", "b"), ("scale",))
class LoraFactors:
    """LoRA factors: ``ΔW = scale · a @ b`` with ``a: (*stack, in, r)``, ``b: (*stack, r, out)``."""

    a: Any
    b: Any
    scale: float

    def factor_matrices(self):
        return self.a, self.b


@_entry(("a", "b"), ("scale", "n_in", "rank", "n_out"))
class TTFactors:
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


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


@_entry(("down", "down_bias", "up", "up_bias"), ("position", "scale", "activation", "features", "bottleneck"))
class BottleneckAdapter:
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


@_entry(("cores",), ("n_in", "n_out"))
class TTKernel:
    """A kernel replaced by a trainable TT matrix ``(in, out)`` (LoRETTA's tensorized classifier)."""

    cores: tuple
    n_in: int
    n_out: int

    def matrix(self):
        return _tt.materialize(self.cores, self.n_in, self.n_out)


@_entry(("value",))
class Trainable:
    """A leaf trained in full (layer norms, a classification head: PEFT's ``modules_to_save``)."""

    value: Any


ENTRY_TYPES = (LoraFactors, TTFactors, BottleneckAdapter, TTKernel, Trainable)


def is_entry(x: Any) -> bool:
    return isinstance(x, ENTRY_TYPES)


def entries(adapter: Any) -> dict[str, Any]:
    """``{path: entry}`` of an adapter tree (the inverse of :func:`lrtt._paths.nest`)."""
    return dict(named_leaves(adapter, is_leaf=is_entry))
