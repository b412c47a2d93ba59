"""``--set`` overrides: ``section.key=value`` applied to a config's raw mapping before validation.

``--set section.key=value`` (or ``--set model=smollm2``) sets one key. The value is
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
"""

from __future__ import annotations

import re
from typing import Any

from lrtt.cli._schema import ConfigError
from lrtt.cli._show import show, show_key
from lrtt.cli._strict_yaml import load_yaml

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
    return load_yaml(word, where, columns=True, fix=fix)


def _split_override(item: str, source: str) -> tuple[list[str], str]:
    """``section.key=value`` → (``[section, key]``, ``value``), checking the key's form."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"{source}: {show(item)} is not of the form section.key=value (e.g. train.steps=50).")
    dotted, text = item.split("=", 1)
    parts = [part.strip() for part in dotted.split(".")]
    if len(parts) > 2:
        raise ConfigError(
            f"{source}: {show_key(dotted)} has more than one dot; keys are section.key (e.g. train.steps=50)."
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
            raise ConfigError(f"{source}: {show_key(parts[0])} is not a section (it is {show(section)}), "
                              f"cannot set {show_key('.'.join(parts))}.")
        section[parts[1]] = value
    return raw

