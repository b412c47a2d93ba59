"""What a training run writes and prints at the end, and its metrics on the way: records in
``metrics.jsonl`` (:func:`append_metric`), the summary (:func:`final_summary`), ``summary.json``,
``curves.png`` and the merged export (:func:`write_outputs`), and the closing lines on stdout
(:func:`print_report`, with :func:`count_table`, which ``lrtt count`` prints too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lrtt
from lrtt.cli._evaluate import evaluate_split
from lrtt.cli._export import default_format, write_export
from lrtt.cli._schema import RunConfig
from lrtt.cli._tasks import Task
from lrtt.methods import FullFineTune, LoRA


def append_metric(path: Path, record: dict) -> None:
    """Append ``record`` to ``metrics.jsonl`` at ``path`` as one JSON line."""
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


def final_summary(config: RunConfig, method: Any, task: Task, adapter: Any, steps: int,
                  elapsed: float) -> dict:
    """The summary: test metrics, counts, time; ``export`` (a placeholder until
    :func:`write_outputs` writes it) when the method merges and ``output.export`` is on."""
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


def write_outputs(config: RunConfig, method: Any, task: Task, adapter: Any, summary: dict, identity: str) -> None:
    """The merged export (when the summary has one), ``summary.json`` and ``curves.png``."""
    out = Path(config.output.dir)
    if "export" in summary:
        path = out / "merged"
        write_export(config, method, task, adapter, path, default_format(config), source=identity)
        summary["export"] = str(path)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curves(out / "metrics.jsonl", out / "curves.png")


def print_report(config: RunConfig, method: Any, task: Task, summary: dict) -> None:
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
