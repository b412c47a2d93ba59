"""Data parallelism under ``jax.pmap``: the step, and placing state, params and batches on
the local devices (a leading device axis)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lrtt.train._steps import TrainState, check_accumulate, device_mean_value_and_grad, apply_gradients


def pmap_step(
    loss,
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str = "batch",
    accumulate: int = 1,
    devices: Sequence[Any] | None = None,
    donate: bool = True,
):
    """``step(state, params, batch) -> (state, loss)`` under ``jax.pmap`` (data parallel).

    ``state`` is replicated with a leading device axis (:func:`replicate`), ``params`` is a
    broadcast argument (``in_axes=None``: pass the same tree as for :func:`jit_step`; place it
    once with :func:`replicate_params` to avoid a transfer per call) and ``batch`` has a leading
    device axis (:func:`split_batch`). Gradients and the loss are ``pmean``-ed over
    ``axis_name``; each device's dropout key is ``fold_in(fold_in(rng, step), device_index)``.
    The returned loss is replicated: read ``loss[0]``.
    """
    check_accumulate(accumulate)

    def step(state: TrainState, params, batch):
        key = jax.random.fold_in(state.rng, state.step)
        value, grads = device_mean_value_and_grad(loss, state.adapter, params, batch, key, accumulate, axis_name)
        return apply_gradients(optimizer, state, grads), value

    return jax.pmap(
        step,
        axis_name=axis_name,
        in_axes=(0, None, 0),
        devices=devices,
        donate_argnums=(0,) if donate else (),
    )


def replicate(tree: Any, devices: Sequence[Any] | None = None) -> Any:
    """Each leaf stacked once per device (leading axis), one copy on each device (for pmap)."""
    devices = list(devices or jax.local_devices())
    mesh = Mesh(np.array(devices), ("replica",))

    def put(x):
        x = jnp.asarray(x)
        sharding = NamedSharding(mesh, P("replica"))
        pieces = [jax.device_put(x[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *x.shape), sharding, pieces)

    return jax.tree.map(put, tree)


def replicate_params(params: Any, devices: Sequence[Any] | None = None) -> Any:
    """``params`` placed once, whole, on every device (a replicated sharding, no leading axis)."""
    devices = list(devices or jax.local_devices())
    return jax.device_put(params, NamedSharding(Mesh(np.array(devices), ("replica",)), P()))


def unreplicate(tree: Any) -> Any:
    """The first device's copy of each leaf of a replicated tree."""
    return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch: Any, n_devices: int | None = None) -> Any:
    """``(B, ...)`` leaves → ``(n_devices, B/n_devices, ...)`` (device ``d`` gets consecutive rows)."""
    n = n_devices or jax.local_device_count()

    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"the batch size {x.shape[0]} is not divisible by the {n} devices.")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree.map(split, batch)
