"""Every function of ``lrtt._private`` against the installed packages: each test reaches the
private name itself and checks the function gives lrtt what it needs, so an upgrade that moves
the name fails here, naming the name and the function to fix (each function's docstring says
how). A package that is not installed skips its test."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrtt import _private

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def test_source_summary_names_the_line_an_equation_was_traced_from():
    try:
        from jax._src import source_info_util
    except ImportError as err:
        pytest.fail(f"jax._src.source_info_util moved ({err}): fix lrtt._private.source_summary")
    assert hasattr(source_info_util, "summarize"), \
        "jax._src.source_info_util.summarize is gone: fix lrtt._private.source_summary"

    def traced(x):
        return jnp.sin(x)

    eqn = jax.make_jaxpr(traced)(1.0).jaxpr.eqns[0]
    summary = _private.source_summary(eqn.source_info)
    assert "test_private.py" in summary and "traced" in summary, (
        f"lrtt._private.source_summary gave {summary!r}, not the traced line: "
        "jax._src.source_info_util.summarize changed")


def test_source_summary_is_empty_for_what_it_cannot_read():
    assert _private.source_summary(object()) == ""


def test_coordinator_address_is_the_one_this_process_joined():
    """In a child process (joining a job cannot be undone): no job, None; after
    ``jax.distributed.initialize``, the address it was given."""
    try:
        from jax._src import distributed
    except ImportError as err:
        pytest.fail(f"jax._src.distributed moved ({err}): fix lrtt._private.coordinator_address")
    assert hasattr(distributed.global_state, "coordinator_address"), (
        "jax._src.distributed.global_state.coordinator_address is gone: fix lrtt._private.coordinator_address")
    sys.path.insert(0, TESTS)
    from _multiprocess import free_port

    address = f"127.0.0.1:{free_port()}"
    code = ("import jax; from lrtt import _private; before = _private.coordinator_address(); "
            f"jax.distributed.initialize({address!r}, num_processes=1, process_id=0); "
            "print(before, _private.coordinator_address()); jax.distributed.shutdown()")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["None", address], (
        f"lrtt._private.coordinator_address gave {out.stdout.strip()!r} (before, after joining {address}): "
        "jax no longer keeps it at jax._src.distributed.global_state.coordinator_address")


def test_qwix_with_aux_is_the_wrapper_quantize_params_puts_in_a_tree():
    qwix = pytest.importorskip("qwix")
    import flax.linen as nn

    try:
        from qwix._src.providers import ptq
    except ImportError as err:
        pytest.fail(f"{_private.QWIX_PTQ_MODULE} moved ({err}): fix lrtt._private.qwix_with_aux")
    assert _private.QWIX_PTQ_MODULE == ptq.__name__
    assert _private.qwix_with_aux() is ptq.WithAux, \
        f"{_private.QWIX_PTQ_MODULE}.WithAux is not what lrtt._private.qwix_with_aux returns"

    model, x = nn.Dense(32), jnp.ones((2, 32))
    params = model.init(jax.random.key(0), x)["params"]
    qmodel = qwix.quantize_model(model, qwix.PtqProvider([qwix.QuantizationRule(module_path=".*", weight_qtype="int8")]))
    kernel = qwix.quantize_params(params, jax.eval_shape(qmodel.init, jax.random.key(0), x)["params"])["kernel"]
    assert isinstance(kernel, _private.qwix_with_aux()), (
        f"qwix.quantize_params wraps a kernel in {type(kernel).__module__}.{type(kernel).__name__}, not in "
        "lrtt._private.qwix_with_aux(): fix it and lrtt._private.is_qwix_leaf")
    assert _private.is_qwix_leaf(kernel) and not _private.is_qarray(kernel)
    assert _private.is_qwix_leaf(kernel.array) and _private.is_qarray(kernel.array), (
        f"qwix's quantized array is a {type(kernel.array).__name__}, not a QArray: fix lrtt._private.is_qarray "
        "and lrtt._private.is_qwix_leaf")
    assert isinstance(kernel.array, qwix.QArray)
    assert not _private.is_qwix_leaf(params["kernel"]) and not _private.is_qarray(params["kernel"])


def test_is_gemma_transformer_config_recognizes_the_gemma_package_config():
    pytest.importorskip("gemma")
    sys.path.insert(0, TESTS)
    import ecosystem_models as em

    gm = em.import_gemma()
    cls = gm.nn.config.TransformerConfig
    assert cls.__module__ == _private.GEMMA_CONFIG_MODULE, (
        f"gemma's TransformerConfig is now defined in {cls.__module__}, not {_private.GEMMA_CONFIG_MODULE}: "
        "fix lrtt._private.is_gemma_transformer_config")
    config = object.__new__(cls)  # the class is what is tested; its fields do not matter
    assert _private.is_gemma_transformer_config(config)
    assert not _private.is_gemma_transformer_config(gm.nn.Transformer)


def test_mark_flax_model_initialized_lets_a_do_init_false_model_hold_params():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8)
    model = transformers.FlaxGPT2LMHeadModel(config, _do_init=False)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), model.params_shape_tree)
    with pytest.raises(ValueError, match="_do_init=False"):
        model.params = params  # what the flag guards
    _private.mark_flax_model_initialized(model)
    try:
        model.params = params
    except ValueError as err:
        pytest.fail(f"transformers' FlaxPreTrainedModel no longer checks _is_initialized ({err}): fix "
                    "lrtt._private.mark_flax_model_initialized")
    logits = model(np.zeros((1, 4), np.int32)).logits
    assert logits.shape == (1, 4, 32)


def test_orbax_inner_checkpointer_is_the_async_checkpointer_to_wait_for(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True))
    try:
        checkpointer = _private.orbax_inner_checkpointer(manager)
        assert checkpointer is not None, (
            "orbax's CheckpointManager has no _checkpointer: fix lrtt._private.orbax_inner_checkpointer")
        assert isinstance(checkpointer, ocp.AsyncCheckpointer) and callable(checkpointer.wait_until_finished), (
            f"orbax's CheckpointManager._checkpointer is a {type(checkpointer).__name__}, not the "
            "AsyncCheckpointer lrtt waits for: fix lrtt._private.orbax_inner_checkpointer")
    finally:
        manager.close()
