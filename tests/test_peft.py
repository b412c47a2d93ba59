"""PEFT LoRA interop (lrtt/io/_peft_*.py, lrtt/io/_hf_names.py): format, name maps, refusals, and logits
against the real `peft` on tiny PyTorch models whose weights are copied into the Flax ones.

The format and error tests need only the `hf` extra (safetensors, transformers); the round
trips through PyTorch need the `interop` extra (torch, peft) and are skipped without it.
"""

import json
import os
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrtt
from lrtt.io import _hf_names as names
from conftest import tiny_inputs

# The interop extra (torch, peft) is required, not optional: a missing one fails these tests
# instead of skipping them, so CI cannot pass without checking against the real peft.
from safetensors.numpy import load_file, save_file  # noqa: E402

KEY = jax.random.key(0)
RTOL = 1e-5  # max |Δlogits| / max |logits|, float32

_ENCODER = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=64)
FAMILIES = {  # family: (config class, config, PyTorch class; the Flax class is "Flax" + it)
    "gpt2": ("GPT2Config", dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16), "GPT2LMHeadModel"),
    "llama": ("LlamaConfig", dict(_ENCODER, num_key_value_heads=2, max_position_embeddings=16), "LlamaForCausalLM"),
    "bert": ("BertConfig", dict(_ENCODER, max_position_embeddings=16, num_labels=3), "BertForSequenceClassification"),
    "roberta": ("RobertaConfig", dict(_ENCODER, max_position_embeddings=20, num_labels=2),
                "RobertaForSequenceClassification"),
}
_shapes: dict = {}


def _flax_class(family):
    import transformers

    config_name, kwargs, torch_name = FAMILIES[family]
    return getattr(transformers, "Flax" + torch_name), getattr(transformers, config_name)(**kwargs)


def _params(family):
    """Random float32 params of the tiny Flax model of ``family`` (from its shapes: no init compile)."""
    if family not in _shapes:
        cls, config = _flax_class(family)
        _shapes[family] = _noisy(cls(config, _do_init=False).params_shape_tree, seed=0, scale=0.02)
    return _shapes[family]


def _noisy(tree, *, seed=1, scale=0.1):
    """``tree`` plus Gaussian noise on every array leaf (makes B non-zero), in numpy."""
    rng = np.random.default_rng(seed)

    def noisy(x):
        base = 0.0 if isinstance(x, jax.ShapeDtypeStruct) else np.asarray(x)
        return np.asarray(base + scale * rng.standard_normal(x.shape), np.float32)

    return jax.tree.map(noisy, tree)


def _read(directory):
    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    return config, load_file(os.path.join(directory, "adapter_model.safetensors"))


def _write(directory, config=None, tensors=None):
    if config is not None:
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump(config, f)
    if tensors is not None:
        save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})


def _saved(tmp_path, family="gpt2", **kwargs):
    """A trained-looking LoRA adapter of a tiny Flax model, saved; returns (dir, params, method, adapter)."""
    params = _params(family)
    method = lrtt.LoRA(rank=4, alpha=8, **kwargs)
    adapter = _noisy(method.init(KEY, params))
    lrtt.save_peft(tmp_path, method, adapter, params)
    return tmp_path, params, method, adapter


# --- the format, without PyTorch ---------------------------------------------------------------


