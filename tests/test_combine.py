"""lrtt._combine.combine (PEFT's add_weighted_adapter): each `how` against a dense numpy reference,
LorettaRep and stacked (nn.scan) leaves, the returned method with merge / wrap, and the refusals.
No torch: tests/test_combine_peft.py checks the same factors against peft itself."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrtt
from lrtt._combine import combine
from lrtt._paths import named_leaves

Q, V = "attn/q_proj/kernel", "attn/v_proj/kernel"
PARAMS = {"attn": {"q_proj": {"kernel": jnp.full((16, 12), 0.5)}, "v_proj": {"kernel": jnp.full((16, 8), -0.25)}},
          "norm": {"scale": jnp.ones((16,))}}
STACKED = {"layers": {"mlp": {"kernel": jnp.full((3, 16, 12), 0.5)}}}
SCAN = dict(targets=r"mlp/kernel$", layouts={r"mlp/kernel$": "layer in out"})
ATOL = 1e-6


def trained(method, params, seed):
    """``method.init`` with every factor / core replaced by N(0, 0.5²) noise (B != 0, as after training)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(method.init, jax.random.key(seed), params)  # no init compiled: fast
    return jax.tree.map(lambda x: jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype), shapes)


def dense(method, params, adapter):
    """``{path: ΔW}`` in float64 numpy (lrtt.delta)."""
    return {p: np.asarray(d, np.float64) for p, d in lrtt.delta(method, params, adapter).items()}


def weighted_sum(methods, params, adapters, weights):
    out = {}
    for m, a, w in zip(methods, adapters, weights):
        for p, d in dense(m, params, a).items():
            out[p] = out.get(p, 0.0) + w * d
    return out


def three_loras():
    """Three LoRA adapters of ranks 2, 3 (alpha 6) and 4 (rslora, a rank_pattern)."""
    methods = [lrtt.LoRA(rank=2, targets="q_proj|v_proj"),
               lrtt.LoRA(rank=3, alpha=6.0, targets="q_proj|v_proj"),
               lrtt.LoRA(rank=4, alpha=3.0, rslora=True, rank_pattern={"v_proj": 1}, targets="q_proj|v_proj")]
    return methods, [trained(m, PARAMS, seed) for seed, m in enumerate(methods)]


def np_factors(adapter, path):
    e = lrtt.entries(adapter)[path]
    a, b = e.factor_matrices()
    return np.asarray(a, np.float64), np.asarray(b, np.float64), e.scale


def np_truncated(m, k):
    """Best rank-k approximation of each matrix of ``m`` (numpy, float64) and its relative error."""
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    approx = (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]
    return approx, math.sqrt((s[..., k:] ** 2).sum() / (s ** 2).sum())


def assert_usable(lora, params, adapter, want):
    """merge, wrap + factored and delta of the returned method all give W0 + ``want``."""
    merged = lrtt.merge(lora, params, adapter)
    wrapped = lrtt.wrap(lora, params, adapter)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16)), jnp.float32)
    for path, dw in want.items():
        w0 = np.asarray(dict(named_leaves(params))[path])
        got = np.asarray(dict(named_leaves(merged))[path])
        np.testing.assert_allclose(got, w0 + dw, rtol=0, atol=1e-5)
        fn = lambda p, x: x @ functools.reduce(lambda t, k: t[k], path.split("/"), p)  # noqa: E731
        if w0.ndim == 2:
            np.testing.assert_allclose(lrtt.factored(fn)(wrapped, x), np.asarray(x) @ (w0 + dw), rtol=0, atol=1e-5)


# --- cat ----------------------------------------------------------------------------------------


def test_cat_is_the_exact_weighted_sum_at_the_summed_rank():
    methods, adapters = three_loras()
    weights = [0.7, -1.3, 0.4]
    lora, out, error = combine(methods, adapters, weights, how="cat", return_error=True)
    want = weighted_sum(methods, PARAMS, adapters, weights)
    got = dense(lora, PARAMS, out)
    for path in (Q, V):
        np.testing.assert_allclose(got[path], want[path], rtol=0, atol=ATOL)
        assert error[path] < 1e-6
    assert [lrtt.entries(out)[p].a.shape[-1] for p in (Q, V)] == [9, 6]
    assert lora.rank == 9 and lora.rank_for(V) == 6 and lora.scale_for(Q) == lora.scale_for(V) == 1.0
    assert lora.targets == methods[0].targets and not lora.rslora
    assert_usable(lora, PARAMS, out, want)


