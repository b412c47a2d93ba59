"""The skinny products of factored execution, with backward passes laid out for speed.

``low_rank_add(base, x, a, b)`` is ``base + scale·(x @ a) @ b`` on 2-D views (``x: (m, k)``,
``a: (k, r)``, ``b: (r, n)``, ``base: (m, n)`` the model's own ``x @ W0``) with a hand-written
VJP. Two layouts matter on XLA CPU (measured on GPT-2-small layers, see docs/factored.md):

* a skinny product is several times faster when its long side is the *last* axis of the result
  (docs/factored.md, "What was changed to get here"): the VJP forms ``dB = tᵀ·g: (r, n)`` and ``dAᵀ = gtᵀ·x: (r, k)``, the latter
  behind an ``optimization_barrier`` so that XLA cannot fold the small transpose back into the
  product (which would bring back the slow ``(k, r)`` orientation);
* for ``r <= FUSED_MAX_RANK`` the rank-``r`` products ``t @ b: (m, n)`` (forward) and
  ``gt @ aᵀ: (m, k)`` (backward) are written as one broadcast multiply reduced over ``r``
  (``sum_j u[:, j, None] * v[None, j, :]``), which XLA fuses with the add of the base product
  (forward) or of the base's input gradient (backward): one pass over the ``(m, n)`` /
  ``(m, k)`` arrays instead of a product, then an add. (Written as ``r`` separate
  multiply-adds it ran as fast but gave XLA ``r`` times the instructions: GPT-2 small's LoRA
  step compiled in 4.6 s against 3.1 s, docs/factored.md.)

``bottleneck(h, down, d, up, u)`` is LoRETTA_adp's ``f(h) = s·(act(h @ D + d) @ U + u)``.

``low_rank_branch``, ``adapter_before`` and ``adapter_after`` apply them at one ``dot_general``
of :func:`lrtt.factored`, laid out by a :class:`DotPlan` (one slice of the dot's batch axes).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from lrtt._adapter import ACTIVATIONS

FUSED_MAX_RANK = 16
_MM = (((1,), (0,)), ((), ()))  # (m, k) · (k, n): contract the last axis of lhs with the first of rhs
_TN = (((0,), (0,)), ((), ()))  # (m, k)ᵀ · (m, n): contract the leading axes
_NT = (((1,), (1,)), ((), ()))  # (m, k) · (n, k)ᵀ: contract the trailing axes


def _dot(lhs, rhs, dims, precision, preferred):
    return lax.dot_general(lhs, rhs, dims, precision=precision, preferred_element_type=preferred)


def _rank_r(u, v, precision, preferred):
    """``u @ v`` for ``u: (m, r)``, ``v: (r, n)``: for a small ``r``, a broadcast multiply
    reduced over ``r`` (a reduction XLA fuses with the add that consumes it)."""
    r = u.shape[1]
    if r > FUSED_MAX_RANK:
        return _dot(u, v, _MM, precision, preferred)
    dtype = jnp.promote_types(u.dtype, v.dtype)
    if preferred is not None:  # (a numpy dtype is falsy: compare with None)
        dtype = jnp.promote_types(dtype, preferred)
    # Accumulate bf16/fp16 in float32 and round once, as a dot_general does: r roundings in bf16
    # would be ~3x less accurate. XLA fuses the converts into the same pass.
    acc = jnp.float32 if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32 else dtype
    products = u.astype(acc)[:, :, None] * v.astype(acc)[None, :, :]  # (m, r, n), fused away
    return products.sum(axis=1).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def low_rank_add(base, x, a, b, scale, precision=None, preferred=None):
    """``base + scale · (x @ a) @ b`` for ``x: (m, k)``, ``a: (k, r)``, ``b: (r, n)``.

    Args:
      base: ``(m, n)``, the model's product ``x @ W0`` (its gradient is the output's).
      x: the activations, leading axes already flattened.
      a, b: the factors, already in the activations' compute dtype.
      scale: a Python float (static).
      precision, preferred: passed to the products, as in the model's own dot.
    """
    return _forward(base, x, a, b, scale, precision, preferred)[0]


def _forward(base, x, a, b, scale, precision, preferred):
    t = _dot(x, a, _MM, precision, preferred).astype(x.dtype)
    if scale != 1.0:
        t = t * jnp.asarray(scale, t.dtype)
    return base + _rank_r(t, b, precision, preferred).astype(base.dtype), t


def _low_rank_fwd(base, x, a, b, scale, precision, preferred):
    y, t = _forward(base, x, a, b, scale, precision, preferred)
    return y, (x, a, b, t)


def _low_rank_bwd(scale, precision, preferred, residuals, g):
    x, a, b, t = residuals  # t = scale·x·a
    gx = g.astype(x.dtype)
    gt = _dot(gx, b, _NT, precision, None)  # (m, r) = s·g·bᵀ
    if scale != 1.0:
        gt = gt * jnp.asarray(scale, gt.dtype)
    db = _dot(t, gx, _TN, precision, None)  # (r, n) = (s·x·a)ᵀ·g, the fast orientation
    da = lax.optimization_barrier(_dot(gt, x, _TN, precision, None)).T  # (r, k), then transposed
    dx = _rank_r(gt, a.T, precision, None)  # (m, k) = s·g·bᵀ·aᵀ
    return g, dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


low_rank_add.defvjp(_low_rank_fwd, _low_rank_bwd)


def bottleneck(h, down, down_bias, up, up_bias, *, scale: float, activation: str):
    """``f(h) = scale · (act(h @ D + d) @ U + u)`` for ``h: (m, n)``, ``D: (n, b)``, ``U: (b, n)``."""
    dtype = h.dtype
    z = ACTIVATIONS[activation](h @ down.astype(dtype) + down_bias.astype(dtype))
    return jnp.asarray(scale, dtype) * (z @ up.astype(dtype) + up_bias.astype(dtype))


def dropout(key, x, rate: float):
    """Inverted dropout of ``x`` with keep probability ``1 - rate`` (identity when ``rate == 0``)."""
    if rate <= 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


# --- the branch of one dot_general, on one slice of its batch axes ------------------------------
@dataclasses.dataclass(frozen=True)
class DotPlan:
    """How one ``dot_general`` of activations ``x`` with an adapted kernel ``W`` is laid out.

    ``x_con``: x's contracted axes, in the order of the matching kernel axes; ``x_free``: its
    other axes. ``transposed``: the dot contracts W's *out* axes (``x·Wᵀ``). ``on_left``: W is
    the lhs, so the output is ``(W free, x free)``. ``g_shape``: the contracted group's shape in
    W; ``o_shape``: W's free group's shape.
    """

    x_con: tuple[int, ...]
    x_free: tuple[int, ...]
    transposed: bool
    on_left: bool
    g_shape: tuple[int, ...]
    o_shape: tuple[int, ...]


def _to_rows(x, plan: DotPlan):
    """``x`` with its free axes flattened into rows and its contracted axes into columns."""
    perm = list(plan.x_free + plan.x_con)
    xt = x.transpose(perm) if perm != list(range(x.ndim)) else x
    free_shape = tuple(x.shape[a] for a in plan.x_free)
    return xt.reshape(math.prod(free_shape), -1), free_shape, perm


def _from_rows(y, plan: DotPlan, free_shape):
    """``(rows, n)`` → the dot's output layout: (x free, W free) or (W free, x free)."""
    y = y.reshape(free_shape + plan.o_shape)
    if plan.on_left:
        n_f = len(free_shape)
        y = y.transpose(list(range(n_f, y.ndim)) + list(range(n_f)))
    return y


