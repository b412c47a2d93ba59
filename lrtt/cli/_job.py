"""The CLI's jobs: train (with resume), evaluate, export and count, from a :class:`RunConfig`.

Outputs of a run go under ``output.dir``: ``checkpoints/`` (Orbax, adapter + optimizer state
only), ``metrics.jsonl`` (one JSON object per logged step or evaluation), ``curves.png``,
``summary.json`` and ``merged/`` (the export).

Training runs data-parallel on a Mesh over every device of every process of the job
(:mod:`lrtt.cli._cluster`); in a multi-process job process 0 alone writes those files but the
checkpoints, which every process saves through Orbax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lrtt
from lrtt.cli import _cluster
from lrtt.cli._cluster import Cluster
from lrtt.cli._schema import ConfigError, RunConfig
from lrtt.cli import _signals
from lrtt.cli._resume_rules import resume_changes
from lrtt.cli._rundir import (check_owned, config_history, drop_metrics_after, mark, run_id, set_aside,
                              write_config)
from lrtt.cli._tasks import Task, build_task, summarize
from lrtt.cli._methods import build_method
from lrtt.methods import FullFineTune, LoRA


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


def evaluate_split(task: Task, method: Any, adapter: Any, split: str, batch_size: int, *,
                   tokens: bool = False) -> dict[str, float]:
    """Average metrics of the adapted model over a whole split (no dropout); with ``tokens``, a
    language model's result also gives ``tokens``, the number of tokens its loss averages."""

    arrays = task.splits[split]
    n = len(next(iter(arrays.values())))
    if method.mergeable:
        forward = jax.jit(lambda params, batch: task.metrics(task.apply(params, batch, None), batch))
        evaluated = lrtt.merge(method, task.params, adapter)
        run = lambda batch: forward(evaluated, batch)  # noqa: E731
    else:
        factored_apply = lrtt.factored(task.apply)
        forward = jax.jit(
            lambda adapter, params, batch: task.metrics(
                factored_apply(lrtt.wrap(method, params, adapter), batch, None), batch
            )
        )
        run = lambda batch: forward(adapter, task.params, batch)  # noqa: E731
    sums: dict[str, list] = {}
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in arrays.items()}
        for name, (total, count) in run(batch).items():
            entry = sums.setdefault(name, [0.0, 0])
            entry[0] += float(total)
            entry[1] += int(count)
    result = summarize({k: tuple(v) for k, v in sums.items()})
    if tokens and task.name == "lm":
        result = {"loss": result["loss"], "perplexity": result["perplexity"], "tokens": int(sums["loss"][1])}
    return result


