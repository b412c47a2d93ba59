"""`merge`/`unmerge`/`delta` against the formulas of DESIGN §1, and identity at step 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrtt
from conftest import perturb, tiny_inputs, tiny_model

KEY = jax.random.key(0)


def _leaf(tree, path):
    for name in path.split("/"):
        tree = tree[name]
    return tree


def test_lora_merge_matches_the_formula_on_gpt2_conv1d():
    params = tiny_model("gpt2").params
    method = lrtt.LoRA(rank=4, alpha=8)
    adapter = perturb(method.init(KEY, params), jax.random.key(1))
    merged = lrtt.merge(method, params, adapter)
    path = "transformer/h/1/attn/c_attn/kernel"
    entry = lrtt.entries(adapter)[path]
    w0 = np.asarray(_leaf(params, path))  # (out, in): Conv1D
    expected = w0 + (8 / 4) * (np.asarray(entry.a) @ np.asarray(entry.b)).T
    np.testing.assert_allclose(_leaf(merged, path), expected, rtol=1e-6, atol=1e-6)
    untouched = "transformer/h/1/mlp/c_fc/kernel"
    np.testing.assert_array_equal(_leaf(merged, untouched), _leaf(params, untouched))


def test_rep_merge_matches_the_formula():
    params = tiny_model("llama").params
    method = lrtt.LorettaRep(rank=4, alpha=16, tt_rank=3)
    adapter = perturb(method.init(KEY, params), jax.random.key(1))
    merged = lrtt.merge(method, params, adapter)
    path = "model/layers/0/self_attn/v_proj/kernel"
    entry = lrtt.entries(adapter)[path]
    tt_a = lrtt.tt.materialize(entry.a, 32, 4)
    tt_b = lrtt.tt.materialize(entry.b, 4, 16)
    expected = np.asarray(_leaf(params, path)) + 4.0 * np.asarray(tt_a @ tt_b)
    np.testing.assert_allclose(_leaf(merged, path), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lrtt.delta(method, params, adapter)[path], expected - _leaf(params, path), atol=1e-6)


def test_stacked_merge_matches_per_layer_formula():
    w = jax.random.normal(KEY, (3, 8, 12))
    params = {"layers": {"dense": {"kernel": w}}}
    method = lrtt.LoRA(rank=2, targets="dense", layouts={"dense": "layer in out"})
    adapter = perturb(method.init(KEY, params), jax.random.key(2))
    entry = adapter["layers"]["dense"]["kernel"]
    merged = lrtt.merge(method, params, adapter)["layers"]["dense"]["kernel"]
    for layer in range(3):
        np.testing.assert_allclose(merged[layer], w[layer] + entry.a[layer] @ entry.b[layer], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", [lrtt.LoRA(rank=4), lrtt.LorettaRep(rank=4, tt_rank=3)], ids=["lora", "rep"])
def test_unmerge_inverts_merge_and_structure_is_kept(method):
    params = tiny_model("bert").params
    adapter = perturb(method.init(KEY, params), jax.random.key(3))
    merged = lrtt.merge(method, params, adapter)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    restored = lrtt.unmerge(method, merged, adapter)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), restored, params)


def test_merge_keeps_the_base_dtype():
    params = {"q_proj": {"kernel": jax.random.normal(KEY, (16, 16)).astype(jnp.bfloat16)}}
    method = lrtt.LoRA(rank=2, targets="q_proj")
    adapter = perturb(method.init(KEY, params), jax.random.key(1))
    merged = lrtt.merge(method, params, adapter)
    assert merged["q_proj"]["kernel"].dtype == jnp.bfloat16
    entry = adapter["q_proj"]["kernel"]
    exact = params["q_proj"]["kernel"].astype(jnp.float32) + entry.a @ entry.b
    np.testing.assert_allclose(merged["q_proj"]["kernel"].astype(jnp.float32), exact.astype(jnp.bfloat16).astype(jnp.float32))


def test_merge_of_adp_raises_and_says_why():
    params = tiny_model("llama").params
    method = lrtt.LorettaAdp(bottleneck=8, tt_rank=2, tt_shape=None)
    adapter = method.init(KEY, params)
    with pytest.raises(ValueError, match="non-linear.*lrtt.factored"):
        lrtt.merge(method, params, adapter)


def test_merge_refuses_an_adapter_of_another_model():
    method = lrtt.LoRA(rank=4)
    adapter = method.init(KEY, tiny_model("llama").params)
    with pytest.raises(ValueError, match="another model"):
        lrtt.merge(method, tiny_model("gpt2").params, adapter)


def test_trainable_leaves_replace_their_base_in_merge():
    params = tiny_model("bert").params
    method = lrtt.LoRA(rank=2, trainable=r"classifier/")
    adapter = method.init(KEY, params)
    assert isinstance(adapter["classifier"]["kernel"], lrtt.Trainable)
    adapter["classifier"]["kernel"] = lrtt.Trainable(adapter["classifier"]["kernel"].value + 1.0)
    merged = lrtt.merge(method, params, adapter)
    np.testing.assert_allclose(merged["classifier"]["kernel"], params["classifier"]["kernel"] + 1.0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_default_inits_leave_the_model_unchanged_and_gaussian_does_not(family):
    model = tiny_model(family)
    ids = tiny_inputs()
    reference = model(ids, params=model.params).logits
    for method in (lrtt.LoRA(rank=4), lrtt.LorettaRep(rank=4, tt_rank=3)):
        merged = lrtt.merge(method, model.params, method.init(KEY, model.params))
        np.testing.assert_array_equal(model(ids, params=merged).logits, reference)
    gaussian = lrtt.LorettaRep(rank=4, tt_rank=3, initializer="gaussian")
    merged = lrtt.merge(gaussian, model.params, gaussian.init(KEY, model.params))
    assert float(jnp.abs(model(ids, params=merged).logits - reference).max()) > 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_adp_identity_init_leaves_the_model_unchanged_and_gaussian_does_not(family):
    """LorettaAdp is not mergeable: its step-0 check runs through lrtt.factored."""
    model = tiny_model(family)
    ids = tiny_inputs()
    reference = np.asarray(model(ids, params=model.params).logits)
    apply = lrtt.factored(lambda p, x: model(x, params=p).logits)
    outputs = {}
    for initializer in ("identity", "gaussian"):
        method = lrtt.LorettaAdp(bottleneck=8, tt_rank=3, tt_shape=None, initializer=initializer)
        outputs[initializer] = np.asarray(apply(lrtt.wrap(method, model.params, method.init(KEY, model.params)), ids))
    np.testing.assert_allclose(outputs["identity"], reference, rtol=1e-6, atol=1e-6)
    assert np.abs(outputs["gaussian"] - reference).max() > 1e-4

