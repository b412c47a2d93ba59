"""Shared fixtures: tiny transformers Flax models (random init, float32) for every family."""

from __future__ import annotations

import importlib
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")

import jax
import numpy as np
import pytest

try:  # once per process at start-up (~4 s), not inside whichever test first builds a tiny model
    for _family in ("gpt2", "llama", "bert", "roberta"):
        importlib.import_module(f"transformers.models.{_family}.modeling_flax_{_family}")
except ImportError:  # transformers 5 (no Flax classes) or none: the tests that need them skip or are not run
    pass


def _built(model_class, config):
    """``model_class(config, seed=0)`` with its random init jitted: the eager init compiles one
    program per op (3–4 s for the first tiny model in a process, 1.1–1.3 s jitted); same values."""
    model = model_class(config, seed=0, _do_init=False)
    init = jax.jit(model.init_weights, static_argnums=1)
    model._is_initialized = True  # what lrtt._private.mark_flax_model_initialized sets
    model.params = init(jax.random.PRNGKey(0), model.input_shape)
    return model


def _gpt2():
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
    return _built(FlaxGPT2LMHeadModel, config)


def _llama():
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=16,
    )
    return _built(FlaxLlamaForCausalLM, config)


def _bert():
    from transformers import BertConfig, FlaxBertForSequenceClassification

    config = BertConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        vocab_size=64, max_position_embeddings=16, num_labels=3,
    )
    return _built(FlaxBertForSequenceClassification, config)


def _roberta():
    from transformers import FlaxRobertaForSequenceClassification, RobertaConfig

    config = RobertaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        vocab_size=64, max_position_embeddings=20, num_labels=2,
    )
    return _built(FlaxRobertaForSequenceClassification, config)


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


def quick_jit(fn, **jit_kwargs):
    """``jax.jit(fn, **jit_kwargs)`` compiled with :data:`FAST_COMPILE` (cached like any jit)."""
    return jax.jit(fn, compiler_options=FAST_COMPILE, **jit_kwargs)


def perturb(tree, key, scale=0.1):
    """Add Gaussian noise to every array leaf (makes B / zeroed cores non-zero). numpy's noise,
    seeded by ``key``: jax.random would compile one eager program per leaf shape."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    return jax.tree.map(lambda x: x + (scale * rng.standard_normal(x.shape)).astype(x.dtype), tree)


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
