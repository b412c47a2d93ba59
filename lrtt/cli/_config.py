"""Run configs for the ``lrtt`` CLI: YAML files validated into frozen dataclasses.

A config has five sections (and an optional sixth, ``quantize``); every key is checked (unknown keys and wrong types are errors that
name the file, the key, what was given and what is allowed)::

    model: minilm            # minilm (BERT, classification) | smollm2 (Llama, language model)
                             # | {path: DIR, dtype: bfloat16}: a transformers checkpoint directory (LM)
    method: {name: loretta_rep, rank: 8, tt_rank: 5, targets: qv, trainable: '^classifier/'}
    data: {max_len: 128, seed: 0}
    train: {steps: 300, batch_size: 16, lr: 5.0e-3, ...}
    output: {dir: runs/minilm-bbc-loretta-rep}
    quantize: {qtype: nf4, block_size: 64}   # optional: a quantized frozen base (QLoRA)

Files. A config is a UTF-8 text file whose top level is a mapping. A key given twice in one
mapping (at any level) is an error naming both lines (YAML itself would keep the last silently);
so are a file that is binary, not UTF-8 (the byte offset is named), a directory, or unreadable.

Overrides. ``--set section.key=value`` (or ``--set model=smollm2``) sets one key. The value is
everything after the first ``=`` and is read as:

* an int (``50``, ``-3``), a float (``1e-3``, ``5.0e-3``, ``.5``), a bool (``true`` / ``false``,
  any case) or null (``null``, any case, or ``~``), when the whole value (spaces around it
  ignored) is one; ``none`` is the string ``'none'`` (``quantize.qtype=none``);
* a YAML flow list or mapping when it starts with ``[`` or ``{`` (``method.targets=[q_proj,
  v_proj]``); one that does not parse is an error naming the override;
* a string, the text between the quotes, when it is wrapped in ``'...'`` or ``"..."`` (YAML
  quoting: ``output.dir='2024'`` is the string ``'2024'``, not the int);
* otherwise the string exactly as written: ``output.dir=/x/run #1`` is ``'/x/run #1'`` (no YAML
  comments) and ``output.dir=`` is the empty string (not null).

Messages. Every :class:`ConfigError` is one line naming the file (or ``--set``), the key, the
value and the fix; a value is shown by :func:`show`, at most ~80 characters of it.

Resuming. :data:`FIXED` and :data:`APPLIES` classify every key for a resumed run, and
:func:`resume_changes` compares a run's saved config with the new one (:func:`format_table`
renders the classification for the docs).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from lrtt import Error, Method

MODELS = ("minilm", "smollm2")
MODEL_KEYS = ("path", "dtype")  # `model: {path: DIR, dtype: ...}`: a checkpoint directory (lrtt.models.load)
MODEL_DTYPES = ("float32", "bfloat16", "float16")


def method_names() -> tuple[str, ...]:
    """The names ``method.name`` takes: the ``NAME`` of every method class lrtt registers
    (:meth:`lrtt.Method.registered`), a new one included."""
    return tuple(Method.registered())


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


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "output": OutputConfig, "quantize": QuantizeConfig}
_TOP = ("model", "method", "data", "train", "output", "quantize")


# ---------------------------------------------------------------------------------------------
# Showing values: every user value quoted in a message goes through `show`.

SHOW_LIMIT = 80


def _repr() -> reprlib.Repr:
    """A ``reprlib.Repr`` that cuts long values (its keyword arguments are Python 3.12+ only)."""
    short = reprlib.Repr()
    for name, value in dict(maxlevel=3, maxlist=8, maxtuple=8, maxdict=8, maxset=8,
                            maxstring=SHOW_LIMIT, maxother=SHOW_LIMIT, maxlong=SHOW_LIMIT).items():
        setattr(short, name, value)
    return short


_REPR = _repr()


def show(value: Any, limit: int = SHOW_LIMIT) -> str:
    """``repr(value)`` on one line, cut to about ``limit`` characters.

    A long string keeps its first ``limit`` characters and its length: ``'xxxx…' (10000000
    characters)``; a long list or mapping its first items, then ``…``. Never raises (an int too
    long for ``str`` is shown by its size)."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        head = repr(value[:limit])
        return f"{head[:-1]}…{head[-1]} ({len(value)} characters)"
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int of more than 4300 digits
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= limit else text[:limit] + "…"


