"""Divergence guard: a non-finite update is never applied, and the caller can tell.

:func:`skip_nonfinite` wraps any optax optimizer in ``optax.apply_if_finite``: when an update
holds a NaN or an infinity (a NaN or infinite loss gives such gradients), the parameters and
the inner optimizer state are left as they were, on device, without a host round trip; the
wrapper's state counts the skipped steps. :func:`nonfinite_counts` reads those counters, so a
training loop can stop (or go on skipping) at the host cadence it already has (e.g. when it
logs the loss). Nothing non-finite ever reaches the adapter through the optimizer, so nothing
non-finite is ever checkpointed (:class:`lrtt.CheckpointManager` also refuses it).

    tx = lrtt.train.skip_nonfinite(optax.adamw(1e-3))   # lrtt.train.adamw does this by default
    state, loss = step(state, params, batch)
    consecutive, total = lrtt.train.nonfinite_counts(state.opt_state)
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from lrtt._errors import Error

NO_LIMIT = int(np.iinfo(np.int32).max)


class DivergenceError(Error, FloatingPointError):
    """Training produced a non-finite loss or update (the step was not applied)."""


def skip_nonfinite(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer``, except that an update with a non-finite value is skipped (never applied).

    ``optax.apply_if_finite(optimizer, max_consecutive_errors=2**31 - 1)``: optax's own guard,
    with no count after which it would apply a non-finite update anyway; the loop decides when
    to stop (:func:`nonfinite_counts`).

    Example:
      >>> import jax.numpy as jnp, optax, lrtt
      >>> tx = lrtt.train.skip_nonfinite(optax.sgd(0.1))
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state, params)
      >>> updates["w"].tolist(), [int(c) for c in lrtt.train.nonfinite_counts(state)]
      ([0.0, 0.0], [1, 1])
    """
    return optax.apply_if_finite(optimizer, max_consecutive_errors=NO_LIMIT)


def _guard_state(opt_state: Any) -> Any:
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ApplyIfFiniteState))
             if isinstance(s, optax.ApplyIfFiniteState)]
    if not found:
        raise ValueError(
            "the optimizer state holds no non-finite guard: build the optimizer with "
            "lrtt.train.skip_nonfinite(tx) (or lrtt.train.adamw, which does) to count skipped steps."
        )
    return found[0]


def nonfinite_counts(opt_state: Any) -> tuple[jax.Array, jax.Array]:
    """``(consecutive, total)`` steps skipped for a non-finite update, from the optimizer state.

    ``consecutive`` is 0 when the last step was applied. Raises ValueError when the optimizer
    was not built with :func:`skip_nonfinite`.
    """
    guard = _guard_state(opt_state)
    return guard.notfinite_count, guard.total_notfinite
