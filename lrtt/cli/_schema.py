"""The run config's schema: its sections as frozen dataclasses with their defaults, the choices
of its keys, and :class:`ConfigError`, the error every config check raises.

A config has five sections (and an optional sixth, ``quantize``)::

    model: minilm            # minilm (BERT, classification) | smollm2 (Llama, language model)
                             # | {path: DIR, dtype: bfloat16}: a transformers checkpoint directory (LM)
    method: {name: loretta_rep, rank: 8, tt_rank: 5, targets: qv, trainable: '^classifier/'}
    data: {max_len: 128, seed: 0}
    train: {steps: 300, batch_size: 16, lr: 5.0e-3, ...}
    output: {dir: runs/minilm-bbc-loretta-rep}
    quantize: {qtype: nf4, block_size: 64}   # optional: a quantized frozen base (QLoRA)

``method.name`` is the ``NAME`` of a method class lrtt registers (:mod:`lrtt.cli._methods`);
the method's other keys are its class's fields.
"""

from __future__ import annotations

import dataclasses

from lrtt import Error

MODELS = ("minilm", "smollm2")
MODEL_KEYS = ("path", "dtype")  # `model: {path: DIR, dtype: ...}`: a checkpoint directory (lrtt.models.load)
MODEL_DTYPES = ("float32", "bfloat16", "float16")
DATA_FORMATS = ("auto", "text", "prompt_completion", "chat")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The training data: BBC News (the default), or the user's files for a language model
    (``train``: a path, directory or glob, or a list of them; lrtt.data reads them).
    ``max_len``: tokens per example (classification), block (BBC LM) or row (files)."""

    max_len: int = 128
    seed: int = 0
    train_limit: int | None = None  # use only the first N training examples / blocks / rows
    eval_limit: int | None = None
    train: str | list | None = None  # the user's files (JSONL, JSON, CSV, Parquet, text); None: BBC News
    eval: str | list | None = None  # held-out files; else eval_fraction of `train`
    eval_fraction: float | None = None  # default 0.05 when `train` is given without `eval`
    format: str = "auto"  # auto | text | prompt_completion | chat
    fields: dict | None = None  # field names, e.g. {prompt: question, completion: answer}
    roles: dict | None = None  # other role names, e.g. {human: user, gpt: assistant}
    on_bad_row: str = "error"  # error | skip
    packing: bool = False  # several examples per row (segment ids; attention never crosses them)
    train_on_prompt: bool = False  # the loss also counts prompt / user / system tokens
    chat_template: bool = False  # render prompt/completion strings with the checkpoint's chat template


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    accumulate: int = 1
    eval_every: int = 100
    eval_batch_size: int = 64
    seed: int = 0
    forward: str = "factored"  # factored | merged
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or update does (never applied)
    max_skips: int = 10  # on_nonfinite=skip: this many skipped steps in a row stop the run


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """The frozen base held quantized (QLoRA): every linear kernel but the head, via lrtt.quantize."""

    qtype: str = "none"  # none | int8 | int4 | nf4
    block_size: int | None = 64  # inputs per scale; None: one scale per output channel


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/default"
    save_every: int = 100
    keep: int = 3
    export: bool = True  # write the merged params at the end (LoRA, LorettaRep, full)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str | dict  # a bundled model's name, or {"path": DIR, "dtype": ...} (a checkpoint directory)
    method: dict
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()
    quantize: QuantizeConfig = QuantizeConfig()

    @property
    def method_name(self) -> str:
        return self.method["name"]

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint directory of ``model: {path: DIR}``, or None for a bundled model."""
        return self.model["path"] if isinstance(self.model, dict) else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(Error, ValueError):
    """A config file or override that does not fit the schema."""


SECTIONS = {"data": DataConfig, "train": TrainConfig, "output": OutputConfig, "quantize": QuantizeConfig}
TOP_KEYS = ("model", "method", "data", "train", "output", "quantize")