def _key(dotted: Any) -> str:
    """A (dotted) key for a message: in backquotes (`train.steps`) when it is short text, else :func:`show`."""
    text = str(dotted) if isinstance(dotted, (str, int, float, bool)) or dotted is None else None
    if text is not None and text.isprintable() and len(text) <= SHOW_LIMIT:
        return f"`{text}`"
    return show(dotted)


def _name(path: Path) -> str:
    """A file's name for a message (escaped if it holds control characters)."""
    text = str(path)
    return text if text.isprintable() else show(text, limit=4 * SHOW_LIMIT)


def _suggest(key: Any, allowed) -> str:
    if not isinstance(key, str) or len(key) > SHOW_LIMIT:
        return ""
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f"; did you mean `{close[0]}`?" if close else ""


# ---------------------------------------------------------------------------------------------
# Reading files.


class _DuplicateKey(yaml.YAMLError):
    """A mapping that gives one key twice (``first`` and ``second`` are the keys' marks)."""

    def __init__(self, path: str, first: yaml.Mark, second: yaml.Mark):
        super().__init__(path)
        self.path, self.first, self.second = path, first, second

    def describe(self, *, columns: bool = False) -> str:
        """One line: the key and where it is given twice (lines in a file, columns in an override)."""
        if columns:
            where = f"at columns {self.first.column + 1} and {self.second.column + 1} of the value"
        else:
            where = f"at line {self.first.line + 1} and line {self.second.line + 1}"
        return f"{_key(self.path)} is given twice, {where}; keep one"


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a mapping giving a key twice is an error
    (:class:`_DuplicateKey`, with both places) where YAML keeps the last value silently, and an
    int too long for Python is a YAML error at its place rather than a bare ``ValueError``."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        self._check_keys(node, "", set())
        return self.construct_document(node)

    def _check_keys(self, node: yaml.Node, path: str, seen: set[int]) -> None:
        """Walk the composed document (each node once: aliases share nodes) for repeated keys."""
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_keys(item, f"{path}[{i}]", seen)
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Mark] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys given here may override
                    self._check_keys(value_node, path, seen)
                    continue
                if isinstance(key_node, yaml.ScalarNode):
                    key = self.construct_object(key_node)
                    dotted = f"{path}.{key}" if path else str(key)
                else:  # a list or mapping as a key: never equal to another one here
                    key, dotted = id(key_node), f"{path}.<complex key>"
                if key in first:
                    raise _DuplicateKey(dotted, first[key], key_node.start_mark)
                first[key] = key_node.start_mark
                self._check_keys(value_node, dotted, seen)

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"the integer {show(node.value)} has too many digits for Python (quote it if it is text)",
                node.start_mark,
            ) from None


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _one_line(err: yaml.YAMLError, *, columns: bool = False) -> str:
    """YAML's multi-line error as one line: the problem at line L, column C (and its context)."""
    if isinstance(err, _DuplicateKey):
        return err.describe(columns=columns)

    def at(mark) -> str:
        if columns:
            return f"at column {mark.column + 1} of the value"
        return f"at line {mark.line + 1}, column {mark.column + 1}"

    if isinstance(err, yaml.MarkedYAMLError):
        problem, mark = (err.problem, err.problem_mark) if err.problem else (err.context, err.context_mark)
        text = f"{problem} {at(mark)}" if mark else str(problem)
        if err.problem and err.context:
            text += f" ({err.context}{' ' + at(err.context_mark) if err.context_mark else ''})"
        if err.note:
            text += f"; {err.note}"
    else:
        text = str(err)
    text = " ".join(text.split())
    return text if len(text) <= 4 * SHOW_LIMIT else text[: 4 * SHOW_LIMIT] + "…"


def _load_yaml(text: str, where: str, *, columns: bool = False, fix: str = "") -> Any:
    """``text`` parsed by :class:`_StrictLoader`; every YAML failure a one-line ConfigError
    (``columns``: with the column of the error; ``fix``: the way out, appended)."""
    loader = _StrictLoader(text)
    fix = f"; {fix}" if fix else ""
    try:
        return loader.get_single_data()
    except _DuplicateKey as err:
        raise ConfigError(f"{where}: {err.describe(columns=columns)}.") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {_one_line(err, columns=columns)}{fix}.") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read; a config is a few levels of mappings.") from None
    finally:
        loader.dispose()


_NOT_TEXT = yaml.reader.Reader.NON_PRINTABLE  # characters YAML refuses in a stream (NUL, most C0 controls, ...)


