"""Shared fixtures: tiny transformers Flax models (random init, float32) for every family."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")

import jax
import numpy as np
import pytest


def _gpt2():
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
    return FlaxGPT2LMHeadModel(config, seed=0)


def _llama():
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=16,
    )
    return FlaxLlamaForCausalLM(config, seed=0)


def _bert():
    from transformers import BertConfig, FlaxBertForSequenceClassification

    config = BertConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        vocab_size=64, max_position_embeddings=16, num_labels=3,
    )
    return FlaxBertForSequenceClassification(config, seed=0)


def _roberta():
    from transformers import FlaxRobertaForSequenceClassification, RobertaConfig

    config = RobertaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        vocab_size=64, max_position_embeddings=20, num_labels=2,
    )
    return FlaxRobertaForSequenceClassification(config, seed=0)


def pytest_collection_modifyitems(items):
    """Tests that run PyTorch (the ``interop`` fixture) are marked ``torch``: the Python 3.12 leg
    of CI, where no CPU torch wheel is installed, deselects them with ``-m "not torch"``."""
    for item in items:
        if "interop" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.torch)


TINY_MODELS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "roberta": _roberta}
_cache: dict = {}


def tiny_model(family: str):
    """A tiny transformers Flax model of ``family`` (cached per session)."""
    if family not in _cache:
        _cache[family] = TINY_MODELS[family]()
    return _cache[family]


def tiny_inputs(batch: int = 2, seq: int = 8, vocab: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, seq), dtype=np.int32)


def model_logits(model, params, input_ids):
    return model(input_ids, params=params).logits


@pytest.fixture(params=["gpt2", "llama", "bert"])
def family(request):
    return request.param


FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
"""XLA compiler options for tests, which compile far more than they run: the lowest backend
optimization level, no expensive LLVM passes. The one copy; use it through :func:`quick_jit`."""


def quick_jit(fn):
    """``jax.jit(fn)`` compiled with :data:`FAST_COMPILE` (lowered and compiled on each call)."""

    def call(*args):
        return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)

    return call


def perturb(tree, key, scale=0.1):
    """Add Gaussian noise to every array leaf (makes B / zeroed cores non-zero)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size) -> path``: a fresh tmpfs of ``size`` (e.g. ``"256k"``) under ``tmp_path``,
    unmounted after the test; ``remount(path, size)`` grows it ("space freed"). Needs root (CI
    runs as root): skipped with the reason where it cannot mount."""
    import subprocess

    mounted = []

    def mount(size: str):
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (os.geteuid() != 0)")
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs at {path}: {done.stderr.strip()}")
        mounted.append(path)
        return path

    def remount(path, size: str):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)

    mount.remount = remount
    try:
        yield mount
    finally:
        for path in mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)
