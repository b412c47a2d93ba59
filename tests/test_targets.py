"""Target selection: presets per family, layouts, stacked leaves, and the errors."""

import jax.numpy as jnp
import numpy as np
import pytest

import lrtt
from lrtt import _families
from lrtt._targets import Layout, select
from conftest import tiny_model

EXPECTED = {
    # family: {preset: leaf names (without the layer prefix) selected in each layer}
    "gpt2": {
        "qv": {"attn/c_attn/kernel"},
        "attention": {"attn/c_attn/kernel", "attn/c_proj/kernel"},
        "all-linear": {"attn/c_attn/kernel", "attn/c_proj/kernel", "mlp/c_fc/kernel", "mlp/c_proj/kernel"},
    },
    "llama": {
        "qv": {"self_attn/q_proj/kernel", "self_attn/v_proj/kernel"},
        "attention": {f"self_attn/{n}_proj/kernel" for n in "qkvo"},
        "all-linear": {f"self_attn/{n}_proj/kernel" for n in "qkvo"}
        | {f"mlp/{n}_proj/kernel" for n in ("gate", "up", "down")},
    },
    "bert": {
        "qv": {"attention/self/query/kernel", "attention/self/value/kernel"},
        "attention": {f"attention/self/{n}/kernel" for n in ("query", "key", "value")}
        | {"attention/output/dense/kernel"},
        "all-linear": {f"attention/self/{n}/kernel" for n in ("query", "key", "value")}
        | {"attention/output/dense/kernel", "intermediate/dense/kernel", "output/dense/kernel"},
    },
}
LAYER_PREFIX = {"gpt2": "transformer/h/{}/", "llama": "model/layers/{}/", "bert": "bert/encoder/layer/{}/"}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "roberta"])
@pytest.mark.parametrize("preset", ["qv", "attention", "all-linear"])
def test_presets_select_the_expected_leaves(family, preset):
    params = tiny_model(family).params
    base = "bert" if family == "roberta" else family
    prefix = LAYER_PREFIX[base].replace("bert/", "roberta/") if family == "roberta" else LAYER_PREFIX[base]
    expected = {prefix.format(i) + name for i in range(2) for name in EXPECTED[base][preset]}
    assert {t.path for t in select(params, preset)} == expected


def _shapes(cls_name: str, config_name: str, **config):
    import transformers

    config = getattr(transformers, config_name)(vocab_size=50, max_position_embeddings=16, **config)
    return getattr(transformers, cls_name)(config, _do_init=False).params_shape_tree


MORE_FAMILIES = {  # family: (params from shapes only, layer prefix, {preset: module names})
    "opt": (lambda: _shapes("FlaxOPTForCausalLM", "OPTConfig", num_hidden_layers=2, hidden_size=16, ffn_dim=32,
                            num_attention_heads=2, word_embed_proj_dim=16),
            "model/decoder/layers/{}/", {"qv": ["self_attn/q_proj", "self_attn/v_proj"],
                                         "attention": [f"self_attn/{n}_proj" for n in ("q", "k", "v", "out")],
                                         "all-linear": [f"self_attn/{n}_proj" for n in ("q", "k", "v", "out")]
                                         + ["fc1", "fc2"]}),
    "gpt_neo": (lambda: _shapes("FlaxGPTNeoForCausalLM", "GPTNeoConfig", num_layers=2, hidden_size=16, num_heads=2,
                                attention_types=[[["global", "local"], 1]], window_size=4),
                "transformer/h/{}/", {"qv": ["attn/attention/q_proj", "attn/attention/v_proj"],
                                      "attention": [f"attn/attention/{n}_proj" for n in ("q", "k", "v", "out")],
                                      "all-linear": [f"attn/attention/{n}_proj" for n in ("q", "k", "v", "out")]
                                      + ["mlp/c_fc", "mlp/c_proj"]}),
    "mistral": (lambda: _shapes("FlaxMistralForCausalLM", "MistralConfig", num_hidden_layers=2, hidden_size=16,
                                intermediate_size=32, num_attention_heads=2, num_key_value_heads=1),
                "model/layers/{}/", {"qv": ["self_attn/q_proj", "self_attn/v_proj"],
                                     "attention": [f"self_attn/{n}_proj" for n in "qkvo"],
                                     "all-linear": [f"self_attn/{n}_proj" for n in "qkvo"]
                                     + [f"mlp/{n}_proj" for n in ("gate", "up", "down")]}),
}


@pytest.mark.parametrize("family", sorted(MORE_FAMILIES))
def test_presets_of_opt_gpt_neo_mistral(family):
    params, prefix, expected = MORE_FAMILIES[family]
    params = params()
    for preset, names in expected.items():
        want = {prefix.format(i) + n + "/kernel" for i in range(2) for n in names}
        assert {t.path for t in select(params, preset)} == want, preset