def _log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def plot_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """Training loss and validation metrics against step, from ``metrics.jsonl``, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional: the metrics stay in metrics.jsonl
        return None
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        axes[0].plot(*zip(*train), label="train loss")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation loss")
        key = "accuracy" if "accuracy" in evals[0] else "perplexity"
        axes[1].plot([r["step"] for r in evals], [r[key] for r in evals], "o-", color="C2")
        axes[1].set_ylabel(f"validation {key}")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def count_table(task_params: Any, method: Any) -> str:
    """The method next to LoRA r=8 on q,v and full fine-tuning, from shapes only."""

    if isinstance(method, FullFineTune):  # the table's first row is full fine-tuning already
        return lrtt.parameter_table(task_params, [LoRA(rank=8, targets="qv")])
    comparison = [method]
    if not isinstance(method, LoRA):  # LoRA r=8 on q, v with the same leaves trained in full
        comparison.append(LoRA(rank=8, targets="qv", trainable=method.trainable or None))
    return lrtt.parameter_table(task_params, comparison)


@dataclasses.dataclass(frozen=True)
class RestoreFrom:
    """Which checkpoint a job starts from: the newest (default), ``step``, or with ``fallback``
    the newest that reads back whole (damaged newer ones are reported and skipped)."""

    step: int | None = None
    fallback: bool = False


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
                _cluster.on_primary(cluster, lambda: _check_export_target(merged, out, identity, overwrite=False))
            _signals.check()
            task = build_task(config)
            _check_data(config, task)
            state, step, params = _training(config, method, task)
            _signals.check()
            state, position, moved = _resume(config, manager, state, step, restore, cluster)
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
        summary = _finish(config, method, task, adapter, int(state.step), elapsed)
        summary["skipped_steps"] = skipped
        _cluster.on_primary(cluster, lambda: _write_outputs(config, method, task, adapter, summary, identity))
        if "export" in summary:  # written by process 0, at the path every process knows
            summary["export"] = str(out / "merged")
    if cluster.primary:
        _report(config, method, task, summary)
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


def _resume(config: RunConfig, manager: Any, state: Any, step: Any, restore: RestoreFrom,
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

    log = functools.partial(_log, Path(config.output.dir) / "metrics.jsonl") if cluster.primary else lambda record: None
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


def _finish(config: RunConfig, method: Any, task: Task, adapter: Any, steps: int, elapsed: float) -> dict:
    """The summary: test metrics, counts, time; ``export`` (a placeholder until
    :func:`_write_outputs` writes it) when the method merges and ``output.export`` is on."""
    test = evaluate_split(task, method, adapter, "test", config.train.eval_batch_size)
    summary = {
        "config": config.to_dict(),
        "method": method.to_config(),
        "trainable_params": lrtt.num_params(adapter),
        "base_params": lrtt.num_params(task.params),
        "test": test,
        "train_seconds": elapsed,
        "steps": steps,
    }
    if config.output.export and method.mergeable:
        summary["export"] = None
    return summary


def _write_outputs(config: RunConfig, method: Any, task: Task, adapter: Any, summary: dict, identity: str) -> None:
    """The merged export (when the summary has one), ``summary.json`` and ``curves.png``."""
    out = Path(config.output.dir)
    if "export" in summary:
        path = out / "merged"
        write_export(config, method, task, adapter, path, default_format(config), source=identity)
        summary["export"] = str(path)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curves(out / "metrics.jsonl", out / "curves.png")


def _report(config: RunConfig, method: Any, task: Task, summary: dict) -> None:
    """The closing lines on stdout: the count table, the held-out metric, the export."""
    test = summary["test"]
    print()
    print(count_table(task.params, method))
    print()
    headline = task.headline
    print(f"held-out test {headline}: {test[headline]:.4f}   (test loss {test['loss']:.4f}, {len(next(iter(task.splits['test'].values())))} examples)")
    print(f"trainable parameters: {summary['trainable_params']:,} of {summary['base_params']:,} ({100 * summary['trainable_params'] / summary['base_params']:.3f}%)")
    print(f"training time this session: {summary['train_seconds']:.1f} s; outputs in {config.output.dir}/")
    if "export" in summary:
        print(f"merged export (zero inference overhead): {summary['export']}")
    elif config.output.export:
        print(f"no merged export: {type(method).__name__} is not mergeable (non-linear adapters)")


def _restore_adapter(config: RunConfig, method: Any, task: Task, restore: RestoreFrom = RestoreFrom()) -> Any:
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


def evaluate(config: RunConfig, split: str = "test", restore: RestoreFrom = RestoreFrom(),
             data: str | None = None) -> dict:
    """Metrics of the run's latest checkpoint (or the one ``restore`` names) on ``split``: for a
    language model ``{"loss", "perplexity", "tokens"}`` (``tokens``: those the loss averages).
    ``data``: a language model evaluated on these files instead (read and tokenized as the run's
    ``data`` section says: format, fields, chat template, masks)."""
    method = build_method(config)
    if data is not None and config.model == "minilm":
        raise ConfigError("--data evaluates a language model on your files; MiniLM classifies BBC News only.")
    task = build_task(config, eval_files=data)
    if data is not None:
        split = "test"
    if split not in task.splits:
        raise ConfigError(f"`split` must be one of {sorted(task.splits)}, got {split!r}.")
    adapter = _restore_adapter(config, method, task, restore)
    return evaluate_split(task, method, adapter, split, config.train.eval_batch_size, tokens=True)


EXPORT_FORMATS = ("hf", "peft", "flax")


def default_format(config: RunConfig) -> str:
    """``hf`` for every model: the PyTorch-format checkpoint transformers 5 loads (MiniLM's
    transformers Flax directory is ``--format flax``)."""
    return "hf"


def _check_format(config: RunConfig, method: Any, fmt: str, serve_for: str | None) -> None:
    """Refuse, before the model loads, a format the run's model or method cannot be exported in."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {list(EXPORT_FORMATS)}, got {fmt!r}.")
    if fmt == "flax" and config.model != "minilm":
        raise ConfigError("--format flax writes a transformers Flax directory, which only the MiniLM classifier "
                          "has; a language model (smollm2, a checkpoint directory) exports as --format hf (what "
                          "AutoModelForCausalLM loads) or peft.")
    if serve_for is not None and fmt != "peft":
        raise ConfigError(f"--for {serve_for} checks a PEFT adapter for serving: use it with --format peft (an hf "
                          "export is a whole model, which vLLM serves as it is).")
    if not method.mergeable:
        raise ConfigError(f"method `{config.method_name}` has no {fmt} export: its adapters are non-linear, and "
                          "merged models and PEFT LoRA files hold linear updates only; serve it through lrtt.factored.")
    if serve_for == "vllm":  # the method's ranks and trainable leaves, before the model loads
        ranks = {"method.rank": getattr(method, "rank", 8)}
        ranks.update({f"method.rank_pattern {k!r}": v for k, v in dict(getattr(method, "rank_pattern", ()) or ()).items()})
        trainable = getattr(method, "trainable", None)
        try:
            lrtt.io.check_vllm({"modules_to_save": [f"method.trainable {trainable!r}"] if trainable else None}, ranks)
        except ValueError as err:
            raise ConfigError(f"--for vllm: {err}") from None


