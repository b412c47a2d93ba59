"""Training steps: gradients with respect to the adapter only, on one device, pmap or a Mesh.

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
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lrtt._count import adapter_shapes
from lrtt._factored._wrap import wrap
from lrtt._factored._interpreter import factored
from lrtt.train._distributed import is_multiprocess, local_rows, put_global, put_local
from lrtt.train._guard import skip_nonfinite as guard_nonfinite
from lrtt.train._sharding import adapter_specs, param_specs

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


def _value_and_grad(loss, adapter, params, batch, key, accumulate, constrain=lambda b: b):
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


def _device_mean_value_and_grad(loss, adapter, params, batch, key, accumulate, axis):
    """Loss and gradients of this device's rows (``key`` folded with the device's index), each
    averaged over the mapped ``axis``: the data-parallel step of ``pmap_step`` and of
    ``mesh_step(reduce="gradients")``."""
    key = jax.random.fold_in(key, jax.lax.axis_index(axis))
    value, grads = _value_and_grad(loss, adapter, params, batch, key, accumulate)
    return jax.lax.pmean(value, axis), jax.lax.pmean(grads, axis)


def _update(optimizer, state: TrainState, grads) -> TrainState:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.adapter)
    adapter = optax.apply_updates(state.adapter, updates)
    return TrainState(adapter, opt_state, state.step + 1, state.rng)


def _check_accumulate(accumulate: int) -> None:
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
    _check_accumulate(accumulate)

    def step(state: TrainState, params, batch):
        key = jax.random.fold_in(state.rng, state.step)
        value, grads = _value_and_grad(loss, state.adapter, params, batch, key, accumulate)
        return _update(optimizer, state, grads), value

    return jax.jit(step, donate_argnums=(0,) if donate else ())


# --- pmap -----------------------------------------------------------------------------------


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
    _check_accumulate(accumulate)

    def step(state: TrainState, params, batch):
        key = jax.random.fold_in(state.rng, state.step)
        value, grads = _device_mean_value_and_grad(loss, state.adapter, params, batch, key, accumulate, axis_name)
        return _update(optimizer, state, grads), value

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


# --- Mesh / NamedSharding (the specs: lrtt/_sharding.py) ------------------------------------

def _auto_axes(mesh: Mesh) -> Mesh:
    """The same devices and axis names with ``Auto`` axis types.

    ``jax.make_mesh`` makes ``Explicit`` axes by default, under which every operation of the model
    must have an unambiguous sharding in its type; model code written for ordinary jit (HF Flax
    models, most linen code) is not. The Mesh step states its shardings at the jit boundary and
    lets XLA propagate them, which needs ``Auto`` axes.
    """
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


REDUCTIONS = ("auto", "gradients", "compiler")


def _uses_axis(spec: P, axis: str) -> bool:
    return any(axis == e or (isinstance(e, tuple) and axis in e) for e in spec)


def _without_axis(spec: P, axis: str) -> P:
    """``spec`` with ``axis`` dropped from every entry (the array whole along that mesh axis)."""
    def drop(entry):
        if entry == axis:
            return None
        if isinstance(entry, tuple):
            kept = tuple(a for a in entry if a != axis)
            return kept if len(kept) > 1 else (kept[0] if kept else None)
        return entry

    return P(*(drop(e) for e in spec))


def _gathered_at_use(loss, mesh: Mesh, p_specs, a_specs, data_axis: str):
    """``loss`` whose params and adapter are constrained whole along ``data_axis`` on entry."""
    whole = lambda specs: jax.tree.map(  # noqa: E731
        lambda s: NamedSharding(mesh, _without_axis(s, data_axis)), specs, is_leaf=lambda x: isinstance(x, P))
    p_whole, a_whole = whole(p_specs), whole(a_specs)

    def gathered(adapter, params, batch, rng):
        params = jax.lax.with_sharding_constraint(params, p_whole)
        adapter = jax.lax.with_sharding_constraint(adapter, a_whole)
        return loss(adapter, params, batch, rng)

    return gathered


def _reduction(reduce: str, replicated_specs: bool, method: Any) -> str:
    """The Mesh step's gradient reduction for ``reduce`` (see :func:`mesh_step`)."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"`reduce` must be one of {list(REDUCTIONS)}, got {reduce!r}.")
    if reduce == "gradients" and not replicated_specs:
        raise ValueError("`reduce`='gradients' needs the params and the adapter replicated: the `rules` given shard "
                         "them. Use reduce='compiler' (or 'auto') with sharding rules.")
    if reduce == "auto":
        dropout = float(getattr(method, "dropout", 0.0) or 0.0)
        return "gradients" if replicated_specs and not dropout else "compiler"
    return reduce


