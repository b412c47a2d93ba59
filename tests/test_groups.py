"""lrtt.group_layers: an unrolled model's per-layer entries stacked per target kind.

Against the adapter as method.init makes it, on a tiny transformers Flax GPT-2 (two unrolled
layers): the round trip is exact; the loss and the gradients through ``wrap`` are equal
(to float32 rounding), with dropout too; an AdamW step on the groups is the step on the tree;
``merge``/``save_peft``-side functions read the groups as the tree; the grouped loss contracts
each group's TT cores once for all layers (fewer products in its jaxpr).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrtt
import lrtt.train
from conftest import quick_jit, tiny_inputs, tiny_model
from test_factored import assert_close, random_adapter

METHODS = {
    "lora": lambda: lrtt.LoRA(rank=4, targets="all-linear"),
    "rep": lambda: lrtt.LorettaRep(rank=4, tt_rank=3, targets="all-linear"),
    "adp": lambda: lrtt.LorettaAdp(bottleneck=8, tt_rank=3),
    "rep+norms": lambda: lrtt.LorettaRep(rank=4, tt_rank=3, targets="qv", trainable="ln_f|ln_1"),
}


def _setup(name, dropout=0.0):
    model = tiny_model("gpt2")
    method = METHODS[name]()
    if dropout:
        method = lrtt.LorettaRep(rank=4, tt_rank=3, targets="all-linear", dropout=dropout)
    adapter = random_adapter(method, model.params)
    ids = jnp.asarray(tiny_inputs())

    def loss(adapter, params, rng=None):
        wrapped = lrtt.wrap(method, params, adapter, rng=rng)
        logits = lrtt.factored(lambda p, x: model(x, params=p).logits)(wrapped, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    return model, method, adapter, loss


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.mark.parametrize("name", list(METHODS))
def test_round_trip_is_exact_and_groups_the_tt_factors(name):
    model, method, adapter, _ = _setup(name)
    groups = lrtt.group_layers(adapter)
    assert _leaves_equal(lrtt.ungroup_layers(groups), adapter)
    tt = {p for p, e in lrtt.entries(adapter).items() if isinstance(e, lrtt.TTFactors)}
    assert set(groups.others) == set(lrtt.entries(adapter)) - tt  # LoRA, adapters, norms: as they are
    # GPT-2's two layers: each TT-factored target kind is one group of both layers
    assert {g: len(w) for g, w in groups.members} == {re.sub(r"/\d+/", "/*/", p): 2 for p in tt}
    assert sum(x.size for x in jax.tree.leaves(groups)) == sum(x.size for x in jax.tree.leaves(adapter))
    if tt:
        assert len(jax.tree.leaves(groups)) < len(jax.tree.leaves(adapter))


@pytest.mark.parametrize("name", ["lora", "rep", "adp", "rep+norms"])
def test_loss_and_gradients_equal_the_tree(name):
    model, method, adapter, loss = _setup(name)
    groups = lrtt.group_layers(adapter)
    grad = quick_jit(jax.value_and_grad(loss))
    value, grads = grad(adapter, model.params)
    value_g, grads_g = grad(groups, model.params)
    assert isinstance(grads_g, lrtt.LayerGroups)
    np.testing.assert_allclose(value_g, value, rtol=1e-5)
    assert_close(lrtt.ungroup_layers(grads_g), grads)


def test_dropout_keys_are_the_trees():
    model, method, adapter, loss = _setup("rep", dropout=0.3)
    rng = jax.random.key(3)
    f = quick_jit(loss)
    a, b = f(adapter, model.params, rng), f(lrtt.group_layers(adapter), model.params, rng)
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert float(a) != float(f(adapter, model.params, None))  # dropout is on


def test_adamw_step_on_the_groups_is_the_step_on_the_tree():
    model, method, adapter, loss = _setup("rep")
    optimizer = lrtt.train.adamw(1e-2, weight_decay=0.01, clip_norm=1.0)
    step = lrtt.train.jit_step(lambda a, p, b, k: loss(a, p), optimizer)
    tree_state, tree_loss = step(lrtt.train.init_state(adapter, optimizer), model.params, None)
    state, group_loss = step(lrtt.train.init_state(lrtt.group_layers(adapter), optimizer), model.params, None)
    np.testing.assert_allclose(group_loss, tree_loss, rtol=1e-5)
    assert_close(lrtt.ungroup_layers(state.adapter), tree_state.adapter, rtol=1e-5)
    # AdamW holds one state per group: fewer leaves than per core
    assert len(jax.tree.leaves(state.opt_state)) < len(jax.tree.leaves(tree_state.opt_state))


def test_other_functions_read_the_groups_as_the_tree():
    model, method, adapter, _ = _setup("rep")
    groups = lrtt.group_layers(adapter)
    assert _leaves_equal(lrtt.merge(method, model.params, groups), lrtt.merge(method, model.params, adapter))
    resolved = lrtt.resolve(method, model.params, groups)
    assert set(resolved.entries) == set(lrtt.entries(adapter))
    assert lrtt.num_params(groups) == lrtt.num_params(adapter)
    assert _leaves_equal(lrtt.stack(method, [groups, adapter]), lrtt.stack(method, [adapter, adapter]))
    _, both = lrtt.combine(method, [groups, adapter], [0.5, 0.5])
    assert _leaves_equal(both, lrtt.combine(method, [adapter, adapter], [0.5, 0.5])[1])


def _products(fn, *args) -> int:
    jaxpr = jax.make_jaxpr(fn)(*args)

    def count(jaxpr):  # dot_generals, nested jaxprs (jit, custom_vjp) included
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == "dot_general"
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    n += count(inner) if hasattr(inner, "eqns") else 0
        return n

    return count(jaxpr.jaxpr)


def test_each_groups_cores_are_contracted_once():
    """Per layer, the tree contracts d - 1 pairs of cores for each TT matrix of d cores; the
    groups contract all but the last core once for every layer (d - 2 products) and then one
    product per layer."""
    model, method, adapter, loss = _setup("rep")
    tree, grouped = _products(loss, adapter, model.params), _products(loss, lrtt.group_layers(adapter), model.params)
    lora = lrtt.LoRA(rank=4, targets="all-linear")
    base = _products(loss, random_adapter(lora, model.params), model.params)  # the model's own products + LoRA's
    matrices = [len(cores) for e in lrtt.entries(adapter).values() for cores in (e.a, e.b)]
    assert min(matrices) >= 2 and len(matrices) % 2 == 0  # (a 1-core matrix has no product either way)
    per_kind = matrices[: len(matrices) // 2]  # layer 0's; layer 1's are the same
    assert tree - base == 2 * sum(d - 1 for d in per_kind), (base, tree, per_kind)
    assert grouped - base == sum(d - 2 + 2 for d in per_kind), (base, grouped, per_kind)


def test_entries_of_one_pattern_and_other_shapes_group_apart():
    kernels = [(64, 64), (64, 32), (64, 64), (64, 32), (32, 64)]
    params = {"h": {str(i): {"q": {"kernel": jnp.ones(shape)}} for i, shape in enumerate(kernels)}}
    method = lrtt.LorettaRep(rank=4, tt_rank=2, targets="q")
    adapter = random_adapter(method, params)
    groups = lrtt.group_layers(adapter)
    assert dict(groups.members) == {"h/*/q/kernel": (0, 2), "h/*/q/kernel#2": (1, 3)}
    assert list(groups.others) == ["h/4/q/kernel"]  # no partner: as it is
    assert _leaves_equal(lrtt.ungroup_layers(groups), adapter)
    ids = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64)), jnp.float32)
    run = lambda a: [lrtt.factored(lambda p, x, i=i: x[:, :kernels[i][0]] @ p["h"][str(i)]["q"]["kernel"])(  # noqa: E731
        lrtt.wrap(method, params, a), ids) for i in range(len(kernels))]
    for x, y in zip(run(groups), run(adapter)):
        np.testing.assert_allclose(x, y, rtol=1e-5)


def test_bad_input_says_what_to_pass():
    model, method, adapter, _ = _setup("lora")
    groups = lrtt.group_layers(adapter)
    with pytest.raises(ValueError, match="group an adapter once"):
        lrtt.group_layers(groups)
    with pytest.raises(ValueError, match="no adapter entries"):
        lrtt.group_layers({"w": jnp.ones(3)})
    with pytest.raises(TypeError, match="what group_layers returns"):
        lrtt.ungroup_layers(adapter)
    with pytest.raises(ValueError, match="do not group a stack"):
        lrtt.group_layers(lrtt.stack(method, [adapter, adapter]))


def test_checkpoint_and_peft_files_hold_the_tree(tmp_path):
    """A checkpoint of the groups is a checkpoint of the tree (restored like the tree);
    save_peft and export_merged write the tree's files."""
    model, method, adapter, _ = _setup("rep")
    groups = lrtt.group_layers(adapter)
    with lrtt.CheckpointManager(tmp_path / "ckpt", method) as manager:
        manager.save(3, groups)
        manager.wait()
        restored = manager.restore(3, adapter_like=adapter).adapter
    assert _leaves_equal(restored, adapter)
    lrtt.save_peft(tmp_path / "a", method, groups, model.params)
    lrtt.save_peft(tmp_path / "b", method, adapter, model.params)
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    lrtt.export_merged(method, model.params, groups, tmp_path / "g.safetensors")
    lrtt.export_merged(method, model.params, adapter, tmp_path / "t.safetensors")
    assert (tmp_path / "g.safetensors").read_bytes() == (tmp_path / "t.safetensors").read_bytes()


