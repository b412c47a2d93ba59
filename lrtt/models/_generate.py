"""Batched autoregressive generation with the KV cache: :func:`generate`.

A batch of prompts of different lengths is left-padded to one *bucketed* length ``P`` (segment
id 0 on the padding, 1 on the prompt), prefilled in one jitted call, then decoded in one jitted
``lax.while_loop`` (one token per row per iteration, stopping early once every row is done)::

    prompts  [[5, 9, 2], [7, 1]]                 P = bucket(3) = 16, N = bucket(max_new_tokens)
    tokens   (B, P)      [[0 … 0 5 9 2], [0 … 0 0 7 1]]   left-padded with pad_token_id
    segments (B, P)      [[0 … 0 1 1 1], [0 … 0 0 1 1]]   0: padding, seen by no prompt token
    cache    (layers, B, P + N, kv_heads, head_dim)       + per-slot segment ids and positions

Each row's positions count its own tokens only (``0 … len-1`` on the prompt, then on), so every
row computes exactly what its prompt alone would (tested to 1e-5 against the unpadded forward and
token for token against transformers' ``generate``). Compiled code is keyed on ``(B, P, N)``, the
sampling mode and ``apply``; the bucketing makes other prompt lengths / ``max_new_tokens`` of the
same bucket reuse it (no compilation per call, none per token).
"""

from __future__ import annotations

import collections
import functools
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_TRACES: collections.Counter = collections.Counter()
"""How many times the prefill / decode functions were traced (each trace is one compilation):
the tests check that new prompt lengths of the same bucket compile nothing."""


