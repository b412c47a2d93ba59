"""A Llama decoder whose layers run under ``nn.scan`` (MaxText's ``scan_layers``), with
transformers' parameter names, for the memory benchmark.

transformers' Flax Llama unrolls its layers: XLA's CPU schedule then holds the float form of
every quantized kernel at once (docs/results.md). Here one remat'ed layer is scanned over
stacked kernels, so one layer's kernels exist in float at a time. The math is transformers'
``FlaxLlamaForCausalLM`` (RMSNorm, rotary embeddings with ``rotate_half``, grouped-query
attention, SwiGLU MLP; computed in float32 whatever the params' dtype, as
transformers' ``dtype=jnp.float32``; ``tests/test_scan_llama.py`` checks equal logits); the params are
transformers' with the layer index moved into a leading axis of each layer leaf:

    model/layers/{i}/self_attn/q_proj/kernel (in, out)  ->  model/layers/self_attn/q_proj/kernel (layers, in, out)

:func:`stack_layers` converts a transformers Llama param tree.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYOUTS = {r"model/layers/.*/kernel": "layer in out"}
"""The layout of every stacked kernel, for the methods' and ``lrtt.quantize``'s ``layouts``."""


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 / jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(jnp.float32) * normed


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rotary(x, positions, theta):
    """``x: (batch, seq, heads, head_dim)`` rotated by ``positions: (batch, seq)``."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return (x * jnp.cos(emb) + _rotate_half(x) * jnp.sin(emb)).astype(x.dtype)


class Mlp(nn.Module):
    config: Any

    @nn.compact
    def __call__(self, h):
        c = self.config
        gate = nn.Dense(c.intermediate_size, use_bias=False, dtype=jnp.float32, name="gate_proj")(h)
        up = nn.Dense(c.intermediate_size, use_bias=False, dtype=jnp.float32, name="up_proj")(h)
        return nn.Dense(c.hidden_size, use_bias=False, dtype=jnp.float32, name="down_proj")(jax.nn.silu(gate) * up)


class Attention(nn.Module):
    config: Any

    @nn.compact
    def __call__(self, h, positions):
        c = self.config
        heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
        head_dim = c.hidden_size // heads
        batch, seq, _ = h.shape

        def project(features, name):
            return nn.Dense(features * head_dim, use_bias=False, dtype=jnp.float32, name=name)(h).reshape(batch, seq, features, head_dim)

        q, k, v = project(heads, "q_proj"), project(kv_heads, "k_proj"), project(kv_heads, "v_proj")
        q, k = _rotary(q, positions, c.rope_theta), _rotary(k, positions, c.rope_theta)
        k, v = (jnp.repeat(t, heads // kv_heads, axis=2) for t in (k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((seq, seq), bool))
        probs = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(jnp.float32).min), axis=-1).astype(v.dtype)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, heads * head_dim)
        return nn.Dense(c.hidden_size, use_bias=False, dtype=jnp.float32, name="o_proj")(attn)


class Layer(nn.Module):
    """One decoder layer; ``__call__(x, positions) -> (x, None)`` (the scan's carry and output)."""

    config: Any

    @nn.compact
    def __call__(self, x, positions):
        eps = self.config.rms_norm_eps
        x = x + Attention(self.config, name="self_attn")(RMSNorm(eps, name="input_layernorm")(x), positions)
        return x + Mlp(self.config, name="mlp")(RMSNorm(eps, name="post_attention_layernorm")(x)), None


class Decoder(nn.Module):
    config: Any
    remat: bool = True

    @nn.compact
    def __call__(self, ids):
        c = self.config
        x = nn.Embed(c.vocab_size, c.hidden_size, dtype=jnp.float32, name="embed_tokens")(ids)
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        body = nn.remat(Layer, prevent_cse=False) if self.remat else Layer
        layers = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast,), length=c.num_hidden_layers)
        x, _ = layers(c, name="layers")(x, positions)
        return RMSNorm(c.rms_norm_eps, name="norm")(x)


class ScannedLlamaForCausalLM(nn.Module):
    """``ids: (batch, seq) -> logits (batch, seq, vocab)``; ``config``: a transformers ``LlamaConfig``
    (``remat``: recompute each layer in the backward pass, as MaxText's scanned layers do)."""

    config: Any
    remat: bool = True

    @nn.compact
    def __call__(self, ids):
        x = Decoder(self.config, self.remat, name="model")(ids)
        return nn.Dense(self.config.vocab_size, use_bias=False, dtype=jnp.float32, name="lm_head")(x)


def stack_layers(params: Any) -> Any:
    """A transformers Flax Llama param tree (``model/layers/{i}/...``) in this model's layout: each
    layer leaf stacked over the layers on a new leading axis (the inputs are not kept)."""
    model = dict(params["model"])
    per_layer = model.pop("layers")
    layers = [per_layer[str(i)] for i in range(len(per_layer))]
    model["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return {**params, "model": model}
