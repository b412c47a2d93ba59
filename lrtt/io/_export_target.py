"""What is at an export path, and whether lrtt may replace it: :class:`ExportTarget` and
:func:`inspect_export` (a directory export's manifest ``lrtt-export.json``, the ``"lrtt-merged"``
metadata of a safetensors file, an unmarked msgpack file), and the checks of a target
(:class:`ExportError`) that :func:`lrtt.io.export_merged` and :func:`lrtt.io.export_directory`
make before any work and again before they replace it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any

from lrtt._errors import Error

MANIFEST = "lrtt-export.json"
_MANIFEST_FORMAT = "lrtt-merged-export"
_MANIFEST_VERSION = 1
_SAFETENSORS_FORMAT = "lrtt-merged"
_SHOWN = 5  # names quoted in a message
_FIX_MOVE = "choose another path (lrtt export --out), or move {} away"
_FIX_OVERWRITE = "pass overwrite=True (lrtt export --overwrite) to replace it, or choose another path (lrtt export --out)"


class ExportError(Error, OSError):
    """A merged export that could not be written, did not read back as written, or whose target
    holds something :func:`export_merged` may not replace."""


@dataclasses.dataclass(frozen=True)
class ExportTarget:
    """What is at an export path, as :func:`export_merged` judges it; see :func:`inspect_export`.

    Attributes:
      path: the absolute path.
      kind: ``"absent"`` (nothing there), ``"empty"`` (an empty directory), ``"lrtt"`` (an intact
        export lrtt wrote: a directory holding exactly its manifest's files, or a safetensors file
        marked ``"lrtt-merged"``), ``"unmarked"`` (a msgpack file: lrtt's or another program's,
        it carries no mark), or ``"foreign"`` (anything else).
      source: for ``kind == "lrtt"``, the ``source`` the export was written with (``None`` when
        none was given); ``None`` for the other kinds.
      detail: what is there, as a phrase for messages: ``"the lrtt export of 'run-1'"``,
        ``"a directory lrtt did not write (no lrtt-export.json), holding 1 file: ['thesis.tex']"``.
      is_dir: whether ``path`` is a directory.
    """

    path: str
    kind: str
    source: str | None = None
    detail: str = ""
    is_dir: bool = False

    def replaceable(self, source: str | None = None, overwrite: bool = False) -> bool:
        """Whether :func:`export_merged` with this ``source`` and ``overwrite`` may write here
        (the kind of ``path``, file or directory, aside)."""
        if self.kind in ("absent", "empty"):
            return True
        if self.kind == "lrtt":
            return self.source == source or overwrite
        return self.kind == "unmarked" and overwrite


def _check_target(path: str, fmt: str) -> None:
    """Refuse a target of the wrong kind before any work: a file where a directory goes, or the
    reverse, or a parent that is a file."""
    if fmt == "pretrained" and os.path.exists(path) and not os.path.isdir(path):
        raise ExportError(f"cannot export to {path!r}: it is a file, and the 'pretrained' format writes a "
                          "directory (config.json + weights). Pass a directory path.")
    if fmt != "pretrained" and os.path.isdir(path):
        raise ExportError(f"cannot export to {path!r}: it is a directory, and the {fmt!r} format writes one "
                          f"file. Pass a file path ending in .{fmt}.")
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ExportError(f"cannot export to {path!r}: {parent!r} is a file, not a directory.")
    if parent and not os.access(parent, os.W_OK):
        raise ExportError(f"cannot export to {path!r}: no permission to write in {parent!r}.")


def _check_options(source: Any, overwrite: Any) -> None:
    if source is not None and not isinstance(source, str):
        raise ValueError(f"`source` must be a string (e.g. the training run's id) or None, got {source!r}.")
    if not isinstance(overwrite, bool):
        raise ValueError(f"`overwrite` must be True or False, got {overwrite!r}.")


def _check_owner(path: str, source: str | None, overwrite: bool) -> None:
    """Refuse to replace what is at ``path`` unless lrtt wrote it for this ``source`` (or it is
    another run's lrtt export, or an unmarked msgpack file, and ``overwrite`` is set)."""
    target = inspect_export(path)
    if target.replaceable(source, overwrite):
        return
    if target.kind == "lrtt":
        raise ExportError(f"cannot export to {path!r}: it holds {target.detail}, not of {source!r}; {_FIX_OVERWRITE}.")
    if target.kind == "unmarked":
        raise ExportError(f"cannot export to {path!r}: it is {target.detail}; {_FIX_OVERWRITE}.")
    raise ExportError(f"cannot export to {path!r}: it is {target.detail}; lrtt replaces only the exports it "
                      f"wrote, even with overwrite=True: {_FIX_MOVE.format('it' if not target.is_dir else 'them')}.")


def check_export_target(path: str | os.PathLike, *, source: str | None = None, overwrite: bool = False) -> None:
    """Raise the :class:`ExportError` :func:`export_merged` would raise for what is at ``path``
    (nothing if it may write there), before any work: for a caller that wants to refuse at
    once, e.g. before a training run whose export comes at its end.

    Raises:
      ExportError: ``path`` holds something lrtt did not export, or another ``source``'s export
        (without ``overwrite``).
    """
    _check_options(source, overwrite)
    _check_owner(os.path.abspath(os.fspath(path)), source, overwrite)


def inspect_export(path: str | os.PathLike) -> ExportTarget:
    """What is at ``path``, and whether lrtt wrote it: the judgement :func:`export_merged` applies
    before it replaces anything (use :meth:`ExportTarget.replaceable` for its verdict).

    A directory is an lrtt export when its ``lrtt-export.json`` is a valid manifest and the
    directory holds exactly the manifest's files with the listed sizes; a file is one when it is a
    safetensors file whose metadata ``format`` is ``"lrtt-merged"``. A msgpack file is
    ``"unmarked"``: lrtt writes no mark into it. A symbolic link at ``path`` is ``"foreign"``
    whatever it points to. Reads only directory listings, the manifest and a file's first bytes;
    never raises for what it finds (an unreadable path is ``"foreign"``).

    Args:
      path: a file or directory path; it need not exist.

    Returns:
      An :class:`ExportTarget` (kind, the recorded source, and a phrase saying what is there).

    Example::

      target = lrtt.inspect_export("runs/a/merged")
      if not target.replaceable(source="runs/a"):
          print(f"{target.path} holds {target.detail}")
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.islink(path):
        return ExportTarget(path, "foreign", detail=f"a symbolic link (to {os.readlink(path)!r})")
    if not os.path.exists(path):
        return ExportTarget(path, "absent", detail="nothing")
    try:
        if os.path.isdir(path):
            return _inspect_directory(path)
        return _inspect_file(path)
    except OSError as e:
        return ExportTarget(path, "foreign", detail=f"unreadable ({e.strerror or e})", is_dir=os.path.isdir(path))


def _inspect_directory(path: str) -> ExportTarget:
    names = sorted(os.listdir(path))
    if not names:
        return ExportTarget(path, "empty", detail="an empty directory", is_dir=True)
    if MANIFEST not in names:
        entries = [_entry_name(path, n) for n in names]
        return ExportTarget(path, "foreign", is_dir=True, detail=(
            f"a directory lrtt did not write (no {MANIFEST}), holding {_count(entries, 'file')}: {_first(entries)}"))
    try:
        source, files = _read_manifest(os.path.join(path, MANIFEST))
    except ValueError as e:
        return ExportTarget(path, "foreign", is_dir=True,
                            detail=f"a directory whose {MANIFEST} is not a valid lrtt export manifest ({e})")
    extra = _unlisted(path, files)
    if extra:
        return ExportTarget(path, "foreign", is_dir=True,
                            detail=f"an lrtt export that holds {_count(extra, 'file')} lrtt did not write: {_first(extra)}")
    changed = _changed(path, files)
    if changed:
        return ExportTarget(path, "foreign", is_dir=True,
                            detail=f"an lrtt export changed since lrtt wrote it ({'; '.join(changed[:_SHOWN])})")
    return ExportTarget(path, "lrtt", source, f"the lrtt export of {source!r}", is_dir=True)


def _inspect_file(path: str) -> ExportTarget:
    size = os.path.getsize(path)
    metadata = _safetensors_metadata(path)
    if metadata is not None:
        if metadata.get("format") == _SAFETENSORS_FORMAT:
            source = metadata.get("source")
            return ExportTarget(path, "lrtt", source, f"the lrtt export of {source!r}")
        return ExportTarget(path, "foreign", detail=f"a safetensors file lrtt did not write (its metadata has no "
                                                    f"'format': {_SAFETENSORS_FORMAT!r})")
    if _looks_like_msgpack(path):
        return ExportTarget(path, "unmarked", detail="a msgpack file, which carries no mark of the program that wrote it")
    return ExportTarget(path, "foreign", detail=f"a file lrtt did not write ({size:,} bytes, neither a safetensors "
                                                "nor a msgpack export)")


def _entry_name(root: str, relative: str) -> str:
    """``relative``, with a trailing ``/`` when it is a directory (not a link to one)."""
    full = os.path.join(root, relative)
    return f"{relative}/" if os.path.isdir(full) and not os.path.islink(full) else relative


def _count(names: list[str], noun: str) -> str:
    return f"{len(names)} {noun}{'' if len(names) == 1 else 's'}"


def _first(names: list[str]) -> str:
    shown = repr(names[:_SHOWN])
    return shown if len(names) <= _SHOWN else f"{shown[:-1]}, ...]"


def _read_manifest(path: str) -> tuple[str | None, dict[str, int]]:
    """``(source, {relative path: bytes})`` of a manifest; ValueError saying what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT:
        raise ValueError(f"no 'format': {_MANIFEST_FORMAT!r}")
    if manifest.get("version") != _MANIFEST_VERSION:
        raise ValueError(f"version {manifest.get('version')!r}, this lrtt reads {_MANIFEST_VERSION}")
    source, files = manifest.get("source"), manifest.get("files")
    if source is not None and not isinstance(source, str):
        raise ValueError(f"'source' is {source!r}, not a string or null")
    if not isinstance(files, dict) or not files:
        raise ValueError("'files' is not a non-empty object")
    for name, size in files.items():
        if not _safe_relative(name) or name == MANIFEST:
            raise ValueError(f"'files' lists {name!r}, not a relative path inside the export")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"'files' gives {name!r} the size {size!r}")
    return source, files


