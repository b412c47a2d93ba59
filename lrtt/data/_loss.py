"""The next-token loss of a (padded or packed) batch: targets where the loss mask says, never
across two examples of a packed row."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def loss_weights(batch: Mapping[str, Any]):
    """``(batch, max_len - 1)`` 0/1 weights: position ``t`` predicts token ``t + 1`` and counts
    when ``loss_mask[:, t + 1] == 1`` and ``segment_ids[:, t + 1] == segment_ids[:, t] != 0``
    (a batch without ``segment_ids`` is one example per row)."""
    import jax.numpy as jnp

    mask = jnp.asarray(batch["loss_mask"])
    segments = batch.get("segment_ids")
    weights = mask[:, 1:] != 0
    if segments is not None:
        segments = jnp.asarray(segments)
        weights &= (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
    return weights


def masked_lm_loss(logits, batch: Mapping[str, Any]):
    """Summed next-token cross entropy and the number of targets it sums over.

    Args:
      logits: ``(batch, max_len, vocab)``, the model's output at every position (any float
        dtype; computed in float32).
      batch: ``{"input_ids", "loss_mask", "segment_ids"}``, each ``(batch, max_len)``, as
        :func:`lrtt.data.batches` yields.

    Returns:
      ``(sum_loss, count)``: float32 and int32 scalars; the mean is ``sum_loss / max(count, 1)``
      (sum both over micro-batches or devices first, then divide). Pure ``jax.numpy``: use it
      under ``jit``/``grad``.
    """
    import jax
    import jax.numpy as jnp

    ids = jnp.asarray(batch["input_ids"])
    logits = jnp.asarray(logits)[:, :-1].astype(jnp.float32)
    targets = ids[:, 1:]
    weights = loss_weights(batch)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = log_z - picked
    return jnp.sum(jnp.where(weights, nll, 0.0)), jnp.sum(weights.astype(jnp.int32))