def low_rank_branch(plan: DotPlan, meta, dtype, precision, preferred, use: int, base, x, parts):
    """``base + scale·(x·A)·B`` (or ``+ scale·(x·Bᵀ)·Aᵀ`` for ``x·Wᵀ``), in the dot's layout."""
    x2, free_shape, _ = _to_rows(x, plan)
    if "key" in parts:
        x2 = dropout(jax.random.fold_in(parts["key"], use), x2, meta.dropout)
    k, n = math.prod(plan.g_shape), math.prod(plan.o_shape)
    a, b = parts["a"], parts["b"]
    if "rows" in parts:
        return _per_row_branch(plan, meta, dtype, precision, preferred, base, x2, free_shape, parts)
    if plan.transposed:  # x·Wᵀ = (x·Bᵀ)·Aᵀ
        left, right = b.reshape(-1, k).T, a.reshape(n, -1).T
    else:  # x·W = (x·A)·B
        left, right = a.reshape(k, -1), b.reshape(-1, n)
    left, right = left.astype(dtype), right.astype(dtype)
    if plan.on_left:  # base is (W free, x free): add the branch in that layout
        zero = jnp.zeros((x2.shape[0], n), base.dtype)
        y = low_rank_add(zero, x2, left, right, meta.scale, precision, preferred)
        return base + _from_rows(y, plan, free_shape)
    base2 = base.reshape(x2.shape[0], n)
    y = low_rank_add(base2, x2, left, right, meta.scale, precision, preferred)
    return y.reshape(base.shape)