def test_a_scanned_model_is_left_as_it_is():
    """lrtt.models stacks each target over its layers already: no entry has a partner, so the
    groups hold the tree's entries unchanged and wrap computes what it computes on the tree."""
    import lrtt.models
    from _model_configs import CONFIGS

    model = lrtt.models.Model.from_config(CONFIGS["llama"])
    params = model.init(jax.random.key(0))
    method = lrtt.LorettaRep(rank=4, tt_rank=3, targets="all-linear")
    adapter = random_adapter(method, params)
    groups = lrtt.group_layers(adapter)
    assert not groups.members and set(groups.others) == set(lrtt.entries(adapter))
    ids = jnp.asarray(tiny_inputs(vocab=128))

    def loss(a):
        logits = lrtt.factored(model)(lrtt.wrap(method, params, a), ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    grad = quick_jit(jax.value_and_grad(loss))
    (value, grads), (value_g, grads_g) = grad(adapter), grad(groups)
    np.testing.assert_allclose(value_g, value, rtol=1e-5)
    assert_close(lrtt.ungroup_layers(grads_g), grads)


def test_a_checkpoint_with_the_optimizer_state_restores_groups_or_the_tree(tmp_path):
    """Groups in the adapter and in AdamW's state are saved as their trees: restored onto grouped
    likes they come back grouped and equal, onto the tree's likes as the tree."""
    model, method, adapter, _ = _setup("rep")
    groups = lrtt.group_layers(adapter)
    optimizer = optax.adamw(1e-2)
    grads = jax.tree.map(lambda x: jnp.cos(x) + 0.1, groups)
    opt_state = optimizer.update(grads, optimizer.init(groups), groups)[1]
    with lrtt.CheckpointManager(tmp_path / "ckpt", method) as manager:
        manager.save(1, groups, opt_state)
        manager.wait()
        back = manager.restore(1, adapter_like=groups, opt_state_like=jax.eval_shape(optimizer.init, groups))
        tree = manager.restore(1, adapter_like=adapter, opt_state_like=jax.eval_shape(optimizer.init, adapter))
    assert isinstance(back.adapter, lrtt.LayerGroups) and _leaves_equal(back.adapter, groups)
    assert _leaves_equal(back.opt_state, opt_state)
    assert _leaves_equal(tree.adapter, adapter)
    mu = tree.opt_state[0].mu
    assert _leaves_equal(lrtt.group_layers(mu), opt_state[0].mu)


def test_mesh_step_takes_the_groups_it_is_given():
    """mesh_step(adapter=groups) trains the groups (replicated) and equals jit_step; a grouped
    state given to a step built for the tree is an error that names the fix."""
    from jax.sharding import Mesh

    model, method, adapter, loss = _setup("rep")
    groups = lrtt.group_layers(adapter)
    optimizer = lrtt.train.adamw(1e-2)
    four = lambda a, p, b, k: loss(a, p)  # noqa: E731
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    batch = {"x": jnp.zeros((2, 1))}
    on_mesh = lrtt.train.mesh_step(four, optimizer, mesh, method=method, params=model.params, adapter=groups)
    state, value = on_mesh.step(on_mesh.put_state(lrtt.train.init_state(groups, optimizer)), model.params, batch)
    plain, expected = lrtt.train.jit_step(four, optimizer)(lrtt.train.init_state(groups, optimizer), model.params, batch)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    assert_close(state.adapter, plain.adapter, rtol=1e-6)
    tree_step = lrtt.train.mesh_step(four, optimizer, mesh, method=method, params=model.params)
    with pytest.raises(ValueError, match="adapter=state.adapter"):
        tree_step.put_state(lrtt.train.init_state(groups, optimizer))


def test_flax_linen_layer_names_group():
    """Flax linen names list members and auto-named modules ``layers_0``, ``Dense_1``: the index
    after the underscore is a layer index too."""
    import flax.linen as nn

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(3):
                x = nn.Dense(64)(x)
            return x

    x = jnp.ones((2, 64))
    params = Stack().init(jax.random.key(0), x)["params"]
    method = lrtt.LorettaRep(rank=4, tt_rank=2, targets=r"Dense_\d+/kernel$")
    adapter = random_adapter(method, params)
    groups = lrtt.group_layers(adapter)
    assert dict(groups.members) == {"Dense_*/kernel": (0, 1, 2)} and not groups.others
    run = lambda a: lrtt.factored(lambda p, x: Stack().apply({"params": p}, x))(lrtt.wrap(method, params, a), x)  # noqa: E731
    np.testing.assert_allclose(run(groups), run(adapter), rtol=1e-5)


def test_layer_matrices_are_the_tt_matrices_with_broadcast_stack_axes():
    """Each layer's matrix from the grouped chain equals materialize() of its own cores, also when
    the cores' stack axes broadcast ((1,) against (2,)) and for one-core trains."""
    from lrtt._groups import _layer_matrices
    from lrtt.tt import materialize

    rng = np.random.default_rng(0)
    layers = [(jnp.asarray(rng.standard_normal((1, 1, 8, 2)), jnp.float32),
               jnp.asarray(rng.standard_normal((2, 2, 8, 1)), jnp.float32)) for _ in range(3)]
    stacked = [jnp.stack([cores[k] for cores in layers]) for k in range(2)]
    for got, cores in zip(_layer_matrices(stacked, 16, 4, 3), layers):
        np.testing.assert_allclose(got, materialize(cores, 16, 4), rtol=1e-6)
    one = [jnp.asarray(rng.standard_normal((3, 1, 12, 1)), jnp.float32)]
    for i, got in enumerate(_layer_matrices(one, 3, 4, 3)):
        np.testing.assert_allclose(got, materialize([one[0][i]], 3, 4), rtol=1e-6)


def test_path_masks_need_the_tree():
    model, method, adapter, _ = _setup("rep")
    tree = {"frozen": {"w": jnp.ones(3)}, "adapter": lrtt.group_layers(adapter)}
    mask = lrtt.optim.trainable_mask(tree)  # where=None: every entry's leaves, grouped or not
    assert not any(jax.tree.leaves(mask["frozen"])) and all(jax.tree.leaves(mask["adapter"]))
    with pytest.raises(ValueError, match="ungroup_layers"):
        lrtt.optim.trainable_mask(tree, where=r"h/0/")