class MeshStep(NamedTuple):
    """A jitted Mesh step and the shardings its arguments must (and its outputs will) have.

    The ``put_*`` helpers place host values on those shardings, in one process or in each of
    the processes of a multi-host job (:func:`lrtt.train.initialize_distributed`):

    * ``put_params(params)``, ``put_state(state)``: every process passes the same values (the
      same weights, ``init_state`` with the same seed, the same ``restore``); each builds only
      its own shards. Multi-process, ``verify=True`` gathers a CRC32 per leaf from every
      process and raises ValueError if one differs.
    * ``put_batch(batch)``: the whole global batch ``(B, ...)``, the same in every process.
    * ``put_local_batch(local)``: this process's rows only, ``local_rows(B)`` of the global
      batch (``B / jax.process_count()`` rows when the batch is split over every device); the
      step sees the global batch ``(B, ...)``. This is the multi-host data path: no process
      loads the others' data.
    """

    step: Callable
    params_sharding: Any
    state_sharding: Any
    batch_sharding: NamedSharding

    def put_params(self, params, *, verify: bool = True):
        if not is_multiprocess():
            return jax.device_put(params, self.params_sharding)
        return put_global(params, self.params_sharding, what="params", verify=verify)

    def put_state(self, state, *, verify: bool = True):
        if not is_multiprocess():
            return jax.device_put(state, self.state_sharding)
        return put_global(state, self.state_sharding, what="state", verify=verify)

    def put_batch(self, batch):
        if not is_multiprocess():
            return jax.device_put(batch, self.batch_sharding)
        return put_global(batch, self.batch_sharding, what="batch", verify=False)

    def put_local_batch(self, local):
        return put_local(local, self.batch_sharding)

    def local_rows(self, global_batch_size: int) -> slice:
        """The rows of a global batch of ``global_batch_size`` this process feeds to ``put_local_batch``."""
        return local_rows(self.batch_sharding, global_batch_size)


