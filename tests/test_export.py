"""`lrtt.export_merged` / `lrtt.load_merged`: the merged tiny GPT-2 in its own formats."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from transformers import FlaxGPT2LMHeadModel

import lrtt
from conftest import perturb, tiny_inputs, tiny_model

METHODS = {
    "lora": lrtt.LoRA(rank=4, alpha=8, targets="attention"),
    "rep": lrtt.LorettaRep(rank=4, tt_rank=2),
}


def _trained(name, params):
    method = METHODS[name]
    return method, perturb(method.init(jax.random.key(0), params), jax.random.key(1), scale=0.2)


def _logits(params, ids):
    return tiny_model("gpt2")(ids, params=params, train=False).logits


def _same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype


@pytest.mark.parametrize("name", ["lora", "rep"])
def test_save_pretrained_export_loads_and_matches_the_factored_model(tmp_path, name):
    model = tiny_model("gpt2")
    params = model.params
    method, adapter = _trained(name, params)
    merged = lrtt.export_merged(method, params, adapter, tmp_path, model=model)
    assert os.path.exists(tmp_path / "config.json")
    _, loaded = FlaxGPT2LMHeadModel.from_pretrained(tmp_path, _do_init=False)
    _same_tree(loaded, params)
    ids = tiny_inputs(batch=2, seq=8)
    factored = lrtt.factored(lambda p, x: _logits(p, x))(lrtt.wrap(method, params, adapter), ids)
    reloaded = _logits(loaded, ids)
    np.testing.assert_allclose(reloaded, factored, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(reloaded, _logits(merged, ids))
    assert float(jnp.abs(reloaded - _logits(params, ids)).max()) > 1e-3  # the adapter mattered


@pytest.mark.parametrize("suffix", [".safetensors", ".msgpack"])
def test_plain_pytree_formats_keep_the_base_dtype(tmp_path, suffix):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny_model("gpt2").params)
    method, adapter = _trained("lora", params)
    path = tmp_path / f"merged{suffix}"
    merged = lrtt.export_merged(method, params, adapter, path)
    _same_tree(merged, params)  # bf16 in, bf16 out (the sum is formed in float32)
    for loaded in (lrtt.load_merged(path, like=params), lrtt.load_merged(path)):
        flat = dict(lrtt._paths.named_leaves(loaded))
        for p, x in lrtt._paths.named_leaves(merged):
            assert flat[p].dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(flat[p], np.float32), np.asarray(x, np.float32))
    _same_tree(lrtt.load_merged(path, like=params), params)


def test_safetensors_names_are_the_slash_joined_paths(tmp_path):
    params = tiny_model("gpt2").params
    method, adapter = _trained("rep", params)
    path = tmp_path / "m.safetensors"
    lrtt.export_merged(method, params, adapter, path)
    with safe_open(path, framework="np") as f:
        assert set(f.keys()) == {p for p, _ in lrtt._paths.named_leaves(params)}
        assert f.metadata() == {"format": "lrtt-merged"}


def test_merged_inference_is_the_base_program():
    """Same structure, shapes and dtypes: the jitted inference step compiles to the same HLO."""
    params = tiny_model("gpt2").params
    method, adapter = _trained("lora", params)
    merged = lrtt.merge(method, params, adapter)
    ids = jnp.asarray(tiny_inputs(batch=2, seq=8))
    infer = jax.jit(_logits)
    assert infer.lower(merged, ids).as_text() == infer.lower(params, ids).as_text()


def test_export_errors(tmp_path):
    params = tiny_model("gpt2").params
    with pytest.raises(ValueError, match="cannot be merged"):
        adp = lrtt.LorettaAdp(bottleneck=4, tt_rank=2, tt_shape=None)
        lrtt.export_merged(adp, params, adp.init(jax.random.key(0), params), tmp_path / "x.safetensors")
    method, adapter = _trained("lora", params)
    with pytest.raises(ValueError, match="cannot tell the format"):
        lrtt.export_merged(method, params, adapter, tmp_path / "merged.bin")
    with pytest.raises(ValueError, match="`format` must be one of"):
        lrtt.export_merged(method, params, adapter, tmp_path / "m.safetensors", format="gguf")
    with pytest.raises(ValueError, match="needs `model`"):
        lrtt.export_merged(method, params, adapter, tmp_path, format="pretrained")
    with pytest.raises(ValueError, match=r"must end in \.safetensors or \.msgpack"):
        lrtt.load_merged(tmp_path / "m.bin")
    assert json.loads(json.dumps(method.to_config()))["method"] == "LoRA"
