"""Loading that quantizes as it reads: ``lrtt.load_quantized`` and ``lrtt.cli.zoo.load_llama`` over
a GGUF file and transformers ``save_pretrained`` directories (PyTorch names, sharded; Flax names)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from test_gguf import read_gguf_llama, write_tiny_gguf, _hf_weights  # tests/test_gguf.py

import lrtt
from lrtt.cli.zoo import build_llama, load_llama

QUANTIZE = dict(qtype="nf4", block_size=8)  # the tiny model's widths are 16 and 32


def _equal_trees(a, b) -> bool:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    same_structure = jax.tree.structure(a) == jax.tree.structure(b)
    return same_structure and all(bool(jnp.array_equal(x, y)) for x, y in zip(leaves_a, leaves_b))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(gguf path, config, flat float params)`` of a tiny llama."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, _hf_weights())
    config, flat, _ = read_gguf_llama(path)
    return path, config, flat


def test_load_quantized_reads_each_leaf_once_and_equals_quantize(tiny):
    _, config, flat = tiny
    model = build_llama(config, flat)
    reads = []

    def read(path):
        reads.append(path)
        return flat[path]

    loaded = lrtt.load_quantized(model.params_shape_tree, read, "all-linear", **QUANTIZE)
    assert sorted(reads) == sorted(flat)  # every leaf once
    assert _equal_trees(loaded, lrtt.quantize(model.params, "all-linear", **QUANTIZE))
    kernel = loaded["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert lrtt._paths.is_quantized(kernel) and not lrtt._paths.is_quantized(loaded["lm_head"]["kernel"])


def test_load_quantized_refuses_a_leaf_of_another_shape(tiny):
    _, config, flat = tiny
    shapes = build_llama(config, flat).params_shape_tree

    def read(path):
        return flat[path][:, :-1] if path.endswith("0/mlp/up_proj/kernel") else flat[path]

    with pytest.raises(ValueError, match=r"model/layers/0/mlp/up_proj/kernel.*does not belong to this model"):
        lrtt.load_quantized(shapes, read, **QUANTIZE)


def test_gguf_quantized_as_read_equals_quantizing_the_converted_model(tiny):
    path, config, flat = tiny
    model, params = load_llama(path, quantize=QUANTIZE)
    assert _equal_trees(params, lrtt.quantize(build_llama(config, flat).params, "all-linear", **QUANTIZE))
    float_model, float_params = load_llama(path)
    assert _equal_trees(float_params, lrtt._paths.nest({k: jnp.asarray(v) for k, v in flat.items()}))


def _write_pytorch_checkpoint(directory, config, flat, *, shards=2) -> None:
    """transformers' PyTorch save_pretrained layout: ``(out, in)`` weights, tied head left out,
    the tensors split over ``shards`` files listed in ``model.safetensors.index.json``."""
    from transformers import LlamaConfig

    torch_names = {}
    for path, value in flat.items():
        if path == "lm_head/kernel":
            continue  # tied: the PyTorch checkpoint holds the embedding only
        name = path.replace("/", ".").replace(".kernel", ".weight").replace(".embedding", ".weight")
        torch_names[name] = np.ascontiguousarray(value.T) if path.endswith("kernel") else value
    names = sorted(torch_names)
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = names[shard::shards]
        save_file({n: torch_names[n] for n in part}, str(directory / file))
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    LlamaConfig(**{**config, "tie_word_embeddings": True}).save_pretrained(directory)


def test_sharded_pytorch_safetensors_checkpoint_loads_float_and_quantized(tiny, tmp_path):
    _, config, flat = tiny
    _write_pytorch_checkpoint(tmp_path, config, flat)
    expected = build_llama(config, flat).params
    _, params = load_llama(tmp_path)
    assert _equal_trees(params, expected)
    _, quantized = load_llama(tmp_path, quantize=QUANTIZE)
    assert _equal_trees(quantized, lrtt.quantize(expected, "all-linear", **QUANTIZE))


def test_flax_save_pretrained_safetensors_loads_quantized(tiny, tmp_path):
    _, config, flat = tiny
    model = build_llama(config, flat)
    model.save_pretrained(tmp_path, params=model.params, safe_serialization=True)
    _, quantized = load_llama(tmp_path, quantize=dict(QUANTIZE, qtype="int8"))
    assert _equal_trees(quantized, lrtt.quantize(model.params, "all-linear", **dict(QUANTIZE, qtype="int8")))


def test_a_checkpoint_missing_a_tensor_is_named(tiny, tmp_path):
    _, config, flat = tiny
    partial = {k: v for k, v in flat.items() if k != "model/layers/1/mlp/down_proj/kernel"}
    _write_pytorch_checkpoint(tmp_path, config, {**partial, "lm_head/kernel": flat["lm_head/kernel"]}, shards=1)
    with pytest.raises(ValueError, match="missing model/layers/1/mlp/down_proj/kernel"):
        load_llama(tmp_path, quantize=QUANTIZE)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llama(tmp_path / "nowhere")
