"""Which checkpoint a job starts from, and reading it back: :class:`RestoreFrom` (the newest, a
step, or the newest intact one), :func:`resume` (``lrtt train`` continuing a run: its state,
with later checkpoints set aside) and :func:`restore_adapter` (``lrtt eval`` / ``export`` /
``generate``: the adapter alone). A damaged checkpoint's error names the command-line way out.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp

import lrtt
from lrtt.cli import _cluster
from lrtt.cli._cluster import Cluster
from lrtt.cli._rundir import drop_metrics_after, set_aside
from lrtt.cli._schema import ConfigError, RunConfig
from lrtt.cli._tasks import Task


@dataclasses.dataclass(frozen=True)
class RestoreFrom:
    """Which checkpoint a job starts from: the newest (default), ``step``, or with ``fallback``
    the newest that reads back whole (damaged newer ones are reported and skipped)."""

    step: int | None = None
    fallback: bool = False


def resume(config: RunConfig, manager: Any, state: Any, step: Any, restore: RestoreFrom,
           cluster: Cluster) -> tuple[Any, tuple[int, int], bool]:
    """``(state, (epoch, index), moved)`` from the checkpoint ``restore`` names (placed by the
    Mesh ``step``), or the fresh state at (0, 0); ``moved``: later steps were set aside.

    Checkpoints newer than the one restored (an earlier ``--restore-step``, or damaged ones
    skipped by ``--fallback``) are moved to ``<run>/discarded/`` so training can write those steps
    anew; nothing is deleted. The metrics of steps after it are dropped (they are replayed).
    Every process restores; process 0 moves and drops, after every process has listed the steps.

    Raises:
      ConfigError: the run is already past ``train.steps``, or a restore option without checkpoints.
      CheckpointMismatchError, CheckpointCorruptError: from the restore (nothing changed yet).
    """
    out = Path(config.output.dir)
    steps = manager.all_steps()
    if not steps:
        if restore.step is not None or restore.fallback:
            raise ConfigError(f"--restore-step/--fallback: {out} has no checkpoint to restore from.")
        return state, (0, 0), False
    with _cli_advice(manager):
        restored = manager.restore(adapter_like=state.adapter, opt_state_like=state.opt_state,
                                   shardings=step.state_sharding, step=restore.step, fallback=restore.fallback)
    if restored.step > config.train.steps:
        raise ConfigError(
            f"{out} is at step {restored.step}, past `train.steps`={config.train.steps}: there is nothing "
            f"to train. Set train.steps above {restored.step} to continue, or use `lrtt eval`/`lrtt export` "
            "on this run."
        )
    later = [s for s in steps if s > restored.step]
    _cluster.barrier(cluster)  # every process has listed the steps before process 0 moves any
    _cluster.on_primary(cluster, lambda: _tidy_after(out, Path(manager.directory), later, restored.step))
    state = lrtt.train.TrainState(restored.adapter, restored.opt_state, jnp.asarray(restored.step, jnp.int32), restored.rng)
    return step.put_state(state), (restored.data_position["epoch"], restored.data_position["index"]), bool(later)


def _tidy_after(out: Path, checkpoints: Path, later: list[int], step: int) -> None:
    """Set the checkpoints ``later`` than ``step`` aside and drop the metrics after it (saying so)."""
    moved = set_aside(checkpoints, later, out)
    if moved is not None:
        print(f"checkpoints {later} moved to {moved} (kept, not deleted): training continues from step {step}")
    dropped = drop_metrics_after(out / "metrics.jsonl", step)
    print(f"resuming {out} from step {step}" + (f" ({dropped} metric records of later steps dropped)" if dropped else ""))


def restore_adapter(config: RunConfig, method: Any, task: Task, restore: RestoreFrom = RestoreFrom()) -> Any:
    """The adapter of the run's checkpoint ``restore`` names; creates nothing on disk."""
    checkpoints = Path(config.output.dir) / "checkpoints"
    if not checkpoints.is_dir():
        raise ConfigError(
            f"no checkpoints in {config.output.dir} ({checkpoints} does not exist); run `lrtt train` with this "
            "config first, or point output.dir at a run."
        )
    adapter_like = lrtt.adapter_shapes(method, task.params)
    with lrtt.CheckpointManager(checkpoints, method, create=False) as manager:
        if manager.latest_step() is None:
            raise ConfigError(f"no committed checkpoint in {checkpoints}; run `lrtt train` with this config first.")
        with _cli_advice(manager):
            return manager.restore(adapter_like=adapter_like, step=restore.step, fallback=restore.fallback).adapter


@contextlib.contextmanager
def _cli_advice(manager: Any):
    """A damaged checkpoint's error, with the command-line way out (the API's names a call)."""
    try:
        yield
    except lrtt.CheckpointCorruptError as err:
        steps = manager.all_steps()
        way_out = f" or --restore-step {err.earlier[-1]} (committed steps: {steps})" if err.earlier else ""
        raise lrtt.CheckpointCorruptError(
            f"{err}\nFrom the command line: add --fallback (the newest step that reads back whole){way_out}.",
            step=err.step, earlier=err.earlier,
        ) from None
