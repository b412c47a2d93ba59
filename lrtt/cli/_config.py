"""Run configs for the ``lrtt`` CLI: YAML files validated into frozen dataclasses.

A config has five sections (and an optional sixth, ``quantize``); every key is checked (unknown keys and wrong types are errors that
name the file, the key, what was given and what is allowed)::

    model: minilm            # minilm (BERT, classification) | smollm2 (Llama, language model)
    method: {name: loretta_rep, rank: 8, tt_rank: 5, targets: qv, trainable: '^classifier/'}
    data: {max_len: 128, seed: 0}
    train: {steps: 300, batch_size: 16, lr: 5.0e-3, ...}
    output: {dir: runs/minilm-bbc-loretta-rep}
    quantize: {qtype: nf4, block_size: 64}   # optional: a quantized frozen base (QLoRA)

``--set section.key=value`` overrides a key (the value is parsed as YAML: ``3``, ``1e-3``,
``[a, b]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

MODELS = ("minilm", "smollm2")
METHODS = ("full", "lora", "loretta_rep", "loretta_adp")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """BBC News, tokenized. ``max_len``: tokens per example (classification) or block (LM)."""

    max_len: int = 128
    seed: int = 0
    train_limit: int | None = None  # use only the first N training examples / blocks
    eval_limit: int | None = None


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
    model: str
    method: dict
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()
    quantize: QuantizeConfig = QuantizeConfig()

    @property
    def method_name(self) -> str:
        return self.method["name"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "output": OutputConfig, "quantize": QuantizeConfig}
_TOP = ("model", "method", "data", "train", "output", "quantize")


def _suggest(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f"; did you mean `{close[0]}`?" if close else ""


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``annotation`` (int, float, str, bool, ``X | None``); ints → floats."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"int": int, "float": float, "str": str, "bool": bool, "None": None})
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return True, None
            ok, converted = _type_ok(value, option)
            if ok:
                return True, converted
        return False, value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return True, float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
        try:
            return True, float(value)
        except ValueError:
            return False, value
    if annotation is int and isinstance(value, bool):
        return False, value
    return isinstance(value, annotation), value


# The smallest value each numeric key may take (``None`` stays allowed where the type has it).
_MINIMUM = {
    "data.max_len": 2, "data.train_limit": 1, "data.eval_limit": 1,
    "train.steps": 1, "train.batch_size": 1, "train.warmup": 0, "train.weight_decay": 0.0,
    "train.accumulate": 1, "train.eval_every": 1, "train.eval_batch_size": 1,
    "output.save_every": 1, "output.keep": 1, "train.max_skips": 1, "quantize.block_size": 1,
}


def _section(name: str, raw: Any, cls, source: str):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: `{name}` must be a mapping of keys, got {raw!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key `{name}.{key}`; allowed: {', '.join(fields)}{_suggest(key, fields)}"
            )
        ok, converted = _type_ok(value, fields[key].type)
        if not ok:
            raise ConfigError(
                f"{source}: `{name}.{key}` must be {fields[key].type}, got {value!r} "
                f"({type(value).__name__})."
            )
        minimum = _MINIMUM.get(f"{name}.{key}")
        if minimum is not None and converted is not None and converted < minimum:
            raise ConfigError(f"{source}: `{name}.{key}` must be >= {minimum}, got {value!r}.")
        if f"{name}.{key}" == "train.lr" and not (math.isfinite(converted) and converted > 0):
            raise ConfigError(f"{source}: `train.lr` must be a finite number > 0, got {value!r}.")
        if isinstance(converted, float) and not math.isfinite(converted):
            raise ConfigError(f"{source}: `{name}.{key}` must be a finite number, got {value!r}.")
        values[key] = converted
    return cls(**values)


def _check_choice(value, allowed, key, source):
    if value not in allowed:
        raise ConfigError(f"{source}: `{key}` must be one of {list(allowed)}, got {value!r}{_suggest(str(value), allowed)}")


def parse(raw: Any, *, source: str = "config") -> RunConfig:
    """Validate a loaded YAML mapping into a :class:`RunConfig`.

    Raises:
      ConfigError: unknown keys (with a suggestion), wrong types, unknown model or method.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config is a mapping with keys {list(_TOP)}, got {type(raw).__name__}.")
    for key in raw:
        if key not in _TOP:
            raise ConfigError(f"{source}: unknown key `{key}`; allowed: {', '.join(_TOP)}{_suggest(key, _TOP)}")
    for key in ("model", "method"):
        if key not in raw:
            raise ConfigError(f"{source}: missing required key `{key}`.")
    _check_choice(raw["model"], MODELS, "model", source)
    method = raw["method"]
    if not isinstance(method, dict) or "name" not in method:
        raise ConfigError(f"{source}: `method` must be a mapping with a `name` in {list(METHODS)}, got {method!r}.")
    _check_choice(method["name"], METHODS, "method.name", source)
    sections = {name: _section(name, raw.get(name), cls, source) for name, cls in _SECTIONS.items()}
    _check_choice(sections["train"].forward, ("factored", "merged"), "train.forward", source)
    _check_choice(sections["train"].on_nonfinite, ("stop", "skip"), "train.on_nonfinite", source)
    _check_choice(sections["quantize"].qtype, ("none", "int8", "int4", "nf4"), "quantize.qtype", source)
    return RunConfig(model=raw["model"], method=dict(method), **sections)


def apply_overrides(raw: dict, overrides: list[str], *, source: str = "--set") -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config mapping."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: `{item}` is not of the form section.key=value (e.g. train.steps=50).")
        dotted, text = item.split("=", 1)
        value = yaml.safe_load(text) if text else None
        parts = dotted.split(".")
        if len(parts) == 1:
            raw[parts[0]] = value
        elif len(parts) == 2:
            section = raw.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise ConfigError(f"{source}: `{parts[0]}` is not a section, cannot set `{dotted}`.")
            section[parts[1]] = value
        else:
            raise ConfigError(f"{source}: `{dotted}` has more than one dot; keys are section.key.")
    return raw


def load(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, override and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; the shipped ones are in configs/.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse(apply_overrides(raw, list(overrides)), source=str(path))
