"""Many adapters on one base (lrtt.stack): each batch row with its own adapter, equal to running
the row alone with that adapter — outputs, gradients, a training step, generation — plus slot
updates that compile nothing and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrtt
import lrtt.models
from conftest import quick_jit

CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32,
              intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def llama():
    model = lrtt.models.Model.from_config(CONFIG)
    return model, model.init(0), jax.jit(lrtt.factored(model))  # tests call it inside one quick_jit each


def _noisy(method, params, seed, amount=0.05):
    """A trained-looking adapter: method.init plus noise (B = 0 would make every member the base).
    The noise is numpy's: jax.random would compile one program per leaf shape, eagerly."""
    adapter = method.init(jax.random.key(seed), params)
    rng = np.random.default_rng(100 + seed)
    return jax.tree.map(lambda x: x + (amount * rng.standard_normal(x.shape)).astype(x.dtype), adapter)


def _members(params):
    """Three LoRA adapters of ranks 4, 2, 4 and two scales (alpha 8 / alpha 2), and three LorettaRep ones."""
    lora = [(lrtt.LoRA(rank=4, alpha=8, targets="all-linear"), 0), (lrtt.LoRA(rank=2, alpha=2, targets="all-linear"), 1),
            (lrtt.LoRA(rank=4, alpha=8, targets="all-linear"), 2)]
    rep = lrtt.LorettaRep(rank=4, tt_rank=3, targets="all-linear", initializer="gaussian")
    return {
        "lora": (lora[0][0], [_noisy(m, params, s) for m, s in lora]),
        "loretta_rep": (rep, [_noisy(rep, params, s, 0.02) for s in range(3)]),
    }


def _max_rel(x, y):
    return float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))


@pytest.mark.parametrize("kind", ["lora", "loretta_rep"])
def test_each_row_runs_with_its_own_adapter(llama, kind):
    model, params, apply = llama
    method, adapters = _members(params)[kind]
    stacked = lrtt.stack(method, adapters)
    tokens = jax.random.randint(jax.random.key(3), (5, 7), 0, 64)
    ids = np.array([2, -1, 0, 2, 1], np.int32)

    @quick_jit  # one compile for the stack and every row alone
    def mixed_and_alone(params, stacked, adapters):
        out = apply(lrtt.wrap(method, params, stacked, adapter_ids=ids), tokens)
        alone = [model(params, tokens[row:row + 1]) if k < 0 else
                 apply(lrtt.wrap(method, params, adapters[k]), tokens[row:row + 1]) for row, k in enumerate(ids)]
        return out, alone

    out, alone = mixed_and_alone(params, stacked, adapters)
    for row, k in enumerate(ids):
        assert _max_rel(out[row], alone[row][0]) < 1e-5, (row, k)
    # a member of another rank / scale really differs from the others (the test can fail)
    assert _max_rel(out[4], out[2]) > 1e-3


@pytest.mark.parametrize("kind", ["lora", "loretta_rep"])
def test_gradients_of_a_mixed_batch_are_each_members_own(llama, kind):
    model, params, apply = llama
    method, adapters = _members(params)[kind]
    stacked = lrtt.stack(method, adapters)
    tokens = jax.random.randint(jax.random.key(4), (4, 6), 0, 64)
    ids = np.array([2, 0, 2, -1], np.int32)

    probe = jax.random.normal(jax.random.key(6), (4, 6, 64))  # a linear loss: float error not amplified

    def mixed(stacked):
        return jnp.sum(apply(lrtt.wrap(method, params, stacked, adapter_ids=ids), tokens) * probe)

    def alone(adapter, rows):
        return jnp.sum(apply(lrtt.wrap(method, params, adapter), tokens[rows]) * probe[rows])

    members = ((0, [1]), (2, [0, 2]))

    @quick_jit  # one compile for the mixed gradient and each member's own
    def gradients(stacked):
        return jax.grad(mixed)(stacked), [jax.grad(alone)(lrtt.member(stacked, k), np.array(rows)) for k, rows in members]

    grads, expected_grads = gradients(stacked)
    tolerance = 1e-5 if kind == "lora" else 5e-5  # TT cores: products of float32 cores (2e-5 seen)
    for (k, rows), expected in zip(members, expected_grads):
        for g, e in zip(jax.tree.leaves(grads.tree), jax.tree.leaves(expected)):
            assert _max_rel(g[k], e) < tolerance
    assert all(float(jnp.max(jnp.abs(g[1]))) == 0.0 for g in jax.tree.leaves(grads.tree))  # member 1: no rows


