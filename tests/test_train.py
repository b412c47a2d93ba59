"""`lrtt.train`: jit steps on a tiny GPT-2 (factored and merged forward), accumulation, dropout
keys, schedules, and the sharding rules of the Mesh step (8-device runs: test_multidevice.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import lrtt
from conftest import perturb, tiny_model

METHODS = {
    "lora": lambda **kw: lrtt.LoRA(rank=4, targets="attention", **kw),
    "rep": lambda **kw: lrtt.LorettaRep(rank=4, tt_rank=2, **kw),
}


def _apply(params, batch, rng):
    return tiny_model("gpt2")(batch["input_ids"], params=params, train=False).logits


def _loss(logits, batch):
    ids = batch["input_ids"]
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def _batches(n, size=8):
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, 64, (size, 16), dtype=np.int32)} for _ in range(n)]


_STEPS: dict = {}


def _step(name, forward, accumulate=1, tx=None, donate=True, **method_kw):
    """One compiled step per configuration, shared by the tests (compiling dominates their time)."""
    key = (name, forward, accumulate, tuple(sorted(method_kw.items())), tx is None, donate)
    if key not in _STEPS:
        method = METHODS[name](**method_kw)
        tx = tx or optax.adam(1e-2)
        loss = lrtt.train.make_loss(method, _apply, _loss, forward=forward)
        _STEPS[key] = method, tx, lrtt.train.jit_step(loss, tx, accumulate=accumulate, donate=donate)
    return _STEPS[key]


def _run(name, forward, *, accumulate=1, steps=3):
    method, tx, step = _step(name, forward, accumulate)
    params = tiny_model("gpt2").params
    state = lrtt.train.init_state(method.init(jax.random.key(0), params), tx)
    losses = []
    for batch in _batches(steps):
        state, loss = step(state, params, batch)
        losses.append(float(loss))
    return state, losses


def _max_diff(a, b):
    return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_lora_factored_and_merged_steps_train_the_same_adapter():
    merged, merged_losses = _run("lora", "merged")
    factored, factored_losses = _run("lora", "factored")
    np.testing.assert_allclose(merged_losses, factored_losses, rtol=1e-5)
    assert _max_diff(merged.adapter, factored.adapter) < 1e-5
    assert int(factored.step) == 3
    fresh = METHODS["lora"]().init(jax.random.key(0), tiny_model("gpt2").params)
    assert _max_diff(factored.adapter, fresh) > 1e-3  # it trained


def test_rep_factored_step_trains_every_core():
    state, losses = _run("rep", "factored")
    fresh = METHODS["rep"]().init(jax.random.key(0), tiny_model("gpt2").params)
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state.adapter), jax.tree.leaves(fresh))]
    assert min(moved) > 1e-4  # zero_delta init: the zero core first, then all the others
    assert losses[-1] < losses[0]


def test_gradient_accumulation_equals_the_full_batch_step():
    full, full_losses = _run("lora", "merged")
    micro, micro_losses = _run("lora", "merged", accumulate=2)
    np.testing.assert_allclose(full_losses, micro_losses, rtol=1e-5)
    assert _max_diff(full.adapter, micro.adapter) < 1e-5
    with pytest.raises(ValueError, match="accumulate"):
        lrtt.train.jit_step(lambda *a: 0.0, optax.sgd(1.0), accumulate=0)


def test_params_are_an_argument_not_a_constant_and_the_state_is_donated():
    method, tx, step = _step("lora", "merged")
    params = tiny_model("gpt2").params
    adapter = method.init(jax.random.key(0), params)
    state = lrtt.train.init_state(adapter, tx)
    batch = _batches(1)[0]
    closed = jax.make_jaxpr(step)(state, params, batch)
    inner = closed.eqns[0].params["jaxpr"]
    big = [c for c in list(closed.consts) + list(inner.consts) if np.size(c) >= 32 * 32]
    assert big == []  # no frozen weight baked into the program

    cache_size = step._cache_size()
    old_leaf = jax.tree.leaves(state.adapter)[0]
    _, loss_a = step(state, params, batch)
    assert old_leaf.is_deleted()  # donated
    assert not any(x.is_deleted() for x in jax.tree.leaves(adapter))  # the state held a copy
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))  # params never donated
    other = jax.tree.map(lambda x: x * 1.01, params)
    _, loss_b = step(lrtt.train.init_state(method.init(jax.random.key(0), params), tx), other, batch)
    assert float(loss_a) != float(loss_b)
    assert step._cache_size() == max(cache_size, 1)  # one compiled step serves any params


def test_dropout_keys_fold_the_step_and_are_reproducible():
    sgd0 = optax.sgd(0.0)  # the adapter stays put: only the dropout key changes the loss
    method, tx, step = _step("lora", "factored", tx=sgd0, donate=False, dropout=0.5)
    params = tiny_model("gpt2").params
    adapter = perturb(method.init(jax.random.key(0), params), jax.random.key(1), scale=0.5)

    def losses(seed):
        state, batch, out = lrtt.train.init_state(adapter, tx, seed), _batches(1)[0], []
        for _ in range(3):
            state, loss = step(state, params, batch)
            out.append(float(loss))
        return out

    a, b, c = losses(0), losses(0), losses(1)
    assert a == b  # same rng, same masks
    assert len(set(a)) == 3  # a new mask each step (fold_in(rng, step))
    assert a != c


def test_adamw_schedule_is_warmup_then_cosine():
    tx = lrtt.train.adamw(1.0, warmup=2, total=6)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    seen = []
    for _ in range(6):
        updates, state = tx.update({"w": jnp.ones(3)}, state, params)
        seen.append(-float(updates["w"][0]))  # Adam's step on a constant gradient is the lr
    expected = [float(optax.warmup_cosine_decay_schedule(0.0, 1.0, 2, 6, end_value=0.0)(i)) for i in range(6)]
    np.testing.assert_allclose(seen, expected, rtol=1e-4, atol=1e-6)  # Adam's eps
    flat = lrtt.train.adamw(0.5, warmup=2)
    state = flat.init(params)
    seen = []
    for _ in range(4):
        updates, state = flat.update({"w": jnp.ones(3)}, state, params)
        seen.append(-float(updates["w"][0]))
    np.testing.assert_allclose(seen, [0.0, 0.25, 0.5, 0.5], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="must exceed `warmup`"):
        lrtt.train.adamw(1.0, warmup=5, total=5)


def test_make_loss_errors():
    with pytest.raises(ValueError, match="`forward` must be one of"):
        lrtt.train.make_loss(METHODS["lora"](), _apply, _loss, forward="dense")
    with pytest.raises(ValueError, match="cannot apply the adapter's dropout"):
        lrtt.train.make_loss(METHODS["lora"](dropout=0.1), _apply, _loss, forward="merged")
    with pytest.raises(ValueError, match="cannot be merged"):
        lrtt.train.make_loss(lrtt.LorettaAdp(), _apply, _loss, forward="merged")


# --- sharding rules (no devices needed: specs only) -----------------------------------------


def _mesh(**axes):
    return AbstractMesh(tuple(axes.values()), tuple(axes))


def _specs(tree):
    return dict(lrtt._paths.named_leaves(tree, is_leaf=lambda x: isinstance(x, P)))


def test_lora_factors_inherit_the_in_and_out_sharding_of_their_kernel():
    params = {
        "dense": {"kernel": jnp.zeros((16, 24))},  # (in, out)
        "stacked": {"kernel": jnp.zeros((3, 16, 24))},  # (layer, in, out)
    }
    method = lrtt.LoRA(rank=4, targets=r"kernel$", layouts={"stacked": "layer in out"})
    mesh = _mesh(x=2, y=4)
    rules = {r"^dense/kernel$": P("x", "y"), r"^stacked/kernel$": P(None, "x", "y")}
    specs = _specs(lrtt.train.adapter_specs(method, params, lrtt.train.param_specs(params, mesh, rules)))
    assert specs["dense/kernel/a"] == P("x", None) and specs["dense/kernel/b"] == P(None, "y")
    assert specs["stacked/kernel/a"] == P(None, "x", None) and specs["stacked/kernel/b"] == P(None, None, "y")


def test_tensor_parallel_preset_on_gpt2_reads_conv1d_as_out_in():
    params = tiny_model("gpt2").params
    mesh = _mesh(data=2, model=2)
    p_specs = lrtt.train.param_specs(params, mesh, "tensor")
    flat = _specs(p_specs)
    assert flat["transformer/h/0/attn/c_attn/kernel"] == P("model", None)  # (out, in): out split
    assert flat["transformer/h/0/attn/c_attn/bias"] == P("model")
    assert flat["transformer/h/0/attn/c_proj/kernel"] == P(None, "model")  # row-parallel: in split
    assert flat["transformer/wte/embedding"] == P()
    lora = _specs(lrtt.train.adapter_specs(METHODS["lora"](), params, p_specs))
    assert lora["transformer/h/0/attn/c_attn/kernel/a"] == P(None, None)
    assert lora["transformer/h/0/attn/c_attn/kernel/b"] == P(None, "model")
    assert lora["transformer/h/0/attn/c_proj/kernel/a"] == P("model", None)
    assert lora["transformer/h/0/attn/c_proj/kernel/b"] == P(None, None)
    rep = _specs(lrtt.train.adapter_specs(METHODS["rep"](), params, p_specs))
    assert set(rep.values()) == {P()}  # TT cores are small: replicated


def test_fsdp_preset_and_rule_errors():
    params = tiny_model("gpt2").params
    flat = _specs(lrtt.train.param_specs(params, _mesh(data=8), "fsdp"))
    assert flat["transformer/h/0/mlp/c_fc/kernel"] == P("data", None)  # (128, 32): largest axis
    assert flat["transformer/h/0/mlp/c_proj/kernel"] == P(None, "data")  # (32, 128)
    assert flat["transformer/h/0/ln_1/scale"] == P(None)
    with pytest.raises(ValueError, match="names mesh axes"):
        lrtt.train.param_specs(params, _mesh(data=2), {r"c_attn/kernel$": P("model", None)})
    with pytest.raises(ValueError, match="does not divide"):
        lrtt.train.param_specs(params, _mesh(data=5), {r"c_attn/kernel$": P("data", None)})
    with pytest.raises(ValueError, match="'model'"):
        lrtt.train.param_specs(params, _mesh(data=2), "tensor")
    with pytest.raises(ValueError, match="`rules` must be one of"):
        lrtt.train.param_specs(params, _mesh(data=2), "zero3")


def test_tensor_parallel_preset_follows_the_family_kinds_on_multi_axis_kernels():
    """Gemma (``gemma`` package names): q_einsum ``(N, D, H)`` splits its heads, kv_einsum
    ``(2, K, D, H)`` the first out axis ``model`` divides (K when 2 does not divide), the
    output einsum ``(N, H, D)`` its heads (row-parallel), the MLP as gate/up column, down row."""
    s = jax.ShapeDtypeStruct
    layer = {
        "attn": {"q_einsum": {"w": s((4, 16, 8), jnp.float32)}, "kv_einsum": {"w": s((2, 4, 16, 8), jnp.float32)},
                 "attn_vec_einsum": {"w": s((4, 8, 16), jnp.float32)}},
        "mlp": {"gating_einsum": s((2, 32, 16), jnp.float32), "linear": s((32, 16), jnp.float32)},
    }
    params = {"layer_0": layer, "embedder": {"input_embedding": s((64, 16), jnp.float32)}}
    flat = _specs(lrtt.train.param_specs(params, _mesh(data=1, model=4), "tensor"))
    assert flat["layer_0/attn/q_einsum/w"] == P("model", None, None)
    assert flat["layer_0/attn/kv_einsum/w"] == P(None, "model", None, None)  # 2 % 4 != 0: K split
    assert flat["layer_0/attn/attn_vec_einsum/w"] == P("model", None, None)
    assert flat["layer_0/mlp/gating_einsum"] == P(None, "model", None)  # (2, F, D): F split
    assert flat["layer_0/mlp/linear"] == P("model", None)  # down: in (F) split
    assert flat["embedder/input_embedding"] == P()
