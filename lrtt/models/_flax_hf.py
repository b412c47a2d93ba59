""":func:`save_flax_model`: a transformers (4.x) Flax model's params -> the PyTorch-format
checkpoint directory transformers 5 loads (no torch, no Flax classes needed to read it)."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import numpy as np

from lrtt._private import is_qwix_leaf
from lrtt.models._safetensors import write_sharded

_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if hasattr(tree, "items"):
        out = []
        for key, value in tree.items():
            out.extend(_flatten(value, (*prefix, str(key))))
        return out
    return [(prefix, tree)]


def torch_names(params: Any, *, tie_word_embeddings: bool = False) -> list[tuple[str, tuple[str, ...], bool]]:
    """``(PyTorch name, Flax path, transpose)`` of each leaf of a transformers Flax params tree, by
    the rule transformers' own Flax -> PyTorch conversion uses: path parts joined by ``.``, a 2-D
    ``kernel`` -> ``weight`` transposed (``nn.Linear`` is ``(out, in)``), a LayerNorm ``scale`` ->
    ``weight``, an ``embedding`` -> ``weight``, everything else (``bias``, an RMSNorm ``weight``)
    kept. ``tie_word_embeddings``: the top-level ``lm_head`` is left out (PyTorch ties it to the
    input embedding on load).

    Raises:
      ValueError: a leaf the rule does not cover (a kernel of another rank than 2, a quantized leaf).
    """
    out = []
    for path, leaf in _flatten(params):
        if tie_word_embeddings and path[0] == "lm_head":
            continue
        if is_qwix_leaf(leaf) or not hasattr(leaf, "shape"):
            raise ValueError(f"{'/'.join(path)!r} is a {type(leaf).__name__}, not a float array: merge with "
                             "dtype= or lrtt.dequantize(params) first.")
        last, transpose = path[-1], False
        if last == "kernel":
            if len(leaf.shape) != 2:
                raise ValueError(f"{'/'.join(path)!r} is a {len(leaf.shape)}-D kernel; the conversion covers "
                                 "nn.Linear (2-D) kernels only.")
            last, transpose = "weight", True
        elif last in ("scale", "embedding"):
            last = "weight"
        out.append((".".join((*path[:-1], last)), path, transpose))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"two Flax leaves map to one PyTorch name: {sorted({n for n in names if names.count(n) > 1})[:3]}.")
    return out


def _tied(params: Any, leaves: dict) -> bool:
    """Whether the top-level ``lm_head`` kernel is exactly an input embedding transposed (then
    PyTorch's tying reproduces it). transformers' Flax Llama never ties: it applies its own
    ``lm_head`` kernel whatever ``tie_word_embeddings`` says, so a head that differs (trained, or
    random) is written and the exported config unties it."""
    head = leaves.get(("lm_head", "kernel"))
    if head is None:
        return False
    head = np.asarray(jax.device_get(head))
    for path, leaf in leaves.items():
        if path[-1] == "embedding" and path[0] != "lm_head" and tuple(leaf.shape) == head.shape[::-1]:
            if np.array_equal(np.asarray(jax.device_get(leaf)), head.T):
                return True
    return False


def torch_class_name(flax_model: Any) -> str:
    """``FlaxBertForSequenceClassification`` -> ``BertForSequenceClassification``."""
    name = type(flax_model).__name__
    return name[len("Flax"):] if name.startswith("Flax") else name


def save_flax_model(out_dir: str | os.PathLike, flax_model: Any, params: Any,
                    max_shard_size: int | str = "5GB") -> list[str]:
    """Write a transformers Flax model's ``params`` (e.g. ``lrtt.merge``'s result) as the
    PyTorch-format checkpoint directory transformers 5 loads with ``AutoModelFor*.from_pretrained``
    (Flax classes are gone there): ``model.safetensors`` (or shards + index) with the names and
    layouts of :func:`torch_names`, in the params' dtype, and ``config.json`` (the Flax model's
    ``config.to_dict()``, ``architectures`` the PyTorch class, ``dtype`` the params').

    Args:
      out_dir: created if missing; the files written are overwritten.
      flax_model: the ``FlaxPreTrainedModel`` the params belong to (e.g. ``FlaxBertForSequenceClassification``).
      params: its float params tree (``{"bert": ..., "classifier": ...}``).
      max_shard_size: bytes per file (``"5GB"``, ``"500MB"``, or an int).

    Returns:
      The files written.

    Raises:
      ValueError: a quantized leaf, a kernel that is not 2-D, or leaves of several dtypes.
    """
    config = flax_model.config
    leaves = dict(_flatten(params))
    tied = _tied(params, leaves) if getattr(config, "tie_word_embeddings", False) else False
    entries = torch_names(params, tie_word_embeddings=tied)
    dtypes = {np.dtype(leaves[path].dtype) for _, path, _ in entries}
    if len(dtypes) != 1:
        raise ValueError(f"the params mix dtypes {sorted(d.name for d in dtypes)}; cast them to one first.")
    (dtype,) = dtypes
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def produce(path, transpose):
        value = np.asarray(jax.device_get(leaves[path]))
        return value.T if transpose else value

    tensors = [(name, tuple(leaves[path].shape[::-1] if transpose else leaves[path].shape), dtype,
                lambda path=path, transpose=transpose: produce(path, transpose))
               for name, path, transpose in entries]
    written = write_sharded(out, tensors, max_shard_size)
    raw = config.to_dict()
    raw.pop("torch_dtype", None)
    raw["architectures"] = [torch_class_name(flax_model)]
    if "lm_head" in params and getattr(config, "tie_word_embeddings", False) and not tied:
        raw["tie_word_embeddings"] = False  # the Flax head is its own kernel (no tying in Flax Llama)
    raw["dtype"] = _TORCH_DTYPES.get(dtype.name, dtype.name)
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True, default=str) + "\n")
    written.append("config.json")
    return written