def test_save_writes_peft_orientation_and_scale(tmp_path):
    directory, params, method, adapter = _saved(tmp_path, targets="attention", rank_pattern={"c_proj": 2})
    config, tensors = _read(directory)
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert config["fan_in_fan_out"] is True and config["bias"] == "none" and config["use_rslora"] is False
    assert config["rank_pattern"] == {"c_proj": 2} and config["alpha_pattern"] == {}
    entry = lrtt.entries(adapter)["transformer/h/1/attn/c_attn/kernel"]  # Conv1D: kernel (out, in)
    key = "base_model.model.transformer.h.1.attn.c_attn"
    np.testing.assert_array_equal(tensors[f"{key}.lora_A.weight"], np.asarray(entry.a).T)  # (r, in)
    np.testing.assert_array_equal(tensors[f"{key}.lora_B.weight"], np.asarray(entry.b).T)  # (out, r)
    assert tensors[f"{key}.lora_A.weight"].shape == (4, 32)
    assert tensors[f"{key}.lora_B.weight"].shape == (96, 4)
    assert tensors["base_model.model.transformer.h.0.attn.c_proj.lora_A.weight"].shape == (2, 32)
    # PEFT's ΔW in PyTorch orientation is (alpha/r)·B_w·A_w; Conv1D's torch weight is kernel.T = (in, out).
    dw_torch = 2.0 * tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]  # (out, in)
    merged = lrtt.merge(method, params, adapter)["transformer"]["h"]["1"]["attn"]["c_attn"]["kernel"]
    w0 = params["transformer"]["h"]["1"]["attn"]["c_attn"]["kernel"]
    np.testing.assert_allclose(np.asarray(merged - w0), dw_torch, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "roberta"])
def test_save_load_round_trip_is_exact(tmp_path, family):
    params, rslora = _params(family), family in ("llama", "roberta")
    method = lrtt.LoRA(
        rank=4, alpha=6, targets="all-linear", rslora=rslora, trainable=r"(ln_f|norm|LayerNorm)/",
        rank_pattern={"(c_fc|up_proj|intermediate)": 2}, alpha_pattern={"(c_attn|q_proj|query)/": 3.5},
    )
    adapter = _noisy(method.init(KEY, params))
    lrtt.save_peft(tmp_path, method, adapter, params)
    loaded_method, loaded = lrtt.load_peft(tmp_path, params)
    assert jax.tree.structure(loaded) == jax.tree.structure(adapter)
    assert jax.tree.structure(loaded_method.init(KEY, params)) == jax.tree.structure(adapter)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), loaded, adapter)
    for path, entry in lrtt.entries(loaded).items():
        if isinstance(entry, lrtt.LoraFactors):
            assert loaded_method.scale_for(path) == entry.scale == lrtt.entries(adapter)[path].scale
    assert loaded_method.rslora is rslora


def test_loretta_rep_is_written_as_its_materialized_lora(tmp_path):
    params = _params("llama")
    method = lrtt.LorettaRep(rank=4, alpha=8, tt_rank=2, initializer="gaussian")
    adapter = method.init(KEY, params)
    config = lrtt.save_peft(tmp_path, method, adapter, params)
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8, ["q_proj", "v_proj"])
    loaded_method, loaded = lrtt.load_peft(tmp_path, params)
    for path, entry in lrtt.entries(adapter).items():
        a, b = entry.factor_matrices()
        got = lrtt.entries(loaded)[path]
        np.testing.assert_allclose(got.a, a, rtol=1e-6)
        np.testing.assert_allclose(got.b, b, rtol=1e-6)
        assert got.scale == entry.scale == 2.0
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
        lrtt.merge(loaded_method, params, loaded), lrtt.merge(method, params, adapter),
    )


def test_loretta_adp_has_no_peft_equivalent(tmp_path):
    with pytest.raises(ValueError, match="LorettaAdp has no PEFT equivalent"):
        lrtt.save_peft(tmp_path, lrtt.LorettaAdp(), {}, _params("llama"))


def test_save_refuses_empty_adapters_and_warns_on_untrained(tmp_path):
    params = _params("gpt2")
    method = lrtt.LoRA(rank=2)
    with pytest.raises(ValueError, match="no LoRA factors"):
        lrtt.save_peft(tmp_path, method, {}, params)
    with pytest.warns(UserWarning, match="every LoRA update of the adapter is zero"):
        lrtt.save_peft(tmp_path, method, method.init(KEY, params), params)


def test_save_refuses_stacked_factors_and_trainable_leaves_inside_a_target(tmp_path):
    params = {"layers": {"q_proj": {"kernel": jnp.ones((2, 8, 8))}}}
    method = lrtt.LoRA(rank=2, targets="q_proj", layouts={"q_proj": "layer in out"})
    with pytest.raises(ValueError, match="Unstack nn.scan layers"):
        lrtt.save_peft(tmp_path, method, method.init(KEY, params), params)
    params = _params("gpt2")
    method = lrtt.LoRA(rank=2, targets="qv", trainable=r"attn/c_attn/bias$")
    with pytest.raises(ValueError, match="PEFT never adds LoRA to a module in modules_to_save"):
        lrtt.save_peft(tmp_path, method, _noisy(method.init(KEY, params)), params)