def _per_row_branch(plan: DotPlan, meta, dtype, precision, preferred, base, x2, free_shape, parts):
    """``base + scale·(x[i]·A[rows[i]])·B[rows[i]]`` per batch row ``i`` (a stack of adapters).

    ``a: (S, *in, r)``, ``b: (S, r, *out)`` hold ``S`` slots; ``rows: (batch,)`` (``-1``: no
    adapter). The batch is x's first free axis: ``x2 (batch·m, k)`` is viewed as
    ``(batch, m, k)`` and each row's factors gathered — ``batch·(k + n)·r`` numbers, never a
    dense ``ΔW``.
    """
    rows = parts["rows"]
    batch = rows.shape[0]
    if not free_shape or free_shape[0] != batch:
        raise ValueError(
            f"the adapted kernel {meta.path!r} meets activations whose first free axis is "
            f"{free_shape[:1]}, not the {batch} batch rows of adapter_ids: per-row adapters need the "
            "activations laid out (batch, ..., features) at each adapted product. Run such a model with "
            "one adapter at a time (lrtt.member(stacked, k)).")
    k, n = math.prod(plan.g_shape), math.prod(plan.o_shape)
    a, b = parts["a"], parts["b"]
    slots = a.shape[0]
    if plan.transposed:  # x·Wᵀ = (x·Bᵀ)·Aᵀ
        left, right = b.reshape(slots, -1, k).swapaxes(1, 2), a.reshape(slots, n, -1).swapaxes(1, 2)
    else:  # x·W = (x·A)·B
        left, right = a.reshape(slots, k, -1), b.reshape(slots, -1, n)
    valid = rows >= 0
    index = jnp.maximum(rows, 0)
    left = left[index].astype(dtype)  # (batch, k, r)
    right = right[index].astype(dtype)  # (batch, r, n)
    x3 = x2.reshape(batch, -1, x2.shape[-1])
    t = jnp.einsum("bmk,bkr->bmr", x3, left, precision=precision, preferred_element_type=preferred).astype(x2.dtype)
    t = t * jnp.where(valid, jnp.asarray(meta.scale, t.dtype), jnp.zeros((), t.dtype))[:, None, None]
    y = jnp.einsum("bmr,brn->bmn", t, right, precision=precision, preferred_element_type=preferred)
    y = y.reshape(x2.shape[0], n).astype(base.dtype)
    if plan.on_left:
        return base + _from_rows(y, plan, free_shape)
    return base + y.reshape(base.shape)


def _f(meta, parts, h2):
    n = h2.shape[-1]
    return bottleneck(h2, parts["down"].reshape(n, -1), parts["down_bias"], parts["up"].reshape(-1, n),
                      parts["up_bias"].reshape(n), scale=meta.scale, activation=meta.activation)


def adapter_before(plan: DotPlan, meta, x, parts):
    """``x + f(x)`` over x's contracted axes (a before-linear adapter), in x's own layout."""
    x2, _, perm = _to_rows(x, plan)
    x2 = x2 + _f(meta, parts, x2)
    xt = x2.reshape(tuple(x.shape[a] for a in perm))
    return xt.transpose([perm.index(a) for a in range(x.ndim)]) if perm != list(range(x.ndim)) else xt


def adapter_after(plan: DotPlan, meta, base, parts):
    """``h0 + f(h0 + b0)`` over the dot's output features (an after-linear adapter)."""
    n_f, n_o = len(plan.x_free), len(plan.o_shape)
    h = base.transpose(list(range(n_o, n_o + n_f)) + list(range(n_o))) if plan.on_left else base
    free_shape = tuple(h.shape[:n_f])
    h2 = h.reshape(math.prod(free_shape), -1)
    h_in = h2 + parts["b0"].reshape(-1).astype(h2.dtype) if "b0" in parts else h2
    return base + _from_rows(_f(meta, parts, h_in), plan, free_shape)
