"""Kernels whose in, out and layer axes interleave (Gemma einsums, MaxText scanned layers),
through every transform: init, factored == merged (outputs and gradients), unmerge, counts,
sharding rules; ragged_dot_general experts; layouts and "all-linear" read off the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

import lrtt
from test_factored import _normal, assert_close, factored_and_merged, random_adapter

D, N, H, K, L = 8, 4, 3, 2, 3  # embed, heads, head dim, kv heads, layers


def _scan_mlp(p, x):  # MaxText: a kernel (embed, layers, out) scanned on its axis 1
    def block(h, w):
        return jnp.tanh(h @ w), None

    return lax.scan(block, x, jnp.moveaxis(p["w"], 1, 0))[0]


CASES = {
    # name: (layout, shape, fn(params, x) with x: (B, T, D))
    "gemma_q": ("out in out", (N, D, H), lambda p, x: jnp.einsum("BTD,NDH->BTNH", x, p["w"])),
    "gemma_kv": ("out out in out", (2, K, D, H), lambda p, x: jnp.einsum("BSD,CKDH->CBSKH", x, p["w"])),
    "gemma_attn_vec": ("in in out", (N, 2, D),
                       lambda p, x: jnp.einsum("BTNH,NHD->BTD", x.reshape(*x.shape[:2], N, 2), p["w"])),
    "gemma_gating": ("out out in", (2, 5, D), lambda p, x: jnp.einsum("...F,NHF->...NH", x, p["w"])),
    "maxtext_scan": ("in layer out", (D, L, D), _scan_mlp),
    "maxtext_query": ("in layer out out", (D, L, N, H),
                      lambda p, x: jnp.einsum("LBTD,LDNH->LBTNH", jnp.stack([x] * L), jnp.moveaxis(p["w"], 1, 0))),
}
METHODS = {
    "lora": lambda layout: lrtt.LoRA(rank=2, targets="w", layouts={"w": layout}),
    "rep": lambda layout: lrtt.LorettaRep(rank=2, tt_rank=2, targets="w", layouts={"w": layout}),
}


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_interleaved_layout_factored_equals_merged_and_unmerges(case, method_name):
    layout, shape, fn = CASES[case]
    params = {"w": _normal(0, shape)}
    method = METHODS[method_name](layout)
    adapter = random_adapter(method, params)
    x = _normal(1, (2, 4, D))
    factored_and_merged(method, params, adapter, fn, x)
    stack, ins, outs = lrtt.Layout.parse(layout).split(shape)
    n_in, n_out = int(np.prod(ins)), int(np.prod(outs))
    if method_name == "lora":  # A: (*stack, in, r), B: (*stack, r, out); count and ΔW exact
        entry = adapter["w"]
        assert entry.a.shape == stack + (n_in, 2) and entry.b.shape == stack + (2, n_out)
        assert lrtt.num_params(adapter) == int(np.prod(stack, dtype=int)) * 2 * (n_in + n_out)
        delta = np.asarray(lrtt.merge(method, params, adapter)["w"] - params["w"])
        matrix = lrtt.Layout.parse(layout).to_matrix(delta)
        np.testing.assert_allclose(matrix, np.asarray(entry.a @ entry.b), rtol=1e-5, atol=1e-6)
    restored = lrtt.unmerge(method, lrtt.merge(method, params, adapter), adapter)
    assert_close(restored, params)


def test_sharding_rules_follow_an_interleaved_layout():
    """Tensor parallel shards a column-parallel kernel's first out axis and its bias' out axis,
    whatever the layout; each factor inherits the spec of its group."""
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    params = {"layers": {"self_attn": {"q_proj": {"kernel": jnp.zeros((D, L, N * H)), "bias": jnp.zeros((L, N * H))},
                                       "o_proj": {"kernel": jnp.zeros((N * H, L, D))}}}}
    layouts = {"q_proj/kernel": "in layer out", "o_proj/kernel": "in layer out"}
    specs = lrtt.train.param_specs(params, mesh, rules="tensor", layouts=layouts)
    attn = specs["layers"]["self_attn"]
    assert attn["q_proj"]["kernel"] == P(None, None, "model")
    assert attn["q_proj"]["bias"] == P(None, "model")  # (layers, out): not the layer axis
    assert attn["o_proj"]["kernel"] == P("model", None, None)
    method = lrtt.LoRA(rank=2, targets="q_proj/kernel", layouts=layouts)
    kernel_spec = {"w": P("x", "y", None, None)}
    factors = lrtt.train.adapter_specs(
        lrtt.LoRA(rank=2, targets="w", layouts={"w": "out layer in out"}), {"w": jnp.zeros((2, L, D, H))}, kernel_spec)
    assert factors["w"].a == P("y", None, None) and factors["w"].b == P("y", None, "x")
    assert method.init(jax.random.key(0), params)["layers"]["self_attn"]["q_proj"]["kernel"].a.shape == (L, D, 2)


@pytest.mark.parametrize("method", [
    lrtt.LoRA(rank=2, targets="experts", layouts={"experts": "layer in out"}),
    lrtt.LorettaRep(rank=2, tt_rank=2, targets="experts", layouts={"experts": "layer in out"}),
], ids=["lora", "rep"])
def test_ragged_dot_experts_factored_equals_merged(method):
    """Mixture-of-experts: rows grouped by expert, ``lax.ragged_dot`` over (E, in, out) kernels;
    per-expert factors A: (E, in, r), B: (E, r, out), the same group sizes (one group empty)."""
    params = {"experts": _normal(0, (3, D, 5))}
    group_sizes = jnp.array([2, 0, 4], jnp.int32)
    x = _normal(1, (6, D))
    adapter = random_adapter(method, params)
    fn = lambda p, x, gs: lax.ragged_dot(x, p["experts"], gs)  # noqa: E731
    factored_and_merged(method, params, adapter, fn, x, group_sizes)
    grad = jax.grad(lambda ad: lrtt.factored(fn)(lrtt.wrap(method, params, ad), x, group_sizes).sum())
    names = {e.primitive.name for e in jax.make_jaxpr(grad)(adapter).jaxpr.eqns}
    assert "ragged_dot_general" in names


def test_ragged_dot_with_the_kernel_on_the_left_is_refused():
    params = {"experts": _normal(0, (3, D, 5))}
    method = lrtt.LoRA(rank=2, targets="experts", layouts={"experts": "layer in out"})
    wrapped = lrtt.wrap(method, params, random_adapter(method, params))
    fn = lambda p, x: lax.ragged_dot(p["experts"][0], x, jnp.array([3, 2, 3], jnp.int32))  # noqa: E731
    with pytest.raises(ValueError, match="ragged_dot_general.*'experts'"):
        lrtt.factored(fn)(wrapped, _normal(1, (3, 5, 4)))


def _gemma_like(p, x):
    """A Gemma-style block: q/kv einsums, attn_vec, gating einsum (2, F, D), linear (F, D)."""
    q = jnp.einsum("BTD,NDH->BTNH", x, p["attn"]["q_einsum"]["w"])
    k, v = jnp.einsum("BSD,CKDH->CBSKH", x, p["attn"]["kv_einsum"]["w"])
    scores = jnp.einsum("BTNH,BSKH->BNTS", q, jnp.repeat(k, N // K, axis=2))
    out = jnp.einsum("BNTS,BSKH->BTNH", jax.nn.softmax(scores), jnp.repeat(v, N // K, axis=2))
    h = x + jnp.einsum("BTNH,NHD->BTD", out, p["attn"]["attn_vec_einsum"]["w"])
    gate = jnp.einsum("...D,NFD->...NF", h, p["mlp"]["gating_einsum"])
    return h + (jax.nn.gelu(gate[..., 0, :]) * gate[..., 1, :]) @ p["mlp"]["linear"]


def _gemma_params(f=6):
    return {"layer_0": {
        "attn": {"q_einsum": {"w": _normal(0, (N, D, H))}, "kv_einsum": {"w": _normal(1, (2, K, D, H))},
                 "attn_vec_einsum": {"w": _normal(2, (N, H, D))}},
        "mlp": {"gating_einsum": _normal(3, (2, f, D)), "linear": _normal(4, (f, D))},
    }}


def test_gemma_names_get_family_layouts_and_discover_agrees():
    params = _gemma_params()
    fn = lambda p, x: _gemma_like(p["layer_0"], x)  # noqa: E731
    x = _normal(5, (2, 4, D))
    by_family = {t.path: str(t.layout) for t in lrtt.select(params, "all-linear")}
    found = lrtt.discover(fn, params, x)
    assert by_family == dict(found) == {
        "layer_0/attn/q_einsum/w": "out in out", "layer_0/attn/kv_einsum/w": "out out in out",
        "layer_0/attn/attn_vec_einsum/w": "in in out", "layer_0/mlp/gating_einsum": "out out in",
        "layer_0/mlp/linear": "in out"}
    assert {t.path for t in lrtt.select(params, "qv")} == {"layer_0/attn/q_einsum/w", "layer_0/attn/kv_einsum/w"}
    method = lrtt.LoRA(rank=2, targets="all-linear")
    factored_and_merged(method, params, random_adapter(method, params), fn, x)


def test_a_preset_that_finds_only_some_of_its_kinds_is_an_error():
    params = _gemma_params()
    del params["layer_0"]["attn"]["kv_einsum"]
    with pytest.raises(ValueError, match=r"(?s)'qv'.*gemma.*v \(.*kv_einsum"):
        lrtt.LoRA(rank=2, targets="qv").init(jax.random.key(0), params)


def test_all_linear_over_a_discovery_leaves_the_head_out():
    params = {"embed": _normal(0, (11, D)), "w1": _normal(1, (D, 6)), "w2": _normal(2, (6, D)),
              "head": _normal(3, (D, 11)), "norm": jnp.ones((D,))}

    def fn(p, ids):
        h = p["embed"][ids]
        h = h + jnp.tanh(h @ p["w1"]) @ p["w2"]
        return (h * p["norm"]) @ p["head"]

    ids = jnp.array([[1, 2, 3]])
    found = lrtt.discover(fn, params, ids)
    method = lrtt.LoRA(rank=2, targets="all-linear", layouts=found)
    adapter = method.init(jax.random.key(0), params)
    assert set(adapter) == {"w1", "w2"}
    assert lrtt.LoRA(rank=2, targets="all-linear", layouts=found) == method  # hashable, comparable
    factored_and_merged(method, params, random_adapter(method, params), fn, ids)


def test_a_kernel_discover_saw_used_two_ways_is_refused_with_both_uses():
    params = {"w": _normal(0, (D, D)), "u": _normal(1, (D, D))}
    fn = lambda p, x: (x @ p["w"]) @ p["u"] + x @ p["w"].T  # noqa: E731
    found = lrtt.discover(fn, params, _normal(2, (3, D)))
    assert [i.path for i in found.conflicts()] == ["w"]
    with pytest.raises(ValueError, match=r"(?s)'w'.*incompatible ways.*dot_general in out.*dot_general out in"):
        lrtt.LoRA(rank=2, targets="w|u", layouts=found).init(jax.random.key(0), params)
    adapter = lrtt.LoRA(rank=2, targets="u", layouts=found).init(jax.random.key(0), params)
    assert set(adapter) == {"u"}
