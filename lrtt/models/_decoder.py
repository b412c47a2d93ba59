"""One config-driven decoder: pure functions over a params dict, layers scanned.

Every family of :mod:`lrtt.models._config` is this one computation with switches (norm kind,
biases, q/k norms, sandwich norms, soft-capping, sliding windows, rope per layer, learned
positions). The params are a plain dict; each layer leaf is stacked on a leading ``layers`` axis
and the layers run under ``jax.lax.scan`` with ``jax.checkpoint`` per layer. Kernels are Flax's
``(in, out)`` (``(layers, in, out)`` stacked)::

    embed/embedding               (vocab, hidden)
    pos_embed/embedding           (positions, hidden)          GPT-2
    layers/attn_norm/scale        (L, hidden)                  (+ bias: GPT-2's LayerNorm)
    layers/attn/{q,k,v,o}_proj/kernel (L, in, out)             (+ bias (L, out): Qwen2 q/k/v, GPT-2)
    layers/attn/{q,k}_norm/scale  (L, head_dim)                Qwen3, Gemma 3
    layers/post_attn_norm/scale   (L, hidden)                  Gemma 2 / 3
    layers/mlp_norm/scale         (L, hidden)                  (Gemma 2/3's pre-feedforward norm)
    layers/mlp/{gate,up,down}_proj/kernel (L, in, out)         (no gate: GPT-2; + bias: GPT-2)
    layers/post_mlp_norm/scale    (L, hidden)                  Gemma 2 / 3
    final_norm/scale              (hidden,)                    (+ bias: GPT-2)
    lm_head/kernel                (hidden, vocab)              untied heads only

Norm weights are stored as the checkpoint holds them (Gemma's ``x·(1 + w)`` keeps ``w``).
Everything is computed in float32 whatever the params' dtype (kernels are cast at each matmul).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lrtt._private import is_qwix_leaf
from lrtt.models._config import DecoderConfig, Rope

_NEG = -1e30


def param_shapes(c: DecoderConfig, dtype: Any = jnp.float32) -> dict:
    """The params tree of ``c`` as ``jax.ShapeDtypeStruct`` leaves."""
    L, D = c.num_layers, c.hidden_size

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))

    def linear(i, o, bias):
        return {"kernel": s(L, i, o), **({"bias": s(L, o)} if bias else {})}

    def norm(n, stacked=True):
        shape = (L, n) if stacked else (n,)
        return {"scale": s(*shape), **({"bias": s(*shape)} if c.norm == "layer" else {})}

    attn = {"q_proj": linear(D, c.q_size, c.qkv_bias), "k_proj": linear(D, c.kv_size, c.qkv_bias),
            "v_proj": linear(D, c.kv_size, c.qkv_bias), "o_proj": linear(c.q_size, D, c.o_bias)}
    if c.qk_norm:
        attn.update(q_norm=norm(c.head_dim), k_norm=norm(c.head_dim))
    mlp = {"up_proj": linear(D, c.intermediate_size, c.mlp_bias), "down_proj": linear(c.intermediate_size, D, c.mlp_bias)}
    if c.gated_mlp:
        mlp = {"gate_proj": linear(D, c.intermediate_size, c.mlp_bias), **mlp}
    layers = {"attn_norm": norm(D), "attn": attn, "mlp_norm": norm(D), "mlp": mlp}
    if c.sandwich_norms:
        layers.update(post_attn_norm=norm(D), post_mlp_norm=norm(D))
    tree = {"embed": {"embedding": s(c.vocab_size, D)}, "layers": layers, "final_norm": norm(D, stacked=False)}
    if c.max_positions:
        tree["pos_embed"] = {"embedding": s(c.max_positions, D)}
    if not c.tie_word_embeddings:
        tree["lm_head"] = {"kernel": s(D, c.vocab_size)}
    return tree


def init_params(c: DecoderConfig, key: Any, dtype: Any = jnp.float32, std: float = 0.02) -> dict:
    """Random params of ``c`` (normal ``std`` for kernels, embeddings and biases; norm weights
    ``1 + N(0, 0.1²)``, Gemma's ``w`` of ``1 + w`` ``N(0, 0.1²)``): for tests and examples.
    ``key``: a JAX PRNG key or an int seed (drawn with numpy: no per-leaf compilation)."""
    if isinstance(key, int):
        seed = [key]
    else:
        data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
        seed = np.asarray(data).astype(np.uint64).ravel().tolist()
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(c, dtype))
    out = []
    for path, like in leaves:
        if jax.tree_util.keystr(path).endswith("['scale']"):
            value = (0.0 if c.norm == "rms_gemma" else 1.0) + 0.1 * rng.standard_normal(like.shape)
        else:
            value = std * rng.standard_normal(like.shape)
        out.append(jnp.asarray(value.astype(np.float32), like.dtype))
    return jax.tree.unflatten(treedef, out)


def _dense(leaf: Any) -> jax.Array:
    """A param leaf as float32 (a quantized kernel is dequantized here, one layer at a time)."""
    if is_qwix_leaf(leaf):
        import lrtt

        leaf = lrtt.dequantize(leaf)
    return jnp.asarray(leaf).astype(jnp.float32)


def _linear(x, p):
    y = x @ _dense(p["kernel"])
    return y + _dense(p["bias"]) if "bias" in p else y


def _norm(c: DecoderConfig, x, p):
    if c.norm == "layer":
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + c.norm_eps) * _dense(p["scale"]) + _dense(p["bias"])
    normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + c.norm_eps)
    scale = _dense(p["scale"])
    return normed * (1.0 + scale if c.norm == "rms_gemma" else scale)


def _act(c: DecoderConfig, x):
    if c.activation == "silu":
        return jax.nn.silu(x)
    if c.activation == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if c.activation == "gelu":
        return jax.nn.gelu(x, approximate=False)
    return jax.nn.relu(x)


def inv_freq(rope: Rope | None, head_dim: int) -> np.ndarray:
    """transformers' ``inv_freq`` of one layer (``(head_dim/2,)``; zeros for no rope)."""
    if rope is None:
        return np.zeros(head_dim // 2, np.float32)
    base = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if rope.kind == "linear":
        return (base / rope.factor).astype(np.float32)
    if rope.kind == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / base
        scaled = np.where(wavelen > low_wavelen, base / rope.factor, base)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return base.astype(np.float32)


def _rotate(x, positions, freq):
    """``x: (batch, seq, heads, head_dim)`` rotated by ``positions: (batch, seq)`` (rotate_half)."""
    angles = positions[..., None].astype(jnp.float32) * freq  # (batch, seq, head_dim/2)
    emb = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * jnp.cos(emb) + rotated * jnp.sin(emb)


def _attention(c: DecoderConfig, p, h, positions, freq, window, mask, kv_positions, kv):
    """Self-attention of ``h: (B, S, D)``.

    ``mask: bool (B, S, T)`` is what the window does not decide (causal by slot, same segment);
    ``kv_positions: (B, T)`` the keys' positions, so that key ``t`` is seen by query ``s`` iff
    ``mask[b, s, t] and positions[b, s] - kv_positions[b, t] < window``. ``kv``: None (the keys
    are this call's tokens, ``T = S``) or the layer's cache ``(k, v, end)``,
    ``(B, T, kv_heads, head_dim)`` buffers into which this call's keys are written at ``end``.
    """
    B, S, _ = h.shape
    H, K, hd = c.num_heads, c.num_kv_heads, c.head_dim
    q = _linear(h, p["q_proj"]).reshape(B, S, H, hd)
    k = _linear(h, p["k_proj"]).reshape(B, S, K, hd)
    v = _linear(h, p["v_proj"]).reshape(B, S, K, hd)
    if c.qk_norm:
        q, k = _norm(c, q, p["q_norm"]), _norm(c, k, p["k_norm"])
    if c.max_positions is None:
        q, k = _rotate(q, positions, freq), _rotate(k, positions, freq)
    new_kv = None
    if kv is not None:
        cache_k, cache_v, end = kv
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, end, 0, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, end, 0, 0))
        new_kv = (cache_k, cache_v)
        k, v = cache_k.astype(jnp.float32), cache_v.astype(jnp.float32)
    q = q.reshape(B, S, K, H // K, hd)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k) * c.query_scale
    if c.attn_softcap:
        scores = jnp.tanh(scores / c.attn_softcap) * c.attn_softcap
    visible = mask & (positions[:, :, None] - kv_positions[:, None, :] < window)  # (B, S, T)
    scores = jnp.where(visible[:, None, None], scores, _NEG)  # finite: a row masked whole stays finite
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(B, S, H * hd)
    return _linear(out, p["o_proj"]), new_kv


def _layer(c: DecoderConfig, x, p, positions, freq, window, mask, kv_positions, kv):
    h, new_kv = _attention(c, p["attn"], _norm(c, x, p["attn_norm"]), positions, freq, window, mask, kv_positions, kv)
    if c.sandwich_norms:
        h = _norm(c, h, p["post_attn_norm"])
    x = x + h
    h = _norm(c, x, p["mlp_norm"])
    m = p["mlp"]
    h = _act(c, _linear(h, m["gate_proj"])) * _linear(h, m["up_proj"]) if c.gated_mlp else _act(c, _linear(h, m["up_proj"]))
    h = _linear(h, m["down_proj"])
    if c.sandwich_norms:
        h = _norm(c, h, p["post_mlp_norm"])
    return x + h, new_kv


def init_cache(c: DecoderConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> dict:
    """An empty KV cache of ``batch`` rows of ``max_len`` slots::

        k, v          (layers, batch, max_len, kv_heads, head_dim)  dtype
        segment_ids   (batch, max_len) int32   the segment id of each written slot; 0: empty / padding
        positions     (batch, max_len) int32   the position each slot was written with
        end           () int32                 the next slot to write (shared by the rows)
    """
    if batch < 1 or max_len < 1:
        raise ValueError(f"init_cache(batch={batch}, max_len={max_len}): both must be >= 1.")
    shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "positions": jnp.zeros((batch, max_len), jnp.int32),
            "end": jnp.zeros((), jnp.int32)}


_CACHE_KEYS = ("k", "v", "segment_ids", "positions", "end")


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 where the segment id changes along a row: for packed rows
    ``[[1, 1, 1, 2, 2, 0, 0]]`` -> ``[[0, 1, 2, 0, 1, 0, 1]]`` (``(batch, seq)`` int32)."""
    segment_ids = jnp.asarray(segment_ids)
    S = segment_ids.shape[1]
    index = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), segment_ids.shape)
    boundary = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    start = jax.lax.cummax(jnp.where(boundary, index, 0), axis=1)
    return index - start


def forward(c: DecoderConfig, params: dict, tokens: jax.Array, cache: dict | None = None,
            positions: jax.Array | None = None, remat: bool = True, segment_ids: jax.Array | None = None):
    """Logits ``(batch, seq, vocab)`` float32 of ``tokens: (batch, seq)``; with ``cache``,
    ``(logits, cache)`` where the tokens are written at slots ``cache["end"] + arange(seq)`` of
    every row and attend to the cache.

    Query ``i`` sees key ``j`` (slots; with a cache, ``j`` ranges over the cache's slots) iff

    .. math:: j \\le i \\;\\wedge\\; \\mathrm{seg}_j = \\mathrm{seg}_i \\;\\wedge\\; \\mathrm{pos}_i - \\mathrm{pos}_j < w_\\ell

    (causal by slot, within the segment, the sliding window ``w_ℓ`` of layer ℓ by position; a
    global layer has ``w = ∞``). A query that sees no key (never the case for a real token, which
    sees itself) gets finite garbage, not NaN.

    Args:
      segment_ids: ``int32 (batch, seq)``; default all 1. Without a cache: several examples packed
        in a row (ids ``1, 2, ...``, 0 for padding), each attending only within itself, so a packed
        row gives each example's logits alone. With a cache: 0 marks padding (left-padded prompts of
        different lengths), other ids are stored per slot and matched, so each row is its prompt alone.
      positions: ``int32 (batch, seq)`` for the rotary embedding / GPT-2's position table. Default
        without a cache: ``arange(seq)``, or restarting at 0 at each change of ``segment_ids``
        (:func:`segment_positions`); with a cache: per row, continuing from the last written
        position, counting only non-padding tokens (``next + cumsum(seg != 0) - (seg != 0)``), so
        left padding is skipped.
    """
    tokens = jnp.asarray(tokens)
    B, S = tokens.shape
    if cache is not None and any(key not in cache for key in _CACHE_KEYS):
        raise ValueError(f"cache has keys {sorted(cache)}, expected {sorted(_CACHE_KEYS)}: make it with "
                         "model.init_cache(batch, max_len) (caches of older lrtt versions lack segment_ids / positions).")
    explicit_segments = segment_ids is not None
    segment_ids = jnp.ones((B, S), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    if segment_ids.shape != (B, S):
        raise ValueError(f"segment_ids has shape {segment_ids.shape}, tokens {(B, S)}: give one id per token.")
    if positions is not None:
        positions = jnp.asarray(positions, jnp.int32)
        positions = jnp.broadcast_to(positions, (B, S)) if positions.ndim == 1 else positions
        if positions.shape != (B, S):
            raise ValueError(f"positions has shape {positions.shape}, tokens {(B, S)}: give one position per token.")
    if cache is None:
        start = 0
        if positions is None:
            positions = segment_positions(segment_ids) if explicit_segments else jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        kv_positions, kv_segments = positions, segment_ids
        mask = jnp.tril(jnp.ones((S, S), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    else:
        start = cache["end"]
        if positions is None:
            valid = (segment_ids != 0).astype(jnp.int32)
            following = jnp.max(jnp.where(cache["segment_ids"] != 0, cache["positions"] + 1, 0), axis=1)
            positions = following[:, None] + jnp.cumsum(valid, axis=1) - valid
        kv_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, start))
        kv_positions = jax.lax.dynamic_update_slice(cache["positions"], positions, (0, start))
        T = kv_segments.shape[1]
        causal = jnp.arange(T)[None, :] <= (start + jnp.arange(S))[:, None]  # (S, T)
        mask = causal[None] & (segment_ids[:, :, None] == kv_segments[:, None, :])
    embedding = params["embed"]["embedding"]
    x = jnp.take(embedding, tokens, axis=0)
    if c.embed_scale:  # transformers scales in the embedding's dtype
        x = x * jnp.asarray(math.sqrt(c.hidden_size), dtype=x.dtype)
    x = x.astype(jnp.float32)
    if c.max_positions:  # padding may sit past the table: clip (its output is never used) instead of NaN
        x = x + jnp.take(params["pos_embed"]["embedding"], positions, axis=0, mode="clip").astype(jnp.float32)
    freqs = jnp.asarray(np.stack([inv_freq(r, c.head_dim) for r in c.layer_rope]))
    windows = jnp.asarray([w if w else np.iinfo(np.int32).max for w in c.layer_window], jnp.int32)

    def body(x, xs):
        p, freq, window, kv = xs
        if kv is not None:
            kv = (*kv, start)
        x, new_kv = _layer(c, x, p, positions, freq, window, mask, kv_positions, kv)
        return x, new_kv

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    kv = (cache["k"], cache["v"]) if cache is not None else None
    x, new_kv = jax.lax.scan(body, x, (params["layers"], freqs, windows, kv))
    x = _norm(c, x, params["final_norm"])
    if c.tie_word_embeddings:
        logits = x @ _dense(embedding).T
    else:
        logits = x @ _dense(params["lm_head"]["kernel"])
    if c.final_softcap:
        logits = jnp.tanh(logits / c.final_softcap) * c.final_softcap
    if cache is None:
        return logits
    return logits, {"k": new_kv[0], "v": new_kv[1], "segment_ids": kv_segments, "positions": kv_positions,
                    "end": start + S}
