"""Which files: paths, globs and directories resolved to an ordered list, each with its type."""

from __future__ import annotations

import glob
import gzip
import os
import pathlib
from collections.abc import Sequence

# suffix -> file type; ".gz" after any of them but Parquet is read through gzip
FILE_TYPES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "txt",
    ".text": "txt",
}
TYPES = ("jsonl", "json", "csv", "tsv", "parquet", "txt")
_GLOB_CHARS = set("*?[")


def file_type(path: pathlib.Path, override: str | None = None) -> str:
    """The type of ``path`` from its suffix (``.jsonl``, ``.json``, ``.csv``, ``.tsv``,
    ``.parquet``, ``.txt``; any but ``.parquet`` may end in ``.gz``), or ``override``."""
    if override is not None:
        if override not in TYPES:
            raise ValueError(f"`file_type` must be one of {list(TYPES)}, got {override!r}.")
        return override
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] == ".parquet":
            raise ValueError(f"{path}: a gzipped Parquet file is not read; Parquet compresses itself, save it unzipped.")
    kind = FILE_TYPES.get(suffixes[-1]) if suffixes else None
    if kind is None:
        raise ValueError(
            f"{path}: unknown file type {''.join(path.suffixes) or '(no suffix)'!r}; lrtt.data reads "
            f"{', '.join(FILE_TYPES)} (optionally .gz). Rename the file, or pass file_type= one of {list(TYPES)}."
        )
    return kind


def is_gzip(path: pathlib.Path) -> bool:
    return path.suffix.lower() == ".gz"


def open_binary(path: pathlib.Path):
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def open_text(path: pathlib.Path):
    # utf-8-sig: a byte-order mark (common in CSV exported from spreadsheets) is dropped
    if is_gzip(path):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _known(path: pathlib.Path) -> bool:
    try:
        file_type(path)
    except ValueError:
        return False
    return True


def resolve(paths: str | os.PathLike | Sequence[str | os.PathLike], *, file_type_override: str | None = None) -> list[pathlib.Path]:
    """Files named by ``paths``, in order, each once.

    Each entry is a file, a directory (its files of a known type, recursively, sorted) or a glob
    (``data/*.jsonl``, ``data/**/*.parquet``; matches sorted). Raises ``FileNotFoundError`` for
    an entry that names nothing.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("no data files given: pass a path, a directory or a glob such as 'data/*.jsonl'.")
    out: list[pathlib.Path] = []
    for entry in paths:
        text = os.fspath(entry)
        if _GLOB_CHARS & set(text) and not os.path.exists(text):
            found = [pathlib.Path(p) for p in sorted(glob.glob(os.path.expanduser(text), recursive=True))]
            found = [p for p in found if p.is_file()]
            if not found:
                raise FileNotFoundError(f"the glob {text!r} matches no file (relative to {os.getcwd()}).")
        else:
            path = pathlib.Path(os.path.expanduser(text))
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and
                               (file_type_override is not None or _known(p)))
                if not found:
                    raise FileNotFoundError(
                        f"the directory {text!r} holds no data file ({', '.join(FILE_TYPES)}, optionally .gz)."
                    )
            elif path.is_file():
                found = [path]
            else:
                raise FileNotFoundError(f"data file {text!r} does not exist (relative to {os.getcwd()}).")
        out += found
    unique: dict[pathlib.Path, None] = {}
    for path in out:
        unique.setdefault(path, None)
    return list(unique)