def test_cat_factors_are_peft_s():
    """A' = [w_i s_i A_i] along the rank axis, B' = [B_i] (PEFT's lora_A rows scaled, lora_B columns)."""
    methods, adapters = three_loras()
    weights = [0.7, -1.3, 0.4]
    _, out = combine(methods, adapters, weights, how="cat")
    a, b, _ = np_factors(out, Q)
    parts = [np_factors(ad, Q) for ad in adapters]
    np.testing.assert_allclose(a, np.concatenate([w * s * pa for w, (pa, _, s) in zip(weights, parts)], -1), atol=ATOL)
    np.testing.assert_allclose(b, np.concatenate([pb for _, pb, _ in parts], -2), atol=ATOL)


# --- linear -------------------------------------------------------------------------------------


def test_linear_is_peft_s_sqrt_weighted_factor_sum():
    methods = [lrtt.LoRA(rank=3, alpha=a, targets="q_proj|v_proj") for a in (3.0, 6.0, 1.5)]
    adapters = [trained(m, PARAMS, seed) for seed, m in enumerate(methods)]
    weights = [0.5, -2.0, 1.0]
    lora, out, error = combine(methods, adapters, weights, how="linear", return_error=True)
    for path in (Q, V):
        parts = [np_factors(ad, path) for ad in adapters]
        ws = [w * s for w, (_, _, s) in zip(weights, parts)]
        a_ref = sum(np.sign(x) * math.sqrt(abs(x)) * pa for x, (pa, _, _) in zip(ws, parts))
        b_ref = sum(math.sqrt(abs(x)) * pb for x, (_, pb, _) in zip(ws, parts))
        a, b, scale = np_factors(out, path)
        np.testing.assert_allclose(a, a_ref, rtol=0, atol=ATOL)
        np.testing.assert_allclose(b, b_ref, rtol=0, atol=ATOL)
        assert scale == 1.0 and a.shape[-1] == 3
        exact = weighted_sum(methods, PARAMS, adapters, weights)[path]
        assert error[path] == pytest.approx(np.linalg.norm(a_ref @ b_ref - exact) / np.linalg.norm(exact), rel=1e-4)
        assert error[path] > 0.1  # the cross terms A_i B_j: linear is not the weighted sum
    assert lora.rank == 3 and lora.rank_pattern == ()
    assert_usable(lora, PARAMS, out, {p: np_factors(out, p)[0] @ np_factors(out, p)[1] for p in (Q, V)})


def test_linear_of_one_adapter_is_its_weighted_delta():
    method = lrtt.LoRA(rank=3, alpha=6.0, targets="q_proj|v_proj")
    adapter = trained(method, PARAMS, 0)
    lora, out, error = combine(method, [adapter], [-0.6], how="linear", return_error=True)
    want = {p: -0.6 * d for p, d in dense(method, PARAMS, adapter).items()}
    for path, dw in dense(lora, PARAMS, out).items():
        np.testing.assert_allclose(dw, want[path], rtol=0, atol=ATOL)
        assert error[path] < 1e-6


def test_linear_refuses_different_ranks_naming_them():
    methods, adapters = three_loras()
    with pytest.raises(ValueError, match=r"same rank; got ranks \[2, 3, 4\] at 'attn/q_proj/kernel'.*how='cat'"):
        combine(methods, adapters, [1.0, 1.0, 1.0], how="linear")


# --- svd ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [5, 8])
def test_svd_at_the_rank_of_the_sum_is_the_exact_sum(rank):
    methods, adapters = three_loras()
    methods, adapters, weights = methods[:2], adapters[:2], [0.7, -1.3]  # ranks 2 + 3: the sum has rank 5
    lora, out, error = combine(methods, adapters, weights, how="svd", rank=rank, return_error=True)
    want = weighted_sum(methods, PARAMS, adapters, weights)
    got = dense(lora, PARAMS, out)
    for path in (Q, V):
        np.testing.assert_allclose(got[path], want[path], rtol=0, atol=1e-5)
        assert error[path] < 1e-6
    assert lora.rank == rank and lora.rank_pattern == ()
    assert_usable(lora, PARAMS, out, want)