def _safe_relative(name: Any) -> bool:
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _unlisted(root: str, files: dict[str, int]) -> list[str]:
    """The topmost entries under ``root`` that are neither a listed file, the manifest, nor a
    directory on the way to one (directories with a trailing ``/``; links count as unlisted)."""
    listed = set(files) | {MANIFEST}
    folders = {name.rsplit("/", 1)[0] for name in listed if "/" in name}
    folders |= {f.rsplit("/", i)[0] for f in list(folders) for i in range(1, f.count("/") + 1)}
    extra = []
    for here, dirs, names in os.walk(root):
        relative = os.path.relpath(here, root)
        prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
        for d in sorted(dirs):
            if prefix + d not in folders or os.path.islink(os.path.join(here, d)):
                extra.append(prefix + d + ("" if os.path.islink(os.path.join(here, d)) else "/"))
        dirs[:] = sorted(d for d in dirs if prefix + d in folders and not os.path.islink(os.path.join(here, d)))
        extra += [prefix + n for n in sorted(names)
                  if prefix + n not in listed or os.path.islink(os.path.join(here, n))]
    return extra


def _changed(root: str, files: dict[str, int]) -> list[str]:
    """``"'name' is missing"`` / ``"'name' has N bytes, not M"`` for listed files not as listed."""
    changed = []
    for name, size in sorted(files.items()):
        full = os.path.join(root, *name.split("/"))
        if not os.path.isfile(full):
            changed.append(f"{name!r} is missing")
        elif os.path.getsize(full) != size:
            changed.append(f"{name!r} has {os.path.getsize(full):,} bytes, not {size:,}")
    return changed


def _safetensors_metadata(path: str) -> dict | None:
    """The ``__metadata__`` of a safetensors file (``{}`` if none); None when ``path`` is not one
    (its first 8 bytes give a JSON header's length, and the header is a JSON object)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (length,) = struct.unpack("<Q", head)
        if length < 2 or length > min(size - 8, 100_000_000):
            return None
        raw = f.read(length)
    if raw[:1] != b"{":
        return None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


def _looks_like_msgpack(path: str) -> bool:
    """A msgpack map whose first key is a string: the start of a flax ``to_bytes`` file."""
    import msgpack

    with open(path, "rb") as f:
        head = f.read(1 << 16)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(head)
    try:
        if unpacker.read_map_header() < 1:
            return False
        return isinstance(unpacker.unpack(), str)
    except Exception:  # msgpack's errors share no base class: any failure means "not msgpack"
        return False
