"""The training job of ``lrtt train``: :func:`train` (with resume) from a :class:`~lrtt.cli._schema.RunConfig`.

Outputs of a run go under ``output.dir``: ``checkpoints/`` (Orbax, adapter + optimizer state
only), ``metrics.jsonl`` (one JSON object per logged step or evaluation), ``curves.png``,
``summary.json`` and ``merged/`` (the export); :mod:`lrtt.cli._outputs` writes all but the
checkpoints, :mod:`lrtt.cli._restore` reads those back.

Training runs data-parallel on a Mesh over every device of every process of the job
(:mod:`lrtt.cli._cluster`); in a multi-process job process 0 alone writes those files but the
checkpoints, which every process saves through Orbax.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

import lrtt
from lrtt.cli import _cluster, _signals
from lrtt.cli._cluster import Cluster
from lrtt.cli._evaluate import evaluate_split
from lrtt.cli._export import check_export_target
from lrtt.cli._methods import build_method
from lrtt.cli._outputs import append_metric, final_summary, print_report, write_outputs
from lrtt.cli._restore import RestoreFrom, resume
from lrtt.cli._resume_rules import resume_changes
from lrtt.cli._rundir import check_owned, config_history, mark, write_config
from lrtt.cli._schema import ConfigError, RunConfig
from lrtt.cli._tasks import Task, build_task


def _batch_iterator(arrays: dict, batch_size: int, seed: int, position: tuple[int, int]):
    """Endless shuffled batches from ``position = (epoch, index)``; yields (batch, next position)."""
    from lrtt.cli._data import batches, num_batches

    n = len(next(iter(arrays.values())))
    per_epoch = num_batches(n, batch_size)
    if per_epoch == 0:
        raise ConfigError(f"`train.batch_size`={batch_size} is larger than the {n} training examples.")
    epoch, index = position
    while True:
        for batch in batches(arrays, batch_size, seed=seed, epoch=epoch, start=index):
            index += 1
            if index == per_epoch:
                epoch, index = epoch + 1, 0
            yield batch, (epoch, index)


def train(config: RunConfig, *, progress: bool = True, restore: RestoreFrom = RestoreFrom()) -> dict:
    """Train (or resume) the run of ``config``; returns the final summary.

    Order, so that a refused run changes nothing: the config (checked when it was loaded), the
    method, the run directory (lrtt's to write in: new, empty or marked as an lrtt run), then
    the writer lock — before any model loads, so a second writer is refused at once — then the
    checkpoint path, the settings against the run's saved ones (:func:`_config_changes`), the
    merged-export target, the model and data (``data.max_len`` within the model's positions,
    ``train.batch_size`` within the data), the checkpoint it resumes from (same method, shapes,
    intact bytes) and the step count. Only then are the run marker and ``config.json`` written.
    A directory this call created is removed again if the run is refused.

    In a multi-process job (joined with :func:`lrtt.cli._cluster.join` first) every process calls
    this with the same config; process 0 holds the lock and writes the outputs.

    Raises:
      ConfigError, ValueError: a setting that does not fit (nothing in the directory changed).
      RunDirectoryError: ``output.dir`` holds files lrtt did not write.
      RunLockedError: another ``lrtt train`` holds the directory.
      CheckpointWriteError: a checkpoint could not be written (disk full): the run stops at once.
      DivergenceError: a non-finite loss or update (the step was not applied, nothing after the
        last good checkpoint was saved, the export was not touched).
    """
    out = Path(config.output.dir)
    method = build_method(config)
    cluster = _cluster.current()
    _cluster.check_batch(config.train.batch_size, config.train.accumulate, cluster, jax.device_count())
    identity = _cluster.on_primary(cluster, lambda: check_owned(out))
    with _cluster.run_lock(out, cluster):
        _signals.check()
        manager = lrtt.CheckpointManager(out / "checkpoints", method, max_to_keep=config.output.keep)
        try:
            history = _config_changes(config, out, manager.all_steps())
            if config.output.export and method.mergeable:
                merged = out / "merged"
                if merged.exists() and not merged.is_dir():
                    raise ConfigError(f"{merged} is a file where the merged export goes; move it away, or set "
                                      "output.export=false.")
                # process 0 writes the export, so it alone judges the target (and every process learns the outcome)
                _cluster.on_primary(cluster, lambda: check_export_target(merged, out, identity, overwrite=False))
            _signals.check()
            task = build_task(config)
            _check_data(config, task)
            state, step, params = _training(config, method, task)
            _signals.check()
            state, position, moved = resume(config, manager, state, step, restore, cluster)
            if moved:  # steps were moved out of the directory: a fresh manager sees the new list
                manager.close()
                manager = lrtt.CheckpointManager(out / "checkpoints", method, max_to_keep=config.output.keep)
            _cluster.on_primary(cluster, lambda: _record_config(out, identity, history, config, int(state.step)))
            started = time.perf_counter()
            with _signals.saving(manager), _signals.deferred():  # a signal stops the loop at its next step
                state, skipped = _loop(config, method, task, state, step, params, manager, position, cluster,
                                       progress=progress)
        except KeyboardInterrupt:  # a signal: the save in flight committed, one interrupted as it began removed
            with _signals.deferred():
                manager.discard_uncommitted()
            raise
        finally:
            with _signals.deferred():  # Orbax's wait is not cut half-way; a signal is raised just below
                manager.wait()
                manager.close()
        _signals.check()
        elapsed = time.perf_counter() - started
        adapter = _cluster.local_copy(state.adapter)
        summary = final_summary(config, method, task, adapter, int(state.step), elapsed)
        summary["skipped_steps"] = skipped
        _cluster.on_primary(cluster, lambda: write_outputs(config, method, task, adapter, summary, identity))
        if "export" in summary:  # written by process 0, at the path every process knows
            summary["export"] = str(out / "merged")
    if cluster.primary:
        print_report(config, method, task, summary)
    return summary


def _config_changes(config: RunConfig, out: Path, steps: list[int]) -> list[dict]:
    """The run's config history, checked against ``config``: a run with checkpoints keeps its
    settings that saved state depends on (a change of one is refused, naming old and new
    values); the others may change and are recorded at the step the run resumes from.

    Raises:
      ConfigError: a change of a key that would reinterpret the saved state.
    """
    history = config_history(out)
    if not history or not steps:
        return history
    refused, _ = resume_changes(history[-1]["config"], config)
    if refused:
        shown = ", ".join(str(change) for change in refused)
        raise ConfigError(
            f"{out} was trained with other settings that its checkpoints depend on: {shown}. Keep the run's "
            "values (config.json holds them) to resume it, or set output.dir to a new directory to train with "
            "these."
        )
    return history


def _record_config(out: Path, identity: str, history: list[dict], config: RunConfig, step: int) -> None:
    """Mark the run as lrtt's and write ``config.json`` with the version starting at ``step``
    (printing what changed on resume)."""
    mark(out, identity)
    current = json.loads(json.dumps(config.to_dict()))  # as config.json holds it (lists, not tuples)
    if history:
        refused, applied = resume_changes(history[-1]["config"], config)
        applied = refused + applied  # refused ones only reach here with no checkpoint saved yet
        if not applied and history[-1]["config"] == current:
            return
        for change in applied:
            print(f"changed on resume: {change} (from step {step})")
        history = [*history, {"step": step, "config": current, "changes": [str(c) for c in applied]}]
    else:
        history = [{"step": step, "config": current, "changes": []}]
    write_config(out, history)


def _check_data(config: RunConfig, task: Task) -> None:
    """Refuse a batch larger than the training data (it would never fill one step)."""
    n = len(next(iter(task.splits["train"].values())))
    if config.train.batch_size > n:
        limit = f" (data.train_limit={config.data.train_limit})" if config.data.train_limit else ""
        raise ConfigError(
            f"`train.batch_size`={config.train.batch_size} is larger than the {n} training examples{limit}; "
            f"set train.batch_size to {n} or less."
        )


def _training(config: RunConfig, method: Any, task: Task) -> tuple[Any, Any, Any]:
    """``(state, step, params)``: the fresh train state (adapter, AdamW state, step 0) placed on
    the run's Mesh, its jitted :class:`lrtt.train.MeshStep` and the frozen params placed for it.

    The Mesh is data-parallel over ``jax.devices()`` (every device of every process): the batch
    is split over the devices, the params (a quantized base too) and the adapter are replicated.
    """
    adapter = method.init(jax.random.key(config.train.seed), task.params)
    optimizer = lrtt.train.adamw(
        config.train.lr,
        warmup=min(config.train.warmup, config.train.steps // 2),  # short runs: warmup capped at half
        total=config.train.steps + 1,
        weight_decay=config.train.weight_decay,
        skip_nonfinite=True,
    )
    state = lrtt.train.init_state(adapter, optimizer, rng=config.train.seed)
    forward = config.train.forward if method.mergeable else "factored"
    loss = lrtt.train.make_loss(method, task.apply, task.loss, forward=forward)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    step = lrtt.train.mesh_step(loss, optimizer, mesh, method=method, params=task.params,
                                accumulate=config.train.accumulate)
    return step.put_state(state), step, step.put_params(task.params)


def _loop(config, method, task, state, mesh_step, params, manager, position, cluster: Cluster, *,
          progress: bool) -> tuple[Any, int]:
    """Steps up to ``config.train.steps``: log each, evaluate and checkpoint on schedule.

    Each process feeds its rows of every global batch (``MeshStep.local_rows``) and evaluates
    on its own copy of the adapter; process 0 alone logs and shows progress. A step whose loss
    or update is not finite is never applied (the optimizer skips it on device); here it stops
    the run (``train.on_nonfinite=stop``) or is counted and logged (``skip``, up to
    ``train.max_skips`` in a row). Returns ``(state, skipped steps)``.
    """
    from tqdm.auto import tqdm

    log = functools.partial(append_metric, Path(config.output.dir) / "metrics.jsonl") if cluster.primary else lambda record: None
    step = int(state.step)
    started = time.perf_counter()
    data = _batch_iterator(task.splits["train"], config.train.batch_size, config.data.seed, position)
    rows = mesh_step.local_rows(config.train.batch_size)
    # Redirected to a file or a CI log, the bar redraws every 30 s instead of at every step.
    redraw = 0.1 if sys.stderr.isatty() else 30.0
    bar = tqdm(total=config.train.steps, initial=step, disable=not (progress and cluster.primary),
               desc=f"{config.method_name}", unit="step", mininterval=redraw)
    skipped = 0
    try:
        while step < config.train.steps:
            _signals.check()
            manager.check_save()  # an asynchronous save that failed (disk full) stops the run now
            batch, position = next(data)
            local = mesh_step.put_local_batch({k: v[rows] for k, v in batch.items()})
            state, loss_value = mesh_step.step(state, params, local)
            step += 1
            loss_value, (consecutive, _) = jax.device_get((loss_value, lrtt.train.nonfinite_counts(state.opt_state)))
            loss_value, consecutive = float(loss_value), int(consecutive)
            if consecutive or not math.isfinite(loss_value):
                skipped += 1
                log({"kind": "skipped", "step": step, "loss": repr(loss_value)})
                _check_divergence(config, manager, step, loss_value, consecutive, cluster)
                bar.update(1)
                continue
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)  # drawn by update(), at its interval
            bar.update(1)
            log({"kind": "train", "step": step, "loss": loss_value, "time": time.perf_counter() - started})
            if step % config.train.eval_every == 0 or step == config.train.steps:
                adapter = _cluster.local_copy(state.adapter)
                result = evaluate_split(task, method, adapter, "validation", config.train.eval_batch_size)
                log({"kind": "eval", "split": "validation", "step": step, **result})
                if cluster.primary:
                    bar.write(f"step {step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
            if step % config.output.save_every == 0 or step == config.train.steps:
                manager.save(step, state.adapter, state.opt_state, data_position={"epoch": position[0], "index": position[1]}, rng=state.rng)
    finally:
        bar.close()
    return state, skipped


def _check_divergence(config: RunConfig, manager: Any, step: int, loss: float, consecutive: int,
                      cluster: Cluster) -> None:
    """Raise :class:`lrtt.train.DivergenceError` unless ``train.on_nonfinite=skip`` allows one more
    skip (every process sees the same loss, so all of them decide alike; process 0 reports)."""
    if config.train.on_nonfinite == "skip" and consecutive <= config.train.max_skips:
        if cluster.primary:
            print(f"step {step}: non-finite loss or update (loss {loss!r}); step skipped, not applied", file=sys.stderr)
        return
    manager.wait()
    last = manager.latest_step()
    kept = f"the last checkpoint, step {last}, is kept" if last is not None else "no checkpoint was written"
    why = (f"{consecutive} steps in a row were non-finite (train.max_skips={config.train.max_skips})"
           if config.train.on_nonfinite == "skip" else f"the loss is {loss!r} or the update is not finite")
    raise lrtt.train.DivergenceError(
        f"training diverged at step {step}: {why}. The step was not applied and nothing after it was "
        f"saved; {kept}, and the merged export was not touched. Lower train.lr (now {config.train.lr:g}), "
        "or set train.on_nonfinite=skip to skip such steps."
    )