def test_name_maps():
    cases = {
        "transformer/h/0/attn/c_attn/kernel": "transformer.h.0.attn.c_attn.weight",
        "h/0/ln_1/scale": "h.0.ln_1.weight",
        "model/layers/0/self_attn/q_proj/kernel": "model.layers.0.self_attn.q_proj.weight",
        "model/norm/weight": "model.norm.weight",
        "model/embed_tokens/embedding": "model.embed_tokens.weight",
        "bert/encoder/layer/0/attention/self/query/kernel": "bert.encoder.layer.0.attention.self.query.weight",
        "roberta/encoder/layer/1/output/LayerNorm/bias": "roberta.encoder.layer.1.output.LayerNorm.bias",
        "classifier/out_proj/kernel": "classifier.out_proj.weight",
    }
    for path, torch_name in cases.items():
        assert names.torch_param(path) == torch_name
    kernel = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(names.to_torch("a/kernel", kernel), kernel.T)
    np.testing.assert_array_equal(names.from_torch("a/kernel", kernel.T), kernel)
    np.testing.assert_array_equal(names.to_torch("a/embedding", kernel), kernel)
    assert names.resolve_family(["roberta/encoder/layer/0/attention/self/query/kernel"]) == "roberta"
    assert names.resolve_family(["bert/encoder/layer/0/attention/self/query/kernel"]) == "bert"
    assert names.resolve_family(["h/0/attn/c_attn/kernel"]) == "gpt2"
    with pytest.raises(ValueError, match="`family` must be one of"):
        names.resolve_family([], "t5")


def test_load_bridges_the_base_model_prefix(tmp_path):
    """LlamaForCausalLM's adapter (`model.layers…`) loads onto FlaxLlamaModel params, and back."""
    directory, params, method, adapter = _saved(tmp_path / "head", family="llama")
    bare = params["model"]
    loaded_method, loaded = lrtt.load_peft(directory, bare)
    assert set(lrtt.entries(loaded)) == {p.removeprefix("model/") for p in lrtt.entries(adapter)}
    assert loaded_method.plan(bare)[0].path == "layers/0/self_attn/q_proj/kernel"
    lrtt.save_peft(tmp_path / "bare", loaded_method, loaded, bare)
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in _read(tmp_path / "bare")[1]
    _, back = lrtt.load_peft(tmp_path / "bare", params)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), back, adapter)


def test_bfloat16_factors_load_as_float32(tmp_path):
    params = _params("llama")
    method = lrtt.LoRA(rank=4, param_dtype=jnp.bfloat16)
    adapter = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _noisy(method.init(KEY, params)))
    lrtt.save_peft(tmp_path, method, adapter, params)
    assert {v.dtype.name for v in _read(tmp_path)[1].values()} == {"bfloat16"}
    _, loaded = lrtt.load_peft(tmp_path, params)
    for path, entry in lrtt.entries(loaded).items():
        assert entry.a.dtype == entry.b.dtype == jnp.float32
        np.testing.assert_array_equal(entry.b, np.asarray(lrtt.entries(adapter)[path].b, np.float32))


# --- refusals (DESIGN §6 and the issue's point 4) ----------------------------------------------


def _mutated(tmp_path, *, config=None, tensors=None, **kwargs):
    directory, params, _, _ = _saved(tmp_path, **kwargs)
    old_config, old_tensors = _read(directory)
    _write(directory, config(old_config) if config else None, tensors(old_tensors) if tensors else None)
    return directory, params


def _without(d, *keys):
    return {k: v for k, v in d.items() if k not in keys}


A0 = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
B0 = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"

