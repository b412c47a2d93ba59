"""Training on a ``jax.sharding.Mesh`` (data, FSDP or tensor parallel, one or many processes):
``mesh_step`` and how it reduces gradients (the sharding specs: :mod:`lrtt.train._sharding`)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lrtt._count import adapter_shapes
from lrtt._groups import LayerGroups
from lrtt.train._distributed import is_multiprocess, local_rows, put_global, put_local
from lrtt.train._sharding import adapter_specs, param_specs
from lrtt.train._steps import TrainState, check_accumulate, device_mean_value_and_grad, apply_gradients, adapter_value_and_grad


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
        if isinstance(state.adapter, LayerGroups) != isinstance(self.state_sharding.adapter, LayerGroups):
            raise ValueError(
                "the state's adapter is not the one this mesh_step was built for (e.g. a lrtt.LayerGroups "
                "where the step expects the tree, or the reverse): pass the state's adapter to "
                "mesh_step(..., adapter=state.adapter).")
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
    adapter: Any = None,
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
      adapter: the adapter (or its shapes) the state holds, when it is not the tree
        ``lrtt.adapter_shapes(method, params)``: a :class:`lrtt.LayerGroups` (replicated).

    Returns:
      :class:`MeshStep` ``(step, params_sharding, state_sharding, batch_sharding)`` with helpers
      ``put_params``, ``put_state``, ``put_batch``, ``put_local_batch`` (a process's slice of
      the global batch, multi-host) and ``local_rows``.
    """
    check_accumulate(accumulate)
    mesh = _auto_axes(mesh)
    if data_axis not in mesh.shape:
        raise ValueError(f"`data_axis`={data_axis!r} is not an axis of the mesh {dict(mesh.shape)}.")
    named = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    p_specs = param_specs(params, mesh, rules, layouts=method.layouts, data_axis=data_axis)
    adapter = adapter_shapes(method, params) if adapter is None else jax.eval_shape(lambda a: a, adapter)
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
        return device_mean_value_and_grad(loss, adapter, params, batch, key, accumulate, data_axis)

    per_device = jax.shard_map(local_gradients, mesh=mesh, in_specs=(P(), P(), P(data_axis), P()),
                               out_specs=(P(), P()), axis_names={data_axis}, check_vma=False)

    def step(state: TrainState, params, batch):
        key = jax.random.fold_in(state.rng, state.step)
        if reduce == "gradients":
            value, grads = per_device(state.adapter, params, batch, key)
        else:
            value, grads = adapter_value_and_grad(loss, state.adapter, params, batch, key, accumulate, constrain)
        return apply_gradients(optimizer, state, grads), value

    jitted = jax.jit(
        step,
        in_shardings=(state_sharding, params_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,) if donate else (),
    )
    return MeshStep(jitted, params_sharding, state_sharding, batch_sharding)