def bucket(n: int) -> int:
    """The padded length for ``n`` tokens: the next power of two (at least 16) up to 1024, then
    the next multiple of 512. Lengths of one bucket share compiled code."""
    if n <= 1024:
        return max(16, 1 << (max(n, 1) - 1).bit_length())
    return -(-n // 512) * 512


def _as_token_lists(prompts: Any, vocab: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts is a string: tokenize it first and pass [token_ids] (a list of token-id lists).")
    try:
        rows = list(prompts)
    except TypeError:
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}.") from None
    if not rows:
        raise ValueError("prompts is empty: pass at least one prompt (a list of token ids).")
    if all(np.ndim(r) == 0 for r in rows):
        raise ValueError("prompts is a flat list of ints: pass [prompt] for a single prompt (a list of token-id lists).")
    out = []
    for i, row in enumerate(rows):
        ids = np.asarray(row)
        if ids.ndim != 1:
            raise ValueError(f"prompt {i} has shape {ids.shape}: each prompt must be a 1-D list of token ids.")
        if ids.size == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (start it with the "
                             "tokenizer's BOS token, e.g. config.json's bos_token_id).")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt {i} holds {ids.dtype} values: token ids must be integers.")
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise ValueError(f"prompt {i} holds token id {bad}, outside the model's vocabulary [0, {vocab}): "
                             "was it tokenized with another model's tokenizer?")
        out.append([int(t) for t in ids])
    return out


def _token_ids(value: Any, name: str) -> list[int]:
    if value is None:
        return []
    if np.ndim(value) == 0:
        return [int(value)]
    return [int(v) for v in value]


def default_eos_token_id(model: Any) -> list[int]:
    """The EOS ids transformers' ``generate`` would use: ``generation_config.json``'s
    ``eos_token_id`` in ``model.source`` when present, else ``config.json``'s (int, list or none)."""
    source = getattr(model, "source", None)
    if source and os.path.isfile(os.path.join(source, "generation_config.json")):
        with open(os.path.join(source, "generation_config.json")) as f:
            generation = json.load(f)
        if generation.get("eos_token_id") is not None:
            return _token_ids(generation["eos_token_id"], "eos_token_id")
    return _token_ids(model.config.raw.get("eos_token_id"), "eos_token_id")


def _max_positions(model: Any) -> int | None:
    c = model.config
    if c.max_positions:
        return int(c.max_positions)
    limit = c.raw.get("max_position_embeddings")
    return int(limit) if limit else None


@functools.partial(jax.jit, static_argnames=("model", "apply", "max_len", "cache_dtype"))
def _prefill(params, tokens, segment_ids, *, model, apply, max_len, cache_dtype):
    """The prompts ``(B, P)`` written into a fresh cache of ``max_len`` slots; the last slot's
    logits ``(B, vocab)`` (left padding: every row's last prompt token sits there)."""
    _TRACES["prefill"] += 1
    cache = model.init_cache(tokens.shape[0], max_len, cache_dtype)
    logits, cache = apply(params, tokens, cache=cache, segment_ids=segment_ids)
    return logits[:, -1].astype(jnp.float32), cache


def _pick(logits, key, temperature, top_p, *, greedy, top_k, use_top_p):
    """Next tokens ``(B,)`` of ``logits (B, V)``: argmax, or a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest, then to the smallest
    set of largest whose probabilities sum to ``>= top_p`` (transformers' order of warpers)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        ordered = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the mass before a token; the first is kept
        least = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < least, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("apply", "n_out", "greedy", "top_k", "use_top_p"))
def _decode(params, logits, cache, key, max_new, temperature, top_p, eos, stops, stop_lengths, pad, *,
            apply, n_out, greedy, top_k, use_top_p):
    """Up to ``max_new`` tokens per row from the prefill's ``logits (B, V)`` and ``cache``, in one
    ``lax.while_loop``: ``(tokens (B, n_out), lengths (B,))``; a row stops after EOS or a stop
    sequence (included), the loop once every row has stopped."""
    _TRACES["decode"] += 1
    B = logits.shape[0]
    L = stops.shape[1]
    pick = functools.partial(_pick, temperature=temperature, top_p=top_p, greedy=greedy, top_k=top_k,
                             use_top_p=use_top_p)
    stop_visible = jnp.arange(L)[None, :] >= L - stop_lengths[:, None]  # (n_stops, L): right-aligned

    def emit(token, t, out, done, length, recent):
        token = jnp.where(done, pad, token)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, t))
        length = jnp.where(done, length, t + 1)
        recent = jnp.concatenate([recent[:, 1:], token[:, None]], axis=1)
        hit_eos = jnp.any(token[:, None] == eos[None, :], axis=-1)
        same = (recent[:, None, :] == stops[None]) | ~stop_visible[None]  # (B, n_stops, L)
        hit_stop = jnp.any(jnp.all(same, axis=-1), axis=-1)
        return token, out, done | hit_eos | hit_stop, length, recent

    out = jnp.full((B, n_out), pad, jnp.int32)
    done = jnp.zeros((B,), bool)
    length = jnp.zeros((B,), jnp.int32)
    recent = jnp.full((B, L), -1, jnp.int32)
    first = pick(logits, jax.random.fold_in(key, 0))
    state = (jnp.int32(1), cache, *emit(first, 0, out, done, length, recent))

    def cond(state):
        t, _, _, _, done, _, _ = state
        return (t < max_new) & ~jnp.all(done)

    def body(state):
        t, cache, token, out, done, length, recent = state
        logits, cache = apply(params, token[:, None], cache=cache)
        token = pick(logits[:, -1].astype(jnp.float32), jax.random.fold_in(key, t))
        return (t + 1, cache, *emit(token, t, out, done, length, recent))

    _, _, _, out, _, length, _ = jax.lax.while_loop(cond, body, state)
    return out, length


@functools.lru_cache(maxsize=None)
def _factored(model: Any) -> Callable:
    """One ``lrtt.factored(model)`` per model, so that calls share compiled code."""
    import lrtt

    return lrtt.factored(model)


def _per_prompt(model, params, apply, adapters, adapter_ids, batch):
    """``(params, apply)`` running prompt ``i`` with member ``adapter_ids[i]`` of a stack."""
    import lrtt

    if adapters is None or adapter_ids is None:
        raise ValueError("an adapter per prompt needs both adapters=(method, lrtt.stack(method, [...])) and "
                         "adapter_ids=[one member id per prompt, -1 for the base].")
    method, stacked = adapters
    ids = np.asarray(adapter_ids)
    if ids.shape != (batch,):
        raise ValueError(f"adapter_ids has shape {ids.shape}; give one id per prompt ({batch}).")
    wrapped = lrtt.wrap(method, params, stacked, adapter_ids=ids.astype(np.int32))
    return wrapped, _factored(model) if apply is None else apply


def generate(model: Any, params: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_token_id: int | Sequence[int] | None = None, stop: Sequence[Sequence[int]] | None = None,
             cache_dtype: Any = jnp.float32, apply: Callable | None = None, pad_token_id: int = 0,
             adapters: tuple[Any, Any] | None = None, adapter_ids: Sequence[int] | None = None) -> list[list[int]]:
    """Completions of a batch of prompts of different lengths, with the KV cache.

    The prompts are left-padded to ``P = bucket(max len)`` (:func:`bucket`: a power of two ≥ 16,
    beyond 1024 a multiple of 512) and prefilled in one jitted call; the cache has
    ``P + bucket(max_new_tokens)`` slots; then one jitted ``lax.while_loop`` emits one token per
    row per step. Each row is computed as its prompt alone (per-row positions, padding masked by
    segment id). Per step, with logits ``z`` of the row's last token:

    - greedy (``temperature=0``): ``argmax z``;
    - sampling: ``z / temperature``, keep the ``top_k`` largest, keep the smallest set of largest
      with probability mass ``≥ top_p``, draw from the softmax with key
      ``fold_in(key(seed), step)`` (same seed and batch: same completions).

    A row stops after emitting an EOS id or completing a ``stop`` sequence; **the EOS token / the
    stop sequence is included** in its completion (as transformers' ``generate`` does; strip it
    if unwanted). The loop ends when every row has stopped or after ``max_new_tokens``.

    Compiled code is reused across calls with the same batch size, prompt bucket,
    ``bucket(max_new_tokens)``, sampling mode (greedy / ``top_k`` / whether ``top_p``), number
    of EOS ids and stop sequences, ``cache_dtype`` and ``apply`` object: keep one
    ``apply = lrtt.factored(model)`` rather than making a new one per call.

    Args:
      model: an :class:`lrtt.models.Model` (its config, cache layout, EOS default).
      params: what ``apply`` takes as first argument: the model's params dict (quantized or not),
        ``lrtt.merge``'d params, or ``lrtt.wrap(method, params, adapter)`` with
        ``apply=lrtt.factored(model)``. Passed to the jitted functions as an argument (never a
        compile-time constant).
      prompts: a list of B token-id lists (ints in ``[0, vocab)``), each at least one token long.
      max_new_tokens: at most this many tokens per completion (≥ 1).
      temperature: 0 for greedy decoding, else the softmax temperature (> 0).
      top_k: sample among the ``k`` most likely tokens only (``top_k=1`` is greedy).
      top_p: nucleus sampling threshold in ``(0, 1]``.
      seed: the sampling seed.
      eos_token_id: an id or a list of ids that end a row; default (None) the model's
        (``generation_config.json`` in ``model.source``, else ``config.json``); ``[]`` for none.
      stop: token-id sequences that end a row when its completion ends with one (string stops:
        tokenize them, or check the decoded text in the caller).
      cache_dtype: dtype of the KV cache (``jnp.bfloat16`` halves its memory; float32 default).
      apply: ``apply(params, tokens, cache=..., segment_ids=...) -> (logits, cache)``; default
        ``model``. ``lrtt.factored(model)`` passes these keywords through.
      pad_token_id: the token placed on the left padding and after a row's end (never returned).
      adapters, adapter_ids: an adapter per prompt: ``adapters=(method, stacked)`` with
        ``stacked`` an :class:`lrtt.AdapterStack` (``lrtt.stack``) over the base ``params``, and
        ``adapter_ids`` one member per prompt (``-1``: the base alone). Runs
        ``lrtt.wrap(method, params, stacked, adapter_ids=...)`` factored (one compiled program
        per model and shapes, whatever the ids); each prompt's greedy completion equals its
        completion alone with its adapter merged.

    Returns:
      B lists of token ids (without the prompt), each at most ``max_new_tokens`` long.

    Raises:
      ValueError / TypeError: no prompts, an empty prompt, ids outside the vocabulary, a prompt
        plus ``max_new_tokens`` longer than the model's positions (``max_position_embeddings`` /
        GPT-2's ``n_positions``), bad sampling arguments; each message names the fix.

    Example:
      >>> import lrtt.models
      >>> model = lrtt.models.Model.from_config(dict(
      ...     model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32,
      ...     intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64))
      >>> params = model.init(0)
      >>> out = lrtt.models.generate(model, params, [[1, 5, 9], [1, 7]], max_new_tokens=4, eos_token_id=[])
      >>> [len(o) for o in out]
      [4, 4]
    """
    c = model.config
    rows = _as_token_lists(prompts, c.vocab_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: give a positive int.")
    max_new_tokens = int(max_new_tokens)
    limit = _max_positions(model)
    longest = max(range(len(rows)), key=lambda i: len(rows[i]))
    if limit is not None and len(rows[longest]) + max_new_tokens > limit:
        n = len(rows[longest])
        raise ValueError(
            f"prompt {longest} has {n} tokens; with max_new_tokens={max_new_tokens} that is {n + max_new_tokens} "
            f"positions, more than the model's {limit} (max_position_embeddings / n_positions): lower "
            f"max_new_tokens to {max(limit - n, 0)} or keep the prompt's last {max(limit - max_new_tokens, 0)} tokens.")
    if temperature < 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature={temperature!r}: give 0 (greedy) or a positive number.")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or not 1 <= top_k <= c.vocab_size):
        raise ValueError(f"top_k={top_k!r}: give an int in [1, {c.vocab_size}] (the vocabulary size), or None.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}: give a number in (0, 1], or None.")
    if not 0 <= pad_token_id < c.vocab_size:
        raise ValueError(f"pad_token_id={pad_token_id}: give an id in [0, {c.vocab_size}).")
    greedy = temperature == 0
    if greedy and (top_k is not None or top_p is not None):
        raise ValueError("top_k / top_p are sampling options but temperature=0 (greedy): give temperature > 0 "
                         "(e.g. 1.0) to sample.")
    eos = default_eos_token_id(model) if eos_token_id is None else _token_ids(eos_token_id, "eos_token_id")
    stops = [[int(t) for t in s] for s in (stop or [])]
    if any(not s for s in stops):
        raise ValueError("stop holds an empty sequence: every stop sequence needs at least one token id.")
    width = max([len(s) for s in stops], default=1)
    stop_array = np.full((len(stops), width), -1, np.int32)
    for i, s in enumerate(stops):
        stop_array[i, width - len(s):] = s

    B = len(rows)
    if adapters is not None or adapter_ids is not None:
        params, apply = _per_prompt(model, params, apply, adapters, adapter_ids, B)
    P = bucket(max(len(r) for r in rows))
    N = bucket(max_new_tokens)
    tokens = np.full((B, P), pad_token_id, np.int32)
    segments = np.zeros((B, P), np.int32)
    for b, r in enumerate(rows):
        tokens[b, P - len(r):] = r
        segments[b, P - len(r):] = 1
    apply = model if apply is None else apply
    logits, cache = _prefill(params, tokens, segments, model=model, apply=apply, max_len=P + N,
                             cache_dtype=jnp.dtype(cache_dtype).name)
    out, length = _decode(
        params, logits, cache, jax.random.key(seed), np.int32(max_new_tokens), np.float32(temperature or 1.0),
        np.float32(1.0 if top_p is None else top_p), np.asarray(eos, np.int32).reshape(-1), stop_array,
        np.asarray([len(s) for s in stops], np.int32), np.int32(pad_token_id),
        apply=apply, n_out=N, greedy=greedy, top_k=None if top_k is None else int(top_k),
        use_top_p=top_p is not None and top_p < 1)
    out, length = np.asarray(out), np.asarray(length)
    return [out[b, :length[b]].tolist() for b in range(B)]
