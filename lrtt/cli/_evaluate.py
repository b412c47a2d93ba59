"""Evaluation: the metrics of an adapted model over a whole split (:func:`evaluate_split`, also
the training job's validation and test), and ``lrtt eval`` on a run's checkpoint (:func:`evaluate`).
"""

from __future__ import annotations

from typing import Any

import jax

import lrtt
from lrtt.cli._methods import build_method
from lrtt.cli._restore import RestoreFrom, restore_adapter
from lrtt.cli._schema import ConfigError, RunConfig
from lrtt.cli._tasks import Task, build_task, summarize


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
    adapter = restore_adapter(config, method, task, restore)
    return evaluate_split(task, method, adapter, split, config.train.eval_batch_size, tokens=True)
