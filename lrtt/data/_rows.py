"""Raw rows out of one file, one at a time: JSON Lines, a JSON array, CSV/TSV, Parquet, text.

Every reader here streams: it holds one line (JSONL, CSV, text), one array item (JSON) or one
record batch (Parquet) at a time, so a file larger than memory is read in constant memory.
Each yields ``(source, row)`` with ``source`` naming the file and line (``"a.jsonl:7"``) or row
(``"a.parquet row 12"``) and ``row`` a dict, or a :class:`RowProblem` for a row that could not
be parsed (bad JSON, wrong number of CSV fields, not UTF-8): the reader decides whether that is
an error or a skip. A fault that leaves the rest of the file unreadable (a syntax error inside
a JSON array) raises ``ValueError`` at once, whatever ``on_bad_row`` says.
"""

from __future__ import annotations

import csv
import json
import pathlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from lrtt.data._errors import RowProblem
from lrtt.data._files import open_binary, open_text

SAMPLE_BY = ("line", "paragraph", "document")
_CHUNK = 1 << 20  # characters read at a time from a JSON array
_WS = " \t\n\r"
_NUMBER = "0123456789.eE+-"
_MISSING_PYARROW = (
    "reading Parquet needs `pyarrow`, which is not installed; it comes with lrtt's `data` extra: "
    "pip install 'lrtt[data]' (or pip install pyarrow)"
)


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _as_row(value: Any) -> dict | RowProblem:
    if isinstance(value, dict):
        return value
    return RowProblem("not an object", f"the row is a JSON {_json_kind(value)}, not an object {{...}}")


def _not_utf8(err: UnicodeDecodeError, what: str) -> RowProblem:
    return RowProblem("not UTF-8", f"the {what} is not UTF-8 ({err.reason} at byte {err.start})")


def _lines(path: pathlib.Path) -> Iterator[tuple[int, str | RowProblem]]:
    """``(number, line)`` of ``path`` from 1, a leading UTF-8 byte-order mark dropped; a line that
    does not decode as UTF-8 is a :class:`RowProblem` instead."""
    with open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, _not_utf8(err, "line")


def jsonl_rows(path: pathlib.Path) -> Iterator[tuple[str, dict | RowProblem]]:
    """One JSON object per line; blank lines are ignored."""
    for number, line in _lines(path):
        source = f"{path}:{number}"
        if isinstance(line, RowProblem):
            yield source, line
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            yield source, RowProblem("invalid JSON", f"the line is not valid JSON ({err.msg}, column {err.colno})")
            continue
        yield source, _as_row(value)


def json_rows(path: pathlib.Path) -> Iterator[tuple[str, dict | RowProblem]]:
    """A JSON array of objects, ``[{...}, {...}]``, parsed item by item (never the whole array at
    once); a ``.json`` file whose first character is ``{`` is read as JSON Lines."""
    decoder = json.JSONDecoder()
    with open_text(path) as f:
        buf, pos, line, eof = "", 0, 1, False

        def more() -> bool:
            nonlocal buf, eof
            chunk = f.read(_CHUNK)
            if not chunk:
                eof = True
                return False
            buf += chunk
            return True

        def skip_ws() -> bool:  # False at the end of the file
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in _WS:
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf):
                    return True
                if eof or not more():
                    return False

        if not skip_ws():
            raise ValueError(f"{path}: the file is empty; a .json file holds a JSON array of objects, [{{...}}, ...].")
        if buf[pos] == "{":
            f.close()
            yield from jsonl_rows(path)
            return
        if buf[pos] != "[":
            raise ValueError(
                f"{path}:{line}: a .json file must hold a JSON array of objects ([{{...}}, ...]) or JSON Lines "
                f"(one object per line); it starts with {buf[pos]!r}."
            )
        pos += 1
        first = True
        while True:
            if not skip_ws():
                raise ValueError(f"{path}: the JSON array is not closed with ']' (the file ends at line {line}).")
            if buf[pos] == "]":
                return
            if not first:
                if buf[pos] != ",":
                    raise ValueError(
                        f"{path}:{line}: expected ',' or ']' between the array's items, found {buf[pos]!r}; the rest "
                        "of a JSON array cannot be read past a syntax error (on_bad_row='skip' does not apply). "
                        "Fix the file, or write it as JSON Lines, where a bad line can be skipped."
                    )
                pos += 1
                if not skip_ws():
                    raise ValueError(f"{path}: the JSON array is not closed with ']' (the file ends at line {line}).")
            first = False
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    # a number cut at the buffer's end ("1" of "1.5e3") parses short: read on until a
                    # character that cannot continue it follows
                    cut = isinstance(value, (int, float)) and not buf[end : end + 64].strip(_NUMBER)
                    if eof or (end < len(buf) and not cut):
                        break
                except json.JSONDecodeError as err:
                    # near the buffer's end (a literal, number or escape cut short) or an open string:
                    # read on before calling it an error
                    partial = err.pos >= len(buf) - 16 or err.msg.startswith("Unterminated string")
                    if eof or not partial:
                        at = line + buf.count("\n", pos, err.pos)
                        raise ValueError(
                            f"{path}:{at}: invalid JSON inside the array ({err.msg}); the rest of a JSON array "
                            "cannot be read past a syntax error (on_bad_row='skip' does not apply). Fix the file, "
                            "or write it as JSON Lines, where a bad line can be skipped."
                        ) from None
                more()
            yield f"{path}:{line}", _as_row(value)
            line += buf.count("\n", pos, end)
            buf, pos = buf[end:], 0


