""":class:`Model`: the decoder of one ``config.json``, a callable over a params dict."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from lrtt.models import _decoder
from lrtt.models._config import DecoderConfig, parse_config


_forward = jax.jit(_decoder.forward, static_argnums=(0, 5))
"""The forward pass, compiled once per config and input shapes (also when called eagerly)."""


@dataclasses.dataclass(frozen=True)
class Model:
    """A causal LM of a supported family: ``model(params, tokens) -> logits``.

    Pure: the params are an argument (a dict, layers stacked; see :mod:`lrtt.models._decoder`),
    so ``lrtt.factored(model)``, ``jax.jit``, ``jax.grad`` apply to it as to any function.

    Attributes:
      config: the parsed :class:`DecoderConfig` (``config.raw`` is the ``config.json`` dict).
      source: the checkpoint directory it was loaded from (its ``config.json``, tokenizer and
        ``generation_config.json`` are copied by :func:`lrtt.models.save`), or None.
      remat: recompute each layer in the backward pass (``jax.checkpoint`` per scanned layer).
    """

    config: DecoderConfig
    source: str | None = None
    remat: bool = True

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | os.PathLike, **kwargs: Any) -> "Model":
        """A model of a ``config.json`` dict, or of the file / directory holding one."""
        if not isinstance(config, Mapping):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                config = json.load(f)
        return cls(parse_config(config), **kwargs)

    def __call__(self, params: Any, tokens: jax.Array, cache: dict | None = None, positions: jax.Array | None = None,
                 *, segment_ids: jax.Array | None = None):
        """``tokens: int32 (batch, seq)`` -> logits ``float32 (batch, seq, vocab)``; with ``cache``
        (from :meth:`init_cache`) -> ``(logits, cache)``, the tokens appended to the cache.

        ``segment_ids: int32 (batch, seq)``: without a cache, examples packed in one row (each
        attends only to itself; 0 = padding; positions restart per segment unless given); with a
        cache, 0 marks padding (left-padded prompts of different lengths in one batch). See
        :func:`lrtt.models._decoder.forward` for the mask and the default ``positions``.
        """
        return _forward(self.config, params, tokens, cache, positions, self.remat, segment_ids)

    def init_cache(self, batch: int, max_len: int, dtype: Any = jnp.float32) -> dict:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens: ``k``, ``v``
        ``(layers, batch, max_len, kv_heads, head_dim)``, per-slot ``segment_ids`` and ``positions``
        ``(batch, max_len)``, and the next slot ``end``."""
        return _decoder.init_cache(self.config, batch, max_len, dtype)

    def param_shapes(self, dtype: Any = jnp.float32) -> dict:
        """The params tree as ``jax.ShapeDtypeStruct`` leaves (no memory)."""
        return _decoder.param_shapes(self.config, dtype)

    def init(self, key: jax.Array, dtype: Any = jnp.float32) -> dict:
        """Random params (for tests and examples; pretrained ones come from :func:`lrtt.models.load`)."""
        return _decoder.init_params(self.config, key, dtype)
