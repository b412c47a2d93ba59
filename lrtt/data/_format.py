"""The example formats: which fields a row needs, auto-detection, and each row's checks.

| format | fields of a row | normalized example |
|---|---|---|
| ``text`` | ``text``: a string | ``{"text": str}`` |
| ``prompt_completion`` | ``prompt``, ``completion``: strings, or both lists of messages | ``{"prompt": ..., "completion": ...}`` |
| ``chat`` | ``messages``: a list of ``{role, content}`` (roles system, user, assistant) | ``{"messages": [...]}`` |

Field names are configurable with ``fields`` (``{"prompt": "question", "completion": "answer"}``;
for chat also ``role`` and ``content``, the keys inside each message) and role names with
``roles`` (``{"human": "user", "gpt": "assistant"}``, ShareGPT's).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from lrtt.data._errors import RowProblem

FORMATS = ("text", "prompt_completion", "chat")
ROLES = ("system", "user", "assistant")
DEFAULT_FIELDS = {"text": "text", "prompt": "prompt", "completion": "completion", "messages": "messages",
                  "role": "role", "content": "content"}
DETECT_ROWS = 16  # auto-detection looks at this many first rows


def check_format(format: str) -> str:
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"`format` must be 'auto' or one of {list(FORMATS)}, got {format!r}.")
    return format


def check_fields(fields: Mapping[str, str] | None) -> dict[str, str]:
    """``DEFAULT_FIELDS`` updated by ``fields`` (canonical name -> the name in the files)."""
    out = dict(DEFAULT_FIELDS)
    for key, value in (fields or {}).items():
        if key not in DEFAULT_FIELDS:
            raise ValueError(
                f"`fields` has the key {key!r}; the keys are the canonical names {sorted(DEFAULT_FIELDS)}, "
                f"each mapped to the name your files use, e.g. fields={{'prompt': 'question', 'completion': 'answer'}}."
            )
        if not isinstance(value, str) or not value:
            raise ValueError(f"`fields[{key!r}]` must be a column/key name (a string), got {value!r}.")
        out[key] = value
    return out


def check_roles(roles: Mapping[str, str] | None) -> dict[str, str]:
    """Role names of the files -> system / user / assistant; the three map to themselves."""
    out = {r: r for r in ROLES}
    for key, value in (roles or {}).items():
        if value not in ROLES:
            raise ValueError(f"`roles[{key!r}]` is {value!r}; each role must map to one of {list(ROLES)}.")
        out[str(key)] = value
    return out


def _match(row: Mapping[str, Any], fields: Mapping[str, str]) -> str | None:
    if fields["messages"] in row:
        return "chat"
    if fields["prompt"] in row and fields["completion"] in row:
        return "prompt_completion"
    if fields["text"] in row:
        return "text"
    return None


def detect(samples: Sequence[tuple[str, Any]], fields: Mapping[str, str]) -> tuple[str, str]:
    """``(format, note)`` from the first rows' keys: each row votes for the first of ``chat``
    (has ``messages``), ``prompt_completion`` (``prompt`` and ``completion``), ``text``
    (``text``) it matches; the most votes win (ties in that order).

    Raises:
      ValueError: no row matches a format; the message lists the keys seen and the fix.
    """
    votes = {name: 0 for name in FORMATS}
    first: dict[str, str] = {}
    keys: list[str] = []
    rows = [(source, row) for source, row in samples if isinstance(row, dict)]
    for source, row in rows:
        keys += [k for k in row if k not in keys]
        found = _match(row, fields)
        if found is not None:
            votes[found] += 1
            first.setdefault(found, source)
    best = max(FORMATS, key=lambda name: (votes[name], -FORMATS.index(name)))
    if votes[best] == 0:
        where = samples[0][0].rsplit(":", 1)[0] if samples else "the data"
        raise ValueError(
            f"cannot tell the format of {where}: its first rows have the keys {keys}; lrtt.data reads "
            f"'text' rows ({fields['text']!r}), 'prompt_completion' rows ({fields['prompt']!r} and "
            f"{fields['completion']!r}) and 'chat' rows ({fields['messages']!r}). Name your columns with "
            "fields=, e.g. fields={'prompt': 'question', 'completion': 'answer'}, or pass format=."
        )
    used = [fields[k] for k in {"chat": ["messages"], "prompt_completion": ["prompt", "completion"],
                                 "text": ["text"]}[best]]
    note = (f"format {best!r} (auto: keys {used} in {votes[best]} of the first {len(rows)} rows, "
            f"from {first[best]})")
    return best, note


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _get(row: Mapping[str, Any], fields: Mapping[str, str], name: str) -> Any:
    key = fields[name]
    if key not in row:
        hint = "" if key != name else f"; if your column has another name, pass fields={{{name!r}: 'your_name'}}"
        raise RowProblem("missing field", f"the row has no field {key!r} (it has {sorted(row)}){hint}")
    return row[key]


def _string(value: Any, what: str, *, empty_ok: bool) -> str:
    if not isinstance(value, str):
        raise RowProblem("wrong type", f"{what} is {_type_name(value)} {value!r:.60}, expected a string")
    if not empty_ok and not value.strip():
        raise RowProblem("empty", f"{what} is empty: nothing to train on")
    return value


def _messages(value: Any, what: str, fields: Mapping[str, str], roles: Mapping[str, str]) -> list[dict[str, str]]:
    if isinstance(value, str):  # CSV cells and some Parquet columns hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowProblem("wrong type", f"{what} is a string that is not a JSON list of messages") from None
    if not isinstance(value, list):
        raise RowProblem("wrong type", f"{what} is {_type_name(value)}, expected a list of {{role, content}} messages")
    if not value:
        raise RowProblem("empty", f"{what} is an empty list")
    out = []
    for j, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise RowProblem("wrong type", f"{what}[{j}] is {_type_name(message)}, expected a {{role, content}} object")
        for name in ("role", "content"):
            if fields[name] not in message:
                raise RowProblem("missing field", f"{what}[{j}] has no {fields[name]!r} (it has {sorted(message)})")
        role = message[fields["role"]]
        if not isinstance(role, str) or role not in roles:
            raise RowProblem(
                "unknown role",
                f"{what}[{j}] has the role {role!r}; roles are system, user, assistant (map others with "
                f"roles=, e.g. roles={{{role!r}: 'assistant'}})",
            )
        content = _string(message[fields["content"]], f"{what}[{j}]'s content", empty_ok=True)
        out.append({"role": roles[role], "content": content})
    return out


def normalize(row: Any, format: str, fields: Mapping[str, str], roles: Mapping[str, str]) -> dict[str, Any]:
    """The example of ``row`` in ``format``'s canonical names (see the module's table).

    Raises:
      RowProblem: a missing field, a wrong type, an unknown role, an empty text or completion.
    """
    if isinstance(row, RowProblem):
        raise row
    if format == "text":
        return {"text": _string(_get(row, fields, "text"), f"field {fields['text']!r}", empty_ok=False)}
    if format == "prompt_completion":
        prompt, completion = _get(row, fields, "prompt"), _get(row, fields, "completion")
        if isinstance(prompt, (list, str)) and isinstance(completion, (list, str)) and type(prompt) is not type(completion):
            raise RowProblem(
                "wrong type",
                f"field {fields['prompt']!r} is a {_type_name(prompt)} and {fields['completion']!r} a "
                f"{_type_name(completion)}; both must be strings, or both lists of messages",
            )
        if isinstance(prompt, list):
            return {"prompt": _messages(prompt, f"field {fields['prompt']!r}", fields, roles),
                    "completion": _messages(completion, f"field {fields['completion']!r}", fields, roles)}
        return {"prompt": _string(prompt, f"field {fields['prompt']!r}", empty_ok=True),
                "completion": _string(completion, f"field {fields['completion']!r}", empty_ok=False)}
    return {"messages": _messages(_get(row, fields, "messages"), f"field {fields['messages']!r}", fields, roles)}


def format_of(example: Mapping[str, Any]) -> str:
    """The format of a normalized example (or of a plain dict with canonical keys).

    Raises:
      RowProblem: ``example`` is not a dict, or has the keys of no format.
    """
    if not isinstance(example, Mapping):
        raise RowProblem("not an object", f"the example is {_type_name(example)}, not a dict")
    found = _match(example, DEFAULT_FIELDS)
    if found is None:
        raise RowProblem(
            "missing field",
            f"the example has the keys {sorted(example)}, those of no format: give 'text', 'prompt' and "
            "'completion', or 'messages' (lrtt.data.read maps other names with fields=)",
        )
    return found
