"""Showing values in messages: every user value a config error quotes goes through :func:`show`,
at most ~80 characters of it, on one line; keys, file names and suggestions alike."""

from __future__ import annotations

import difflib
import reprlib
from pathlib import Path
from typing import Any

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


def show_key(dotted: Any) -> str:
    """A (dotted) key for a message: in backquotes (`train.steps`) when it is short text, else :func:`show`."""
    text = str(dotted) if isinstance(dotted, (str, int, float, bool)) or dotted is None else None
    if text is not None and text.isprintable() and len(text) <= SHOW_LIMIT:
        return f"`{text}`"
    return show(dotted)


def show_path(path: Path) -> str:
    """A file's name for a message (escaped if it holds control characters)."""
    text = str(path)
    return text if text.isprintable() else show(text, limit=4 * SHOW_LIMIT)


def did_you_mean(key: Any, allowed) -> str:
    if not isinstance(key, str) or len(key) > SHOW_LIMIT:
        return ""
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f"; did you mean `{close[0]}`?" if close else ""

