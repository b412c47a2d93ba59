"""Export merged params (``W0 + ΔW``) in the model's own format, for zero-overhead inference.

The merged tree has the base's structure, shapes and dtypes (the sum is formed in float32 and
cast back), so it loads wherever the base loads and its inference step is the base's step.

=================  ======================================  =================================
format             written                                 loaded by
=================  ======================================  =================================
``"pretrained"``   ``model.save_pretrained(path, params)``  ``Flax*.from_pretrained(path)``
``"safetensors"``  one file, tensors named by ``/`` paths   :func:`load_merged`, safetensors
``"msgpack"``      one file, ``flax.serialization``         :func:`load_merged`, flax
=================  ======================================  =================================

lrtt replaces only what it wrote. A ``"pretrained"`` directory gets a manifest,
``lrtt-export.json`` (``{"format": "lrtt-merged-export", "version": 1, "source": ..., "files":
{relative path: bytes}}``, written last); a ``.safetensors`` file carries ``{"format":
"lrtt-merged", "source": ...}`` in its metadata; a ``.msgpack`` file carries no mark. Before any
work, :func:`export_merged` looks at what is at ``path`` (:func:`inspect_export`) and refuses to
replace anything but an intact lrtt export of the same ``source``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from typing import Any

import jax
import numpy as np

from lrtt._errors import Error
from lrtt._extras import needs_extra
from lrtt._merge import merge
from lrtt._paths import named_leaves, nest

FORMATS = ("auto", "pretrained", "safetensors", "msgpack")
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


_SUFFIXES = {".safetensors": "safetensors", ".msgpack": "msgpack"}


def _resolve_format(path: str, model: Any, format: str) -> str:
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {list(FORMATS)}, got {format!r}.")
    if format == "pretrained" and model is None:
        raise ValueError("`format`='pretrained' needs `model`, the transformers Flax model whose save_pretrained writes it.")
    if format != "auto":
        return format
    if model is not None:
        return "pretrained"
    suffix = os.path.splitext(path)[1]
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    raise ValueError(
        f"cannot tell the format of {path!r}: pass `model=` (a transformers Flax model, written with "
        "save_pretrained), a path ending in .safetensors or .msgpack, or `format=`."
    )


def export_merged(
    method: Any,
    params: Any,
    adapter: Any,
    path: str | os.PathLike,
    *,
    model: Any = None,
    format: str = "auto",
    source: str | None = None,
    overwrite: bool = False,
) -> Any:
    """Write ``merge(method, params, adapter)`` as the model's own format; returns the merged tree.

    .. math::  W = W_0 + \\Delta W \\quad\\text{(dtype of } W_0\\text{)}

    Args:
      method: a mergeable method (LoRA, LorettaRep).
      params: the frozen base params.
      adapter: the trained adapter.
      path: a directory for ``"pretrained"``, a file otherwise.
      model: a transformers Flax model (``FlaxPreTrainedModel``): ``model.save_pretrained(path,
        params=merged)``, loadable with ``from_pretrained(path)``.
      format: ``"auto"`` (``"pretrained"`` with a model, else from the file suffix),
        ``"pretrained"``, ``"safetensors"`` (flat ``/``-joined tensor names) or ``"msgpack"``
        (``flax.serialization.to_bytes`` of the tree).
      source: who exports (the CLI passes the training run's id), recorded in the export (the
        manifest of a directory, the metadata of a safetensors file; a msgpack file has no room
        for it) and compared when ``path`` already holds an lrtt export.
      overwrite: replace an lrtt export of another ``source``, or a msgpack file (which carries no
        mark, so lrtt cannot tell whether it wrote it). Anything else is never replaced.

    What may be at an existing ``path`` (checked before any merge or write work; a refusal
    leaves ``path`` as it was):

    * an empty directory (``"pretrained"``): written into;
    * an intact lrtt export (:func:`inspect_export` kind ``"lrtt"``) of the same ``source``:
      replaced; of another ``source``: replaced only with ``overwrite=True``;
    * a msgpack file: replaced only with ``overwrite=True``;
    * anything else (a non-empty directory without a valid ``lrtt-export.json``, a directory with
      files its manifest does not list or with listed files missing or resized, any other file):
      refused, even with ``overwrite=True``. A directory exported by an lrtt that wrote no
      manifest counts here too: move it away once.

    ``path`` is looked at again just before the new export is moved there, so a file saved into
    it during the merge is not lost either. The export is written next to ``path`` under a temporary name (a directory export's manifest
    last), checked (its files exist with the listed sizes, hold at least the merged bytes, and
    their index reads back) and only then moved to ``path``; a previous export at ``path`` stays
    in place until the new one is complete.

    Raises:
      ValueError: LorettaAdp (not mergeable: the error of :func:`lrtt.merge`), an unknown format,
        a format that cannot be inferred, a ``source`` that is not a string or None, or an
        ``overwrite`` that is not a bool.
      ExportError: ``path`` is of the wrong kind (a file where a directory goes, or the reverse),
        holds something the rules above do not let lrtt replace, cannot be written, or the
        written export does not read back.

    Example::

      merged = lrtt.export_merged(method, params, adapter, "merged.safetensors")
      restored = lrtt.load_merged("merged.safetensors", like=params)
    """
    path = os.path.abspath(os.fspath(path))
    fmt = _resolve_format(path, model, format)
    _check_options(source, overwrite)
    if fmt == "pretrained" and not hasattr(model, "save_pretrained"):
        raise ValueError(f"`model` must be a transformers Flax model with save_pretrained, got {type(model).__name__}.")
    _check_target(path, fmt)
    _check_owner(path, source, overwrite)
    merged = merge(method, params, adapter)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial-{os.getpid()}")
    try:
        if fmt == "pretrained":
            model.save_pretrained(staging, params=merged)
            if os.path.isdir(staging):
                _write_manifest(staging, source)
        elif fmt == "safetensors":
            _write_safetensors(staging, merged, source)
        else:
            from flax import serialization

            with open(staging, "wb") as f:
                f.write(serialization.to_bytes(jax.device_get(merged)))
        _verify(staging, fmt, merged, source)
        _check_owner(path, source, overwrite)  # again: `path` may have changed during the merge
        _swap_in(staging, path)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
        elif os.path.exists(staging):
            os.remove(staging)
    return merged


def export_directory(path: str | os.PathLike, write: Any, *, source: str | None = None,
                     overwrite: bool = False) -> list[str]:
    """Write a directory export with ``write(staging_dir)`` under :func:`export_merged`'s
    ownership rules: ``path`` checked first (:func:`check_export_target`), the files written
    next to it under a temporary name, the manifest (``lrtt-export.json``, naming ``source``)
    added last and read back, ``path`` checked again and only then replaced. For exports in a
    format :func:`export_merged` does not write (``lrtt.models.save``, ``lrtt.save_peft``).

    Returns:
      The files of the export (relative paths, the manifest last).

    Raises:
      ExportError: ``path`` is a file or holds what lrtt may not replace; the export does not
        read back.
      Whatever ``write`` raises (``path`` is then left as it was).
    """
    path = os.path.abspath(os.fspath(path))
    _check_options(source, overwrite)
    _check_target(path, "pretrained")
    _check_owner(path, source, overwrite)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial-{os.getpid()}")
    try:
        write(staging)
        if not os.path.isdir(staging) or not os.listdir(staging):
            raise ExportError(f"the export to {path!r} wrote no files.")
        _write_manifest(staging, source)
        _verify_mark(staging, source)
        with open(os.path.join(staging, MANIFEST), encoding="utf-8") as f:
            files = [*json.load(f)["files"], MANIFEST]
        _check_owner(path, source, overwrite)  # again: `path` may have changed while writing
        _swap_in(staging, path)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return files


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


def _write_manifest(directory: str, source: str | None) -> None:
    """``lrtt-export.json``, the last file of a directory export: every other file and its size."""
    files = {}
    for here, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(here, name)
            files[os.path.relpath(full, directory).replace(os.sep, "/")] = os.path.getsize(full)
    manifest = {"format": _MANIFEST_FORMAT, "version": _MANIFEST_VERSION, "source": source, "files": files}
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")


def _write_safetensors(path: str, merged: Any, source: str | None) -> None:
    with needs_extra():
        from safetensors.flax import save_file

    tensors = {name: jax.numpy.asarray(jax.device_get(leaf)) for name, leaf in named_leaves(merged)}
    if len(tensors) != len(named_leaves(merged)):
        raise ValueError("two leaves of the params share one '/'-joined path; safetensors needs unique names.")
    metadata = {"format": _SAFETENSORS_FORMAT} if source is None else {"format": _SAFETENSORS_FORMAT, "source": source}
    save_file(tensors, path, metadata=metadata)


def _verify(path: str, fmt: str, merged: Any, source: str | None) -> None:
    """The written export is complete: its files exist, hold at least the merged bytes, its index
    (transformers' config and shard list, or the safetensors header) reads back, and its mark (a
    directory's manifest, with every file at its listed size; a safetensors file's metadata)
    names ``source``."""
    nbytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for _, x in named_leaves(merged))
    if fmt == "pretrained":
        files = [os.path.join(path, "config.json")]
        index = os.path.join(path, "flax_model.msgpack.index.json")
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files += [os.path.join(path, s) for s in shards] + [index]
        else:
            files.append(os.path.join(path, "flax_model.msgpack"))
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ExportError(f"the export to {path!r} is incomplete: {missing} were not written.")
        with open(files[0]) as f:
            json.load(f)
        weights = sum(os.path.getsize(f) for f in files[1:] if f != index)
        _verify_mark(path, source)
    elif fmt == "safetensors":
        with needs_extra():
            from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            count = len(list(f.keys()))
        if count != len(named_leaves(merged)):
            raise ExportError(f"the export {path!r} holds {count} tensors where {len(named_leaves(merged))} were written.")
        weights = os.path.getsize(path)
        _verify_mark(path, source)
    else:
        weights = os.path.getsize(path)
    if weights < nbytes:
        raise ExportError(f"the export {path!r} holds {weights:,} bytes of weights, less than the {nbytes:,} merged; "
                          "the disk may be full.")


def _verify_mark(path: str, source: str | None) -> None:
    target = inspect_export(path)
    if target.kind != "lrtt" or target.source != source:
        raise ExportError(f"the export {path!r} does not read back as lrtt's export of {source!r}: it is {target.detail}.")


def _swap_in(staging: str, path: str) -> None:
    """Replace ``path`` by the verified ``staging`` copy; the previous export is removed only
    after the new one is in place."""
    if not os.path.exists(path):
        os.replace(staging, path)
        return
    old = f"{staging}.previous"
    os.replace(path, old)
    os.replace(staging, path)
    if os.path.isdir(old):
        shutil.rmtree(old)
    else:
        os.remove(old)


def load_merged(path: str | os.PathLike, *, like: Any = None) -> Any:
    """Read a ``.safetensors`` or ``.msgpack`` file written by :func:`export_merged`.

    Returns a nested dict of arrays keyed by the ``/`` path components, or, with ``like``, a tree
    of ``like``'s structure (e.g. an ``nnx.State`` or the original params).
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1]
    if suffix == ".safetensors":
        with needs_extra():
            from safetensors.flax import load_file

        flat = load_file(path)
        if like is None:
            return nest(flat)
        names = [p for p, _ in named_leaves(like)]
        missing = sorted(set(names) - set(flat))
        if missing:
            raise ValueError(f"{path!r} lacks tensors of `like`: {missing[:5]}.")
        return jax.tree.unflatten(jax.tree.structure(like), [flat[n] for n in names])
    if suffix == ".msgpack":
        from flax import serialization

        with open(path, "rb") as f:
            data = f.read()
        if like is None:
            return jax.tree.map(np.asarray, serialization.msgpack_restore(data))
        return serialization.from_bytes(like, data)
    raise ValueError(f"`path` must end in .safetensors or .msgpack, got {path!r}.")