def _read_text(path: Path) -> str:
    """The file's text; a missing, unreadable, non-UTF-8 or binary file is a ConfigError naming it."""
    name = _name(path)
    if not path.exists():
        raise ConfigError(f"config file {name} does not exist; the shipped ones are in configs/.")
    if path.is_dir():
        try:
            inside = sorted(p.name for p in path.iterdir() if p.suffix in (".yaml", ".yml"))[:3]
        except OSError:
            inside = []
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise ConfigError(f"{name}: is a directory, not a config file; give a YAML file{hint}.")
    if not path.is_file():
        raise ConfigError(f"{name}: is not a regular file (a pipe, socket or device); give a YAML file.")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{name}: cannot be read ({err.strerror or err}); check its permissions.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"{name}: not UTF-8 text: byte 0x{data[err.start]:02x} at byte offset {err.start} (line {line}); "
            "a config is a YAML text file saved as UTF-8."
        ) from None
    bad = _NOT_TEXT.search(text)
    if bad:
        offset = len(text[: bad.start()].encode())
        line = text.count("\n", 0, bad.start()) + 1
        raise ConfigError(
            f"{name}: not a text file: control character {bad.group()!r} at byte offset {offset} (line {line}); "
            "a config is a YAML text file."
        )
    return text


# ---------------------------------------------------------------------------------------------
# Overrides.

_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][-+]?[0-9]+)?")


def override_value(text: str, *, item: str | None = None, source: str = "--set") -> Any:
    """The value of ``--set key=TEXT``: an int, float, bool, null, flow list / mapping or quoted
    string when ``text`` is one (see the module docstring), else ``text`` itself.

    Raises:
      ConfigError: a value starting with ``[`` / ``{`` or quoted that is not valid YAML.
    """
    word = text.strip()
    if _INT.fullmatch(word):
        try:
            return int(word)
        except ValueError:  # more than 4300 digits: the text, which the schema then refuses
            return text
    if _FLOAT.fullmatch(word):
        return float(word)
    if word.lower() in ("true", "false"):
        return word.lower() == "true"
    if word.lower() == "null" or word == "~":
        return None
    where = f"{source} {show(text if item is None else item)}"
    if word[:1] in ("[", "{"):
        kind = "list" if word[0] == "[" else "mapping"
        example = "[a, b]" if kind == "list" else "{a: 1, b: 2}"
        value = _flow(word, where, f"write a YAML flow {kind} ({example}), or quote the whole value to keep it as text")
        if not isinstance(value, (list, dict)):
            raise ConfigError(f"{where}: is not one YAML flow {kind}, got {show(value)}.")
        return value
    if len(word) >= 2 and word[0] == word[-1] and word[0] in "'\"":
        fix = "in YAML quoting a ' inside '...' is written '' ('it''s'), a \" inside \"...\" is \\\""
        value = _flow(word, where, fix)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: is not one quoted string, got {show(value)}.")
        return value
    return text


def _flow(word: str, where: str, fix: str) -> Any:
    """``word`` parsed as YAML; a failure names the override, what it should be and the way out."""
    return _load_yaml(word, where, columns=True, fix=fix)


def _split_override(item: str, source: str) -> tuple[list[str], str]:
    """``section.key=value`` → (``[section, key]``, ``value``), checking the key's form."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"{source}: {show(item)} is not of the form section.key=value (e.g. train.steps=50).")
    dotted, text = item.split("=", 1)
    parts = [part.strip() for part in dotted.split(".")]
    if len(parts) > 2:
        raise ConfigError(
            f"{source}: {_key(dotted)} has more than one dot; keys are section.key (e.g. train.steps=50)."
        )
    if not all(parts):
        raise ConfigError(f"{source}: {show(item)} names no key; write section.key=value (e.g. train.steps=50).")
    return parts, text


def apply_overrides(raw: dict, overrides: list[str], *, source: str = "--set") -> dict:
    """Apply ``section.key=value`` overrides (values read as the module docstring says) to a raw
    config mapping; returns a new mapping (``raw`` and its sections are not changed)."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        parts, text = _split_override(item, source)
        value = override_value(text, item=item, source=source)
        if len(parts) == 1:
            raw[parts[0]] = value
            continue
        if raw.get(parts[0]) is None:  # absent, or `train:` with nothing under it
            raw[parts[0]] = {}
        section = raw[parts[0]]
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: {_key(parts[0])} is not a section (it is {show(section)}), "
                              f"cannot set {_key('.'.join(parts))}.")
        section[parts[1]] = value
    return raw