@pytest.mark.parametrize("rank", [1, 3])
def test_svd_is_the_numpy_truncated_svd_with_its_error(rank):
    methods, adapters = three_loras()
    weights = [0.7, -1.3, 0.4]
    lora, out, error = combine(methods, adapters, weights, how="svd", rank=rank, return_error=True)
    want = weighted_sum(methods, PARAMS, adapters, weights)
    got = dense(lora, PARAMS, out)
    for path in (Q, V):
        approx, rel = np_truncated(want[path], rank)
        np.testing.assert_allclose(got[path], approx, rtol=0, atol=1e-5)
        assert error[path] == pytest.approx(rel, rel=1e-4, abs=1e-6)
        assert rel > 0.05  # a real truncation
        a, b, _ = np_factors(out, path)
        np.testing.assert_allclose(a.T @ a, np.eye(rank), atol=1e-5)  # A' = U: orthonormal; S on B'
        s = np.linalg.svd(want[path], compute_uv=False)[:rank]
        np.testing.assert_allclose(np.linalg.norm(b, axis=-1), s, rtol=1e-5)
    assert lora.rank == rank


def test_svd_default_rank_is_the_largest_input_rank():
    methods, adapters = three_loras()  # ranks 2, 3, 4 (v: 2, 3, 1)
    lora, out = combine(methods, adapters, [1.0, 1.0, 1.0])  # how="svd" by default, as PEFT
    assert [lrtt.entries(out)[p].a.shape[-1] for p in (Q, V)] == [4, 4] and lora.rank == 4


def test_svd_default_rank_is_capped_per_leaf():
    params = {"a": {"kernel": jnp.ones((16, 12))}, "b": {"kernel": jnp.ones((16, 3))}}
    method = lrtt.LoRA(rank=6, rank_pattern={"^b/": 2}, targets="kernel")
    adapters = [trained(method, params, s) for s in (0, 1)]
    lora, out, error = combine(method, adapters, [1.0, 0.5], return_error=True)
    assert lrtt.entries(out)["b/kernel"].a.shape == (16, 3) and lora.rank_for("b/kernel") == 3
    assert lrtt.entries(out)["a/kernel"].a.shape == (16, 6) and lora.rank == 6
    assert error["b/kernel"] < 1e-6 < 0.05 < error["a/kernel"]  # min(in, out): exact; a: rank 6 of 12
    want = weighted_sum([method] * 2, params, adapters, [1.0, 0.5])
    assert_usable(lora, params, out, {"a/kernel": np_truncated(want["a/kernel"], 6)[0], "b/kernel": want["b/kernel"]})


def test_svd_clamp_clips_to_the_quantile_of_the_factors():
    methods, adapters = three_loras()
    weights = [0.7, -1.3, 0.4]
    _, plain = combine(methods, adapters, weights, rank=3)
    _, clamped = combine(methods, adapters, weights, rank=3, clamp=0.9)
    a, b, _ = np_factors(plain, Q)
    hi = np.quantile(np.concatenate([b.ravel(), a.ravel()]), 0.9)
    ca, cb, _ = np_factors(clamped, Q)
    np.testing.assert_allclose(ca, np.clip(a, -hi, hi), atol=ATOL)
    np.testing.assert_allclose(cb, np.clip(b, -hi, hi), atol=ATOL)
    assert (np.abs(cb) < np.abs(b) - 1e-3).any()  # something was clipped


# --- LorettaRep, stacked leaves -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["cat", "svd", "linear"])
def test_loretta_rep_adapters_combine_as_the_lora_they_equal(how):
    method = lrtt.LorettaRep(rank=4, alpha=8.0, tt_rank=2, targets="q_proj|v_proj")
    adapters = [trained(method, PARAMS, s) for s in (0, 1)]
    weights = [0.8, -0.5]
    lora, out, error = combine(method, adapters, weights, how=how, rank=8 if how == "svd" else None, return_error=True)
    assert isinstance(lora, lrtt.LoRA) and all(isinstance(e, lrtt.LoraFactors) for e in lrtt.entries(out).values())
    want = weighted_sum([method] * 2, PARAMS, adapters, weights)
    if how == "linear":
        parts = [np_factors(ad, Q) for ad in adapters]
        a_ref = sum(np.sign(w * s) * math.sqrt(abs(w * s)) * pa for w, (pa, _, s) in zip(weights, parts))
        np.testing.assert_allclose(np_factors(out, Q)[0], a_ref, rtol=0, atol=ATOL)
        return
    for path, dw in dense(lora, PARAMS, out).items():
        np.testing.assert_allclose(dw, want[path], rtol=0, atol=1e-5)
        assert error[path] < 1e-6
    assert lora.targets == method.targets
    assert_usable(lora, PARAMS, out, want)


