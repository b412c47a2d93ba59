"""google-tunix NNX models -> Hugging Face checkpoints and PEFT files, closed through lrtt.models.

For tiny random tunix models of every family lrtt.models.save_tunix writes (Llama 3, Qwen 2,
Qwen 3, Gemma 3, and tunix's ``gemma`` package as Gemma 1 and Gemma 2): LoRA on "all-linear" with
random non-zero factors, merged, saved as a Hugging Face checkpoint, read back by
``lrtt.models.load``: its logits equal the tunix forward of the merged params (float32, max |Δ| /
max |logit| ≤ 1e-4), and tunix's own safetensors loader reads the directory back bit-exactly. Then
the adapter itself: ``lrtt.save_peft`` on the tunix tree, ``lrtt.load_peft`` onto lrtt.models'
params of the base checkpoint: factored logits equal the tunix factored forward. (lrtt.models'
decoder is tested equal to transformers 5 in tests/test_models_hf.py, which closes the loop.)

tunix needs Python >= 3.12: on older Pythons the module skips; on 3.12+ a missing tunix fails.
"""

from __future__ import annotations

import functools
import importlib
import json
import platform
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

if sys.version_info < (3, 12):
    pytest.skip(f"google-tunix needs Python >= 3.12; this is Python {platform.python_version()}",
                allow_module_level=True)

import ecosystem_models as em  # noqa: E402
import lrtt  # noqa: E402
import lrtt.models  # noqa: E402
from conftest import quick_jit  # noqa: E402
from lrtt.models._tunix import save_tunix  # noqa: E402
from lrtt.models._tunix_hf_config import tunix_hf_config  # noqa: E402

BOUND = 1e-4
SEQ = 12  # longer than the sliding windows (4) of Gemma 2 / 3


def _config(name: str):
    """A tiny tunix ModelConfig of each family (float32)."""
    if name == "llama3":
        from tunix.models.llama3 import model as m

        # rope_theta 5e5 as released: tunix's forward ignores it (the warning is tested)
        return m.ModelConfig(num_layers=2, vocab_size=128, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
                             num_kv_heads=2, rope_theta=500_000, norm_eps=1e-5, weight_tying=False)
    if name == "qwen3":
        from tunix.models.qwen3 import model as m

        return m.ModelConfig(num_layers=2, vocab_size=128, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=16,
                             num_kv_heads=2, rope_theta=1_000_000, norm_eps=1e-6, use_tied_embedding=True)
    if name == "qwen2":
        from tunix.models.qwen2 import model as m

        return m.ModelConfig(num_layers=2, vocab_size=128, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
                             num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6, use_tied_embedding=False)
    if name == "gemma3":
        from tunix.models.gemma3 import model as m

        # six layers: five sliding (window 4) and one global with linear rope scaling
        return m.ModelConfig(num_layers=6, num_embed=128, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
                             num_kv_heads=2, sliding_window_size=4, local_base_frequency=10_000,
                             global_base_frequency=1_000_000, global_scale_factor=8.0, param_dtype=jnp.float32)
    from tunix.models.gemma import model as m

    if name == "gemma":  # Gemma 1, multi-head: the fused qkv_einsum
        return m.ModelConfig(num_layers=2, num_embed=128, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
                             num_kv_heads=4, final_logit_softcap=None, use_post_attn_norm=False,
                             use_post_ffw_norm=False, attention_types=(m.AttentionType.GLOBAL,) * 2)
    return m.ModelConfig(  # Gemma 2: soft-capping, post norms, sliding + global
        num_layers=2, num_embed=128, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=2,
        final_logit_softcap=30.0, use_post_attn_norm=True, use_post_ffw_norm=True, attn_logits_soft_cap=50.0,
        sliding_window_size=4, attention_types=(m.AttentionType.LOCAL_SLIDING, m.AttentionType.GLOBAL))


_CLASSES = {"llama3": "llama3.Llama3", "qwen3": "qwen3.Qwen3", "qwen2": "qwen2.Qwen2", "gemma3": "gemma3.Gemma3",
            "gemma": "gemma.Gemma", "gemma2": "gemma.Gemma"}