def test_one_step_trains_every_member_on_its_own_rows(llama):
    """One Adam step of the stack over a mixed batch (the loss a sum of per-member means) equals a
    separate step of each member on its own rows, with its own optimizer state."""
    model, params, apply = llama
    method, adapters = _members(params)["lora"]
    stacked = lrtt.stack(method, adapters)
    tokens = jax.random.randint(jax.random.key(5), (6, 6), 0, 64)
    ids = np.array([0, 1, 2, 0, 2, 1], np.int32)
    optimizer = optax.adam(1e-2)

    def row_losses(logits):
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2, axis=-1)  # any per-row loss

    def mixed(stacked):
        losses = row_losses(apply(lrtt.wrap(method, params, stacked, adapter_ids=ids), tokens))
        return sum(jnp.mean(losses[ids == k]) for k in range(3))

    def step(adapter, loss):
        updates, _ = optimizer.update(jax.grad(loss)(adapter), optimizer.init(adapter), adapter)
        return optax.apply_updates(adapter, updates)

    def alone(k):
        return lambda adapter: jnp.mean(row_losses(apply(lrtt.wrap(method, params, adapter), tokens[ids == k])))

    @quick_jit  # one compile for the stack's step and each member's own
    def steps(stacked):
        return step(stacked, mixed), [step(lrtt.member(stacked, k), alone(k)) for k in range(3)]

    stepped, expected_members = steps(stacked)
    for k, expected in enumerate(expected_members):
        for x, e in zip(jax.tree.leaves(lrtt.member(stepped, k)), jax.tree.leaves(expected)):
            np.testing.assert_allclose(x, e, rtol=1e-5, atol=1e-7)


def test_swapping_adapters_and_loading_a_slot_compile_nothing(llama):
    model, params, apply = llama
    method, adapters = _members(params)["lora"]
    traces = []

    @jax.jit
    def forward(params, adapter, tokens):
        traces.append(1)
        return apply(lrtt.wrap(method, params, adapter), tokens)

    tokens = jnp.ones((2, 5), jnp.int32)
    one, three = forward(params, adapters[0], tokens), forward(params, adapters[2], tokens)  # same shapes
    assert len(traces) == 1 and _max_rel(one, three) > 1e-3

    @jax.jit
    def mixed(params, stacked, ids, tokens):
        traces.append(2)
        return apply(lrtt.wrap(method, params, stacked, adapter_ids=ids), tokens)

    stacked = lrtt.stack(method, adapters[:2], capacity=4)  # slots 2, 3 empty: the base
    ids = np.array([2, 0], np.int32)
    before = mixed(params, stacked, ids, tokens)
    np.testing.assert_allclose(before[0], model(params, tokens[:1])[0], rtol=1e-5, atol=1e-6)
    load = jax.jit(lrtt.set_member)
    stacked = load(stacked, 2, adapters[2])
    stacked = load(stacked, 3, adapters[0])  # a traced slot: one compile for every slot
    after = mixed(params, stacked, ids, tokens)
    assert traces.count(2) == 1
    np.testing.assert_allclose(after[0], three[0], rtol=1e-5, atol=1e-6)  # slot 2 holds adapters[2]
    assert load._cache_size() == 1