def test_stacked_layers_are_combined_per_layer():
    methods = [lrtt.LoRA(rank=2, **SCAN), lrtt.LoRA(rank=3, alpha=1.0, **SCAN)]
    adapters = [trained(m, STACKED, s) for s, m in enumerate(methods)]
    weights = [1.5, -0.5]
    path = "layers/mlp/kernel"
    want = weighted_sum(methods, STACKED, adapters, weights)[path]
    lora, out, error = combine(methods, adapters, weights, how="cat", return_error=True)
    assert lrtt.entries(out)[path].a.shape == (3, 16, 5) and lora.layouts == methods[0].layouts
    np.testing.assert_allclose(dense(lora, STACKED, out)[path], want, rtol=0, atol=ATOL)
    assert_usable(lora, STACKED, out, {path: want})
    lora, out, error = combine(methods, adapters, weights, how="svd", rank=2, clamp=0.95, return_error=True)
    _, unclamped, plain_error = combine(methods, adapters, weights, how="svd", rank=2, return_error=True)
    approx, rel = np_truncated(want, 2)
    np.testing.assert_allclose(dense(lora, STACKED, unclamped)[path], approx, rtol=0, atol=1e-5)
    assert plain_error[path] == pytest.approx(rel, rel=1e-4)
    a, b, _ = np_factors(unclamped, path)
    ca, cb, _ = np_factors(out, path)
    for layer in range(3):  # PEFT's quantile is per module: per layer here
        hi = np.quantile(np.concatenate([b[layer].ravel(), a[layer].ravel()]), 0.95)
        np.testing.assert_allclose(ca[layer], np.clip(a[layer], -hi, hi), atol=ATOL)
        np.testing.assert_allclose(cb[layer], np.clip(b[layer], -hi, hi), atol=ATOL)


def test_missing_zero_combines_each_leaf_from_the_adapters_that_have_it():
    q_only, both = lrtt.LoRA(rank=2, targets="q_proj"), lrtt.LoRA(rank=2, targets="q_proj|v_proj")
    adapters = [trained(q_only, PARAMS, 0), trained(both, PARAMS, 1)]
    weights = [0.5, 2.0]
    with pytest.raises(ValueError, match=r"adapter 0 lacks \['attn/v_proj/kernel'\].*missing='zero'"):
        combine([q_only, both], adapters, weights, how="cat")
    lora, out = combine([q_only, both], adapters, weights, how="cat", missing="zero")
    want = weighted_sum([q_only, both], PARAMS, adapters, weights)
    got = dense(lora, PARAMS, out)
    np.testing.assert_allclose(got[V], want[V], rtol=0, atol=ATOL)
    np.testing.assert_allclose(got[Q], want[Q], rtol=0, atol=ATOL)
    assert lora.rank == 4 and lora.rank_for(V) == 2
    assert_usable(lora, PARAMS, out, want)


def test_flat_entries_and_config_round_trip():
    methods, adapters = three_loras()
    flat = [lrtt.entries(a) for a in adapters]
    lora, out = combine(methods, flat, [1.0, 2.0, 3.0], how="cat")
    assert lrtt.Method.from_config(lora.to_config()) == lora
    assert jax.tree.structure(out) == jax.tree.structure(jax.eval_shape(lora.init, jax.random.key(0), PARAMS))


def test_dtype_is_kept():
    method = lrtt.LoRA(rank=2, targets="q_proj", param_dtype=jnp.bfloat16)
    adapters = [trained(method, PARAMS, s) for s in (0, 1)]
    lora, out = combine(method, adapters, [1.0, 1.0], how="svd")
    assert lrtt.entries(out)[Q].a.dtype == jnp.bfloat16 and lora.param_dtype == jnp.bfloat16


# --- refusals -----------------------------------------------------------------------------------


def _one():
    method = lrtt.LoRA(rank=2, targets="q_proj|v_proj")
    return method, trained(method, PARAMS, 0)