ONES = lambda *shape: np.ones(shape, np.float32)  # noqa: E731
C_PROJ = {A0.replace("c_attn", "c_proj"): ONES(4, 32), B0.replace("c_attn", "c_proj"): ONES(32, 4)}
H7 = {A0.replace("h.0", "h.7"): ONES(4, 32), B0.replace("h.0", "h.7"): ONES(96, 4)}
LN_F = {"base_model.model.transformer.ln_f.weight": ONES(32)}
MAGNITUDE = {A0.replace("lora_A.weight", "lora_magnitude_vector"): ONES(96)}

REFUSALS = {  # case: (mutation of the config or of the tensors, expected message)
    "missing lora_alpha": (dict(config=lambda c: _without(c, "lora_alpha")), "no `lora_alpha`. PEFT would silently"),
    "missing r": (dict(config=lambda c: _without(c, "r")), "no `r`"),
    "missing target_modules": (dict(config=lambda c: {**c, "target_modules": None}), "no `target_modules`"),
    "DoRA": (dict(config=lambda c: {**c, "use_dora": True}), "PEFT DORA adapter"),
    "LoHa": (dict(config=lambda c: {**c, "peft_type": "LOHA"}), "PEFT LOHA adapter"),
    "IA3": (dict(config=lambda c: {**c, "peft_type": "IA3"}), "PEFT IA3 adapter"),
    "lora_bias": (dict(config=lambda c: {**c, "lora_bias": True}), "`lora_bias` = True: a LoRA variant"),
    "pissa": (dict(config=lambda c: {**c, "init_lora_weights": "pissa"}), "rewrites the base weights"),
    "bias=all": (dict(config=lambda c: {**c, "bias": "all"}), "bias='all'"),
    "targets match nothing": (dict(config=lambda c: {**c, "target_modules": ["q_proj"]}), "matches no module"),
    "rank_pattern disagrees": (dict(config=lambda c: {**c, "rank_pattern": {"c_attn": 2}}), "shape mismatch: .*r=2"),
    "empty (ZeRO-3)": (dict(tensors=lambda t: {}), "contains no tensors.*ZeRO-3"),
    "no base_model.model. prefix": (
        dict(tensors=lambda t: {k.removeprefix("base_model.model."): v for k, v in t.items()}),
        "do not start with 'base_model.model.'",
    ),
    "missing lora_B": (dict(tensors=lambda t: _without(t, B0)), "missing tensors.*lora_B"),
    "missing module": (dict(tensors=lambda t: _without(t, A0, B0)), "missing tensors.*transformer.h.0.attn.c_attn"),
    "missing module, all-linear": (
        dict(config=lambda c: {**c, "target_modules": "all-linear"}, tensors=lambda t: _without(t, A0, B0)),
        "missing tensors.*transformer.h.0.attn.c_attn",
    ),
    "extra module not targeted": (dict(tensors=lambda t: {**t, **C_PROJ}), "extra tensors.*c_proj"),
    "extra module not in params": (dict(tensors=lambda t: {**t, **H7}), "modules that the params do not have.*h.7"),
    "extra full tensor": (dict(tensors=lambda t: {**t, **LN_F}), "extra tensor .*ln_f.weight.*modules_to_save"),
    "shape mismatch": (dict(tensors=lambda t: {**t, A0: ONES(4, 31)}), r"\(4, 31\).*\(4, 32\)"),
    "DoRA magnitude": (dict(tensors=lambda t: {**t, **MAGNITUDE}), "unexpected tensor"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_load_refuses(tmp_path, case):
    mutation, message = REFUSALS[case]
    directory, params = _mutated(tmp_path, **mutation)
    with pytest.raises(ValueError, match=message):
        lrtt.load_peft(directory, params)


def test_load_refuses_incomplete_modules_to_save(tmp_path):
    directory, params = _mutated(
        tmp_path, family="bert", targets="qv", trainable=r"^classifier/",
        tensors=lambda t: _without(t, "base_model.model.classifier.bias"),
    )
    with pytest.raises(ValueError, match="missing tensors.*'classifier'.*classifier/bias"):
        lrtt.load_peft(directory, params)


def test_load_refuses_a_modules_to_save_shape_mismatch(tmp_path):
    bad = lambda t: {**t, "base_model.model.classifier.weight": ONES(2, 32)}  # noqa: E731
    directory, params = _mutated(tmp_path, family="bert", targets="qv", trainable=r"^classifier/", tensors=bad)
    with pytest.raises(ValueError, match=r"classifier.weight has shape \(2, 32\).*PyTorch's tensor is \(3, 32\)"):
        lrtt.load_peft(directory, params)


def test_load_refuses_an_untied_embedding(tmp_path):
    """GPT-2's LM head is the embedding in Flax; PEFT trains a copy unless told to tie (DESIGN §6)."""
    drop_head = lambda t: _without(t, "base_model.model.lm_head.weight")  # noqa: E731
    directory, params = _mutated(tmp_path, trainable=r"wte/embedding$", tensors=drop_head)
    with pytest.raises(ValueError, match="trains the embedding but not lm_head"):
        lrtt.load_peft(directory, params)


# --- against PyTorch and peft ------------------------------------------------------------------

_pairs: dict = {}


@pytest.fixture(scope="module")
def interop():
    import peft
    import torch

    return types.SimpleNamespace(torch=torch, peft=peft)


def _pair(family):
    """A tiny PyTorch model and its Flax twin with the same weights: ``fresh()`` (a new PyTorch
    model), ``params``, ``logits(params, x)`` and ``factored(wrapped, x)`` (Flax, jitted).

    The Flax params come from transformers' own PyTorch→Flax converter, not from lrtt's names.
    """
    if family in _pairs:
        return _pairs[family]
    import torch
    import transformers
    from flax.traverse_util import flatten_dict, unflatten_dict
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    config_name, kwargs, torch_name = FAMILIES[family]
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    reference = getattr(transformers, torch_name)(config).eval()
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}

    def fresh():
        model = getattr(transformers, torch_name)(config).eval()
        model.load_state_dict(state)
        return model

    flax_model = _flax_class(family)[0](config, _do_init=False)
    shapes = flax_model.params_shape_tree
    stub = types.SimpleNamespace(params=shapes, base_model_prefix=flax_model.base_model_prefix)
    converted = flatten_dict(convert_pytorch_state_dict_to_flax({k: v.numpy() for k, v in state.items()}, stub))
    params = unflatten_dict({k: jnp.asarray(converted[k]) for k in flatten_dict(shapes)})
    call = lambda p, x: flax_model(x, params=p).logits  # noqa: E731
    _pairs[family] = types.SimpleNamespace(
        fresh=fresh, params=params, logits=jax.jit(call), factored=jax.jit(lrtt.factored(call))
    )
    return _pairs[family]


def _torch_logits(model, x):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.as_tensor(np.asarray(x), dtype=torch.long)).logits.numpy()


