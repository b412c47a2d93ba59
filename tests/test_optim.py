"""`lrtt.optim`: one tree of frozen + adapter leaves; frozen leaves get no state and no update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrtt

KEY = jax.random.key(0)


def _one_tree():
    """``{"params": frozen, "adapter": adapter}`` with a ``-0.0`` among the frozen values."""
    k1, k2, k3 = jax.random.split(KEY, 3)
    params = {
        "dense": {"kernel": jax.random.normal(k1, (32, 48)), "bias": jnp.zeros(48).at[0].set(-0.0)},
        "norm": {"scale": jnp.ones(32)},
        "out": {"kernel": jax.random.normal(k2, (48, 8))},
    }
    method = lrtt.LoRA(rank=4, targets=r"(dense|out)/kernel$")
    adapter = method.init(k3, params)
    return method, {"params": params, "adapter": adapter}


def _loss(method, tree, x):
    merged = lrtt.merge(method, tree["params"], tree["adapter"])
    h = jnp.tanh(x @ merged["dense"]["kernel"] + merged["dense"]["bias"])
    return jnp.mean((h @ merged["out"]["kernel"]) ** 2) + jnp.mean(merged["norm"]["scale"] ** 2)


def _bits(x):
    return np.asarray(x).view(np.uint32)


def test_adapter_only_adamw_never_moves_a_frozen_leaf_and_keeps_no_state_for_it():
    method, tree = _one_tree()
    tx = lrtt.optim.adapter_only(optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 60), weight_decay=0.1))
    opt_state = tx.init(tree)
    x = jax.random.normal(jax.random.key(1), (16, 32))

    @jax.jit
    def step(tree, opt_state):
        grads = jax.grad(lambda t: _loss(method, t, x))(tree)  # a one-tree user: grads of everything
        updates, opt_state = tx.update(grads, opt_state, tree)
        frozen_updates = jax.tree.leaves(updates["params"])
        return lrtt.optim.apply_updates(tree, updates), opt_state, frozen_updates

    start = jax.tree.map(np.asarray, tree)
    for _ in range(60):
        tree, opt_state, frozen_updates = step(tree, opt_state)
    for u in frozen_updates:  # zero updates: no gradient, no weight decay reaches a frozen leaf
        np.testing.assert_array_equal(u, 0.0)
    for before, after in zip(jax.tree.leaves(start["params"]), jax.tree.leaves(tree["params"])):
        np.testing.assert_array_equal(_bits(before), _bits(after))  # bit-identical, -0.0 included
    moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(tree["adapter"]), jax.tree.leaves(start["adapter"]))]
    assert min(moved) > 1e-3

    adapter_shapes = {x.shape for x in jax.tree.leaves(tree["adapter"])}
    arrays = [x for x in jax.tree.leaves(opt_state) if hasattr(x, "shape")]
    assert {x.shape for x in arrays if x.ndim} <= adapter_shapes
    adapter_size = lrtt.num_params(tree["adapter"])
    state_size = sum(x.size for x in arrays if x.ndim)
    assert state_size == 2 * adapter_size  # Adam's two moments of the adapter, nothing else
    assert lrtt.num_params(tree["params"]) > adapter_size


def test_optax_masked_alone_would_pass_frozen_gradients_through():
    """Why `lrtt.optim.adapter_only` uses set_to_zero: `optax.masked` leaves masked-out updates as is."""
    method, tree = _one_tree()
    grads = jax.tree.map(jnp.ones_like, tree)
    mask = lrtt.optim.trainable_mask(tree)
    raw = optax.masked(optax.adam(1e-3), mask)
    updates, _ = raw.update(grads, raw.init(tree), tree)
    assert float(jnp.abs(updates["params"]["dense"]["kernel"]).max()) == 1.0
    ours = lrtt.optim.adapter_only(optax.adam(1e-3))
    updates, _ = ours.update(grads, ours.init(tree), tree)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates["params"]))


@pytest.mark.parametrize(
    "where",
    [
        None,
        r"^adapter/",
        {"adapter/dense/kernel/a", "adapter/dense/kernel/b", "adapter/out/kernel/a", "adapter/out/kernel/b"},
        lambda path, leaf: path.startswith("adapter/"),
    ],
    ids=["entries", "regex", "paths", "callable"],
)
def test_where_specs_agree(where):
    _, tree = _one_tree()
    mask = lrtt.optim.trainable_mask(tree, where)
    assert all(jax.tree.leaves(mask["adapter"])) and not any(jax.tree.leaves(mask["params"]))
    labels = lrtt.optim.adapter_labels(tree, where)
    assert set(jax.tree.leaves(labels["adapter"])) == {"trainable"}
    assert set(jax.tree.leaves(labels["params"])) == {"frozen"}


def test_entries_spliced_into_the_params_are_found():
    w = jnp.ones((8, 8))
    tree = {"dense": {"kernel": w, "lora": lrtt.LoraFactors(jnp.ones((8, 2)), jnp.zeros((2, 8)), scale=1.0)}}
    mask = lrtt.optim.trainable_mask(tree)
    assert mask["dense"]["kernel"] is False and mask["dense"]["lora"].a is True


def test_where_errors():
    with pytest.raises(ValueError, match="holds no entry"):
        lrtt.optim.trainable_mask({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="not a valid regex"):
        lrtt.optim.trainable_mask({"w": jnp.ones(3)}, "(")
    with pytest.raises(ValueError, match="`where` must be"):
        lrtt.optim.trainable_mask({"w": jnp.ones(3)}, 3)


def test_partition_and_combine_differentiate_only_the_trainable_half():
    method, tree = _one_tree()
    trainable, frozen = lrtt.optim.partition(tree)
    assert jax.tree.leaves(trainable["params"]) == [] and jax.tree.leaves(frozen["adapter"]) == []
    x = jnp.ones((4, 32))
    grads = jax.grad(lambda t: _loss(method, lrtt.optim.combine(t, frozen), x))(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    rebuilt = lrtt.optim.combine(trainable, frozen)
    assert jax.tree.structure(rebuilt) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(tree)):
        assert a is b


def test_adapter_only_equals_optax_selective_transform_and_the_old_name_says_so():
    """``adapter_only`` is optax's selective_transform with the mask read off the tree."""
    _, tree = _one_tree()
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), tree)
    freeze = jax.tree.map(lambda m: not m, lrtt.optim.trainable_mask(tree))
    reference = optax.transforms.selective_transform(optax.adamw(1e-2, weight_decay=0.1), freeze_mask=freeze)
    ours = lrtt.optim.adapter_only(optax.adamw(1e-2, weight_decay=0.1))
    s_ref, s_ours = reference.init(tree), ours.init(tree)
    for _ in range(3):
        u_ref, s_ref = reference.update(grads, s_ref, tree)
        u_ours, s_ours = ours.update(grads, s_ours, tree)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), u_ref, u_ours)
    with pytest.raises(AttributeError, match="adapter_only"):
        lrtt.optim.masked  # noqa: B018
