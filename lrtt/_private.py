"""Every use lrtt makes of another package's private names, in one place.

lrtt reads a few things its dependencies do not publish: where a jaxpr equation came from
(jax), the coordinator address of the distributed job this process joined (jax), the wrapper
qwix's PTQ puts around a quantized kernel (qwix), the class a gemma config is (gemma), and the
flag that lets a ``_do_init=False`` transformers Flax model hold params (transformers), plus
the inner checkpointer of an Orbax ``CheckpointManager`` (orbax). Each is one small function
here whose docstring says what it reaches, why, and what to do when the name moves;
``tests/test_private.py`` checks every one against the installed packages, so an upgrade that
moves a name fails there, by the name of the function to fix, rather than deep in a caller.

Nothing here imports an optional package (qwix, gemma, transformers): a function reads it from
``sys.modules`` or from the object it is given, so ``import lrtt`` still needs none of them.
"""

from __future__ import annotations

import sys
from typing import Any

QWIX_PTQ_MODULE = "qwix._src.providers.ptq"
GEMMA_CONFIG_MODULE = "gemma.gm.nn._config"


def source_summary(source_info: Any) -> str:
    """``"file.py:line (function)"`` of a jaxpr equation's ``source_info``; ``""`` if unknown.

    Reaches ``jax._src.source_info_util.summarize`` (jax has no public way to name the user
    line an equation was traced from). Why: ``lrtt.discover`` tells where an unsupported use
    of a parameter is. Best effort: any failure gives ``""``, and the report only loses the
    location. When it moves: import ``summarize`` from its new home (``jax.extend`` may publish
    it) and keep the ``""`` fallback.
    """
    try:
        from jax._src import source_info_util

        return source_info_util.summarize(source_info)
    except Exception:  # noqa: BLE001 - a private API; the location is only a courtesy
        return ""


def coordinator_address() -> str | None:
    """The coordinator address of the distributed job this process joined; None if none is known.

    Reaches ``jax._src.distributed.global_state.coordinator_address`` (JAX publishes the process
    count and index, not the address). Why: ``lrtt.train.initialize_distributed`` called again
    with another address must refuse instead of silently keeping the first job. When it moves:
    read the address from wherever ``jax.distributed.initialize`` now stores it; returning None
    only loosens that check to the process count and index.
    """
    from jax._src import distributed

    return getattr(distributed.global_state, "coordinator_address", None)


def qwix_with_aux() -> type | None:
    """qwix's ``WithAux`` class (the PTQ wrapper around a quantized kernel), if qwix's PTQ is loaded.

    Reaches ``qwix._src.providers.ptq.WithAux`` through ``sys.modules`` (no import: a WithAux
    exists only once that module is loaded). Why: ``qwix.quantize_params`` (tunix, MaxText) puts
    ``WithAux(array=QArray)`` in a param tree, and lrtt takes such a tree as it is. When it moves:
    point :data:`QWIX_PTQ_MODULE` at the module that defines ``WithAux`` (or use a public alias).
    """
    ptq = sys.modules.get(QWIX_PTQ_MODULE)
    return None if ptq is None else ptq.WithAux


def is_qarray(x: Any) -> bool:
    """Whether ``x`` is a ``qwix.QArray``, by its class name (qwix need not be importable).

    Reaches the class name ``QArray`` (not an API: qwix promises ``qwix.QArray``, not what
    ``type(x).__name__`` says). Why: telling a bare QArray from its ``WithAux`` wrapper without
    importing qwix. When it moves (a rename): test ``isinstance(x, sys.modules["qwix"].QArray)``.
    """
    return type(x).__name__ == "QArray"


def is_qwix_leaf(x: Any) -> bool:
    """Whether ``x`` is a quantized kernel, a ``qwix.QArray`` or qwix PTQ's ``WithAux``, by class name.

    Reaches the class names ``QArray`` and ``WithAux`` (the latter private to qwix). Why: the
    model writers and the reference decoder (``lrtt.models``) refuse or dequantize such leaves
    without importing qwix. When either is renamed: add the new name here.
    """
    return type(x).__name__ in ("QArray", "WithAux")


def is_gemma_transformer_config(config: Any) -> bool:
    """Whether ``config`` is the gemma package's ``gm.nn.config.TransformerConfig``.

    Reaches the module that defines it, ``gemma.gm.nn._config`` (gemma publishes the class as
    ``gm.nn.config.TransformerConfig``; its defining module is private). Why: ``save_gemma``
    recognizes the config without importing gemma (which loads heavy dependencies). When it
    moves: point :data:`GEMMA_CONFIG_MODULE` at the module ``TransformerConfig.__module__`` names.
    """
    return type(config).__module__ == GEMMA_CONFIG_MODULE and type(config).__name__ == "TransformerConfig"


def mark_flax_model_initialized(model: Any) -> None:
    """Let a transformers Flax model built with ``_do_init=False`` be given ``.params``.

    Reaches ``FlaxPreTrainedModel._is_initialized``, the flag its constructor sets after its
    random init (which ``_do_init=False`` skips) and that the ``params`` setter checks. Why:
    the CLI's model zoo builds the model without a random init and attaches weights it read
    itself, as ``from_pretrained`` would. When it moves: set whatever flag the ``params``
    setter of ``transformers.modeling_flax_utils.FlaxPreTrainedModel`` now checks.
    """
    model._is_initialized = True


def orbax_inner_checkpointer(manager: Any) -> Any | None:
    """The checkpointer an Orbax ``CheckpointManager`` writes through (an ``AsyncCheckpointer``), or None.

    Reaches ``CheckpointManager._checkpointer``. Why: after a failed save, lrtt waits for that
    checkpointer's background writes too (``wait_until_finished``), so their errors do not
    surface from a later call. When it moves: return the manager's async checkpointer from its
    new attribute; None makes lrtt wait on the manager only.
    """
    return getattr(manager, "_checkpointer", None)
