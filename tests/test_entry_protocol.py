"""A new method with a new entry type is one module: the entry owns its math, and init, wrap,
factored, merge, delta, the optimizer mask and checkpoints take it without any lrtt change.

Also: one adapter resolution (``lrtt.resolve``) whose ``AdapterMismatchError`` carries the
differences as fields, raised alike by wrap, merge, delta and save_peft.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrtt
from lrtt._paths import nest
from lrtt.methods._base import Method


# --- a toy method in this file: ΔW[i, j] = c[j] (a learned shift of every output column) -------
@lrtt.register_entry(("shift",))
class ColumnShift(lrtt.Entry):
    """``ΔW = 1·cᵀ``: ``shift: (*stack, out)`` added to every row of the ``(in, out)`` matrix."""

    shift: Any

    def misfit(self, target, leaf):
        if tuple(self.shift.shape) != (*target.stack, target.n_out):
            return f"its shift is {tuple(self.shift.shape)}, the leaf has {target.n_out} outputs"
        return None

    def delta(self, target):
        matrix = jnp.broadcast_to(self.shift[..., None, :], (*target.stack, target.n_in, target.n_out))
        return target.layout.from_matrix(matrix, target.shape)

    def factored(self, site):
        return (site.w0 + self.delta(site.target)).astype(site.w0.dtype)

    def merged(self, w0, target):
        return w0.astype(jnp.float32) + self.delta(target).astype(jnp.float32)

    def unmerged(self, w, target):
        return w.astype(jnp.float32) - self.delta(target).astype(jnp.float32)


def _define_shift_method():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ShiftMethod(Method):
        targets: Any = ("q/kernel",)
        layouts: tuple = ()
        mergeable = True

        def plan(self, params):
            return tuple(lrtt.select(params, self.targets, layouts=self.layouts))

        def init(self, key, params):
            flat = {}
            for target in self.plan(params):
                key, k = jax.random.split(key)
                flat[target.path] = ColumnShift(0.1 * jax.random.normal(k, (*target.stack, target.n_out)))
            return nest(flat)

    return ShiftMethod


@pytest.fixture
def ShiftMethod(monkeypatch):
    """The toy method, defined per test on a copy of the method registry (defining a Method
    subclass registers it; other tests must not see it)."""
    monkeypatch.setattr(Method, "_REGISTRY", dict(Method._REGISTRY))
    return _define_shift_method()


def _model(params, x):
    h = jnp.tanh(x @ params["q"]["kernel"])
    return h @ params["o"]["kernel"]


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"q": {"kernel": jax.random.normal(k1, (6, 5))}, "o": {"kernel": jax.random.normal(k2, (5, 3))}}


def test_a_toy_method_with_its_own_entry_runs_init_wrap_factored_merge_delta_and_checkpoint(tmp_path, ShiftMethod):
    params, method = _params(), ShiftMethod()
    adapter = method.init(jax.random.key(1), params)
    x = jax.random.normal(jax.random.key(2), (4, 6))
    shift = adapter["q"]["kernel"].shift

    # the dense reference: W = W0 + 1·cᵀ
    dense = {"q": {"kernel": params["q"]["kernel"] + shift[None, :]}, "o": params["o"]}
    want = _model(dense, x)
    got = lrtt.factored(_model)(lrtt.wrap(method, params, adapter), x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    merged = lrtt.merge(method, params, adapter)
    np.testing.assert_allclose(merged["q"]["kernel"], dense["q"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(lrtt.unmerge(method, merged, adapter)["q"]["kernel"], params["q"]["kernel"], atol=1e-6)
    np.testing.assert_allclose(lrtt.delta(method, params, adapter)["q/kernel"], jnp.broadcast_to(shift, (6, 5)))

    # only the entry trains: the optimizer mask finds it, a step moves the loss
    def loss(adapter):
        return jnp.mean(lrtt.factored(_model)(lrtt.wrap(method, params, adapter), x) ** 2)

    mask = lrtt.optim.trainable_mask({"params": params, "adapter": adapter})
    assert mask["adapter"]["q"]["kernel"] == ColumnShift(True) and mask["params"]["q"]["kernel"] is False
    opt = optax.sgd(0.1)
    state = opt.init(adapter)
    grads = jax.grad(loss)(adapter)
    assert isinstance(grads["q"]["kernel"], ColumnShift) and float(jnp.abs(grads["q"]["kernel"].shift).sum()) > 0
    updates, state = opt.update(grads, state, adapter)
    trained = optax.apply_updates(adapter, updates)
    assert float(loss(trained)) < float(loss(adapter))

    # checkpoints take it as any entry: exact round trip, its kind recorded
    with lrtt.CheckpointManager(str(tmp_path / "ckpt"), method) as manager:
        manager.save(1, trained)
        manager.wait()
        restored = manager.restore(1, adapter_like=adapter).adapter
    np.testing.assert_array_equal(restored["q"]["kernel"].shift, trained["q"]["kernel"].shift)
    assert type(restored["q"]["kernel"]) is ColumnShift


def test_a_toy_entry_that_does_not_fit_its_leaf_is_a_mismatch_naming_it(ShiftMethod):
    params, method = _params(), ShiftMethod()
    bad = {"q": {"kernel": ColumnShift(jnp.zeros((7,)))}}
    with pytest.raises(lrtt.AdapterMismatchError) as err:
        lrtt.wrap(method, params, bad)
    assert err.value.misfit == {"q/kernel": "its shift is (7,), the leaf has 5 outputs"}


def test_a_toy_entry_without_a_peft_form_is_refused_by_save_peft(tmp_path, ShiftMethod):
    params, method = _params(), ShiftMethod()
    with pytest.raises(ValueError, match="ColumnShift"):
        lrtt.save_peft(str(tmp_path / "peft"), method, method.init(jax.random.key(0), params), params)


# --- one resolution, one error with fields ------------------------------------------------------
def _lora_case():
    params = {"layers": {str(i): {"q": {"kernel": jnp.ones((8, 8))}} for i in range(3)}}
    method = lrtt.LoRA(rank=2, targets="q")
    return params, method, method.init(jax.random.key(0), params)


def _dropped(adapter, layer):
    out = dict(adapter["layers"])
    del out[layer]
    return {"layers": out}


@pytest.mark.parametrize("use", ["wrap", "merge", "delta", "resolve"])
def test_every_entry_point_raises_one_mismatch_error_with_the_differences_as_fields(use):
    params, method, adapter = _lora_case()
    fewer = _dropped(adapter, "2")  # made for a model with 2 layers
    extra = {"layers": {**adapter["layers"], "9": adapter["layers"]["0"]}}
    small = {"layers": {**adapter["layers"], "1": {"q": {"kernel": lrtt.LoraFactors(
        jnp.zeros((4, 2)), jnp.zeros((2, 8)), scale=1.0)}}}}
    call = {
        "wrap": lambda a: lrtt.wrap(method, params, a),
        "merge": lambda a: lrtt.merge(method, params, a),
        "delta": lambda a: lrtt.delta(method, params, a),
        "resolve": lambda a: lrtt.resolve(method, params, a),
    }[use]
    with pytest.raises(lrtt.AdapterMismatchError) as err:
        call(fewer)
    assert err.value.uncovered == ("layers/2/q/kernel",) and not err.value.unknown and not err.value.misfit
    assert "no entry for 1 of the 3 leaves" in str(err.value)
    with pytest.raises(lrtt.AdapterMismatchError) as err:
        call(extra)
    assert err.value.unknown == ("layers/9/q/kernel",) and "not a leaf of the params" in str(err.value)
    with pytest.raises(lrtt.AdapterMismatchError) as err:
        call(small)
    assert list(err.value.misfit) == ["layers/1/q/kernel"] and "(4, 8)" in err.value.misfit["layers/1/q/kernel"]
    assert isinstance(err.value, ValueError) and isinstance(err.value, lrtt.Error)


def test_a_mismatch_error_survives_pickling_with_its_fields():
    params, method, adapter = _lora_case()
    with pytest.raises(lrtt.AdapterMismatchError) as err:
        lrtt.resolve(method, params, _dropped(adapter, "0"))
    again = pickle.loads(pickle.dumps(err.value))
    assert (again.uncovered, again.unknown, again.misfit, str(again)) == (
        err.value.uncovered, err.value.unknown, err.value.misfit, str(err.value))


def test_save_peft_checks_the_adapter_against_the_params_through_resolve(tmp_path):
    params, method, adapter = _lora_case()
    flat = {"q_proj": {"kernel": jnp.ones((8, 8))}}
    lora = lrtt.LoRA(rank=2, targets="q_proj")
    made = lora.init(jax.random.key(0), flat)
    with pytest.raises(lrtt.AdapterMismatchError) as err:
        lrtt.save_peft(str(tmp_path / "p"), lora, made, {"q_proj": {"kernel": jnp.ones((8, 16))}})
    assert list(err.value.misfit) == ["q_proj/kernel"]


def test_a_tree_with_arrays_that_are_not_entries_is_refused_with_a_value_error():
    params, method, adapter = _lora_case()
    stray = {**adapter, "extra": jnp.ones(3)}
    for call in (lambda: lrtt.wrap(method, params, stray), lambda: lrtt.merge(method, params, stray),
                 lambda: lrtt.save_peft("/nonexistent/never-written", method, params, params)):
        with pytest.raises(ValueError) as err:
            call()
        assert "not adapter entries" in str(err.value) or "no PEFT equivalent" in str(err.value), str(err.value)
    with pytest.raises(lrtt.AdapterMismatchError) as err:
        lrtt.wrap(method, params, stray)
    assert err.value.unknown == ("extra",)
    with pytest.raises(ValueError, match="'extra' is a"):
        lrtt.stack(method, [stray, stray])
    specs = lrtt.train.adapter_specs(method, params, jax.tree.map(lambda _: jax.sharding.PartitionSpec(), params), stray)
    assert specs["extra"] == jax.sharding.PartitionSpec()


def test_save_peft_writes_an_adapter_of_part_of_the_targets(tmp_path):
    params = {"q_proj": {"kernel": jnp.ones((8, 8))}, "v_proj": {"kernel": jnp.ones((8, 8))}}
    method = lrtt.LoRA(rank=2, targets=("q_proj", "v_proj"))
    adapter = method.init(jax.random.key(0), params)
    only_q = {"q_proj": jax.tree.map(lambda x: x + 1.0, adapter["q_proj"])}
    config = lrtt.save_peft(str(tmp_path / "p"), method, only_q, params)
    assert config["target_modules"] == ["q_proj"]
