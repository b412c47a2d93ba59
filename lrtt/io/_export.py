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

import json
import os
import shutil
from typing import Any

import jax
import numpy as np

from lrtt._extras import needs_extra
from lrtt._merge import merge
from lrtt._paths import named_leaves, nest
from lrtt.io._export_target import (
    _MANIFEST_FORMAT,
    _MANIFEST_VERSION,
    _SAFETENSORS_FORMAT,
    MANIFEST,
    ExportError,
    _check_options,
    _check_owner,
    _check_target,
    inspect_export,
)

FORMATS = ("auto", "pretrained", "safetensors", "msgpack")
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
