""":func:`save`: params -> a PyTorch-format transformers checkpoint directory (no torch needed)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np

from lrtt._private import is_qwix_leaf
from lrtt.models import _names
from lrtt.models._load import _paths
from lrtt.models._model import Model
from lrtt.models._safetensors import write_sharded

COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
          "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
          "chat_template.json")
"""Files copied from the source checkpoint directory when present."""

_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def save(out_dir: str | os.PathLike, model: Model, params: Any, max_shard_size: int | str = "5GB") -> list[str]:
    """Write ``params`` as the checkpoint directory transformers (5.x) loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir)``.

    PyTorch names and layouts (``nn.Linear`` weights ``(out, in)``, GPT-2's ``Conv1D`` ``(in, out)``
    with q/k/v fused back into ``c_attn``), in the params' dtype (the base dtype: what
    ``lrtt.merge`` returns), one tensor at a time into shards of at most ``max_shard_size`` with
    ``model.safetensors.index.json``. ``config.json`` is the source's (``model.source``), its
    ``dtype`` set to the params'; tokenizer files and ``generation_config.json`` are copied from
    the source directory when present.

    Args:
      out_dir: created if missing; the files written are overwritten.
      model: the :class:`lrtt.models.Model` the params belong to.
      params: float params (merge an adapter first: ``lrtt.merge(method, params, adapter)``).
      max_shard_size: bytes per file (``"5GB"``, ``"500MB"``, or an int).

    Returns:
      The files written.

    Raises:
      ValueError: a quantized leaf (dequantize or merge with ``dtype=`` first), a leaf of another
        shape than the config's, or a missing leaf.
    """
    c = model.config
    leaves = dict(_paths(params, is_leaf=is_qwix_leaf))
    quantized = sorted(p for p, v in leaves.items() if is_qwix_leaf(v))
    if quantized:
        raise ValueError(f"lrtt.models.save writes float tensors; {quantized[:3]} are quantized. Pass "
                         "lrtt.merge(method, params, adapter, dtype=jnp.bfloat16) or lrtt.dequantize(params).")
    shapes = dict(_paths(model.param_shapes()))
    if set(leaves) != set(shapes):
        raise ValueError(f"the params do not match the model's config: missing {sorted(set(shapes) - set(leaves))[:5]}, "
                         f"unexpected {sorted(set(leaves) - set(shapes))[:5]}.")
    for p, like in shapes.items():
        if tuple(leaves[p].shape) != like.shape:
            raise ValueError(f"{p!r} has shape {tuple(leaves[p].shape)}, the config makes it {like.shape}.")
    dtype = np.dtype(leaves["embed/embedding"].dtype)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def host(p):
        return np.asarray(jax.device_get(leaves[p]))

    tensors = []
    by_name: dict[str, list] = {}
    for rule in _names.rules(c):
        for i, name in enumerate(_names.tensor_names(rule, c.num_layers)):
            by_name.setdefault(name, []).append((rule, i if rule.stacked else None))
    for name, parts in by_name.items():
        parts = sorted(parts, key=lambda x: x[0].part or 0)

        def produce(parts=parts):
            blocks = []
            for rule, i in parts:
                value = host(rule.path)
                value = value[i] if i is not None else value
                blocks.append(value.T if rule.transpose else value)
            return (np.concatenate(blocks, axis=-1) if len(blocks) > 1 else blocks[0]).astype(dtype)

        rule0, _ = parts[0]
        shape = shapes[rule0.path].shape[1:] if rule0.stacked else shapes[rule0.path].shape
        shape = shape[::-1] if rule0.transpose else shape
        if len(parts) > 1:
            shape = (*shape[:-1], shape[-1] * len(parts))
        tensors.append((name, tuple(shape), dtype, produce))
    written = write_sharded(out, tensors, max_shard_size)
    config = dict(c.raw)
    source = pathlib.Path(model.source) if model.source else None
    if source is not None and (source / "config.json").is_file():
        config = json.loads((source / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = _TORCH_DTYPES.get(dtype.name, dtype.name)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    written.append("config.json")
    if source is not None and source.resolve() != out.resolve():
        for file in COPIED:
            if (source / file).is_file():
                shutil.copyfile(source / file, out / file)
                written.append(file)
    return written