_LOADERS = {"llama3": "llama3.params", "qwen3": "qwen3.params", "qwen2": "qwen2.params",
            "gemma3": "gemma3.params_safetensors", "gemma2": "gemma.params_safetensors"}
FAMILIES = tuple(_CLASSES)


@functools.lru_cache(maxsize=None)
def _tunix(name: str):
    """``(config, params, apply, tokens)``: random float32 params (norm weights perturbed; Gemma's
    ``1 + w`` centred at 0), ``apply(params, tokens) -> logits`` the tunix forward, causal mask."""
    from flax import nnx

    config = _config(name)
    module, cls = _CLASSES[name].split(".")
    cls = getattr(importlib.import_module(f"tunix.models.{module}.model"), cls)
    graphdef, shapes, rest = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(params=0))), nnx.Param, ...)
    params = em.fill(shapes, norm_center=0.0 if name.startswith("gemma") else 1.0)
    tokens = em.example_tokens(2, SEQ)
    positions = jnp.broadcast_to(jnp.arange(SEQ)[None], tokens.shape)
    mask = jnp.tril(jnp.ones((tokens.shape[0], SEQ, SEQ), bool))

    def apply(p, t):
        return nnx.merge(graphdef, p, rest)(t, positions, None, mask)[0]

    return config, params, apply, tokens


def _random_adapter(method, params, seed=3, scale=0.1):
    shapes = jax.eval_shape(method.init, jax.random.key(0), params)
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves])


def _run(fn, *args):
    """``fn(*args)`` compiled with the tests' fast-compile options (these tests compile more than run)."""
    return quick_jit(fn)(*args)


