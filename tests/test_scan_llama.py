"""benchmarks/scan_llama.py (the memory benchmark's scanned Llama) against transformers' FlaxLlama,
and the benchmark's random quantized kernels against ``lrtt.quantize``'s structure."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import lrtt  # noqa: E402
from scan_llama import LAYOUTS, ScannedLlamaForCausalLM, stack_layers  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=16)
    return FlaxLlamaForCausalLM(config, seed=0)


def test_scanned_llama_computes_transformers_logits_from_stacked_params(llama):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    model = ScannedLlamaForCausalLM(llama.config)
    stacked = stack_layers(llama.params)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(stacked)
    got, want = model.apply({"params": stacked}, ids), llama(ids).logits
    assert float(jnp.abs(got - want).max()) < 1e-5 * float(jnp.abs(want).max())


def test_layouts_are_what_discover_reads(llama):
    ids = jnp.ones((1, 4), jnp.int32)
    model = ScannedLlamaForCausalLM(llama.config)
    stacked = stack_layers(llama.params)
    found = lrtt.discover(lambda p, x: model.apply({"params": p}, x), stacked, ids)
    linear = found.linear()
    assert len(linear) == 7 and all(path.startswith("model/layers/") for path in linear)
    assert {found[path] for path in linear} == {"layer in out"}
    method = lrtt.LoRA(rank=2, targets="all-linear", layouts=LAYOUTS)
    assert sorted(t.path for t in method.plan(stacked)) == sorted(linear)


@pytest.mark.parametrize("base", ["nf4", "int8"])
def test_random_quantized_kernels_have_quantizes_structure(base):
    import memory  # benchmarks/memory.py

    drawn = memory._quantized_kernel(np.random.default_rng(0), (1, 128, 32), base, packed=True)
    made = lrtt.quantize({"model": {"layers": {"k": {"kernel": jnp.ones((1, 128, 32))}}}}, "model/layers/k/kernel",
                         qtype=base, block_size=64, layouts=LAYOUTS, packed=True)["model"]["layers"]["k"]["kernel"]
    assert jax.tree.structure(drawn) == jax.tree.structure(made)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(drawn)] == [(x.shape, x.dtype) for x in jax.tree.leaves(made)]
    assert 0.01 < float(lrtt._quant.dequantize_leaf(drawn).std()) < 0.04