@pytest.mark.parametrize("adapters, weights, kwargs, match", [
    ([], [], {}, "`adapters` is empty"),
    (2, [1.0], {}, "2 adapters but 1 weights"),
    (2, [1.0, float("nan")], {}, r"weights\[1\] = nan is not finite"),
    (1, [float("inf")], {}, r"weights\[0\] = inf is not finite"),
    (1, ["1"], {}, r"weights\[0\] = '1' is not a real number"),
    (1, [1.0], dict(how="ties"), "`how` must be one of"),
    (1, [1.0], dict(how="cat", rank=2), "`rank` applies to how='svd' only"),
    (1, [1.0], dict(how="linear", clamp=0.5), "`clamp` applies to how='svd' only"),
    (1, [1.0], dict(rank=9), r"svd `rank`=9 is larger than min\(in, out\) of 1 leaves, e.g. 'attn/v_proj/kernel'"),
    (1, [1.0], dict(rank=0), "`rank` must be a positive int"),
    (1, [1.0], dict(clamp=1.5), r"`clamp` must be a quantile in \[0, 1\]"),
    (1, [1.0], dict(missing="skip"), "`missing` must be one of"),
])
def test_bad_arguments_are_refused(adapters, weights, kwargs, match):
    method, adapter = _one()
    with pytest.raises(ValueError, match=match):
        combine(method, [adapter] * adapters if isinstance(adapters, int) else adapters, weights, **kwargs)


def test_mixed_methods_are_refused():
    method, adapter = _one()
    rep = lrtt.LorettaRep(rank=2, tt_rank=2, targets="q_proj|v_proj")
    with pytest.raises(ValueError, match=r"different methods \['LoRA', 'LorettaRep'\].*how='cat'"):
        combine([method, rep], [adapter, trained(rep, PARAMS, 1)], [1.0, 1.0])
    with pytest.raises(ValueError, match="adapter 1 has entries that are not LoraFactors"):
        combine(method, [adapter, trained(rep, PARAMS, 1)], [1.0, 1.0])
    adp = lrtt.LorettaAdp(targets="q_proj")
    with pytest.raises(ValueError, match="LoRA or LorettaRep adapters, got a LorettaAdp"):
        combine(adp, [adapter], [1.0])
    with pytest.raises(ValueError, match="got 1 methods for 2 adapters"):
        combine([method], [adapter, adapter], [1.0, 1.0])
    other = lrtt.LoRA(rank=2, targets="q_proj|v_proj", layouts={"q_proj": "in out"})
    with pytest.raises(ValueError, match="different `layouts`"):
        combine([method, other], [adapter, adapter], [1.0, 1.0])


def test_trainable_entries_are_refused_with_peft_s_behaviour():
    method = lrtt.LoRA(rank=2, targets="q_proj", trainable="norm")
    adapter = trained(method, PARAMS, 0)
    with pytest.raises(ValueError, match=r"adapter 0 trains leaves in full .*\['norm/scale'\].*untrained copy"):
        combine(method, [adapter, adapter], [1.0, 1.0])
    low_rank = {p: e for p, e in lrtt.entries(adapter).items() if not isinstance(e, lrtt.Trainable)}
    lora, out = combine(method, [low_rank, low_rank], [1.0, 1.0], how="cat")  # the fix the message gives
    assert set(lrtt.entries(out)) == {Q} and lora.trainable == ()


def test_different_shapes_and_too_large_cat_ranks_are_refused():
    method, adapter = _one()
    other_params = {"attn": {"q_proj": {"kernel": jnp.ones((16, 10))}, "v_proj": {"kernel": jnp.ones((16, 8))}}}
    with pytest.raises(ValueError, match=r"factors of 'attn/q_proj/kernel' are of different matrices"):
        combine(method, [adapter, trained(method, other_params, 1)], [1.0, 1.0])
    big = lrtt.LoRA(rank=6, targets="q_proj|v_proj")
    with pytest.raises(ValueError, match=r"gives 'attn/v_proj/kernel' rank 12 .* how='svd', rank=8"):
        combine(big, [trained(big, PARAMS, s) for s in (0, 1)], [1.0, 1.0], how="cat")
    with pytest.raises(ValueError, match="adapter 0 has no entries"):
        combine(method, [{}], [1.0])
