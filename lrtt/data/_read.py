"""``read``: the user's files as a lazy, re-iterable stream of checked examples."""

from __future__ import annotations

import itertools
import logging
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from lrtt.data._errors import BadRowError, RowProblem, Stats, check_on_bad_row, handle
from lrtt.data._files import resolve, file_type as _file_type
from lrtt.data._format import (
    DEFAULT_FIELDS,
    DETECT_ROWS,
    check_fields,
    check_format,
    check_roles,
    detect,
    normalize,
)
from lrtt.data._rows import SAMPLE_BY, rows

log = logging.getLogger("lrtt.data")

_COLUMNS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "chat": ("messages",)}


class Reader:
    """The examples of a set of files, read lazily: each ``iter(reader)`` is a new pass that
    opens the files again and holds one row at a time (a file larger than memory streams).

    Iterating yields normalized examples (``{"text"}``, ``{"prompt", "completion"}`` or
    ``{"messages"}``, see :mod:`lrtt.data._format`); :meth:`with_sources` yields
    ``(source, example)`` with ``source`` the file and line (``"train.jsonl:7"``).

    Attributes:
      files: the files, in reading order.
      format: ``'text'``, ``'prompt_completion'`` or ``'chat'`` (resolved if ``'auto'`` was asked).
      format_note: how the format was chosen, e.g. ``"format 'chat' (auto: keys ['messages'] in 16
        of the first 16 rows, from train.jsonl:1)"``.
      on_bad_row: ``'error'`` or ``'skip'``.
      stats: :class:`Stats` of the latest pass started by ``iter(reader)`` (rows, skipped by reason).
    """

    def __init__(self, files, kinds, format, format_note, fields, roles, on_bad_row, sample_by):
        self.files: tuple[pathlib.Path, ...] = tuple(files)
        self._kinds = tuple(kinds)
        self.format: str = format
        self.format_note: str = format_note
        self.fields: dict[str, str] = fields
        self.roles: dict[str, str] = roles
        self.on_bad_row: str = on_bad_row
        self.sample_by: str = sample_by
        self.stats = Stats()

    def with_sources(self, stats: Stats | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """One pass: ``(source, example)`` pairs, counting into ``stats`` (not reset here).

        Raises:
          BadRowError: a bad row with ``on_bad_row='error'`` (names the file, line and fix).
          ValueError: a file that cannot be read on (a syntax error inside a JSON array).
        """
        columns = [self.fields[c] for c in _COLUMNS[self.format]]
        for path, kind in zip(self.files, self._kinds):
            if stats is not None:
                stats.files += 1
            fields = DEFAULT_FIELDS if kind == "txt" else self.fields
            for source, row in rows(path, kind, sample_by=self.sample_by, columns=columns):
                if stats is not None:
                    stats.rows += 1
                try:
                    example = normalize(row, self.format, fields, self.roles)
                except RowProblem as problem:
                    handle(BadRowError(source, problem.reason, problem.detail), self.on_bad_row, stats)
                    continue
                if stats is not None:
                    stats.examples += 1
                yield source, example

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stats.reset()
        for _, example in self.with_sources(self.stats):
            yield example

    def __repr__(self) -> str:
        return (f"Reader({self.format_note}, {len(self.files)} file{'s' * (len(self.files) != 1)}, "
                f"on_bad_row={self.on_bad_row!r})")


def read(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    format: str = "auto",
    *,
    fields: Mapping[str, str] | None = None,
    roles: Mapping[str, str] | None = None,
    on_bad_row: str = "error",
    sample_by: str = "line",
    file_type: str | None = None,
) -> Reader:
    """Training examples from local files: JSON Lines, JSON, CSV/TSV, Parquet or plain text.

    Nothing but the first rows (for ``format='auto'``) is read here; iterating the returned
    :class:`Reader` streams the files, one row in memory at a time.

    Args:
      paths: a file, a directory (its data files, recursively, sorted), a glob
        (``"data/*.jsonl"``, ``"data/**/*.parquet"``) or a list of these. The type comes from the
        suffix: ``.jsonl``/``.ndjson``, ``.json`` (an array of objects, or JSON Lines), ``.csv``,
        ``.tsv``, ``.parquet``, ``.txt``; all but Parquet may be gzipped (``.jsonl.gz``).
      format: ``'text'``, ``'prompt_completion'``, ``'chat'`` or ``'auto'`` (from the first
        rows' keys: ``messages`` → chat, ``prompt`` + ``completion`` → prompt_completion,
        ``text`` → text; see ``Reader.format_note``). ``.txt`` files are always ``text``.
      fields: canonical name → the name in your files, for any of ``text``, ``prompt``,
        ``completion``, ``messages`` and, inside a message, ``role`` and ``content``; e.g.
        ``{"prompt": "question", "completion": "answer"}``.
      roles: role names of your files → ``system``/``user``/``assistant``, e.g.
        ``{"human": "user", "gpt": "assistant"}``.
      on_bad_row: ``'error'`` (default): a bad row raises :class:`BadRowError` naming the file,
        line (or Parquet row) and the fix; ``'skip'``: it is skipped and counted in
        ``Reader.stats.skipped`` by reason.
      sample_by: plain-text files only: one example per non-blank ``'line'`` (default),
        ``'paragraph'`` (blank-line separated) or ``'document'`` (the whole file).
      file_type: read every file as this type (``'jsonl'``, ``'json'``, ``'csv'``, ``'tsv'``,
        ``'parquet'``, ``'txt'``) whatever its suffix.

    Returns:
      A :class:`Reader`: re-iterable, each pass a lazy iterator of examples.

    Raises:
      FileNotFoundError: a path, directory or glob that names no file.
      ValueError: an unknown suffix, format, field key or role; ``format='auto'`` on rows
        matching no format (the message lists the keys seen); a non-text format for ``.txt``.

    Examples:
      >>> reader = read("data/*.jsonl", fields={"prompt": "question", "completion": "answer"})  # doctest: +SKIP
      >>> reader.format, next(iter(reader))  # doctest: +SKIP
      ('prompt_completion', {'prompt': 'What is 2+2?', 'completion': ' 4'})
    """
    check_format(format)
    check_on_bad_row(on_bad_row)
    if sample_by not in SAMPLE_BY:
        raise ValueError(f"`sample_by` must be one of {list(SAMPLE_BY)}, got {sample_by!r}.")
    fields_ = check_fields(fields)
    roles_ = check_roles(roles)
    files = resolve(paths, file_type_override=file_type)
    kinds = [_file_type(p, file_type) for p in files]
    texts = [p for p, k in zip(files, kinds) if k == "txt"]
    if format == "auto":
        if len(texts) == len(files):
            format, note = "text", "format 'text' (auto: plain-text files)"
        else:
            samples: list[tuple[str, Any]] = []
            for path, kind in zip(files, kinds):
                if kind != "txt" and len(samples) < DETECT_ROWS:
                    head = rows(path, kind)
                    try:
                        samples += itertools.islice(head, DETECT_ROWS - len(samples))
                    finally:
                        head.close()
            format, note = detect(samples, fields_)
    else:
        if texts and format != "text":
            raise ValueError(
                f"{texts[0]} is plain text, which holds format 'text' only, not {format!r}: use JSON Lines, JSON, "
                "CSV or Parquet for prompt/completion and chat data, or read the text files separately."
            )
        note = f"format {format!r} (given)"
    log.info("lrtt.data: %s, %d files", note, len(files))
    return Reader(files, kinds, format, note, fields_, roles_, on_bad_row, sample_by)


def sources(examples: Iterable[Any], stats: Stats | None = None) -> Iterator[tuple[str, Any]]:
    """``(source, example)`` pairs of a :class:`Reader`-like object (``with_sources``) or of any
    iterable of example dicts (sources ``"example 1"``, ``"example 2"``, ...)."""
    if hasattr(examples, "with_sources"):
        yield from examples.with_sources(stats)
        return
    for i, example in enumerate(examples, start=1):
        if stats is not None:
            stats.rows += 1
            stats.examples += 1
        yield f"example {i}", example