def test_family_detection():
    def name(paths):
        family = _families.detect(paths)
        return family and family.name

    assert name(["transformer/h/0/attn/c_attn/kernel"]) == "gpt2"
    assert name(["model/layers/3/self_attn/q_proj/kernel"]) == "llama"
    assert name(["model/decoder/layers/3/self_attn/out_proj/kernel"]) == "opt"
    assert name(["roberta/encoder/layer/0/attention/self/query/kernel"]) == "roberta"
    assert name(["bert/encoder/layer/0/attention/self/query/kernel"]) == "bert"
    assert name(["dense/kernel"]) is None


def test_gpt2_conv1d_is_read_out_in():
    params = tiny_model("gpt2").params
    (target,) = [t for t in select(params, "qv") if "/0/" in t.path]
    assert str(target.layout) == "out in"
    assert (target.n_in, target.n_out) == (32, 96)  # stored (96, 32): (out, in)


def test_layout_parse_and_matrix_round_trip():
    layout = Layout.parse("layer in out out")
    w = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
    m = layout.to_matrix(w)
    assert m.shape == (2, 3, 20)
    np.testing.assert_array_equal(layout.from_matrix(m, w.shape), w)
    conv = Layout.parse("out in")
    w2 = jnp.arange(12.0).reshape(3, 4)  # (out=3, in=4)
    np.testing.assert_array_equal(conv.to_matrix(w2), w2.T)
    np.testing.assert_array_equal(conv.from_matrix(w2.T, w2.shape), w2)


@pytest.mark.parametrize("spec", ["in", "x y", "out out", "layer in", "", "in out kernel"])
def test_bad_layouts_are_refused(spec):
    with pytest.raises(ValueError, match="invalid layout"):
        Layout.parse(spec)


@pytest.mark.parametrize("spec, shape, split", [
    ("out in out", (4, 3, 2), ((), (3,), (4, 2))),  # Gemma q_einsum (N, D, H)
    ("out out in out", (2, 4, 3, 5), ((), (3,), (2, 4, 5))),  # Gemma kv_einsum (2, K, D, H)
    ("in layer out out", (3, 2, 4, 5), ((2,), (3,), (4, 5))),  # MaxText, scanned on axis 1
    ("in out in", (2, 5, 3), ((), (2, 3), (5,))),
])
def test_interleaved_layouts_read_each_group_in_axis_order(spec, shape, split):
    layout = Layout.parse(spec)
    assert layout.split(shape) == split and str(layout) == spec
    w = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    m = layout.to_matrix(w)
    stack, ins, outs = split
    assert m.shape == stack + (int(np.prod(ins)), int(np.prod(outs)))
    np.testing.assert_array_equal(layout.from_matrix(m, shape), w)
    # entry [*s, i, o] of the matrix is the kernel entry whose in/out axes unravel i and o
    s_idx = tuple(n - 1 for n in stack)
    i_idx, o_idx = np.unravel_index(int(np.prod(ins)) - 2, ins), np.unravel_index(1, outs)
    index = [0] * len(shape)
    for kind, idx in (("layer", s_idx), ("in", i_idx), ("out", o_idx)):
        for axis, v in zip(layout.axes(kind), idx):
            index[axis] = v
    assert m[s_idx + (int(np.prod(ins)) - 2, 1)] == w[tuple(index)]


def test_no_match_lists_existing_paths():
    params = tiny_model("llama").params
    with pytest.raises(ValueError, match=r"matched no leaf(.|\n)*model/layers/0/"):
        lrtt.LoRA(targets="c_attn").init(None, params)


def test_bad_regex_is_refused():
    with pytest.raises(ValueError, match="not a valid regex"):
        lrtt.LoRA(targets="q_proj(")


def test_stacked_leaf_needs_a_layout_then_gets_stacked_factors():
    params = {"layers": {"dense": {"kernel": jnp.ones((3, 8, 16))}}}
    with pytest.raises(ValueError, match="not 2-D.*layer in out"):
        lrtt.LoRA(rank=2, targets="dense").plan(params)
    with pytest.raises(ValueError, match="layout 'in out' has 2 axes"):
        lrtt.LoRA(rank=2, targets="dense", layouts={"dense": "in out"}).plan(params)
    import jax

    adapter = lrtt.LoRA(rank=2, targets="dense", layouts={"dense": "layer in out"}).init(jax.random.key(0), params)
    entry = adapter["layers"]["dense"]["kernel"]
    assert entry.a.shape == (3, 8, 2) and entry.b.shape == (3, 2, 16)


def test_dense_general_layout_flattens_the_out_group():
    import jax

    params = {"attn": {"query": {"kernel": jnp.ones((16, 4, 8))}}}
    method = lrtt.LoRA(rank=4, targets="query", layouts={"query": "in out out"})
    entry = method.init(jax.random.key(0), params)["attn"]["query"]["kernel"]
    assert entry.a.shape == (16, 4) and entry.b.shape == (4, 32)