# ---------------------------------------------------------------------------------------------
# Validation.


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
                f"{source}: unknown key {_key(dotted)}; allowed: {', '.join(fields)}{_suggest(key, fields)}"
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


DATA_FORMATS = ("auto", "text", "prompt_completion", "chat")


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
            f"{source}: `{key}` must be one of {list(allowed)}, got {show(value)}{_suggest(value, allowed)}"
        )


def _check_no_nul(value: Any, path: str, source: str, seen: set[int]) -> None:
    """Refuse a NUL character in any string (key or value) of the raw config, naming where."""
    if isinstance(value, str):
        if "\0" in value:
            raise ConfigError(
                f"{source}: {_key(path)} holds a NUL character (\\x00) at position {value.index(chr(0))}: "
                f"{show(value)}; remove it."
            )
        return
    if not isinstance(value, (dict, list)) or id(value) in seen:
        return
    seen.add(id(value))
    items = value.items() if isinstance(value, dict) else ((f"[{i}]", v) for i, v in enumerate(value))
    for key, item in items:
        if isinstance(key, str) and "\0" in key and isinstance(value, dict):
            where = f"under {_key(path)}" if path else "at the top level"
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
            f"{source}: a config is a mapping with keys {list(_TOP)}, got a {type(raw).__name__}: {show(raw)}."
        )
    _check_no_nul(raw, "", source, set())
    for key in raw:
        if key not in _TOP:
            raise ConfigError(f"{source}: unknown key {_key(key)}; allowed: {', '.join(_TOP)}{_suggest(key, _TOP)}")
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
    sections = {name: _section(name, raw.get(name), cls, source) for name, cls in _SECTIONS.items()}
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
                f"{_suggest(value, MODELS)}"
            )
        return value
    for key in value:
        if key not in MODEL_KEYS:
            raise ConfigError(
                f"{source}: unknown key {_key(f'model.{key}')}; allowed: {', '.join(MODEL_KEYS)}{_suggest(key, MODEL_KEYS)}"
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


def load(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, override and validate a YAML config file.

    Raises:
      ConfigError: (one line, naming the file) the file is missing, a directory, unreadable, not
        UTF-8 text, not valid YAML, repeats a key, has no mapping at its top level, or does not
        fit the schema (:func:`parse`); an override is malformed (:func:`apply_overrides`).
    """
    path = Path(path)
    name = _name(path)
    raw = _load_yaml(_read_text(path), name)
    if raw is None:  # an empty file (or only comments): the schema then names what is missing
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{name}: the top level must be a mapping of sections ({', '.join(_TOP)}), "
            f"found a {type(raw).__name__}: {show(raw)}."
        )
    return parse(apply_overrides(raw, list(overrides)), source=name)


# ---------------------------------------------------------------------------------------------
# Resuming: which keys may change between a run's start and its resumption.

FIXED: dict[str, str] = {  # key -> what a change would reinterpret: refused on resume
    "model": "the base weights the adapter was trained on (a name, or a checkpoint's path and dtype)",
    "method.*": "the adapter's parameters: their shapes and what they mean (name, rank, targets, tt_rank, ...)",
    "quantize.qtype": "the frozen base the adapter was trained against",
    "quantize.block_size": "the frozen base the adapter was trained against",
    "data.max_len": "the examples (LM blocks) the saved data position counts",
    "data.seed": "the shuffled order the saved data position indexes",
    "data.train_limit": "the training examples the saved data position indexes",
    "data.train": "the training examples the saved data position indexes",
    "data.eval": "which examples are held out (with eval_fraction: which are trained on)",
    "data.eval_fraction": "which examples are held out and which are trained on",
    "data.format": "how the rows are read into examples",
    "data.fields": "how the rows are read into examples",
    "data.roles": "how the rows are read into examples",
    "data.on_bad_row": "which rows are examples (skipped ones shift the data position)",
    "data.packing": "the rows the saved data position counts",
    "data.train_on_prompt": "the loss the adapter was trained on",
    "data.chat_template": "the token sequences the adapter was trained on",
    "train.batch_size": "the examples a step takes, which the saved data position counts",
    "train.accumulate": "what one step (one update) is",
    "train.seed": "the adapter's initialization and the saved random state",
}
APPLIES: dict[str, str] = {  # key -> what a change does: applies from the resumed step
    "train.steps": "where the run ends",
    "train.lr": "the learning-rate schedule",
    "train.warmup": "the learning-rate schedule",
    "train.weight_decay": "the optimizer's weight decay",
    "train.eval_every": "when validation runs",
    "train.eval_batch_size": "evaluation's batches (not its result)",
    "train.forward": "how the forward pass is computed (not its result)",
    "train.on_nonfinite": "what a non-finite step does",
    "train.max_skips": "what a non-finite step does",
    "data.eval_limit": "the validation and test examples evaluated",
    "output.save_every": "when checkpoints are written",
    "output.keep": "how many checkpoints are kept",
    "output.export": "whether the merged params are written at the end",
}
IDENTITY = ("output.dir",)  # the run itself: never compared


class _Unset:
    """A method key the config does not give (shown as ``(not set)``)."""

    def __repr__(self) -> str:
        return "(not set)"


UNSET = _Unset()


class Change(NamedTuple):
    """One key whose value differs between a run's saved config and the new one."""

    key: str  # dotted: 'train.lr', 'method.rank'
    old: Any  # UNSET for a method key the saved config does not give
    new: Any  # UNSET for a method key the new config does not give

    def __str__(self) -> str:
        return f"{self.key} {show(self.old)} → {show(self.new)}"


def _plain(value: Any) -> Any:
    """Tuples as lists (a config saved as JSON reads back lists), for comparing."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _saved(old: dict, key: str) -> Any:
    """The value of dotted ``key`` in a saved config; a missing section or key is the default."""
    section, _, field = key.partition(".")
    if not field:
        return old.get(section)
    values = old.get(section)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"the run's saved config: `{section}` must be a mapping of keys, got {show(values)}.")
    default = {f.name: f.default for f in dataclasses.fields(_SECTIONS[section])}[field]
    return values.get(field, default)


def _method_changes(old: Any, new: dict) -> list[Change]:
    """The method keys that differ, key by key (a key given on one side only is a change)."""
    old = old if isinstance(old, dict) else {}
    keys = list(dict.fromkeys([*new, *old]))
    return [
        Change(f"method.{k}", old.get(k, UNSET), new.get(k, UNSET))
        for k in keys
        if k not in old or k not in new or _plain(old[k]) != _plain(new[k])
    ]


def resume_changes(old: dict, new: RunConfig) -> tuple[list[Change], list[Change]]:
    """(refused, applied): the keys that differ between a run's saved config (old, RunConfig.to_dict()
    form, possibly from an older lrtt missing some keys — missing means the default) and the new one,
    each a Change(key, old, new) NamedTuple with `key` dotted like 'train.lr'.

    ``refused`` holds the :data:`FIXED` keys (``method.*`` compared key by key, e.g.
    ``method.rank``), ``applied`` the :data:`APPLIES` keys, each in the tables' order;
    ``output.dir`` is never compared. Keys of ``old`` that lrtt no longer has are ignored.
    """
    current = new.to_dict()
    refused: list[Change] = []
    applied: list[Change] = []
    for key in (*FIXED, *APPLIES):
        if key == "method.*":
            changes = _method_changes(old.get("method"), new.method)
        else:
            section, _, field = key.partition(".")
            before, after = _saved(old, key), (current[section][field] if field else current[section])
            if key == "model" and isinstance(before, dict) and isinstance(after, dict):  # {path, dtype}: by key
                changes = [Change(f"model.{k}", before.get(k, UNSET), after.get(k, UNSET))
                           for k in dict.fromkeys([*after, *before]) if _plain(before.get(k)) != _plain(after.get(k))]
            else:
                changes = [] if _plain(before) == _plain(after) else [Change(key, before, after)]
        (refused if key in FIXED else applied).extend(changes)
    return refused, applied


def format_table() -> str:
    """:data:`FIXED` and :data:`APPLIES` as a Markdown table (for docs/cli.md)."""
    rows = ["| key | a change on resume | what the key sets |", "|---|---|---|"]
    rows += [f"| `{key}` | refused | {why} |" for key, why in FIXED.items()]
    rows += [f"| `{key}` | applies from the resumed step | {why} |" for key, why in APPLIES.items()]
    rows += [f"| `{key}` | (the run itself: not compared) | which run is resumed |" for key in IDENTITY]
    return "\n".join(rows)
