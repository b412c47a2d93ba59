"""JAX model trees -> Hugging Face checkpoints (PyTorch names and layouts), without torch.

:func:`save_tunix` writes the (merged) params of a google-tunix NNX Llama 3, Qwen 2, Qwen 3,
Gemma (1, 2) or Gemma 3 model, :func:`save_gemma` those of the ``gemma`` package's linen
``gm.nn.Transformer`` (Gemma 1, 2, 3 text), as the checkpoint directory
``transformers.AutoModelForCausalLM`` and :func:`lrtt.models.load` read.

Names and layouts. Each PyTorch tensor the checkpoint needs (:mod:`lrtt.models._names`, for the
``config.json`` written) comes from one leaf. For tunix it is looked up in tunix's own
``_get_key_and_transform_mapping(config)`` (``tunix/models/*/params*.py``), the map tunix reads
Hugging Face checkpoints with, and the ``(permute, reshape)`` it names is inverted:
``q_proj.weight (N·H, D)`` <- ``attn/q_proj/w (D, N, H)``, ``o_proj.weight (D, N·H)`` <-
``attn/o_proj/w (N, H, D)``, Gemma's fused ``kv_einsum (2, K, D, H)`` / ``qkv_einsum (3, N, D, H)``
split back into ``k_proj`` / ``v_proj`` (/ ``q_proj``) as tunix's preprocess stacks them. The
gemma package's map (:func:`_gemma_tensor`) is transformers' Gemma conversion read backwards:
``q_einsum (N, D, H)`` -> ``(N·H, D)``, ``gating_einsum (2, F, D)`` -> ``gate_proj`` / ``up_proj``,
``linear (F, D)`` -> ``down_proj (D, F)``.

``config.json`` is the ``source`` checkpoint's when given, else built from the model's config
(:func:`tunix_hf_config`, :func:`gemma_hf_config`) so that transformers computes what the JAX
forward computes. Where tunix's forward departs from its own config (tunix's Llama 3 and Qwen 3
rotate with the ``rope_theta`` default of their ``apply_rope``, 1e6, whatever
``ModelConfig.rope_theta`` says), the built config follows the forward and a warning names the
difference. MaxText trees have no map here (an error names MaxText's own conversion scripts).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import re
import shutil
import warnings
from typing import Any, Callable

import jax
import numpy as np

from lrtt._paths import is_quantized, named_leaves
from lrtt.models import _names
from lrtt.models._config import parse_config
from lrtt.models._model import Model
from lrtt.models._safetensors import write_sharded
from lrtt.models._save import _TORCH_DTYPES, COPIED
from lrtt.models._tunix_hf_config import (
    _PARAMS_MODULE,
    _gemma_config,
    _refuse_other_stacks,
    _tunix_config,
    gemma_hf_config,
    tunix_hf_config,
)


# --- names and layouts ------------------------------------------------------------------------


Getter = Callable[[], np.ndarray]


def _host(leaves: dict, key: str) -> Getter:
    return lambda: np.asarray(jax.device_get(leaves[key]))


def _tunix_resolver(family: str, config: Any, model_type: str, leaves: dict):
    """``resolve(name, torch_shape) -> (leaf path, getter)`` through tunix's own checkpoint map,
    ``(permute, reshape)`` inverted."""
    from tunix.utils import torch_utils

    mapping = dict(importlib.import_module(_PARAMS_MODULE[family])._get_key_and_transform_mapping(config))
    if model_type == "gemma":
        # tunix's map is Gemma 2's: there `post_attention_layernorm` is the post-attention norm; in
        # Hugging Face Gemma 1 it is the norm before the MLP, tunix's `pre_ffw_norm`.
        mapping[r"model\.layers\.([0-9]+)\.post_attention_layernorm\.weight"] = (r"layers.\1.pre_ffw_norm.scale", None)

    def resolve(name: str, torch_shape: tuple[int, ...]) -> tuple[str, Getter]:
        try:
            key, transform = torch_utils.torch_key_to_jax_key(mapping, name)
        except ValueError:
            raise ValueError(f"tunix's checkpoint map has no single entry for the Hugging Face tensor {name!r}: "
                             "this tunix version names its params differently than lrtt expects.") from None
        if key.startswith("tmp."):  # Gemma q/k/v before tunix's preprocess fuses them: (D, heads, H)
            _, _, layer, _, slot = key.split(".")
            prefix = f"layers/{layer}/attn/"
            if prefix + "qkv_einsum/w" in leaves:
                path, index = prefix + "qkv_einsum/w", "qkv".index(slot)
            elif slot == "q":
                path, index = prefix + "q_einsum/w", None
            else:
                path, index = prefix + "kv_einsum/w", "kv".index(slot)
            fused = _host(leaves, path)

            def get(fused=fused, index=index):
                w = fused()
                return (w if index is None else w[index]).transpose(1, 0, 2)  # (heads, D, H) -> (D, heads, H)
        else:
            path = key.replace(".", "/")
            get = _host(leaves, path)

        def inverse(get=get):
            value = get()
            if transform is not None:  # tunix: torch.transpose(permute).reshape(reshape)
                permute, reshape = transform
                middle = tuple(torch_shape[p] for p in permute) if permute else torch_shape
                if reshape:
                    value = value.reshape(middle)
                if permute:
                    value = value.transpose(np.argsort(permute))
            return value

        return path, inverse

    return resolve


_GEMMA_NORMS = {"input_layernorm": "pre_attention_norm", "pre_feedforward_layernorm": "pre_ffw_norm",
                "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn/_query_norm",
                "self_attn.k_norm": "attn/_key_norm"}


def _gemma_resolver(config: Any, model_type: str, leaves: dict):
    """``resolve(name, torch_shape) -> (leaf path, getter)`` of the gemma package's params
    (transformers' Gemma checkpoint conversion, read backwards)."""

    def resolve(name: str, torch_shape: tuple[int, ...]) -> tuple[str, Getter]:
        if name == "model.embed_tokens.weight":
            return "embedder/input_embedding", _host(leaves, "embedder/input_embedding")
        if name == "model.norm.weight":
            return "final_norm/scale", _host(leaves, "final_norm/scale")
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
        if match is None:
            raise ValueError(f"no gemma-package leaf for the Hugging Face tensor {name!r}.")
        layer, module = f"layer_{match.group(1)}/", match.group(2)
        if module == "post_attention_layernorm":  # Gemma 1: the norm before the MLP
            path = layer + ("pre_ffw_norm/scale" if model_type == "gemma" else "post_attention_norm/scale")
            return path, _host(leaves, path)
        if module in _GEMMA_NORMS:
            path = layer + _GEMMA_NORMS[module] + "/scale"
            return path, _host(leaves, path)
        kind = module.rpartition(".")[2]
        if kind in ("q_proj", "k_proj", "v_proj"):  # (heads, D, H) -> (heads·H, D)
            if layer + "attn/qkv_einsum/w" in leaves:
                path, index = layer + "attn/qkv_einsum/w", "qkv".index(kind[0])
            elif kind == "q_proj":
                path, index = layer + "attn/q_einsum/w", None
            else:
                path, index = layer + "attn/kv_einsum/w", "kv".index(kind[0])
            fused = _host(leaves, path)

            def get(fused=fused, index=index):
                w = fused()
                w = w if index is None else w[index]
                return w.transpose(0, 2, 1).reshape(torch_shape)
        elif kind == "o_proj":  # (N, H, D) -> (D, N·H)
            path = layer + "attn/attn_vec_einsum/w"
            get = lambda w=_host(leaves, path): w().reshape(torch_shape[::-1]).T  # noqa: E731
        elif kind in ("gate_proj", "up_proj"):  # (2, F, D) (transpose_gating_einsum) or (2, D, F)
            path, index = layer + "mlp/gating_einsum", int(kind == "up_proj")
            transposed = bool(config.transpose_gating_einsum)
            get = lambda w=_host(leaves, path), i=index, t=transposed: w()[i] if t else w()[i].T  # noqa: E731
        elif kind == "down_proj":  # (F, D) -> (D, F)
            path = layer + "mlp/linear"
            get = lambda w=_host(leaves, path): w().T  # noqa: E731
        else:
            raise ValueError(f"no gemma-package leaf for the Hugging Face tensor {name!r}.")
        return path, get

    return resolve


def _check_source(built: dict, raw: dict, what: str) -> None:
    """A ``source`` config of another shape than the model's is an error; one that computes
    differently (rope, windows, soft-capping, ...) a warning naming the fields."""
    a, b = parse_config(built), parse_config(raw)
    shape = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
             "intermediate_size", "tie_word_embeddings", "qkv_bias", "qk_norm", "sandwich_norms")
    diff = {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
            if f.name != "raw" and getattr(a, f.name) != getattr(b, f.name)}
    wrong = {k: v for k, v in diff.items() if k in shape or k == "model_type"}
    if wrong:
        raise ValueError(f"`source`'s config.json is not the {what} model's: "
                         + ", ".join(f"{k} {src!r} ({what}: {tx!r})" for k, (tx, src) in wrong.items())
                         + ". Pass the checkpoint the model was loaded from, or source=None.")
    if diff:
        warnings.warn(
            f"`source`'s config.json computes differently from the {what} forward in "
            + ", ".join(f"{k} ({what}: {tx!r}, config.json: {src!r})" for k, (tx, src) in diff.items())
            + ": the checkpoint written is the source's model with the params' weights. Pass source=None "
            "for a config.json that computes what the JAX model computed.", stacklevel=4)


