"""Exports of a run: ``lrtt export`` (:func:`export`) and the training job's merged export
(:func:`write_export`) in one of :data:`EXPORT_FORMATS`, each checked before the model loads
(:func:`check_export_target`: where it goes; the format against the model and method).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lrtt
from lrtt.cli._methods import build_method
from lrtt.cli._restore import RestoreFrom, restore_adapter
from lrtt.cli._rundir import run_id
from lrtt.cli._schema import ConfigError, RunConfig
from lrtt.cli._tasks import Task, build_task


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
    check_export_target(path, run, identity, overwrite=overwrite)
    method = build_method(config)
    fmt = format or default_format(config)
    _check_format(config, method, fmt, serve_for)
    task = build_task(config)
    adapter = restore_adapter(config, method, task, restore)
    write_export(config, method, task, adapter, path, fmt, source=identity, overwrite=overwrite, serve_for=serve_for)
    return path


def check_export_target(path: Path, run: Path, identity: str | None, *, overwrite: bool) -> None:
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
