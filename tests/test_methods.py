"""Method configs and `init`: shapes, scales, inits, validation errors."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrtt
from conftest import tiny_model

KEY = jax.random.key(0)


def test_lora_shapes_and_init_distribution():
    params = tiny_model("llama").params
    adapter = lrtt.LoRA(rank=4, targets="qv").init(KEY, params)
    q = adapter["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    v = adapter["model"]["layers"]["1"]["self_attn"]["v_proj"]["kernel"]
    assert q.a.shape == (32, 4) and q.b.shape == (4, 32)
    assert v.a.shape == (32, 4) and v.b.shape == (4, 16)  # GQA: v_proj is (32, 16)
    assert float(jnp.abs(q.b).max()) == 0.0
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) with fan_in = in
    assert float(jnp.abs(q.a).max()) <= bound and float(jnp.abs(q.a).max()) > 0.5 * bound
    assert set(lrtt.entries(adapter)) == {t.path for t in lrtt.select(params, "qv")}


def test_lora_scales_alpha_rslora_and_patterns():
    assert lrtt.LoRA(rank=8).scale_for("x") == 1.0  # alpha defaults to rank
    assert lrtt.LoRA(rank=8, alpha=16).scale_for("x") == 2.0
    assert lrtt.LoRA(rank=16, alpha=8, rslora=True).scale_for("x") == pytest.approx(2.0)
    method = lrtt.LoRA(rank=8, alpha=16, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4})
    assert method.rank_for("layers/0/v_proj/kernel") == 2
    assert method.scale_for("layers/0/v_proj/kernel") == 8.0
    assert method.scale_for("layers/0/q_proj/kernel") == 0.5
    adapter = method.init(KEY, tiny_model("llama").params)
    v = adapter["model"]["layers"]["0"]["self_attn"]["v_proj"]["kernel"]
    assert v.a.shape[-1] == 2 and v.scale == 8.0


def test_lora_rank_too_large_names_the_leaf_and_the_limit():
    with pytest.raises(ValueError, match=r"`rank`=20 is larger than min\(in, out\)=16 of 'model/layers/0/self_attn/v_proj/kernel'"):
        lrtt.LoRA(rank=20).init(KEY, tiny_model("llama").params)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "`rank` must be an integer >= 1, got 0"),
        (dict(rank=2.5), "`rank` must be an integer"),
        (dict(dropout=1.5), "`dropout` must be a probability"),
        (dict(rank_pattern={"q": 0}), "rank_pattern"),
        (dict(targets=[3]), "`targets` must hold regex strings"),
        (dict(alpha="x"), "`alpha` must be a finite, non-zero number"),
        (dict(alpha=float("nan")), "`alpha` must be a finite, non-zero number"),
        (dict(alpha_pattern={"q": 0}), r"`alpha_pattern\['q'\]` must be a finite, non-zero number"),
    ],
)
def test_lora_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lrtt.LoRA(**kwargs)


def test_methods_are_hashable_static_configs():
    a = lrtt.LoRA(rank=4, rank_pattern={"q": 2})
    b = lrtt.LoRA(rank=4, rank_pattern={"q": 2})
    assert a == b and hash(a) == hash(b)
    assert hash(lrtt.LorettaRep(tt_shape=[[4, 8, 8], [8, 4, 8]])) is not None
    assert hash(lrtt.LorettaAdp()) is not None


def test_rep_shapes_auto_and_given():
    params = tiny_model("bert").params
    adapter = lrtt.LorettaRep(rank=4, tt_rank=3).init(KEY, params)
    entry = adapter["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
    assert math.prod(c.shape[1] for c in entry.a) == 32 * 4
    assert math.prod(c.shape[1] for c in entry.b) == 4 * 32
    assert entry.a[0].shape[0] == 1 and entry.a[-1].shape[-1] == 1
    assert all(c.shape[-1] == 3 for c in entry.a[:-1])
    assert entry.scale == 16.0 / 4
    given = lrtt.LorettaRep(rank=4, tt_rank=2, tt_shape=[8, 16]).init(KEY, params)
    entry = given["bert"]["encoder"]["layer"]["1"]["attention"]["self"]["value"]["kernel"]
    assert [c.shape for c in entry.a] == [(1, 8, 2), (2, 16, 1)]


def test_rep_tt_shape_as_a_number_of_cores():
    """``tt_shape=d``: the balanced automatic factorization into d cores per matrix (both matrices,
    every target); it survives a config round trip and an impossible d is a clear error."""
    params = tiny_model("bert").params
    method = lrtt.LorettaRep(rank=4, tt_rank=3, tt_shape=2)
    assert lrtt.LorettaRep.from_config(json.loads(json.dumps(method.to_config()))) == method
    adapter = method.init(KEY, params)
    entry = adapter["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
    assert [c.shape for c in entry.a] == [(1, 16, 3), (3, 8, 1)]  # auto_dims(32, 4, cores=2)
    assert [c.shape for c in entry.b] == [(1, 16, 3), (3, 8, 1)]
    dense = lrtt.LorettaRep(rank=4, tt_rank=3).init(KEY, params)
    first = lambda adapter: next(iter(lrtt.entries(adapter).values()))  # noqa: E731
    assert len(first(dense).a) == 2  # 128 entries: log_8 gives 2 cores by default too
    three = lrtt.LorettaRep(rank=4, tt_rank=3, tt_shape=3).init(KEY, params)
    assert [c.shape[1] for c in first(three).a] == [4, 8, 4]
    with pytest.raises(ValueError, match=r"`tt_shape=9` .* cannot be split into 9 factors > 1 \(at most 7\)"):
        lrtt.LorettaRep(rank=4, tt_shape=9).init(KEY, params)
    for bad in (0, -1, True):  # refused when the method is made, not at init
        with pytest.raises(ValueError, match=r"an int d .* got " + repr(bad)):
            lrtt.LorettaRep(rank=4, tt_shape=bad)
    numpy_d = lrtt.LorettaRep(rank=4, tt_rank=3, tt_shape=np.int64(2))  # a plain int in the config, as rank
    assert numpy_d == method and json.loads(json.dumps(numpy_d.to_config()))["tt_shape"] == 2
    dims = lrtt.LorettaRep(tt_shape=np.array([8, 16]))
    assert lrtt.LorettaRep.from_config(json.loads(json.dumps(dims.to_config()))).tt_shape == (8, 16)
    adp = lrtt.LorettaAdp(bottleneck=8, tt_rank=2, tt_shape=2)
    bottlenecks = [e for e in lrtt.entries(adp.init(KEY, params)).values() if hasattr(e, "down")]
    assert hash(adp) is not None and bottlenecks and all(len(e.down) == 2 for e in bottlenecks)


def test_rep_tt_shape_product_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"product 96 .* \(32, 4\) matrix .* 128 entries"):
        lrtt.LorettaRep(rank=4, tt_shape=[8, 12]).init(KEY, tiny_model("bert").params)


def test_rep_bad_options():
    with pytest.raises(ValueError, match="`initializer` must be one of"):
        lrtt.LorettaRep(initializer="xavier")
    with pytest.raises(ValueError, match="`tt_rank` must be an integer >= 1, got 0"):
        lrtt.LorettaRep(tt_rank=0)
    with pytest.raises(ValueError, match="`alpha` must be a finite, non-zero number"):
        lrtt.LorettaRep(alpha=0)


def test_rep_zero_delta_zeros_only_the_last_core_of_b():
    params = tiny_model("gpt2").params
    entry = lrtt.entries(lrtt.LorettaRep(rank=4).init(KEY, params))["transformer/h/0/attn/c_attn/kernel"]
    assert float(jnp.abs(entry.b[-1]).max()) == 0.0
    assert all(float(jnp.abs(c).max()) > 0 for c in entry.a + entry.b[:-1])
    gauss = lrtt.entries(lrtt.LorettaRep(rank=4, initializer="gaussian").init(KEY, params))
    assert float(jnp.abs(gauss["transformer/h/0/attn/c_attn/kernel"].b[-1]).max()) > 0


def test_rep_zero_delta_last_core_gets_a_gradient_at_step_zero():
    params = {"dense": {"kernel": jax.random.normal(KEY, (16, 24))}}
    method = lrtt.LorettaRep(rank=4, tt_rank=2, targets="dense")
    adapter = method.init(KEY, params)
    x = jax.random.normal(jax.random.key(1), (5, 16))

    def loss(adapter):
        w = lrtt.merge(method, params, adapter)["dense"]["kernel"]
        return jnp.sum(jnp.sin(x @ w))

    grads = lrtt.entries(jax.grad(loss)(adapter))["dense/kernel"]
    assert float(jnp.abs(grads.b[-1]).max()) > 0


def test_adp_entries_identity_and_features():
    params = tiny_model("llama").params
    method = lrtt.LorettaAdp(bottleneck=8, tt_rank=2, tt_shape=None)
    entries = lrtt.entries(method.init(KEY, params))
    down = entries["model/layers/0/mlp/down_proj/kernel"]
    gate = entries["model/layers/0/mlp/gate_proj/kernel"]
    assert down.position == "after" and down.features == 32  # out of down_proj
    assert gate.position == "before" and gate.features == 32  # in of gate_proj
    h = jax.random.normal(KEY, (3, 32))
    np.testing.assert_array_equal(down(h), jnp.zeros_like(h))  # identity init: f = 0
    assert "model/norm/weight" in entries and "model/layers/1/input_layernorm/weight" in entries
    gauss = lrtt.entries(lrtt.LorettaAdp(bottleneck=8, tt_rank=2, tt_shape=None, initializer="gaussian").init(KEY, params))
    assert float(jnp.abs(gauss["model/layers/0/mlp/down_proj/kernel"](h)).max()) > 0


def test_adp_classifier_and_head_on_bert():
    params = tiny_model("bert").params
    method = lrtt.LorettaAdp(bottleneck=8, tt_rank=2, tt_shape=None, tensorized_classifier=True, train_head=True)
    entries = lrtt.entries(method.init(KEY, params))
    assert isinstance(entries["bert/pooler/dense/kernel"], lrtt.TTKernel)
    assert entries["bert/pooler/dense/kernel"].matrix().shape == (32, 32)
    for path in ("bert/pooler/dense/bias", "classifier/kernel", "classifier/bias"):
        assert isinstance(entries[path], lrtt.Trainable)
    with pytest.raises(ValueError, match="tensorized_classifier"):
        method.init(KEY, tiny_model("llama").params)


def test_adp_tensorized_classifier_cores_differ_between_head_layers():
    params = {"layer": {"out": {"kernel": jnp.zeros((16, 16))}},
              "pooler": {"dense": {"kernel": jnp.zeros((16, 16))}},
              "classifier": {"dense": {"kernel": jnp.zeros((16, 16))}}}
    method = lrtt.LorettaAdp(bottleneck=4, tt_rank=2, tt_shape=None, after=r"layer/out/kernel$", before=None,
                             train_norms=False, tensorized_classifier=True)
    entries = lrtt.entries(method.init(KEY, params))
    pooler, classifier = entries["pooler/dense/kernel"].matrix(), entries["classifier/dense/kernel"].matrix()
    assert float(jnp.abs(pooler - classifier).max()) > 1e-3  # each layer draws its own cores


def test_adp_errors():
    params = tiny_model("bert").params
    with pytest.raises(ValueError, match="`bottleneck`=64 is larger than the 32 features"):
        lrtt.LorettaAdp(tt_shape=None).init(KEY, params)
    with pytest.raises(ValueError, match="`activation` must be one of"):
        lrtt.LorettaAdp(activation="swish2")
    with pytest.raises(ValueError, match="matched no leaf"):
        lrtt.LorettaAdp(after="nothing_here", before=None, bottleneck=4).init(KEY, params)
    with pytest.raises(ValueError, match="both match"):
        lrtt.LorettaAdp(after="output/dense/kernel", before="output/dense/kernel", bottleneck=4).init(KEY, params)
    with pytest.raises(ValueError, match="1-D leaf .* is not a kernel .* 'kernel\\$'"):
        lrtt.LorettaAdp(after="output/dense", before=None, bottleneck=4).init(KEY, params)


def test_configs_are_json_able():

    for method in (lrtt.LoRA(rank_pattern={"q": 2}), lrtt.LorettaRep(tt_shape=[4, 8]), lrtt.LorettaAdp()):
        config = json.loads(json.dumps(method.to_config()))
        assert config["method"] == type(method).__name__
        assert config["param_dtype"] == "float32"


def test_numpy_integers_are_integers_everywhere():
    """One positive-integer rule for methods and lrtt.tt: numpy integers pass (stored as int),
    bools and floats do not."""
    lora = lrtt.LoRA(rank=np.int64(8), rank_pattern={"q": np.int32(4)})
    rep = lrtt.LorettaRep(rank=np.int64(4), tt_rank=np.int16(2))
    assert type(lora.rank) is int and lora.rank_pattern == (("q", 4),) and type(lora.rank_pattern[0][1]) is int
    assert (rep.rank, rep.tt_rank) == (4, 2) and lrtt.tt.tt_ranks((2, 3), np.int64(2)) == (1, 2, 1)
    assert lora == lrtt.LoRA(rank=8, rank_pattern={"q": 4})
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match="`rank` must be an integer >= 1"):
            lrtt.LoRA(rank=bad)
        with pytest.raises(ValueError, match="`tt_rank` must be an integer >= 1"):
            lrtt.tt.tt_ranks((2, 3), bad)


def test_every_method_implements_the_one_interface():
    for method in (lrtt.LoRA(), lrtt.LorettaRep(), lrtt.LorettaAdp(), lrtt.FullFineTune()):
        assert isinstance(method, lrtt.Method)
        assert method.to_config()["method"] == type(method).__name__
        assert method.label.startswith(type(method).__name__ + "(")
        assert isinstance(method.mergeable, bool) and isinstance(method.dropout, float)
    assert lrtt.LorettaRep(rank=4, tt_rank=3).label == "LorettaRep(rank=4, tt_rank=3)"
    assert not lrtt.LorettaAdp().mergeable and lrtt.LorettaAdp().layouts == ()