# --- save -------------------------------------------------------------------------------------


def _write(out_dir, what: str, built: dict, params: Any, make_resolver, source, max_shard_size) -> list[str]:
    """Write the checkpoint: every tensor of the config's rules from the leaf ``resolve`` names."""
    named = named_leaves(params)
    quantized = sorted(p for p, v in named if is_quantized(v))
    if quantized:
        raise ValueError(f"the params are written as float tensors; {quantized[:3]} are quantized. Pass "
                         "lrtt.merge(method, params, adapter, dtype=jnp.bfloat16) or lrtt.dequantize(params).")
    leaves = dict(named)
    raw = built
    source_dir = pathlib.Path(source) if source is not None else None
    if source_dir is not None:
        file = source_dir / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"`source`={os.fspath(source_dir)!r} has no config.json: not a Hugging Face "
                                    "checkpoint directory.")
        raw = json.loads(file.read_text())
        _check_source(built, raw, what)
    if "embedder/input_embedding" not in leaves:
        raise ValueError(f"the params hold no 'embedder/input_embedding' (found e.g. {sorted(leaves)[:4]}): pass the "
                         f"{what} model's params (tunix: nnx.split(model, nnx.Param, ...)[1]; gemma: "
                         "model.init(...)['params']).")
    model = Model(parse_config(raw))
    c = model.config
    resolve = make_resolver(leaves, built["model_type"])
    dtype = np.dtype(leaves["embedder/input_embedding"].dtype)
    shapes = dict(_paths(model.param_shapes()))
    used: set[str] = set()
    tensors = []
    for rule in _names.rules(c):
        shape = shapes[rule.path].shape[1:] if rule.stacked else shapes[rule.path].shape
        torch_shape = tuple(shape[::-1] if rule.transpose else shape)
        for name in _names.tensor_names(rule, c.num_layers):
            path, get = resolve(name, torch_shape)
            if path not in leaves:
                raise ValueError(f"the params have no {path!r}, which holds {name!r}: they are not a {what} model of "
                                 "this config.")
            used.add(path)

            def produce(get=get, torch_shape=torch_shape, name=name, path=path):
                value = get()
                if tuple(value.shape) != torch_shape:
                    raise ValueError(f"{path!r} gives {name!r} the shape {tuple(value.shape)}, the config.json "
                                     f"written makes it {torch_shape}: the params do not belong to this config.")
                return value.astype(dtype)

            tensors.append((name, torch_shape, dtype, produce))
    unused = sorted(set(leaves) - used)
    if unused:
        raise ValueError(
            f"the params hold {len(unused)} leaf/leaves the Hugging Face checkpoint has no place for, e.g. "
            f"{unused[:5]}. Unmerged LoRA params (tunix/qwix LoRAParam, gm.nn.LoRA)? Merge them first "
            "(lrtt.merge(method, params, adapter)) and pass only the model's own params.")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = write_sharded(out, tensors, max_shard_size)
    config_json = dict(raw)
    for key in ("dtype", "torch_dtype"):
        if key in config_json or key == "dtype":
            config_json[key] = _TORCH_DTYPES.get(dtype.name, dtype.name)
    (out / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    written.append("config.json")
    if source_dir is not None and source_dir.resolve() != out.resolve():
        for file in COPIED:
            if (source_dir / file).is_file():
                shutil.copyfile(source_dir / file, out / file)
                written.append(file)
    return written


def save_tunix(out_dir: str | os.PathLike, model_or_config: Any, params: Any = None, *,
               source: str | os.PathLike | None = None, max_shard_size: int | str = "5GB") -> list[str]:
    """Write a google-tunix NNX model's params as a Hugging Face checkpoint directory (no torch).

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` (transformers 5) and
    :func:`lrtt.models.load` read it; tensors are written one at a time in the params' dtype
    (the embedding's) into shards of at most ``max_shard_size``, named and laid out by tunix's
    own checkpoint maps, inverted (see the module docstring).

    Args:
      out_dir: created if missing; the files written are overwritten.
      model_or_config: the tunix model (``Llama3``, ``Qwen2``, ``Qwen3``, ``Gemma``, ``Gemma3``)
        or its ``ModelConfig``.
      params: its ``nnx.Param`` state (``nnx.split(model, nnx.Param, ...)[1]``) or the same as a
        nested dict, merged: ``lrtt.merge(method, params, adapter)``. None: the model's own
        ``nnx.state(model, nnx.Param)``.
      source: the Hugging Face checkpoint directory the tunix model was loaded from: its
        ``config.json`` is written (its ``dtype`` set to the params'; another shape is an error,
        another computation a warning) and its tokenizer files and ``generation_config.json``
        copied. None: ``config.json`` is :func:`tunix_hf_config`'s.
      max_shard_size: bytes per file (``"5GB"``, ``"500MB"``, or an int).

    Returns:
      The files written.

    Raises:
      ValueError: not a tunix model of a supported family (a gemma-package or MaxText model: the
        message names what to use), a config no Hugging Face class computes
        (:func:`tunix_hf_config`), a ``source`` of another shape, quantized leaves, params of
        other shapes than the config's, or leaves the checkpoint has no place for (unmerged LoRA
        params, a vision tower, ...).
    """
    family, config, _ = _tunix_config(model_or_config)
    _refuse_other_stacks(model_or_config, params, "tunix")
    if params is None:
        if config is model_or_config:
            raise ValueError("pass `params` (the merged nnx.Param state) with a tunix ModelConfig.")
        from flax import nnx

        params = nnx.state(model_or_config, nnx.Param)
    built = tunix_hf_config(config)
    return _write(out_dir, f"tunix {family}", built, params,
                  lambda leaves, model_type: _tunix_resolver(family, config, model_type, leaves),
                  source, max_shard_size)


def save_gemma(out_dir: str | os.PathLike, model_or_config: Any, params: Any, *,
               source: str | os.PathLike | None = None, max_shard_size: int | str = "5GB") -> list[str]:
    """Write the gemma package's ``gm.nn.Transformer`` params as a Hugging Face checkpoint
    directory (no torch): Gemma 1, 2 and 3 (text), as :func:`gemma_hf_config` says.

    The same files, checks and arguments as :func:`save_tunix`; ``model_or_config`` is the
    ``gm.nn.Transformer`` or its ``gm.nn.config.TransformerConfig``, ``params`` its (merged)
    ``params`` (``model.init(...)['params']``).

    Raises:
      ValueError: not a gemma-package ``Transformer`` (a tunix or MaxText model: the message
        names what to use), a config no Hugging Face Gemma computes (a vision encoder, ...), a
        ``source`` of another shape, quantized leaves, params of other shapes than the config's,
        or leaves the checkpoint has no place for (unmerged ``gm.nn.LoRA`` params, ...).
    """
    config = _gemma_config(model_or_config)
    _refuse_other_stacks(model_or_config, params, "gemma")
    built = gemma_hf_config(config)
    return _write(out_dir, "gemma package", built, params,
                  lambda leaves, model_type: _gemma_resolver(config, model_type, leaves), source, max_shard_size)


def _paths(tree: Any) -> list[tuple[str, Any]]:
    from lrtt.models._load import _paths as paths

    return paths(tree)