def _rel(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _save(directory, config, params, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="tunix's llama3 forward ignores")
        return save_tunix(directory, config, params, **kwargs)


@pytest.mark.parametrize("name", FAMILIES)
def test_merged_tunix_model_saves_as_the_hf_checkpoint_lrtt_models_computes_and_tunix_reads(name, tmp_path):
    config, params, apply, tokens = _tunix(name)
    method = lrtt.LoRA(rank=2, targets="all-linear")
    adapter = _random_adapter(method, params)
    merged = lrtt.merge(method, params, adapter)
    expected = _run(apply, merged, tokens)
    files = _save(tmp_path / "hf", config, merged)
    assert files == ["model.safetensors", "config.json"]
    model, hf_params = lrtt.models.load(tmp_path / "hf")
    rel = _rel(_run(model, hf_params, tokens), expected)
    print(f"\n{name}: tunix merged forward vs lrtt.models.load(save_tunix(...)): {rel:.2e}")
    assert rel <= BOUND, rel
    if name in _LOADERS:  # tunix's own Hugging Face loader reads the directory back bit-exactly
        # (not Gemma 1: tunix 0.1.7's map sends post_attention_layernorm to Gemma 2's post_attn_norm)
        from flax import nnx

        loaded = importlib.import_module(f"tunix.models.{_LOADERS[name]}").create_model_from_safe_tensors(
            str(tmp_path / "hf"), config)
        ours = dict(lrtt._paths.named_leaves(merged))
        theirs = dict(lrtt._paths.named_leaves(nnx.state(loaded, nnx.Param)))
        assert set(theirs) == set(ours)
        for path, value in ours.items():
            np.testing.assert_array_equal(np.asarray(theirs[path]), np.asarray(value), err_msg=path)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_peft_of_a_tunix_adapter_loads_onto_the_hf_checkpoint_with_the_same_logits(name, tmp_path):
    config, params, apply, tokens = _tunix(name)
    _save(tmp_path / "base", config, params)
    model, hf_params = lrtt.models.load(tmp_path / "base")
    method = lrtt.LoRA(rank=2, alpha=4, targets="all-linear")
    adapter = _random_adapter(method, params)
    written = lrtt.save_peft(tmp_path / "peft", method, adapter, params)
    assert written["r"] == 2 and written["lora_alpha"] == 4
    assert written["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    q = config.num_heads * config.head_dim
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (2, config.embed_dim)
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (q, 2)
    assert tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (2, q)
    loaded_method, loaded = lrtt.load_peft(tmp_path / "peft", hf_params)
    expected = _run(lrtt.factored(apply), lrtt.wrap(method, params, adapter), tokens)
    actual = _run(lrtt.factored(model), lrtt.wrap(loaded_method, hf_params, loaded), tokens)
    rel = _rel(actual, expected)
    print(f"\n{name}: tunix factored forward vs lrtt.models + load_peft(save_peft(tunix adapter)): {rel:.2e}")
    assert rel <= BOUND, rel


def test_gemma_fused_kv_einsum_is_one_lora_per_module_sharing_a(tmp_path):
    """'qv' on Gemma 3 adapts q_einsum and the fused kv_einsum (2, K, D, H): the file holds k_proj
    and v_proj, each with the kernel's A and its column block of B."""
    config, params, _, _ = _tunix("gemma3")
    method = lrtt.LoRA(rank=2, targets="qv")
    adapter = _random_adapter(method, params)
    written = lrtt.save_peft(tmp_path, method, adapter, params)
    assert written["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    entry = adapter["layers"]["0"]["attn"]["kv_einsum"]["w"]
    kv = config.num_kv_heads * config.head_dim
    key = "base_model.model.model.layers.0.self_attn.{}_proj.lora_{}.weight"
    for j, part in enumerate("kv"):
        np.testing.assert_array_equal(tensors[key.format(part, "A")], np.asarray(entry.a).T)
        np.testing.assert_array_equal(tensors[key.format(part, "B")], np.asarray(entry.b)[:, j * kv:(j + 1) * kv].T)


# --- config.json --------------------------------------------------------------------------------


def test_llama3_config_follows_the_tunix_forward_and_warns_about_rope_theta(tmp_path):
    config, params, _, _ = _tunix("llama3")
    with pytest.warns(UserWarning, match=r"ignores ModelConfig.rope_theta=500000 .* 1000000"):
        save_tunix(tmp_path, config, params)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "llama" and written["architectures"] == ["LlamaForCausalLM"]
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == 1e6
    assert written["tie_word_embeddings"] is False and written["dtype"] == "float32"


def test_built_configs_name_each_family():
    types = {name: tunix_hf_config(_config(name))["model_type"] for name in FAMILIES if name != "llama3"}
    assert types == {"qwen3": "qwen3", "qwen2": "qwen2", "gemma3": "gemma3_text", "gemma": "gemma", "gemma2": "gemma2"}
    gemma3 = tunix_hf_config(_config("gemma3"))
    assert gemma3["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert gemma3["rope_parameters"]["full_attention"] == {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}
    assert gemma3["query_pre_attn_scalar"] == 8
    gemma2 = tunix_hf_config(_config("gemma2"))
    assert (gemma2["attn_logit_softcapping"], gemma2["final_logit_softcapping"]) == (50.0, 30.0)
    assert gemma2["layer_types"] == ["sliding_attention", "full_attention"]


def test_source_config_and_tokenizer_are_kept_and_checked(tmp_path):
    config, params, _, _ = _tunix("qwen2")
    source = tmp_path / "source"
    source.mkdir()
    raw = {**tunix_hf_config(config), "bos_token_id": 151643, "torch_dtype": "bfloat16"}
    (source / "config.json").write_text(json.dumps(raw))
    (source / "tokenizer.json").write_text("{}")
    files = save_tunix(tmp_path / "out", config, params, source=source, max_shard_size="20KB")
    assert "tokenizer.json" in files and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["bos_token_id"] == 151643 and written["torch_dtype"] == written["dtype"] == "float32"
    model, hf_params = lrtt.models.load(tmp_path / "out")  # sharded, through the index
    np.testing.assert_array_equal(np.asarray(hf_params["embed"]["embedding"]),
                                  np.asarray(params["embedder"]["input_embedding"]))
    (source / "config.json").write_text(json.dumps({**raw, "rope_theta": 5.0, "rope_parameters": None}))
    with pytest.warns(UserWarning, match="computes differently from the tunix qwen2 forward in layer_rope"):
        save_tunix(tmp_path / "out2", config, params, source=source)
    (source / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"not the tunix qwen2 model's: num_layers 3 \(tunix qwen2: 2\)"):
        save_tunix(tmp_path / "out3", config, params, source=source)


# --- what is refused ----------------------------------------------------------------------------


def test_unmappable_tunix_configs_and_trees_are_refused_by_name(tmp_path):
    import dataclasses

    from tunix.models.qwen3 import model as qwen3

    moe = dataclasses.replace(_config("qwen3"), num_experts=4, num_experts_per_tok=2)
    with pytest.raises(ValueError, match=r"num_experts=4: Qwen 3 mixture-of-experts .*save_lora_merged"):
        tunix_hf_config(moe)
    vision = dataclasses.replace(_config("gemma3"), vision_config=object())
    with pytest.raises(ValueError, match="multimodal Gemma 3"):
        tunix_hf_config(vision)
    assert isinstance(moe, qwen3.ModelConfig)
    config, params, _, _ = _tunix("llama3")
    extra = params.to_pure_dict()
    extra["layers"][0]["attn"]["q_proj"]["lora_a"] = np.zeros((32, 2), np.float32)
    with pytest.raises(ValueError, match=r"no place for, e.g. \['layers/0/attn/q_proj/lora_a'\]. Unmerged LoRA"):
        _save(tmp_path, config, extra)
    with pytest.raises(ValueError, match="google-tunix NNX models"):
        save_tunix(tmp_path, {"model_type": "llama"}, params)
    with pytest.raises(ValueError, match="load_peft onto google-tunix .* lrtt.models.load"):
        lrtt.load_peft(tmp_path, params)


def test_save_peft_refuses_what_is_not_a_per_module_lora_on_tunix_trees(tmp_path):
    config, params, _, _ = _tunix("llama3")
    per_head = lrtt.LoRA(rank=2, targets=r"attn/q_proj/w$", layouts={r"attn/q_proj/w$": "in layer out"})
    message = r"layers/0/attn/q_proj/w.* 'in layer out'.*'in out out' .*one adapter per head"
    with pytest.raises(ValueError, match=message):
        lrtt.save_peft(tmp_path, per_head, _random_adapter(per_head, params), params)
    experts = {"layers": {"0": {"attn": {"q_proj": {"w": jnp.zeros((8, 2, 4))}},
                                "mlp": {"gate_proj": jnp.zeros((4, 8, 16))}}}}  # Qwen 3 MoE experts (E, in, out)
    method = lrtt.LoRA(rank=2, targets=r"mlp/gate_proj$")
    with pytest.raises(ValueError, match=r"layers/0/mlp/gate_proj.*mixture-of-experts"):
        lrtt.save_peft(tmp_path, method, _random_adapter(method, experts), experts)
    trainable = lrtt.LoRA(rank=2, targets="qv", trainable=r"final_norm/w$")
    with pytest.raises(ValueError, match="trainable leaves .*final_norm/w.*lrtt.models.save_tunix"):
        lrtt.save_peft(tmp_path, trainable, _random_adapter(trainable, params), params)


def test_maxtext_trees_are_refused_naming_the_conversion(tmp_path):
    maxtext = {"decoder": {"layers": {"self_attention": {"query": {"kernel": jnp.zeros((16, 2, 4, 8))}}}}}
    method = lrtt.LoRA(rank=2, targets=r"query/kernel$")
    with pytest.raises(ValueError, match="MaxText params .* MaxText's conversion scripts"):
        lrtt.save_peft(tmp_path, method, _random_adapter(method, maxtext), maxtext)
    with pytest.raises(ValueError, match="MaxText params .* can be loaded"):
        lrtt.load_peft(tmp_path, maxtext)
    config, _, _, _ = _tunix("llama3")
    with pytest.raises(ValueError, match="MaxText params .*MaxText/utils/ckpt_conversion"):
        save_tunix(tmp_path, config, maxtext)


# --- the gemma package (gm.nn.Transformer, linen) ---------------------------------------------------


@functools.lru_cache(maxsize=None)
def _gemma_package(kind: str):
    """A 2-layer gemma-package model (a sliding layer, window 4, and a global one): ``"gemma3"``
    (GQA, q/k norms, transposed gating einsum, global rope scaling 8) or ``"gemma2"`` (MHA: the
    fused qkv_einsum, untransposed gating, soft-capping, queries by (embed/heads)^-1/2 ≠ head_dim)."""
    gm = em.import_gemma()
    kinds = gm.nn.AttentionType
    norm = gm.nn.config.QueryPreAttentionNormalisation
    common = dict(num_embed=128, hidden_dim=64, num_heads=4, head_dim=8, use_post_attn_norm=True,
                  use_post_ffw_norm=True, attention_types=(kinds.LOCAL_SLIDING, kinds.GLOBAL), sliding_window_size=4)
    if kind == "gemma3":
        config = gm.nn.config.TransformerConfig(
            **common, embed_dim=32, num_kv_heads=2, final_logit_softcap=None, use_qk_norm=True,
            query_pre_attn_norm=norm.BY_ONE_OVER_SQRT_HEAD_DIM, transpose_gating_einsum=True,
            local_base_frequency=10_000, global_base_frequency=1_000_000, global_scale_factor=8.0)
    else:
        config = gm.nn.config.TransformerConfig(
            **common, embed_dim=48, num_kv_heads=4, final_logit_softcap=30.0, attn_logits_soft_cap=50.0,
            query_pre_attn_norm=norm.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS, transpose_gating_einsum=False)
    model = gm.nn.Transformer(config=config, dtype=jnp.float32)
    tokens = em.example_tokens(2, SEQ)
    with em.gemma_param_patch():
        shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    params = em.fill(shapes, norm_center=0.0)

    def apply(p, t):
        return model.apply({"params": p}, t).logits

    return model, params, apply, tokens


@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
def test_gemma_package_saves_as_hf_checkpoint_and_its_adapters_as_peft(kind, tmp_path):
    model, params, apply, tokens = _gemma_package(kind)
    method = lrtt.LoRA(rank=2, alpha=4, targets="all-linear")
    adapter = _random_adapter(method, params)
    merged = lrtt.merge(method, params, adapter)
    files = lrtt.models._tunix.save_gemma(tmp_path / "merged", model, merged)
    assert files == ["model.safetensors", "config.json"]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == {"gemma3": "gemma3_text", "gemma2": "gemma2"}[kind]
    hf_model, hf_params = lrtt.models.load(tmp_path / "merged")
    rel = _rel(_run(hf_model, hf_params, tokens), _run(apply, merged, tokens))
    print(f"\ngemma package {kind}: merged forward vs lrtt.models.load(save_gemma(...)): {rel:.2e}")
    assert rel <= BOUND, rel
    lrtt.models._tunix.save_gemma(tmp_path / "base", model.config, params)
    hf_model, hf_params = lrtt.models.load(tmp_path / "base")
    written = lrtt.save_peft(tmp_path / "peft", method, adapter, params)
    assert written["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    loaded_method, loaded = lrtt.load_peft(tmp_path / "peft", hf_params)
    expected = _run(lrtt.factored(apply), lrtt.wrap(method, params, adapter), tokens)
    rel = _rel(_run(lrtt.factored(hf_model), lrtt.wrap(loaded_method, hf_params, loaded), tokens), expected)
    print(f"gemma package {kind}: factored forward vs lrtt.models + load_peft(save_peft(...)): {rel:.2e}")
    assert rel <= BOUND, rel


def test_gemma_package_is_refused_where_no_hf_gemma_computes_it(tmp_path):
    import dataclasses

    model, params, _, _ = _gemma_package("gemma3")
    gm = em.import_gemma()
    config = dataclasses.replace(model.config, query_pre_attn_norm=gm.nn.config.QueryPreAttentionNormalisation
                                 .BY_EMBED_DIM_DIV_NUM_HEADS)
    with pytest.raises(ValueError, match="query_pre_attn_norm.*convert_gemma3_weights.py"):
        lrtt.models._tunix.save_gemma(tmp_path, config, params)
    with pytest.raises(ValueError, match="gemma package's model: write it with lrtt.models.save_gemma"):
        save_tunix(tmp_path, model, params)
    with pytest.raises(ValueError, match="load_peft onto the gemma package .*lrtt.models.save_gemma"):
        lrtt.load_peft(tmp_path, params)