def mesh_step(
    loss,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    method: Any,
    params: Any,
    rules: Any = None,
    data_axis: str = "data",
    accumulate: int = 1,
    donate: bool = True,
    reduce: str = "auto",
    gather_at_use: bool | None = None,
) -> MeshStep:
    """A jit step over a ``Mesh``: batch sharded over ``data_axis``, params by ``rules``.

    The adapter's shardings follow its kernels (:func:`adapter_specs`); the optimizer state's
    param-shaped parts follow the adapter (``optax.tree_utils.tree_map_params``), its counters are
    replicated. Under ``jax_threefry_partitionable`` (on by default) dropout bits are drawn for
    the global batch, so each device gets its own mask and the result equals the single-device
    step's.

    Args:
      loss, optimizer, accumulate, donate: as :func:`jit_step`.
      mesh: a ``jax.sharding.Mesh`` that has ``data_axis`` (from ``jax.make_mesh`` or ``Mesh``;
        ``Explicit`` axis types are used as ``Auto``: the returned shardings are on that mesh).
      method, params: the method and frozen params (shapes suffice) the shardings derive from.
      rules: frozen-weight sharding (see :func:`param_specs`).
      reduce: where the data-parallel gradient sum happens.

        * ``"gradients"``: each device takes the gradient of its rows' loss with respect to the
          adapter's own leaves (``jax.shard_map`` over ``data_axis``), then the gradients are
          averaged (``pmean``): the bytes all-reduced are the trainable leaves' — for
          LorettaRep the TT cores, not the dense ``A``/``B`` matrices the cores form (48× fewer
          at LLaMA-2-7B q,v, benchmarks/collectives.py). The loss's ``rng`` is folded with the device's index, as in
          :func:`pmap_step`. Needs params and adapter replicated (no ``rules`` that shard them).
        * ``"compiler"``: one program over the global batch, XLA's partitioner places the sums
          — where a gradient first becomes batch-independent (LorettaRep: the dense ``A``/``B``
          gradients, before the TT backward). Dropout bits are drawn for the global batch,
          equal to one device's.
        * ``"auto"`` (default): ``"gradients"`` when it applies and the method has no adapter
          dropout, else ``"compiler"``.
      gather_at_use: constrain the frozen weights and the adapter to be whole along
        ``data_axis`` where the loss uses them (``with_sharding_constraint``): FSDP's pattern —
        each device all-gathers the weights the ``rules`` split over ``data_axis`` and computes
        on its own rows, so the all-gather is the sharded weights and activations never move.
        Without it XLA's propagation may instead split the activations like the weights and
        move the global batch's activations (benchmarks/collectives.py: at LLaMA-2-7B, batch
        8 × 128, 14.1 GB of mixed collectives whose activation terms grow with the batch, vs
        27.0 GB of weights that do not). Splits over other mesh axes (tensor parallelism)
        stay. ``None`` (default): on when ``rules`` split a frozen weight over ``data_axis``.

    Returns:
      :class:`MeshStep` ``(step, params_sharding, state_sharding, batch_sharding)`` with helpers
      ``put_params``, ``put_state``, ``put_batch``, ``put_local_batch`` (a process's slice of
      the global batch, multi-host) and ``local_rows``.
    """
    _check_accumulate(accumulate)
    mesh = _auto_axes(mesh)
    if data_axis not in mesh.shape:
        raise ValueError(f"`data_axis`={data_axis!r} is not an axis of the mesh {dict(mesh.shape)}.")
    named = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    p_specs = param_specs(params, mesh, rules, layouts=method.layouts, data_axis=data_axis)
    adapter = adapter_shapes(method, params)
    a_specs = adapter_specs(method, params, p_specs, adapter)
    opt_shapes = jax.eval_shape(optimizer.init, adapter)
    o_specs = optax.tree_utils.tree_map_params(
        optimizer, lambda _, spec: spec, opt_shapes, a_specs, transform_non_params=lambda _: P(), is_leaf=is_spec
    )
    state_specs = TrainState(a_specs, o_specs, P(), P())
    state_sharding = jax.tree.map(named, state_specs, is_leaf=is_spec)
    params_sharding = jax.tree.map(named, p_specs, is_leaf=is_spec)
    batch_sharding = named(P(data_axis))
    replicated = named(P())

    replicated_specs = all(not tuple(s) for s in jax.tree.leaves((p_specs, a_specs), is_leaf=is_spec))
    reduce = _reduction(reduce, replicated_specs, method)
    if gather_at_use is None:
        gather_at_use = any(_uses_axis(s, data_axis) for s in jax.tree.leaves(p_specs, is_leaf=is_spec))
    if gather_at_use:
        loss = _gathered_at_use(loss, mesh, p_specs, a_specs, data_axis)

    def constrain(micro):
        return jax.lax.with_sharding_constraint(micro, named(P(None, data_axis)))

    def local_gradients(adapter, params, batch, key):
        return _device_mean_value_and_grad(loss, adapter, params, batch, key, accumulate, data_axis)

    per_device = jax.shard_map(local_gradients, mesh=mesh, in_specs=(P(), P(), P(data_axis), P()),
                               out_specs=(P(), P()), axis_names={data_axis}, check_vma=False)

    def step(state: TrainState, params, batch):
        key = jax.random.fold_in(state.rng, state.step)
        if reduce == "gradients":
            value, grads = per_device(state.adapter, params, batch, key)
        else:
            value, grads = _value_and_grad(loss, state.adapter, params, batch, key, accumulate, constrain)
        return _update(optimizer, state, grads), value

    jitted = jax.jit(
        step,
        in_shardings=(state_sharding, params_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,) if donate else (),
    )
    return MeshStep(jitted, params_sharding, state_sharding, batch_sharding)
