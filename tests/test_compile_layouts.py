"""benchmarks/compile_layouts.py's layouts hold the same adapter: the packed optimizer is AdamW
per leaf up to float32 rounding, and stacking over the layers round-trips (the compile seconds it prints
are measured there, not here)."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrtt

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "compile_layouts.py")


@pytest.fixture(scope="module")
def layouts():
    sys.path.insert(0, os.path.dirname(SCRIPT))  # it imports benchmarks/step.py
    try:
        spec = importlib.util.spec_from_file_location("compile_layouts_benchmark", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
    return module


def _adapters():
    params = {"h": {str(i): {"q": {"kernel": jax.random.normal(jax.random.key(i), (48, 64))},
                             "o": {"kernel": jax.random.normal(jax.random.key(9 + i), (64, 48))}} for i in range(3)}}
    targets = r"(q|o)/kernel$"
    return [(m, m.init(jax.random.key(0), params)) for m in
            (lrtt.LoRA(rank=4, targets=targets), lrtt.LorettaRep(rank=4, tt_rank=3, targets=targets, initializer="gaussian"))]


def test_packed_adamw_is_adamw_per_leaf_and_stacking_round_trips(layouts):
    for method, adapter in _adapters():
        assert layouts.packed_difference(adapter) < 1e-6, type(method).__name__  # jax 0.12: ~3e-7 (XLA's fusion)
        assert len(layouts.pack(adapter)) == 12  # one vector per factor matrix: 6 targets x (A, B)
        stacked = layouts.stack_layers(adapter)
        assert len(stacked) == 2 and all(x.shape[0] == 3 for x in jax.tree.leaves(stacked))
        for layout, (to_layout, from_layout) in layouts.HELD_AS.items():  # each held form round-trips
            back = from_layout(to_layout(adapter), adapter)
            assert jax.tree.structure(back) == jax.tree.structure(adapter), layout
            assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(adapter))), layout


def test_the_packed_check_can_fail(layouts):
    """An optimizer that is not elementwise (a per-leaf norm) differs once packed: the check sees it."""
    _, adapter = _adapters()[1]
    per_leaf_norm = optax.GradientTransformation(
        lambda p: optax.EmptyState(),
        lambda g, s, p=None: (jax.tree.map(lambda x: x / (jnp.linalg.norm(x) + 1.0), g), s))
    grads = jax.tree.map(lambda x: jnp.sin(3.0 * x) + 0.1, adapter)
    plain, _ = per_leaf_norm.update(grads, per_leaf_norm.init(adapter), adapter)
    packed, _ = layouts.packed_optimizer(per_leaf_norm).update(grads, None, adapter)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(packed)))