def csv_rows(path: pathlib.Path, delimiter: str = ",") -> Iterator[tuple[str, dict | RowProblem]]:
    """A header line, then one record per row (quoted fields may span lines); blank lines are
    ignored. Every value is a string (a ``messages`` column holds JSON text)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents exceed the default 128 KiB field
    with open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if not header:
                raise ValueError(f"{path}: the file has no header line; the first line names the columns (e.g. prompt,completion).")
            previous = reader.line_num
            for record in reader:
                start, previous = previous + 1, reader.line_num
                if not record:
                    continue
                source = f"{path}:{start}"
                if len(record) != len(header):
                    yield source, RowProblem(
                        "wrong number of columns", f"the row has {len(record)} fields, the header {len(header)} ({header})"
                    )
                    continue
                yield source, dict(zip(header, record))
        except csv.Error as err:
            raise ValueError(f"{path}:{reader.line_num}: unreadable CSV ({err}).") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: the file is not UTF-8 ({err.reason}); save it as UTF-8.") from None


def parquet_rows(path: pathlib.Path, columns: Sequence[str] | None = None) -> Iterator[tuple[str, dict | RowProblem]]:
    """Rows of a Parquet file, one record batch (1,024 rows) in memory at a time; ``columns``
    limits what is read to those the format needs."""
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(_MISSING_PYARROW, name="pyarrow") from err
    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    wanted = None if columns is None else [c for c in columns if c in names] or None
    number = 0
    for batch in file.iter_batches(batch_size=1024, columns=wanted):
        for row in batch.to_pylist():
            number += 1
            yield f"{path} row {number}", row


def txt_rows(path: pathlib.Path, sample_by: str = "line") -> Iterator[tuple[str, dict | RowProblem]]:
    """Plain text as ``{"text": ...}`` rows: one per non-blank line (``sample_by="line"``, the
    default), per paragraph (blocks separated by blank lines) or per file (``"document"``)."""
    if sample_by not in SAMPLE_BY:
        raise ValueError(f"`sample_by` must be one of {list(SAMPLE_BY)}, got {sample_by!r}.")
    if sample_by == "document":
        with open_binary(path) as f:
            raw = f.read()
        source = f"{path}:1"
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            yield source, _not_utf8(err, "file")
            return
        yield source, {"text": text.rstrip("\r\n")}
        return
    paragraph: list[str] = []
    start = 0
    for number, text in _lines(path):
        if isinstance(text, RowProblem):
            yield f"{path}:{number}", text
            continue
        text = text.rstrip("\r\n")
        if sample_by == "line":
            if text.strip():
                yield f"{path}:{number}", {"text": text}
        elif text.strip():
            if not paragraph:
                start = number
            paragraph.append(text)
        elif paragraph:
            yield f"{path}:{start}", {"text": "\n".join(paragraph)}
            paragraph = []
    if paragraph:
        yield f"{path}:{start}", {"text": "\n".join(paragraph)}


def rows(path: pathlib.Path, kind: str, *, sample_by: str = "line", columns: Sequence[str] | None = None):
    """The rows of ``path`` read as ``kind`` (see :mod:`lrtt.data._files`)."""
    if kind == "jsonl":
        return jsonl_rows(path)
    if kind == "json":
        return json_rows(path)
    if kind in ("csv", "tsv"):
        return csv_rows(path, "," if kind == "csv" else "\t")
    if kind == "parquet":
        return parquet_rows(path, columns)
    return txt_rows(path, sample_by)
