"""lrtt.models without torch: the decoder of every family (shapes, KV-cache decoding, factored LoRA,
presets), its config parsing and errors, and the torch-free safetensors reader / writer. The
comparison against transformers itself is tests/test_models_hf.py (.venv-hf5)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrtt
import lrtt.models
from _model_configs import CONFIGS
from lrtt.models import _safetensors

FAMILIES = sorted(CONFIGS)


def _model(name, **overrides):
    model = lrtt.models.Model.from_config({**CONFIGS[name], **overrides})
    return model, model.init(jax.random.key(0))


def _tokens(batch=2, seq=12):
    return jax.random.randint(jax.random.key(1), (batch, seq), 0, 128, dtype=jnp.int32)


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_shapes_and_cached_decoding_equal_the_full_forward(name):
    model, params = _model(name)
    tokens = _tokens()
    logits = jax.jit(model)(params, tokens)
    assert logits.shape == (2, 12, 128) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    step = jax.jit(lambda p, t, c: model(p, t, cache=c))
    out, cache = step(params, tokens[:, :5], model.init_cache(2, 16))  # prefill, then one token at a time
    pieces = [out]
    for t in range(5, 12):
        out, cache = step(params, tokens[:, t:t + 1], cache)
        pieces.append(out)
    assert int(cache["end"]) == 12
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), logits, rtol=1e-5, atol=1e-5)


def test_sliding_window_and_softcap_change_the_model():
    """The switches are live: Gemma 2 without its window / soft-caps computes something else."""
    tokens = _tokens()
    model, params = _model("gemma2")
    base = model(params, tokens)
    for overrides in ({"sliding_window": 64}, {"attn_logit_softcapping": 0.05}, {"final_logit_softcapping": 0.5}):
        other = lrtt.models.Model.from_config({**CONFIGS["gemma2"], **overrides})
        assert not np.allclose(other(params, tokens), base, atol=1e-6), overrides
    # the first 4 positions see no further back than the window: equal to a model without it
    wide = lrtt.models.Model.from_config({**CONFIGS["gemma2"], "sliding_window": 64})
    np.testing.assert_allclose(wide(params, tokens)[:, :4], base[:, :4], rtol=1e-5, atol=1e-6)


EXPECTED = {
    "qv": {"q_proj", "v_proj"},
    "attention": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "all-linear": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("preset", ["qv", "attention", "all-linear"])
def test_presets_find_the_expected_kernels(name, preset):
    """Shapes only: the params and adapter trees are ``jax.ShapeDtypeStruct``s
    (``param_shapes`` and ``eval_shape``, no random init): selection and factor shapes depend on shapes alone."""
    model = lrtt.models.Model.from_config(CONFIGS[name])
    params = model.param_shapes()
    adapter = jax.eval_shape(lrtt.LoRA(rank=4, targets=preset).init, jax.random.key(0), params)
    found = {p.split("/")[-2] for p, _ in _entries(adapter)}
    expected = EXPECTED[preset] - ({"gate_proj"} if name == "gpt2" else set())
    assert found == expected
    for path, entry in _entries(adapter):  # stacked kernels: factors carry the layer axis
        assert entry.a.shape[0] == entry.b.shape[0] == 2, path


def _entries(adapter):
    leaves = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=lambda x: hasattr(x, "a") and hasattr(x, "b"))[0]
    return [("/".join(str(k.key) for k in p), e) for p, e in leaves if hasattr(e, "a")]


@pytest.mark.parametrize("name", FAMILIES)
def test_factored_lora_equals_the_merged_forward(name):
    model, params = _model(name)
    tokens = _tokens()
    method = lrtt.LoRA(rank=4, targets="all-linear")
    adapter = jax.tree.map(lambda x: x + 0.05, method.init(jax.random.key(2), params))  # B != 0
    factored = jax.jit(lrtt.factored(model))(lrtt.wrap(method, params, adapter), tokens)
    merged = model(lrtt.merge(method, params, adapter), tokens)
    assert not np.allclose(merged, model(params, tokens), atol=1e-4)
    np.testing.assert_allclose(factored, merged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "qwen3"])
def test_factored_gradients_reach_every_factor(name):
    model, params = _model(name)
    tokens = _tokens()
    method = lrtt.LoRA(rank=4, targets="all-linear")
    adapter = jax.tree.map(lambda x: x + 0.05, method.init(jax.random.key(2), params))

    def loss(adapter):
        logits = lrtt.factored(model)(lrtt.wrap(method, params, adapter), tokens)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))

    grads = jax.jit(jax.grad(loss))(adapter)
    assert jax.tree.structure(grads) == jax.tree.structure(adapter)
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))


def test_bfloat16_params_compute_in_float32():
    model, params = _model("llama")
    tokens = _tokens()
    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    reference = model(jax.tree.map(lambda x: x.astype(jnp.float32), low), tokens)
    np.testing.assert_allclose(model(low, tokens), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, key", [
    ({"model_type": "falcon"}, "model_type='falcon'"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn'"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_parameters.rope_type='dynamic'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"attn_logit_softcapping": 30.0}, "attn_logit_softcapping=30.0"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"hidden_act": "quick_gelu"}, "hidden_act='quick_gelu'"),
    ({"layer_types": ["full_attention", "chunked_attention"]}, "layer_types"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "sliding_window=None"),
])
def test_unsupported_options_are_errors_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match="not supported") as info:
        lrtt.models.parse_config({**CONFIGS["llama"], **overrides})
    assert key in str(info.value)


@pytest.mark.parametrize("name, overrides, key", [
    ("qwen2", {"attention_bias": False}, "attention_bias=False"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    ("gpt2", {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=True"),
    ("gemma3_text", {"architectures": ["Gemma3ForConditionalGeneration"]}, "architectures"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
])
def test_family_specific_errors(name, overrides, key):
    with pytest.raises(ValueError, match="not supported") as info:
        lrtt.models.parse_config({**CONFIGS[name], **overrides})
    assert key in str(info.value)


def test_config_fields_per_family():
    parse = lambda name, **kw: lrtt.models.parse_config({**CONFIGS[name], **kw})  # noqa: E731
    assert parse("gemma2").layer_window == (4, None)  # sliding on even layers
    assert parse("gemma2").query_scale == 24 ** -0.5
    g3 = parse("gemma3_text")
    assert [r.theta for r in g3.layer_rope] == [10000.0, 1e6] and g3.layer_rope[1].kind == "linear"
    assert parse("gemma3_text", layer_types=None, sliding_window_pattern=2).layer_window == (4, None)
    assert parse("mistral").layer_window == (4, 4) and parse("mistral").head_dim == 24
    assert parse("qwen2").qkv_bias and not parse("qwen2").o_bias
    assert parse("llama").layer_rope[0].kind == "llama3" and not parse("llama").tie_word_embeddings
    # transformers 5 writes rope_parameters (per layer type for Gemma 3)
    v5 = {**CONFIGS["gemma3_text"], "rope_scaling": None, "rope_theta": None, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
    assert lrtt.models.parse_config(v5).layer_rope == g3.layer_rope


def test_legacy_gemma_gelu_is_the_tanh_approximation():
    """transformers' GemmaConfig reads the official releases' hidden_act="gelu" as tanh GELU."""
    assert lrtt.models.parse_config({**CONFIGS["gemma"], "hidden_act": "gelu"}).activation == "gelu_tanh"
    assert lrtt.models.parse_config({**CONFIGS["llama"], "hidden_act": "gelu"}).activation == "gelu"


def test_per_layer_type_rope_parameters_must_cover_every_layer_type():
    config = {**CONFIGS["gemma3_text"], "rope_scaling": None,
              "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}}
    with pytest.raises(ValueError, match="rope_parameters"):
        lrtt.models.parse_config(config)


def test_rope_scaling_changes_the_llama_model():
    model, params = _model("llama")
    plain = lrtt.models.Model.from_config({**CONFIGS["llama"], "rope_scaling": None})
    assert not np.allclose(model(params, _tokens()), plain(params, _tokens()), atol=1e-6)


# --- files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3_text"])
def test_save_then_load_is_exact_without_torch(tmp_path, name):
    model, params = _model(name)
    files = lrtt.models.save(tmp_path / "out", model, params, max_shard_size="60KB")
    assert "model.safetensors.index.json" not in files and len(files) > 3  # shards + config
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f for f in files if f.endswith(".safetensors")}
    loaded_model, loaded = lrtt.models.load(tmp_path / "out")
    assert loaded_model.config == model.config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    single = lrtt.models.save(tmp_path / "one", model, params)
    assert single[0] == "model.safetensors"
    jax.tree.map(np.testing.assert_array_equal, lrtt.models.load(tmp_path / "one")[1], params)


def test_bfloat16_files_round_trip_and_dtype_is_kept(tmp_path):
    model, params = _model("qwen2")
    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    lrtt.models.save(tmp_path, model, low)
    header = _safetensors.SafetensorsFile(tmp_path / "model.safetensors").header
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    _, kept = lrtt.models.load(tmp_path, dtype=None)
    jax.tree.map(np.testing.assert_array_equal, kept, low)
    _, as32 = lrtt.models.load(tmp_path, dtype="float32")
    assert as32["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.float32


def test_load_refuses_checkpoints_that_do_not_match_the_config(tmp_path):
    model, params = _model("llama")
    lrtt.models.save(tmp_path, model, params)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="needs 9 tensor"):
        lrtt.models.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="does not use"):
        lrtt.models.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(ValueError, match="shape"):
        lrtt.models.load(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        lrtt.models.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        lrtt.models.load(tmp_path / "nowhere")


def test_truncated_safetensors_file_is_an_error(tmp_path):
    model, params = _model("llama")
    lrtt.models.save(tmp_path, model, params)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(ValueError, match="truncated"):
        lrtt.models.load(tmp_path)


def test_save_copies_tokenizer_and_generation_config(tmp_path):
    model, params = _model("gemma")
    lrtt.models.save(tmp_path / "src", model, params)
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    (tmp_path / "src" / "generation_config.json").write_text('{"max_length": 7}')
    loaded_model, loaded = lrtt.models.load(tmp_path / "src")
    files = lrtt.models.save(tmp_path / "out", loaded_model, loaded)
    assert {"tokenizer.json", "generation_config.json", "config.json"} <= set(files)
    assert (tmp_path / "out" / "generation_config.json").read_text() == '{"max_length": 7}'


def test_save_refuses_quantized_or_foreign_params(tmp_path):
    pytest.importorskip("qwix")
    model, params = _model("llama")
    with pytest.raises(ValueError, match="quantized"):
        lrtt.models.save(tmp_path, model, lrtt.quantize(params, "qv", qtype="int8"))
    with pytest.raises(ValueError, match="missing"):
        lrtt.models.save(tmp_path, model, {k: v for k, v in params.items() if k != "lm_head"})


def test_quantized_load_equals_quantizing_the_float_params(tmp_path):
    pytest.importorskip("qwix")
    model, params = _model("llama")
    lrtt.models.save(tmp_path, model, params)
    _, quantized = lrtt.models.load(tmp_path, quantize={"qtype": "nf4"})
    reference = lrtt.quantize(params, "all-linear", qtype="nf4")
    tokens = _tokens()
    method = lrtt.LoRA(rank=4, targets="all-linear")
    adapter = method.init(jax.random.key(0), quantized)
    got = lrtt.factored(model)(lrtt.wrap(method, quantized, adapter), tokens)
    want = lrtt.factored(model)(lrtt.wrap(method, reference, adapter), tokens)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model(quantized, tokens), want, rtol=1e-5, atol=1e-5)  # direct call dequantizes
    dense = model(params, tokens)
    assert float(jnp.abs(got - dense).max()) < 0.25 * float(jnp.abs(dense).max())  # NF4: close, not equal


def test_load_onto_a_mesh(tmp_path):
    model, params = _model("llama")
    lrtt.models.save(tmp_path, model, params)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    _, placed = lrtt.models.load(tmp_path, mesh=mesh)
    kernel = placed["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(kernel.sharding, jax.sharding.NamedSharding)
    jax.tree.map(np.testing.assert_array_equal, placed, params)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    _, placed = lrtt.models.load(tmp_path, mesh=mesh, rules="tensor")  # Megatron split by the family's kinds
    specs = {k: placed["layers"][m][k]["kernel"].sharding.spec for m, k in (("attn", "q_proj"), ("attn", "o_proj"))}
    assert specs == {"q_proj": jax.sharding.PartitionSpec(None, None, "model"),
                     "o_proj": jax.sharding.PartitionSpec(None, "model", None)}


def test_parse_size():
    assert _safetensors.parse_size("5GB") == 5 * 10**9
    assert _safetensors.parse_size("500MiB") == 500 * 2**20
    assert _safetensors.parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size"):
        _safetensors.parse_size("lots")


def test_peft_files_of_stacked_params_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    model, params = _model("qwen3")
    method = lrtt.LoRA(rank=4, alpha=8, targets="qv")
    adapter = jax.tree.map(lambda x: x + 0.05, method.init(jax.random.key(0), params))
    config = lrtt.save_peft(tmp_path, method, adapter, params)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["lora_alpha"] == 8
    keys = _safetensors.SafetensorsFile(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 2 * 2
    loaded_method, loaded = lrtt.load_peft(tmp_path, params)
    jax.tree.map(np.testing.assert_allclose, loaded, adapter)
    tokens = _tokens()
    np.testing.assert_allclose(lrtt.factored(model)(lrtt.wrap(loaded_method, params, loaded), tokens),
                               lrtt.factored(model)(lrtt.wrap(method, params, adapter), tokens), rtol=1e-6, atol=1e-6)


def test_peft_refusals_for_stacked_params(tmp_path):
    pytest.importorskip("safetensors")
    model, params = _model("gpt2")
    method = lrtt.LoRA(rank=4, targets="qv")
    with pytest.raises(ValueError, match="c_attn"):
        lrtt.save_peft(tmp_path, method, method.init(jax.random.key(0), params), params)
    model, params = _model("llama")
    method = lrtt.LoRA(rank=4, targets="qv", trainable=["final_norm/scale"])
    with pytest.raises(ValueError, match="modules_to_save"):
        lrtt.save_peft(tmp_path, method, method.init(jax.random.key(0), params), params)
