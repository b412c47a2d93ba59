"""Validation of a run config: a raw mapping checked key by key into a :class:`~lrtt.cli._schema.RunConfig`.

Every key is checked: unknown keys (with a suggestion), wrong types, values out of range and
choices not among those allowed are errors that name the source, the key, what was given and
what is allowed, on one line.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

from lrtt.cli._methods import method_names
from lrtt.cli._schema import (DATA_FORMATS, MODEL_DTYPES, MODEL_KEYS, MODELS, SECTIONS, TOP_KEYS, ConfigError,
                              DataConfig, RunConfig)
from lrtt.cli._show import did_you_mean, show, show_key


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


def _type_hint(value: Any, annotation: Any) -> str:
    """The way out of a wrong type, where there is an obvious one."""
    if "bool" in str(annotation) and isinstance(value, str):
        return "; write true or false"
    if str(annotation) == "str" and isinstance(value, (int, float, bool)):
        return "; quote it to keep it as text"
    return ""


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
        raise ConfigError(f"{source}: `{name}` must be a mapping of keys, got {show(raw)}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key {show_key(dotted)}; allowed: {', '.join(fields)}{did_you_mean(key, fields)}"
            )
        ok, converted = _type_ok(value, fields[key].type)
        if not ok:
            raise ConfigError(
                f"{source}: `{dotted}` must be {fields[key].type}, got {show(value)} "
                f"({type(value).__name__}){_type_hint(value, fields[key].type)}."
            )
        minimum = _MINIMUM.get(dotted)
        if minimum is not None and converted is not None and converted < minimum:
            raise ConfigError(f"{source}: `{dotted}` must be >= {minimum}, got {show(value)}.")
        if dotted == "train.lr" and not (math.isfinite(converted) and converted > 0):
            raise ConfigError(f"{source}: `train.lr` must be a finite number > 0, got {show(value)}.")
        if isinstance(converted, float) and not math.isfinite(converted):
            raise ConfigError(f"{source}: `{dotted}` must be a finite number, got {show(value)}.")
        values[key] = converted
    return cls(**values)


def _check_data(data: DataConfig, model: Any, source: str) -> None:
    """The user-file keys: choices, and only with a language model and ``data.train``."""
    _check_choice(data.format, DATA_FORMATS, "data.format", source)
    _check_choice(data.on_bad_row, ("error", "skip"), "data.on_bad_row", source)
    for key in ("train", "eval"):
        value = getattr(data, key)
        if isinstance(value, list) and not (value and all(isinstance(v, str) and v for v in value)):
            raise ConfigError(f"{source}: `data.{key}` must be a path or glob, or a non-empty list of them, "
                              f"got {show(value)}.")
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{source}: `data.{key}` must name files (a path, directory or glob), got {show(value)}.")
    for key in ("fields", "roles"):
        value = getattr(data, key)
        if value is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ConfigError(f"{source}: `data.{key}` must map names to names, got {show(value)}.")
    if data.eval_fraction is not None and not 0 < data.eval_fraction < 1:
        raise ConfigError(f"{source}: `data.eval_fraction` must be in (0, 1), got {show(data.eval_fraction)}.")
    user_keys = {"eval": None, "eval_fraction": None, "format": "auto", "fields": None, "roles": None,
                 "on_bad_row": "error", "packing": False, "train_on_prompt": False, "chat_template": False}
    given = [k for k, default in user_keys.items() if getattr(data, k) != default]
    if data.train is None and given:
        raise ConfigError(f"{source}: `data.{given[0]}` applies to the user's files; set `data.train` to them "
                          "(a path, directory or glob), or remove it to train on BBC News.")
    if data.train is not None:
        if model == "minilm":
            raise ConfigError(f"{source}: `data.train` (your files) trains a language model: use `model: smollm2` or "
                              "`model: {path: DIR}`; MiniLM classifies BBC News only.")
        if data.eval is not None and data.eval_fraction is not None:
            raise ConfigError(f"{source}: give `data.eval` (held-out files) or `data.eval_fraction`, not both.")


def _check_choice(value, allowed, key, source):
    if value not in allowed:
        raise ConfigError(
            f"{source}: `{key}` must be one of {list(allowed)}, got {show(value)}{did_you_mean(value, allowed)}"
        )


def _check_no_nul(value: Any, path: str, source: str, seen: set[int]) -> None:
    """Refuse a NUL character in any string (key or value) of the raw config, naming where."""
    if isinstance(value, str):
        if "\0" in value:
            raise ConfigError(
                f"{source}: {show_key(path)} holds a NUL character (\\x00) at position {value.index(chr(0))}: "
                f"{show(value)}; remove it."
            )
        return
    if not isinstance(value, (dict, list)) or id(value) in seen:
        return
    seen.add(id(value))
    items = value.items() if isinstance(value, dict) else ((f"[{i}]", v) for i, v in enumerate(value))
    for key, item in items:
        if isinstance(key, str) and "\0" in key and isinstance(value, dict):
            where = f"under {show_key(path)}" if path else "at the top level"
            raise ConfigError(f"{source}: the key {show(key)} {where} holds a NUL character (\\x00); remove it.")
        if isinstance(value, list):
            child = f"{path}{key}"
        else:
            child = f"{path}.{key}" if path else str(key)
        _check_no_nul(item, child, source, seen)


def parse(raw: Any, *, source: str = "config") -> RunConfig:
    """Validate a loaded YAML mapping into a :class:`RunConfig`.

    Raises:
      ConfigError: unknown keys (with a suggestion), wrong types, unknown model or method, an
        empty ``output.dir``, a NUL character in any string.
    """
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: a config is a mapping with keys {list(TOP_KEYS)}, got a {type(raw).__name__}: {show(raw)}."
        )
    _check_no_nul(raw, "", source, set())
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"{source}: unknown key {show_key(key)}; allowed: {', '.join(TOP_KEYS)}{did_you_mean(key, TOP_KEYS)}")
    for key in ("model", "method"):
        if key not in raw:
            raise ConfigError(f"{source}: missing required key `{key}`.")
    model = _model(raw["model"], source)
    method = raw["method"]
    methods = method_names()
    if not isinstance(method, dict) or "name" not in method:
        raise ConfigError(
            f"{source}: `method` must be a mapping with a `name` in {list(methods)}, got {show(method)}."
        )
    _check_choice(method["name"], methods, "method.name", source)
    sections = {name: _section(name, raw.get(name), cls, source) for name, cls in SECTIONS.items()}
    _check_choice(sections["train"].forward, ("factored", "merged"), "train.forward", source)
    _check_choice(sections["train"].on_nonfinite, ("stop", "skip"), "train.on_nonfinite", source)
    _check_choice(sections["quantize"].qtype, ("none", "int8", "int4", "nf4"), "quantize.qtype", source)
    _check_data(sections["data"], model, source)
    if not sections["output"].dir.strip():
        raise ConfigError(
            f"{source}: `output.dir` must name a directory, got {show(sections['output'].dir)}; "
            "set it in the file or with --set output.dir=runs/NAME."
        )
    return RunConfig(model=model, method=dict(method), **sections)


def _model(value: Any, source: str) -> str | dict:
    """``model``: a bundled model's name, or ``{path: DIR, dtype: ...}`` (keys checked; DIR must be a
    directory holding ``config.json``), returned with every key (``dtype`` default float32)."""
    if not isinstance(value, dict):
        if not isinstance(value, str) or value not in MODELS:
            raise ConfigError(
                f"{source}: `model` must be one of {list(MODELS)} or {{path: DIR}}, got {show(value)}"
                f"{did_you_mean(value, MODELS)}"
            )
        return value
    for key in value:
        if key not in MODEL_KEYS:
            raise ConfigError(
                f"{source}: unknown key {show_key(f'model.{key}')}; allowed: {', '.join(MODEL_KEYS)}{did_you_mean(key, MODEL_KEYS)}"
            )
    if "path" not in value:
        raise ConfigError(f"{source}: `model` as a mapping needs `path`, a transformers checkpoint directory "
                          "(config.json + safetensors).")
    path, dtype = value["path"], value.get("dtype", "float32")
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"{source}: `model.path` must name a checkpoint directory, got {show(path)}.")
    _check_choice(dtype, MODEL_DTYPES, "model.dtype", source)
    where = Path(path).expanduser()
    if not where.is_dir():
        what = "does not exist" if not where.exists() else "is not a directory"
        raise ConfigError(f"{source}: `model.path` {show(path)} {what}; give a transformers checkpoint directory "
                          "(what save_pretrained writes: config.json + model.safetensors).")
    if not (where / "config.json").is_file():
        raise ConfigError(f"{source}: `model.path` {show(path)} holds no config.json: not a transformers checkpoint "
                          "directory (what save_pretrained writes: config.json + model.safetensors).")
    return {"path": path, "dtype": dtype}

