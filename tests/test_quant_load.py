"""Loading that quantizes as it reads: ``lrtt.load_quantized`` over any reader, and
``lrtt.models.load(..., quantize=)`` over a GGUF file and a sharded PyTorch-format checkpoint."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_gguf import write_tiny_gguf, _hf_weights  # tests/test_gguf.py

import lrtt
import lrtt.models
from lrtt.models._load import _paths

QUANTIZE = dict(qtype="nf4", block_size=8)  # the tiny model's widths are 16 and 32


def _equal_trees(a, b) -> bool:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    same_structure = jax.tree.structure(a) == jax.tree.structure(b)
    return same_structure and all(bool(jnp.array_equal(x, y)) for x, y in zip(leaves_a, leaves_b))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(gguf path, model, float params)`` of a tiny llama."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, _hf_weights())
    model, params = lrtt.models.load(path)
    return path, model, params


def test_load_quantized_reads_each_leaf_once_and_equals_quantize(tiny):
    _, model, params = tiny
    flat = dict(_paths(params))
    reads = []

    def read(path):
        reads.append(path)
        return flat[path]

    loaded = lrtt.load_quantized(model.param_shapes(), read, "all-linear", **QUANTIZE)
    assert sorted(reads) == sorted(flat)  # every leaf once
    assert _equal_trees(loaded, lrtt.quantize(params, "all-linear", **QUANTIZE))
    assert lrtt._paths.is_quantized(loaded["layers"]["attn"]["q_proj"]["kernel"])
    assert not lrtt._paths.is_quantized(loaded["embed"]["embedding"])


def test_load_quantized_refuses_a_leaf_of_another_shape(tiny):
    _, model, params = tiny
    flat = dict(_paths(params))

    def read(path):
        return flat[path][..., :-1] if path == "layers/mlp/up_proj/kernel" else flat[path]

    with pytest.raises(ValueError, match=r"layers/mlp/up_proj/kernel.*does not belong to this model"):
        lrtt.load_quantized(model.param_shapes(), read, **QUANTIZE)


def test_sharded_checkpoint_loads_float_and_quantized(tiny, tmp_path):
    _, model, params = tiny
    lrtt.models.save(tmp_path, model, params, max_shard_size=20_000)
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    _, loaded = lrtt.models.load(tmp_path)
    assert _equal_trees(loaded, params)
    for qtype in ("nf4", "int8"):
        _, quantized = lrtt.models.load(tmp_path, quantize=dict(QUANTIZE, qtype=qtype))
        expected = lrtt.quantize(params, "all-linear", **dict(QUANTIZE, qtype=qtype))
        if qtype == "nf4":
            assert _equal_trees(quantized, expected)
        else:  # jaxlib 0.12.1: the jitted one-layer int8 kernel gets scales 1 ulp apart, so values near a
            # rounding boundary land one step apart
            assert jax.tree.structure(quantized) == jax.tree.structure(expected)
            for x, y in zip(jax.tree.leaves(quantized), jax.tree.leaves(expected)):
                if x.dtype == jnp.int8:
                    off = jnp.abs(x.astype(jnp.int32) - y.astype(jnp.int32))
                    assert int(off.max()) <= 1 and float(jnp.mean(off > 0)) < 0.1  # 3.5% seen
                else:
                    np.testing.assert_allclose(x, y, rtol=1e-6, atol=0)


def test_a_checkpoint_missing_a_tensor_is_named(tiny, tmp_path):
    _, model, params = tiny
    lrtt.models.save(tmp_path, model, params, max_shard_size=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        lrtt.models.load(tmp_path, quantize=QUANTIZE)
    with pytest.raises(FileNotFoundError, match="config.json"):
        lrtt.models.load(tmp_path / "nowhere")
