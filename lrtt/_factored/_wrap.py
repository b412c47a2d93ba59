"""``wrap``: the params with each adapted leaf replaced by the leaf its entry makes."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lrtt._adapter import Site
from lrtt._groups import LayerGroups, per_layer
from lrtt._leaves import QuantizedLeaf
from lrtt._paths import is_quantized, quantized_array, replace_leaves
from lrtt._resolve import resolve
from lrtt._stack import AdapterStack, check_ids


def _as_typed_key(rng):
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)


def wrap(method: Any, params: Any, adapter: Any, *, rng: jax.Array | None = None, adapter_ids: Any = None) -> Any:
    """The params with every adapted leaf replaced by an adapted leaf (factors kept apart).

    Call it *inside* the function you differentiate, so that gradients reach the adapter::

        def loss(adapter):
            wrapped = lrtt.wrap(method, params, adapter)
            return lrtt.factored(model_fn)(wrapped, batch)

    ========================  ================================================================
    adapter entry             leaf in the result
    ========================  ================================================================
    ``LoraFactors``           ``LowRankLeaf(w0, a, b)``
    ``TTFactors``             ``LowRankLeaf(w0, TT_A, TT_B)`` (the small matrices, not ``ΔW``)
    ``BottleneckAdapter``     ``AdapterLeaf(w0, b0, D, d, U, u)``
    ``TTKernel``              the dense TT matrix, in the leaf's layout and dtype
    ``Trainable``             its value, in the leaf's dtype
    (none, quantized ``W0``)  ``QuantizedLeaf(w0)``: dequantized at each use
    ========================  ================================================================

    Args:
      method: the method that made ``adapter`` (its ``layouts`` and ``dropout`` are used).
      params: the frozen params (any pytree: linen dict, ``nnx.State``, transformers params).
      adapter: the adapter tree from ``method.init``, or that tree grouped by
        :func:`lrtt.group_layers` (faster to compile on a model with unrolled layers).
      rng: a PRNG key for dropout on the adapter's input (used when ``method.dropout > 0``);
        each target gets its own keys, one per stacked layer. None: no dropout (evaluation).
      adapter_ids: with an :class:`lrtt.AdapterStack` (``lrtt.stack``) as ``adapter``: int32
        ``(batch,)``, the member each batch row runs with (``-1``: the base alone). The model's
        activations at each adapted product must have the batch as their first axis (outside
        the axes the product contracts), as ``(batch, seq, features)`` has.

    Returns:
      A tree with the structure of ``params``.

    Each entry makes its own leaf (``Entry.factored``); the table lists lrtt's entry types.

    Raises:
      AdapterMismatchError: the adapter names leaves the params lack, its factors do not fit
        them, or it has no entry for a leaf the method selects in ``params``
        (``method.plan(params)``): an adapter made for another model (:func:`lrtt.resolve`).
    """
    ids = None
    if isinstance(adapter, LayerGroups):  # each group's factor matrices formed once, for all its layers
        adapter = per_layer(adapter)
    if isinstance(adapter, AdapterStack):
        if adapter_ids is None:
            raise ValueError("the adapter is a stack of adapters (lrtt.stack): give adapter_ids=, one member id "
                             "per batch row (-1: the base alone), or wrap one member (lrtt.member(stacked, k)).")
        ids = check_ids(adapter_ids, adapter.size)
        adapter = adapter.tree
    elif adapter_ids is not None:
        raise ValueError("adapter_ids= was given but the adapter is a single adapter: stack several with "
                         "lrtt.stack(method, adapters) to run each row with its own.")
    resolved = resolve(method, params, adapter, stacked=ids is not None)
    targets, leaves = resolved.targets, resolved.leaves
    rate = float(method.dropout)
    keys = {}
    low_rank = [p for p, e in resolved.entries.items() if e.low_rank]
    if rng is not None and rate > 0.0 and low_rank:
        for path, k in zip(low_rank, jax.random.split(_as_typed_key(rng), len(low_rank))):
            stack = targets[path].stack  # one key per stacked layer: scan slices them
            keys[path] = jax.random.split(k, math.prod(stack)).reshape(stack)
    replacements = {}
    for path, entry in resolved.entries.items():
        w0 = leaves[path]
        if is_quantized(w0):
            w0 = quantized_array(w0)
        site = Site(path, w0, targets.get(path), leaves, key=keys.get(path), dropout=rate, ids=ids)
        replacements[path] = entry.factored(site)
    for path, w0 in leaves.items():  # quantized kernels no adapter touches: dequantized at use
        if path not in replacements and is_quantized(w0):
            replacements[path] = QuantizedLeaf(quantized_array(w0), path=path)
    return replace_leaves(params, replacements)
