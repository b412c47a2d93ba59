"""Loading a run config for the ``lrtt`` CLI: a YAML file read, overridden by ``--set`` and
validated into a :class:`~lrtt.cli._schema.RunConfig` (:func:`load`).

A config is five sections (and an optional sixth, ``quantize``) whose schema is
:mod:`lrtt.cli._schema`; every key is checked (:mod:`lrtt.cli._validate`: unknown keys and wrong
types are errors that name the file, the key, what was given and what is allowed).

Files. A config is a UTF-8 text file whose top level is a mapping. A key given twice in one
mapping (at any level) is an error naming both lines (YAML itself would keep the last silently);
so are a file that is binary, not UTF-8 (the byte offset is named), a directory, or unreadable.

Overrides. ``--set section.key=value`` (or ``--set model=smollm2``) sets one key, the value
read as :mod:`lrtt.cli._overrides` says.

Messages. Every :class:`~lrtt.cli._schema.ConfigError` is one line naming the file (or ``--set``),
the key, the value and the fix; a value is shown by :func:`lrtt.cli._show.show`, at most ~80
characters of it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lrtt.cli._overrides import apply_overrides
from lrtt.cli._schema import TOP_KEYS, ConfigError, RunConfig
from lrtt.cli._show import show, show_path
from lrtt.cli._strict_yaml import load_yaml
from lrtt.cli._validate import parse

_NOT_TEXT = yaml.reader.Reader.NON_PRINTABLE  # characters YAML refuses in a stream (NUL, most C0 controls, ...)


def _read_text(path: Path) -> str:
    """The file's text; a missing, unreadable, non-UTF-8 or binary file is a ConfigError naming it."""
    name = show_path(path)
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


def load(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, override and validate a YAML config file.

    Raises:
      ConfigError: (one line, naming the file) the file is missing, a directory, unreadable, not
        UTF-8 text, not valid YAML, repeats a key, has no mapping at its top level, or does not
        fit the schema (:func:`lrtt.cli._validate.parse`); an override is malformed
        (:func:`lrtt.cli._overrides.apply_overrides`).
    """
    path = Path(path)
    name = show_path(path)
    raw = load_yaml(_read_text(path), name)
    if raw is None:  # an empty file (or only comments): the schema then names what is missing
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{name}: the top level must be a mapping of sections ({', '.join(TOP_KEYS)}), "
            f"found a {type(raw).__name__}: {show(raw)}."
        )
    return parse(apply_overrides(raw, list(overrides)), source=name)
