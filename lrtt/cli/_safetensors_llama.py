"""Llama-architecture checkpoints in transformers' ``save_pretrained`` layout, read lazily.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (``weight_map``: tensor name -> file). Tensor names come in two
layouts, told apart by their names:

* PyTorch (what the hub serves): ``model.layers.0.self_attn.q_proj.weight`` ``(out, in)``,
  read as the Flax kernel ``model/layers/0/self_attn/q_proj/kernel = W.T``; embeddings
  (``…embed_tokens.weight``) as ``…/embedding``; norms as they are; no ``lm_head.weight`` means
  tied embeddings (``lm_head/kernel = embedding.T``).
* Flax (``FlaxLlamaForCausalLM.save_pretrained(..., safe_serialization=True)``, or lrtt's own
  ``export_merged(format="safetensors")``): ``model.layers.0.self_attn.q_proj.kernel`` or
  ``model/layers/0/...``, read as they are.

Each reader opens its file memory-mapped and reads one tensor, so a loader that quantizes each
kernel as it is read (:func:`lrtt.load_quantized`) never holds the model in float.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any, Callable


from lrtt._extras import needs_extra

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def _tensor_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """``{tensor name: file}`` of a save_pretrained directory (sharded or not)."""
    if (directory / _INDEX).is_file():
        weight_map = json.loads((directory / _INDEX).read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    if (directory / _SINGLE).is_file():
        with needs_extra():
            from safetensors import safe_open
        with safe_open(directory / _SINGLE, framework="flax") as f:
            return {name: directory / _SINGLE for name in f.keys()}
    raise FileNotFoundError(
        f"{os.fspath(directory)!r} holds neither {_SINGLE} nor {_INDEX}: not a transformers save_pretrained "
        "checkpoint in safetensors (save it with `safe_serialization=True`, or pass a .gguf file)."
    )


def _flax_name(name: str) -> tuple[str, bool]:
    """The FlaxLlamaForCausalLM path of a tensor name, and whether its values are transposed."""
    path = name.replace(".", "/")
    if path.endswith(("/kernel", "/embedding")) or "/" in name:
        return path, False  # already Flax's layout
    if path.endswith("embed_tokens/weight"):
        return path[: -len("weight")] + "embedding", False
    if re.search(r"(_proj|lm_head)/weight$", path):
        return path[: -len("weight")] + "kernel", True
    return path, False  # norms: `…/weight` in both layouts


def safetensors_llama_readers(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Callable[[], Any]]]:
    """``(config, readers)`` of a Llama save_pretrained directory; nothing is read until a reader is called.

    Returns:
      ``config``: the kwargs of a ``transformers.LlamaConfig`` (``config.json``); ``readers``:
      ``{'/'-joined FlaxLlamaForCausalLM path: () -> array}`` (jax arrays in the file's dtype).

    Raises:
      FileNotFoundError: no ``config.json`` or no safetensors in ``directory``.
      ValueError: not a Llama-architecture config.
    """
    with needs_extra():
        from safetensors import safe_open

    directory = pathlib.Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{os.fspath(directory)!r} has no config.json: not a save_pretrained directory.")
    config = json.loads((directory / "config.json").read_text())
    if config.get("model_type") not in ("llama", "mistral", None):
        raise ValueError(f"{os.fspath(directory)!r} holds a {config.get('model_type')!r} model, not a Llama-architecture one.")

    def reader(file: pathlib.Path, name: str, transpose: bool) -> Callable[[], Any]:
        def read():
            with safe_open(file, framework="flax") as f:
                value = f.get_tensor(name)
            return value.T if transpose else value
        return read

    readers = {}
    for name, file in _tensor_files(directory).items():
        path, transpose = _flax_name(name)
        readers[path] = reader(file, name, transpose)
    if "lm_head/kernel" not in readers and "model/embed_tokens/embedding" in readers:
        embedding = readers["model/embed_tokens/embedding"]
        readers["lm_head/kernel"] = lambda: embedding().T  # tied: FlaxLlama keeps its own head
    return config, readers
