""":func:`load`: a transformers checkpoint directory -> ``(Model, params)``."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lrtt.models import _names
from lrtt.models._config import parse_config
from lrtt.models._model import Model
from lrtt.models._safetensors import tensor_index


def _paths(tree: Any, is_leaf: Any = None) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [("/".join(str(k.key) for k in path), leaf) for path, leaf in leaves]


def _unflatten(like: Any, values: Mapping[str, Any]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree.unflatten(treedef, [values["/".join(str(k.key) for k in p)] for p, _ in leaves])


_set_layer = jax.jit(lambda stack, layer, i: jax.lax.dynamic_update_slice_in_dim(stack, layer, i, 0), donate_argnums=0)
"""``stack`` with ``layer`` (``(1, ...)``) written at index ``i`` of its leading axis, in place."""

_QUANTIZE_DEFAULTS = dict(targets="all-linear", qtype="nf4", block_size=64, layouts=(), scale_dtype=None, packed=False)


def _load_quantized(shapes, by_path, num_layers, read, tensor, dtype, quantize) -> dict:
    """``lrtt.load_quantized`` with a stacked kernel quantized one layer at a time: each layer's
    tensor is quantized as read and its values and scales copied into the stack's buffers, so
    neither the float stack nor a second copy of the quantized one ever exists (the layer axis is
    channelwise: the same values and scales as quantizing the whole stack)."""
    from lrtt import _quant

    unknown = sorted(set(quantize) - set(_QUANTIZE_DEFAULTS))
    if unknown:
        raise TypeError(f"lrtt.models.load: unknown `quantize` option(s) {unknown}; known: {sorted(_QUANTIZE_DEFAULTS)}.")
    o = {**_QUANTIZE_DEFAULTS, **quantize}
    plan = _quant._plan(shapes, o["targets"], o["qtype"], o["block_size"], o["layouts"], o["scale_dtype"], o["packed"])
    values = {}
    leaves = _paths(shapes)  # the leaves kept in float (embedding, head: the largest tensors) first, while
    leaves = [x for x in leaves if x[0] not in plan] + [x for x in leaves if x[0] in plan]  # little else is held
    for leaf_path, like in leaves:
        rule = by_path[leaf_path]
        if leaf_path in plan and rule.stacked:
            quantize_layer = jax.jit(plan[leaf_path])  # compiled once per kernel shape
            buffers = treedef = None
            for i, name in enumerate(_names.tensor_names(rule, num_layers)):
                value = tensor(rule, name)
                if value.shape != like.shape[1:]:
                    raise ValueError(f"{name!r} was read with shape {value.shape}, but config.json makes "
                                     f"{leaf_path!r} {like.shape}: the checkpoint does not belong to this config.")
                parts, treedef_i = jax.tree.flatten(quantize_layer(value[None]))
                if buffers is None:
                    treedef = treedef_i
                    buffers = [jnp.zeros((num_layers, *x.shape[1:]), x.dtype) for x in parts]
                buffers = [_set_layer(b, part, i) for b, part in zip(buffers, parts)]  # in place (donated)
                # Wait for this layer before reading the next: dispatch is asynchronous, and on a busy
                # machine queued layers would each keep their float tensor and temporaries alive.
                jax.block_until_ready(buffers)
                del value, parts
            values[leaf_path] = jax.tree.unflatten(treedef, buffers)
            del buffers
            continue
        value = np.ascontiguousarray(read(leaf_path))  # a transposed view made contiguous here, not by jax
        if tuple(value.shape) != tuple(like.shape):
            raise ValueError(f"{leaf_path!r} was read with shape {tuple(value.shape)}, but config.json makes it "
                             f"{tuple(like.shape)}: the checkpoint does not belong to this config.")
        values[leaf_path] = plan[leaf_path](value) if leaf_path in plan else jnp.asarray(value, dtype)
        del value
    return _unflatten(shapes, values)


def load(
    path: str | os.PathLike,
    dtype: Any = "float32",
    quantize: Mapping[str, Any] | None = None,
    mesh: Any = None,
    *,
    rules: Any = "fsdp",
    remat: bool = True,
) -> tuple[Model, dict]:
    """The model and params of a transformers checkpoint directory (``config.json`` + safetensors),
    or of a llama.cpp ``.gguf`` file (dequantized to float32, read as the transformers Llama it
    was converted from: :mod:`lrtt.models._gguf`).

    The family comes from ``config.json``'s ``model_type`` (see :data:`lrtt.models.FAMILIES`).
    Tensors are read one at a time from the memory-mapped files (single or sharded through
    ``model.safetensors.index.json``), ``nn.Linear`` weights transposed to ``(in, out)``, each
    layer's tensors stacked on a leading axis as they are read.

    Args:
      path: the directory ``save_pretrained`` wrote (or a Hub snapshot of one), or a ``.gguf``.
      dtype: the params' dtype (``"float32"``, ``"bfloat16"``, ...); None keeps the file's.
      quantize: ``lrtt.load_quantized`` options (``{"qtype": "nf4"}``, ``block_size``, ``targets``
        default ``"all-linear"``, ``packed``, ...): each kernel is quantized as it is read, so the
        float model never exists.
      mesh: a ``jax.sharding.Mesh``: each leaf is placed as read, by
        ``lrtt.train.param_specs(..., rules)`` (``"fsdp"`` default, ``"tensor"``, ``{regex: spec}``).
      rules: the sharding rules used with ``mesh``.
      remat: the model recomputes each layer in the backward pass.

    Returns:
      ``(model, params)``: ``model(params, tokens) -> logits``.

    Raises:
      FileNotFoundError: no ``config.json`` or no safetensors.
      ValueError: an unsupported family or option (named), tensors missing from the checkpoint,
        tensors the config does not use, or a tensor of the wrong shape.
    """
    directory = pathlib.Path(path)
    if directory.suffix == ".gguf" and directory.is_file():
        from lrtt.models import _gguf

        raw, index = _gguf.tensor_index(directory)
        model = Model(parse_config(raw), source=None, remat=remat)
    else:
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{os.fspath(directory)!r} has no config.json: not a transformers checkpoint "
                                    "directory (nor a .gguf file).")
        raw = json.loads((directory / "config.json").read_text())
        model = Model(parse_config(raw), source=os.fspath(directory), remat=remat)
        index = tensor_index(directory)
    c = model.config
    rules_ = _names.rules(c)
    if rules_[0].name not in index:  # e.g. the original gpt2 checkpoint, saved without "transformer."
        bare = _names.rules(c, prefix="")
        if bare[0].name in index:
            rules_ = bare
    expected = {n for r in rules_ for n in _names.tensor_names(r, c.num_layers)}
    missing = sorted(expected - set(index))
    if missing:
        raise ValueError(f"{os.fspath(directory)!r}: a {c.model_type!r} checkpoint with this config.json needs "
                         f"{len(missing)} tensor(s) it does not hold, e.g. {missing[:5]}; it holds e.g. {sorted(index)[:5]}.")
    tied_head = {"lm_head.weight"} if c.tie_word_embeddings else set()  # transformers ties it to the embedding
    unused = sorted(n for n in set(index) - expected - tied_head if not n.endswith(_names.IGNORED_SUFFIXES))
    if unused:
        raise ValueError(f"{os.fspath(directory)!r} holds {len(unused)} tensor(s) that a {c.model_type!r} model with "
                         f"this config.json does not use, e.g. {unused[:5]}: it is not the model the config "
                         "describes (or holds an option lrtt.models does not implement).")
    if dtype is None:
        file, name = index[rules_[0].name]
        dtype = file[name].dtype
    dtype = jnp.dtype(dtype)
    shapes = model.param_shapes(dtype)
    by_path = {r.path: r for r in rules_}

    def tensor(rule: _names.Rule, name: str) -> np.ndarray:
        file, key = index[name]
        value = file[key]
        if rule.part is not None:  # GPT-2's fused c_attn: this leaf's column block
            width = value.shape[-1] // rule.parts
            value = value[..., rule.part * width:(rule.part + 1) * width]
        return np.asarray(value.T if rule.transpose else value, dtype)

    def read(leaf_path: str) -> np.ndarray:
        """One params leaf; a stacked one is filled layer by layer (one layer's tensor extra in memory)."""
        rule = by_path[leaf_path]
        names = _names.tensor_names(rule, c.num_layers)
        if not rule.stacked:
            return tensor(rule, names[0])
        out = None
        for i, name in enumerate(names):
            value = tensor(rule, name)
            if out is None:
                out = np.empty((len(names), *value.shape), dtype)
            elif value.shape != out.shape[1:]:
                raise ValueError(f"{name!r} has shape {value.shape}, layer 0's has {out.shape[1:]}.")
            out[i] = value
        return out

    if quantize is not None:
        import lrtt

        if mesh is not None:
            raise ValueError("lrtt.models.load: `quantize` with `mesh` is not supported; load quantized on one "
                             "device, or load in float on the mesh.")
        return model, _load_quantized(shapes, by_path, c.num_layers, read, tensor, dtype, quantize)

    shardings = {}
    if mesh is not None:
        import lrtt.train

        specs = lrtt.train.param_specs(shapes, mesh, rules)
        shardings = {p: jax.sharding.NamedSharding(mesh, s) for p, s in _paths(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}
    values = {}
    for leaf_path, like in _paths(shapes):
        value = read(leaf_path)
        if value.shape != like.shape:
            raise ValueError(f"{leaf_path!r} was read with shape {value.shape}, but config.json makes it "
                             f"{like.shape}: the checkpoint does not belong to this config.")
        values[leaf_path] = jax.device_put(value, shardings.get(leaf_path))
        del value
    return model, _unflatten(shapes, values)