def test_generation_per_prompt_equals_each_prompt_alone_merged(llama):
    model, params, apply = llama
    method, adapters = _members(params)["lora"]
    adapters = [jax.tree.map(lambda x: 10 * x, a) for a in adapters]  # strong enough to change the tokens
    stacked = lrtt.stack(method, adapters)
    prompts = [[1, 5, 9, 3], [1, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 4, 4]]
    ids = np.array([1, 0, -1, 2], np.int32)
    out = lrtt.models.generate(model, params, prompts, max_new_tokens=8, eos_token_id=[],
                               adapters=(method, stacked), adapter_ids=ids)
    wrapped = lrtt.models.generate(model, lrtt.wrap(method, params, stacked, adapter_ids=ids), prompts,
                                   max_new_tokens=8, eos_token_id=[], apply=lrtt.factored(model))
    assert wrapped == out  # the keyword is lrtt.wrap's ids, factored
    texts = set()
    for prompt, k, got in zip(prompts, ids, out):
        base = params if k < 0 else lrtt.merge(method, params, adapters[k])
        alone = lrtt.models.generate(model, base, [prompt], max_new_tokens=8, eos_token_id=[])[0]
        assert got == alone, (k, got, alone)
        texts.add(tuple(lrtt.models.generate(model, base, [prompts[0]], max_new_tokens=8, eos_token_id=[])[0]))
    assert len(texts) > 1  # the adapters do change what the model writes
    with pytest.raises(ValueError, match="one id per prompt"):
        lrtt.models.generate(model, params, prompts, max_new_tokens=2, adapters=(method, stacked), adapter_ids=[0])
    with pytest.raises(ValueError, match="needs both"):
        lrtt.models.generate(model, params, prompts, max_new_tokens=2, adapter_ids=ids)


def test_errors_name_the_problem(llama):
    model, params, apply = llama
    lora = lrtt.LoRA(rank=2, targets="all-linear")
    qv = lrtt.LoRA(rank=2, targets="qv")
    a = lora.init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="no adapters"):
        lrtt.stack(lora, [])
    with pytest.raises(ValueError, match="other leaves"):
        lrtt.stack(lora, [a, qv.init(jax.random.key(1), params)])
    rep = lrtt.LorettaRep(rank=4, tt_rank=3, targets="qv")
    with pytest.raises(ValueError, match="differ from adapter 0"):
        lrtt.stack(rep, [rep.init(jax.random.key(0), params),
                         lrtt.LorettaRep(rank=4, tt_rank=2, targets="qv").init(jax.random.key(1), params)])
    head = lrtt.LoRA(rank=2, targets="qv", trainable="lm_head")
    with pytest.raises(ValueError, match="Trainable"):
        lrtt.stack(head, [head.init(jax.random.key(0), params)] * 2)
    with pytest.raises(ValueError, match="LoRA and LorettaRep"):
        lrtt.stack(lrtt.LorettaAdp(targets="qv"), [a])
    stacked = lrtt.stack(lora, [a, a])
    tokens = jnp.ones((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="give adapter_ids"):
        lrtt.wrap(lora, params, stacked)
    with pytest.raises(ValueError, match="outside"):
        lrtt.wrap(lora, params, stacked, adapter_ids=np.array([0, 2], np.int32))
    with pytest.raises(ValueError, match="single adapter"):
        lrtt.wrap(lora, params, a, adapter_ids=np.array([0, 1], np.int32))
    with pytest.raises(ValueError, match="batch rows"):  # 3 ids for a batch of 2
        apply(lrtt.wrap(lora, params, stacked, adapter_ids=np.array([0, 1, 1], np.int32)), tokens)
    with pytest.raises(ValueError, match="more than the stack's"):
        lrtt.set_member(stacked, 0, lrtt.LoRA(rank=4, targets="all-linear").init(jax.random.key(2), params))
    with pytest.raises(IndexError, match="slot 5"):
        lrtt.member(stacked, 5)
    wrapped = lrtt.wrap(lora, params, stacked, adapter_ids=np.array([0, 1], np.int32))
    with pytest.raises(ValueError, match="one per batch row"):  # a use of the kernel that is not a product
        lrtt.factored(lambda p: p["layers"]["attn"]["q_proj"]["kernel"] * 2.0, materialize=True)(wrapped)