def _assert_close(got, want, what):
    diff = np.abs(np.asarray(got) - np.asarray(want)).max()
    err = diff / np.abs(np.asarray(want)).max()
    print(f"{what}: max |Δlogits| {diff:.1e}, relative to max |logits| {err:.1e}")
    assert err <= RTOL, f"{what}: max |Δlogits| / max |logits| = {err:.2e} > {RTOL}"


LRTT_METHODS = {
    "gpt2": dict(targets="attention", rank_pattern={"c_proj": 2}, alpha_pattern={"c_attn": 4},
                 trainable=r"wte/embedding$"),
    "llama": dict(targets="all-linear", rank_pattern={"(down|up)_proj": 2}, trainable=r"lm_head/"),
    "bert": dict(targets="qv", rank_pattern={"value": 2}, trainable=r"^classifier/"),
    "roberta": dict(targets="attention", trainable=r"^classifier/out_proj/"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lrtt_adapter_served_by_peft(tmp_path, interop, family):
    """Per-target rank/alpha, rslora (Llama), modules_to_save: a head (BERT, Llama), a nested head
    (RoBERTa: PEFT wraps the whole `classifier`), GPT-2's embedding tied to its LM head."""
    pair = _pair(family)
    rslora = family == "llama"
    method = lrtt.LoRA(rank=4, alpha=8, rslora=rslora, **LRTT_METHODS[family])
    adapter = _noisy(method.init(KEY, pair.params), scale=0.2)
    task = "SEQ_CLS" if family in ("bert", "roberta") else "CAUSAL_LM"
    lrtt.save_peft(tmp_path, method, adapter, pair.params, task_type=task)
    served = interop.peft.PeftModel.from_pretrained(pair.fresh(), tmp_path).eval()
    x = tiny_inputs()
    got = _torch_logits(served, x)
    factored = pair.factored(lrtt.wrap(method, pair.params, adapter), x)
    assert np.abs(np.asarray(factored) - np.asarray(pair.logits(pair.params, x))).max() > 1e-2  # not a no-op
    _assert_close(got, factored, f"{family}: lrtt factored → PEFT")
    merged = pair.logits(lrtt.merge(method, pair.params, adapter), x)
    _assert_close(got, merged, f"{family}: lrtt merged → PEFT")


PEFT_CONFIGS = {
    "gpt2": dict(target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 2}, fan_in_fan_out=True),
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True, modules_to_save=["lm_head"]),
    "bert": dict(target_modules=["query", "value", "dense"], alpha_pattern={"value": 3}, task_type="SEQ_CLS",
                 layers_to_transform=[1]),
    "roberta": dict(target_modules=r".*\.(query|key)", task_type="SEQ_CLS",
                    rank_pattern={"layer.0.attention.self.key": 2}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_adapter_loaded_by_lrtt(tmp_path, interop, family):
    """Adapters made by peft itself: list / regex target_modules, rank/alpha patterns, rslora,
    layers_to_transform, modules_to_save (explicit and SEQ_CLS's automatic `classifier`)."""
    torch = interop.torch
    pair = _pair(family)
    torch.manual_seed(1)
    config = interop.peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **PEFT_CONFIGS[family])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = interop.peft.get_peft_model(pair.fresh(), config).eval()
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    trained.save_pretrained(tmp_path)
    method, adapter = lrtt.load_peft(tmp_path, pair.params)
    x = tiny_inputs()
    got = pair.logits(lrtt.merge(method, pair.params, adapter), x)
    assert np.abs(np.asarray(got) - np.asarray(pair.logits(pair.params, x))).max() > 1e-2
    _assert_close(got, _torch_logits(trained, x), f"{family}: PEFT → lrtt")
    assert jax.tree.structure(method.init(KEY, pair.params)) == jax.tree.structure(adapter)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loretta_rep_exported_as_lora_served_by_peft(tmp_path, interop, family):
    pair = _pair(family)
    method = lrtt.LorettaRep(rank=4, alpha=8, tt_rank=3, targets="attention", initializer="gaussian")
    adapter = method.init(KEY, pair.params)
    lrtt.save_peft(tmp_path, method, adapter, pair.params)
    served = interop.peft.PeftModel.from_pretrained(pair.fresh(), tmp_path).eval()
    x = tiny_inputs()
    merged = pair.logits(lrtt.merge(method, pair.params, adapter), x)
    assert np.abs(np.asarray(merged) - np.asarray(pair.logits(pair.params, x))).max() > 1e-2
    _assert_close(_torch_logits(served, x), merged, f"{family}: LorettaRep → PEFT")


def test_peft_tied_embedding_round_trip(tmp_path, interop):
    """PEFT with the embedding and lm_head tied (ensure_weight_tying) loads; lrtt's export ties too."""
    torch = interop.torch
    pair = _pair("gpt2")
    config = interop.peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False,
                                     modules_to_save=["transformer.wte", "lm_head"], ensure_weight_tying=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = interop.peft.get_peft_model(pair.fresh(), config).eval()
    with torch.no_grad():
        table = trained.base_model.model.transformer.wte.modules_to_save["default"].weight
        table.add_(0.1 * torch.randn_like(table))
    trained.save_pretrained(tmp_path)
    method, adapter = lrtt.load_peft(tmp_path, pair.params)
    x = tiny_inputs()
    got = pair.logits(lrtt.merge(method, pair.params, adapter), x)
    _assert_close(got, _torch_logits(trained, x), "tied PEFT → lrtt")


@pytest.mark.parametrize("kind", ["LoHaConfig", "IA3Config", "dora"])
def test_real_peft_non_lora_adapters_are_refused(tmp_path, interop, kind):
    pair = _pair("llama")
    if kind == "dora":
        config, expected = interop.peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "DORA"
    else:
        extra = {"feedforward_modules": []} if kind == "IA3Config" else {}
        config = getattr(interop.peft, kind)(target_modules=["q_proj"], **extra)
        expected = kind[: -len("Config")].upper()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interop.peft.get_peft_model(pair.fresh(), config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"PEFT {expected} adapter"):
        lrtt.load_peft(tmp_path, pair.params)


# --- check="vllm": vLLM's serving rules, checked before anything is written -------------------


def _vllm_params():
    w = lambda *s: jnp.ones(s)  # noqa: E731
    return {"model": {"layers": {"0": {"self_attn": {"q_proj": {"kernel": w(16, 32)}, "v_proj": {"kernel": w(16, 32)}}}},
                      "embed_tokens": {"embedding": w(64, 16)}},
            "lm_head": {"kernel": w(16, 64)}}


def _vllm_save(tmp_path, method):
    params = _vllm_params()
    adapter = jax.tree.map(lambda x: x + 1.0, method.init(KEY, params))
    directory = tmp_path / "adapter"
    return directory, lambda: lrtt.save_peft(directory, method, adapter, params, check="vllm")


@pytest.mark.parametrize("rank, fix", [(4, "use rank=8"), (12, "use rank=16")])
def test_vllm_check_refuses_a_rank_vllm_does_not_serve(tmp_path, rank, fix):
    directory, save = _vllm_save(tmp_path, lrtt.LoRA(rank=rank, targets="q_proj|v_proj"))
    with pytest.raises(ValueError, match=rf"rank {rank} is not one vLLM serves: {fix} \(max_lora_rank ∈ \{{1, 8, 16"):
        save()
    assert not directory.exists()  # nothing written


def test_vllm_check_names_each_rank_of_a_rank_pattern(tmp_path):
    method = lrtt.LoRA(rank=8, targets="q_proj|v_proj", rank_pattern={"v_proj": 4})
    directory, save = _vllm_save(tmp_path, method)
    with pytest.raises(ValueError, match=r"rank 4 \(at \['model.layers.0.self_attn.v_proj'\]\) is not one vLLM serves"):
        save()
    assert not directory.exists()


def test_vllm_check_refuses_the_head_and_trainable_leaves(tmp_path):
    directory, save = _vllm_save(tmp_path, lrtt.LoRA(rank=8, targets="q_proj|lm_head"))
    with pytest.raises(ValueError, match=r"linear layers of the decoder only, not on \['lm_head'\]"):
        save()
    directory, save = _vllm_save(tmp_path, lrtt.LoRA(rank=8, targets="q_proj", trainable="^model/embed_tokens/"))
    with pytest.raises(ValueError, match=r"vLLM does not serve modules_to_save.*Train without `trainable`"):
        save()
    assert not directory.exists()


def test_vllm_check_refuses_dora_and_passes_a_servable_adapter(tmp_path):
    with pytest.raises(ValueError, match=r"rank 600 is not one vLLM serves: use rank=512 or less"):
        lrtt.io._peft_save.check_vllm({}, {"model.layers.0.self_attn.q_proj": 600})
    with pytest.raises(ValueError, match=r"vLLM does not serve DoRA"):
        lrtt.io._peft_save.check_vllm({"use_dora": True}, {"model.layers.0.self_attn.q_proj": 8})
    with pytest.raises(ValueError, match=r"`check` must be one of \[None, 'vllm'\]"):
        lrtt.save_peft(tmp_path / "x", lrtt.LoRA(rank=8, targets="q_proj"), {}, {}, check="tgi")
    directory, save = _vllm_save(tmp_path, lrtt.LoRA(rank=16, targets="q_proj|v_proj"))
    config = save()
    assert config["r"] == 16 and not config["modules_to_save"] and not config["use_dora"]
    assert (directory / "adapter_model.safetensors").is_file()
