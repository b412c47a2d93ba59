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

FORMATS = ("auto", "pretrained", "safetensors", "msgpack")


class ExportError(OSError):
    """A merged export that could not be written, or did not read back as written."""
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

    The export is written next to ``path`` under a temporary name, checked (its files exist,
    hold at least the merged bytes, and their index reads back) and only then moved to ``path``;
    a previous export at ``path`` stays in place until the new one is complete.

    Raises:
      ValueError: LorettaAdp (not mergeable: the error of :func:`lrtt.merge`), an unknown format,
        or a format that cannot be inferred.
      ExportError: ``path`` is of the wrong kind (a file where a directory goes, or the reverse),
        cannot be written, or the written export does not read back.

    Example::

      merged = lrtt.export_merged(method, params, adapter, "merged.safetensors")
      restored = lrtt.load_merged("merged.safetensors", like=params)
    """
    path = os.path.abspath(os.fspath(path))
    fmt = _resolve_format(path, model, format)
    _check_target(path, fmt)
    merged = merge(method, params, adapter)
    if fmt == "pretrained" and not hasattr(model, "save_pretrained"):
        raise ValueError(f"`model` must be a transformers Flax model with save_pretrained, got {type(model).__name__}.")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial-{os.getpid()}")
    try:
        if fmt == "pretrained":
            model.save_pretrained(staging, params=merged)
        elif fmt == "safetensors":
            _write_safetensors(staging, merged)
        else:
            from flax import serialization

            with open(staging, "wb") as f:
                f.write(serialization.to_bytes(jax.device_get(merged)))
        _verify(staging, fmt, merged)
        _swap_in(staging, path)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
        elif os.path.exists(staging):
            os.remove(staging)
    return merged


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


def _write_safetensors(path: str, merged: Any) -> None:
    with needs_extra():
        from safetensors.flax import save_file

    tensors = {name: jax.numpy.asarray(jax.device_get(leaf)) for name, leaf in named_leaves(merged)}
    if len(tensors) != len(named_leaves(merged)):
        raise ValueError("two leaves of the params share one '/'-joined path; safetensors needs unique names.")
    save_file(tensors, path, metadata={"format": "lrtt-merged"})


def _verify(path: str, fmt: str, merged: Any) -> None:
    """The written export is complete: its files exist, hold at least the merged bytes, and its
    index (transformers' config and shard list, or the safetensors header) reads back."""
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
    elif fmt == "safetensors":
        with needs_extra():
            from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            count = len(list(f.keys()))
        if count != len(named_leaves(merged)):
            raise ExportError(f"the export {path!r} holds {count} tensors where {len(named_leaves(merged))} were written.")
        weights = os.path.getsize(path)
    else:
        weights = os.path.getsize(path)
    if weights < nbytes:
        raise ExportError(f"the export {path!r} holds {weights:,} bytes of weights, less than the {nbytes:,} merged; "
                          "the disk may be full.")


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