def write_export(config: RunConfig, method: Any, task: Task, adapter: Any, path: Path, fmt: str, *,
                 source: str | None, overwrite: bool = False, serve_for: str | None = None) -> None:
    """Write the export of ``fmt`` at ``path`` under lrtt's ownership rules (an existing ``path``
    must be an lrtt export of ``source``; ``overwrite``: of another source too):

    * ``flax``: the merged params by the bundled model's ``save_pretrained`` (:func:`lrtt.export_merged`);
    * ``hf`` (the default): the merged params as PyTorch-format safetensors, for transformers 5's
      ``AutoModelFor*.from_pretrained``: a checkpoint-directory model's by :func:`lrtt.models.save`
      (its config.json and tokenizer files; SmolLM2's converted checkpoint too), the bundled
      transformers Flax MiniLM's by :func:`lrtt.models.save_flax_model` (``BertForSequenceClassification``);
    * ``peft``: the adapter by :func:`lrtt.save_peft` (``serve_for="vllm"``: ``check="vllm"``).
    """
    if fmt == "flax":
        lrtt.export_merged(method, task.params, adapter, path, model=task.model, source=source, overwrite=overwrite)
    elif fmt == "hf":
        import lrtt.models as lrtt_models  # binds lrtt_models only (a bare `import lrtt.models` would make lrtt local)

        if isinstance(task.model, lrtt_models.Model):  # smollm2 or a checkpoint directory
            dtype = config.model["dtype"] if config.checkpoint is not None else None
            merged = lrtt.merge(method, task.params, adapter, dtype=dtype)
            lrtt.io.export_directory(path, lambda staging: lrtt_models.save(staging, task.model, merged),
                                     source=source, overwrite=overwrite)
        else:  # the bundled transformers Flax MiniLM, in its base's dtype (what export_merged writes)
            merged = lrtt.merge(method, task.params, adapter)
            lrtt.io.export_directory(path, lambda staging: lrtt_models.save_flax_model(staging, task.model, merged),
                                     source=source, overwrite=overwrite)
    else:
        task_type = "CAUSAL_LM" if task.name == "lm" else "SEQ_CLS"
        base = config.checkpoint and str(Path(config.checkpoint).expanduser().resolve())
        lrtt.io.export_directory(
            path,
            lambda staging: lrtt.save_peft(staging, method, adapter, task.params, task_type=task_type,
                                           base_model_name_or_path=base, check=serve_for),
            source=source, overwrite=overwrite)


def export(config: RunConfig, *, out: str | None = None, restore: RestoreFrom = RestoreFrom(),
           overwrite: bool = False, format: str | None = None, serve_for: str | None = None) -> Path:
    """Write the run's checkpoint as ``format`` (:func:`write_export`): ``<output.dir>/merged`` by
    default, or ``out``. ``format`` defaults to ``hf`` (``flax``: a bundled model's transformers
    Flax directory); ``serve_for="vllm"`` (with ``peft``) refuses an adapter vLLM does not serve.

    ``out`` must be outside the run directory (``<output.dir>/merged`` aside) and, if it exists,
    an empty directory or an lrtt export of this run (``overwrite``: of another run too); it is
    checked before the model loads, for every format.

    Raises:
      ConfigError: ``out`` is the run directory or inside it; a format the model or method has
        not; an adapter vLLM does not serve (``serve_for="vllm"``).
      ExportError: ``out`` holds something lrtt did not export (left as it is).
    """
    run = Path(config.output.dir)
    path = Path(out) if out else run / "merged"
    identity = run_id(run) if run.is_dir() else None
    _check_export_target(path, run, identity, overwrite=overwrite)
    method = build_method(config)
    fmt = format or default_format(config)
    _check_format(config, method, fmt, serve_for)
    task = build_task(config)
    adapter = _restore_adapter(config, method, task, restore)
    write_export(config, method, task, adapter, path, fmt, source=identity, overwrite=overwrite, serve_for=serve_for)
    return path


def _check_export_target(path: Path, run: Path, identity: str | None, *, overwrite: bool) -> None:
    """Refuse, before any work, an export target inside the run (but ``merged/``) or holding
    what lrtt may not replace (:func:`lrtt.io.check_export_target`)."""
    target, home = path.resolve(), run.resolve()
    if target != home / "merged" and (target == home or home in target.parents):
        raise ConfigError(
            f"--out {str(path)!r} is {'the run directory' if target == home else 'inside the run directory'} "
            f"{str(run)!r}, where the export would replace what the run wrote; export to {run / 'merged'} "
            "(the default) or to a directory outside the run."
        )
    lrtt.io.check_export_target(path, source=identity, overwrite=overwrite)
