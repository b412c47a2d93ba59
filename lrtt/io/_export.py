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

import os
from typing import Any

import jax
import numpy as np

from lrtt._extras import needs_extra
from lrtt._merge import merge
from lrtt._paths import named_leaves, nest

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

    Raises:
      ValueError: LorettaAdp (not mergeable: the error of :func:`lrtt.merge`), an unknown format,
        or a format that cannot be inferred.

    Example::

      merged = lrtt.export_merged(method, params, adapter, "merged.safetensors")
      restored = lrtt.load_merged("merged.safetensors", like=params)
    """
    path = os.fspath(path)
    fmt = _resolve_format(path, model, format)
    merged = merge(method, params, adapter)
    if fmt == "pretrained":
        if not hasattr(model, "save_pretrained"):
            raise ValueError(f"`model` must be a transformers Flax model with save_pretrained, got {type(model).__name__}.")
        model.save_pretrained(path, params=merged)
        return merged
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if fmt == "safetensors":
        with needs_extra():
            from safetensors.flax import save_file

        tensors = {name: jax.numpy.asarray(jax.device_get(leaf)) for name, leaf in named_leaves(merged)}
        if len(tensors) != len(named_leaves(merged)):
            raise ValueError("two leaves of the params share one '/'-joined path; safetensors needs unique names.")
        save_file(tensors, path, metadata={"format": "lrtt-merged"})
    else:
        from flax import serialization

        with open(path, "wb") as f:
            f.write(serialization.to_bytes(jax.device_get(merged)))
    return merged


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
