"""Training steps: gradients with respect to the adapter only, on one device, pmap or a Mesh
(the last two in :mod:`lrtt.train._pmap` and :mod:`lrtt.train._mesh`; what all three share is here).

Every step has the signature ``step(state, params, batch) -> (state, loss)``:

* ``state`` — a :class:`TrainState` ``(adapter, opt_state, step, rng)``, donated (updated in place);
* ``params`` — the frozen weights, an ordinary jit argument: never differentiated, never
  closed over (so one compiled step serves any params of the same shapes and no constant is
  baked into the executable);
* ``batch`` — any pytree whose leaves have the batch on their leading axis.

.. math::  g = \\nabla_{\\text{adapter}}\\, \\mathcal{L}(\\text{adapter}, \\text{params}, \\text{batch}), \\qquad
   (\\text{adapter}, \\text{opt\\_state}) \\leftarrow \\text{optimizer}(g, \\ldots)

The dropout key of a step is ``fold_in(state.rng, state.step)``; under ``pmap`` it is further
folded with the device index; with ``accumulate=k`` each micro-batch ``i`` gets
``fold_in(key, i)``. Micro-batch ``i`` holds rows ``i, i+k, i+2k, ...`` of the batch, so every
device keeps its share of each micro-batch under data parallelism; the gradient is the mean of
the micro-batch gradients (equal to the full-batch gradient of a mean loss).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrtt._factored._wrap import wrap
from lrtt._factored._interpreter import factored
from lrtt.train._guard import skip_nonfinite as guard_nonfinite

FORWARDS = ("factored", "merged")


class TrainState(NamedTuple):
    """What a step updates: the adapter, the optimizer state, the step counter and the base rng."""

    adapter: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def init_state(adapter: Any, optimizer: optax.GradientTransformation, rng: jax.Array | int = 0) -> TrainState:
    """A fresh :class:`TrainState` (``step = 0``); ``rng`` is a key or an integer seed.

    The state holds a copy of ``adapter``: the steps donate their state, and donating the
    caller's own arrays would delete them (``adapter`` stays usable after training starts).
    """
    if not isinstance(rng, jax.Array):
        rng = jax.random.key(rng)
    adapter = jax.tree.map(jnp.copy, adapter)
    return TrainState(adapter, optimizer.init(adapter), jnp.zeros((), jnp.int32), rng)


def adamw(
    learning_rate: float,
    *,
    warmup: int = 0,
    total: int | None = None,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = None,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformation:
    """AdamW with a linear warmup then cosine decay to 0 at ``total`` (constant if ``total`` is None).

    Any optax optimizer works with the steps; this is the usual LoRA recipe. A schedule given to
    an optax optimizer advances once per optimizer update (per step, not per micro-batch).

    Args:
      learning_rate: peak learning rate.
      warmup: number of linear warmup steps from 0.
      total: total number of steps (warmup included) for the cosine decay; None keeps the peak.
      weight_decay: decoupled weight decay (applies to the adapter only: frozen weights are
        never in the optimizer).
      b1, b2, eps: Adam's moments.
      clip_norm: clip the global gradient norm first, if given.
      skip_nonfinite: never apply an update that holds a NaN or an infinity; the step is
        skipped and counted (:func:`lrtt.train.skip_nonfinite`, :func:`lrtt.train.nonfinite_counts`).

    Raises:
      ValueError: a learning rate that is not a finite number > 0, or ``total <= warmup``.
    """
    try:
        peak = float(learning_rate)
    except (TypeError, ValueError):
        peak = math.nan
    if not (math.isfinite(peak) and peak > 0):
        raise ValueError(f"`learning_rate` must be a finite number > 0, got {learning_rate!r}.")
    if total is not None:
        if total <= warmup:
            raise ValueError(f"`total`={total} must exceed `warmup`={warmup} (both count steps).")
        schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, total, end_value=0.0)
    elif warmup:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup), optax.constant_schedule(learning_rate)], [warmup]
        )
    else:
        schedule = learning_rate
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm else tx
    return guard_nonfinite(tx) if skip_nonfinite else tx


# --- the loss -------------------------------------------------------------------------------


def make_loss(
    method: Any,
    apply_fn: Callable[[Any, Any, jax.Array], Any],
    loss_fn: Callable[[Any, Any], jax.Array],
    *,
    forward: str = "factored",
) -> Callable[[Any, Any, Any, jax.Array], jax.Array]:
    """``loss(adapter, params, batch, rng) -> scalar`` of the adapted model.

    Args:
      method: the lrtt method the adapter was made with.
      apply_fn: ``apply_fn(params, batch, rng) -> outputs``, the plain model (e.g.
        ``lambda p, b, k: model(b["input_ids"], params=p, dropout_rng=k, train=True).logits``).
      loss_fn: ``loss_fn(outputs, batch) -> scalar`` (a mean over the batch, so that
        micro-batching and data parallelism average correctly).
      forward: ``"factored"`` (default): ``lrtt.factored(apply_fn)`` on
        ``lrtt.wrap(method, params, adapter, rng=...)``, computing ``x·W0 + s·(x·A)·B`` without
        forming ``W0 + ΔW``; the adapter's dropout runs here. ``"merged"``: ``apply_fn`` on
        ``lrtt.merge(method, params, adapter)`` (exact and differentiable, but forms the dense
        kernels; no adapter dropout, LoRA and LorettaRep only).

    Raises:
      ValueError: unknown ``forward``; ``"merged"`` with adapter dropout or an unmergeable method.
    """
    if forward not in FORWARDS:
        raise ValueError(f"`forward` must be one of {list(FORWARDS)}, got {forward!r}.")
    dropout = float(method.dropout)
    if forward == "merged":
        from lrtt._merge import NOT_MERGEABLE, merge

        if not method.mergeable:
            raise ValueError(NOT_MERGEABLE.format(method=type(method).__name__))
        if dropout:
            raise ValueError(
                f"`forward`='merged' cannot apply the adapter's dropout ({type(method).__name__}"
                f"(dropout={dropout})): dropout acts on the adapter's input only, which a merged "
                "kernel no longer separates. Use forward='factored', or dropout=0."
            )

        def loss(adapter, params, batch, rng):
            return loss_fn(apply_fn(merge(method, params, adapter), batch, rng), batch)

        return loss

    factored_apply = factored(apply_fn)

    def loss(adapter, params, batch, rng):
        adapter_key, model_key = jax.random.split(rng)
        wrapped = wrap(method, params, adapter, rng=adapter_key if dropout else None)
        return loss_fn(factored_apply(wrapped, batch, model_key), batch)

    return loss


def _microbatches(batch: Any, n: int) -> Any:
    """``(B, ...)`` leaves → ``(n, B/n, ...)`` with micro-batch ``i`` = rows ``i, i+n, ...``."""

    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"`accumulate`={n} must divide the batch size, got a leaf of shape {x.shape}.")
        return jnp.moveaxis(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 1, 0)

    return jax.tree.map(split, batch)


def adapter_value_and_grad(loss, adapter, params, batch, key, accumulate, constrain=lambda b: b):
    grad_fn = jax.value_and_grad(loss)
    if accumulate == 1:
        return grad_fn(adapter, params, batch, key)
    micro = constrain(_microbatches(batch, accumulate))

    def body(carry, inputs):
        index, mb = inputs
        value, grads = grad_fn(adapter, params, mb, jax.random.fold_in(key, index))
        total_value, total_grads = carry
        return (total_value + value.astype(jnp.float32), jax.tree.map(jnp.add, total_grads, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, adapter)
    (value, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(accumulate), micro))
    return value / accumulate, jax.tree.map(lambda g: g / accumulate, grads)


def device_mean_value_and_grad(loss, adapter, params, batch, key, accumulate, axis):
    """Loss and gradients of this device's rows (``key`` folded with the device's index), each
    averaged over the mapped ``axis``: the data-parallel step of ``pmap_step`` and of
    ``mesh_step(reduce="gradients")``."""
    key = jax.random.fold_in(key, jax.lax.axis_index(axis))
    value, grads = adapter_value_and_grad(loss, adapter, params, batch, key, accumulate)
    return jax.lax.pmean(value, axis), jax.lax.pmean(grads, axis)


def apply_gradients(optimizer, state: TrainState, grads) -> TrainState:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.adapter)
    adapter = optax.apply_updates(state.adapter, updates)
    return TrainState(adapter, opt_state, state.step + 1, state.rng)


def check_accumulate(accumulate: int) -> None:
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"`accumulate` must be an integer >= 1, got {accumulate!r}.")


# --- single device --------------------------------------------------------------------------


def jit_step(loss, optimizer: optax.GradientTransformation, *, accumulate: int = 1, donate: bool = True):
    """``step(state, params, batch) -> (state, loss)`` under ``jax.jit``, ``state`` donated.

    Args:
      loss: ``loss(adapter, params, batch, rng)`` (see :func:`make_loss`).
      optimizer: any optax transformation over the adapter tree.
      accumulate: number of micro-batches the batch is split into (gradient accumulation).
      donate: donate ``state`` (its buffers are reused for the new state).
    """
    check_accumulate(accumulate)

    def step(state: TrainState, params, batch):
        key = jax.random.fold_in(state.rng, state.step)
        value, grads = adapter_value_and_grad(loss, state.adapter, params, batch, key, accumulate)
        return apply_gradients(optimizer, state, grads), value

    return jax.jit(step, donate_argnums=(0,) if donate else ())
