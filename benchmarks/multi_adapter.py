"""Many adapters on one base: prefill and decode tokens per second with a different adapter per
row (``lrtt.stack`` + ``lrtt.wrap(..., adapter_ids=)``), next to the base alone, one merged
adapter and one factored adapter; the memory of K adapters; gathered vs grouped per-row products.

Model: a random model of SmolLM2-135M's configuration (hidden 576, 30 layers, 9 heads / 3 KV
heads, MLP 1536, vocabulary 49,152; ``--layers`` to shorten), float32, through
``lrtt.models``. Adapters on q and v: LoRA r = 8 and LorettaRep (r = 8, TT rank 5). A stack of K
members holds random factors (a trained adapter costs the same); the batch of ``--batch`` rows
uses members ``ids = arange(batch) % K``, so K ≥ batch gives every row its own adapter.

Timing, per setting, after one untimed call of each compiled function:
  prefill: one jitted forward of (batch, ``--prompt-len``) tokens → batch·prompt_len / time
           (median of ``--repeats``);
  decode:  one jitted step of one new token per row over the KV cache the prompts filled (the
           step ``lrtt.models.generate``'s loop runs) → batch / time (median of
           ``--repeats`` × ``--new-tokens`` calls).
The ratios printed divide by the one-adapter factored setting (K = 1 row of the same method).

Gather vs group (``--micro``): one q projection (576 → 576, r = 8) over (batch, T) activations with
per-row members: lrtt's gather (each row's ``A``/``B`` gathered, two batched products) against
rows sorted by member and two ``jax.lax.ragged_dot`` over the member groups (Punica's SGMV form).

Memory: the bytes of K LorettaRep and LoRA adapters of the LLaMA-2-7B shape (q, v; 32 layers of
4096 × 4096) from their shapes, and the resident-set growth of allocating the 1,000-member
LorettaRep stack in this process.

Run:  python benchmarks/multi_adapter.py                 (~10 min on 2 CPU cores)
      python benchmarks/multi_adapter.py --layers 4 --ks 1,16 --repeats 2     (a smoke run)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lrtt  # noqa: E402
import lrtt.models  # noqa: E402
from _proc import status_bytes  # noqa: E402  (benchmarks/_proc.py)

SMOLLM2 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
               intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32, help="cache room; decode steps timed per repeat")
    parser.add_argument("--ks", default="1,4,16,64,1000")
    parser.add_argument("--methods", default="lora,loretta_rep")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    return parser.parse_args(argv)


def rss_bytes() -> int:
    return status_bytes("VmRSS") or 0


def median_time(fn, repeats):
    jax.block_until_ready(fn())  # compile / warm
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def random_stack(method, params, size, key):
    """An AdapterStack of ``size`` members with random factors (the structure of method.init)."""
    template = lrtt.stack(method, [method.init(key, params)])
    leaves, tree = jax.tree.flatten(template)
    keys = jax.random.split(key, len(leaves))
    # the scale of trained factors: small enough that the logits stay finite and sensible
    new = [0.02 * jax.random.normal(k, (size, *x.shape[1:]), x.dtype) for x, k in zip(leaves, keys)]
    return lrtt.AdapterStack(jax.tree.unflatten(tree, new).tree, size)


def throughput(model, params, apply, prompts, args):
    """``(prefill tokens/s, decode tokens/s)``: a jitted forward of the prompts, and a jitted
    one-token step over a KV cache the prompts filled (each timed call recomputes the same step)."""
    tokens = jnp.asarray(np.asarray(prompts, np.int32))
    batch, length = tokens.shape
    forward = jax.jit(lambda p, t: apply(p, t))
    prefill_s = median_time(lambda: forward(params, tokens), args.repeats)

    @jax.jit
    def fill(p, t):
        return apply(p, t, cache=model.init_cache(batch, length + args.new_tokens, "float32"))

    @jax.jit
    def step(p, t, cache):
        return apply(p, t, cache=cache)

    logits, cache = fill(params, tokens)
    last = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
    decode_s = median_time(lambda: step(params, last, cache), args.repeats * args.new_tokens)
    return batch * length / prefill_s, batch / decode_s


def micro(args):
    """Gathered vs grouped per-row LoRA products of one 576 → 576 projection."""
    d, r = 576, 8
    print(f"\ngather vs group: one {d} -> {d} projection, r = {r}, batch {args.batch}, per-row members")
    print(f"{'T':>4} {'K':>5} {'gather ms':>10} {'group ms':>9} {'group/gather':>13}")
    key = jax.random.key(0)
    for length in (1, args.prompt_len):
        for size in (16, 1000):
            x = jax.random.normal(key, (args.batch, length, d))
            a = 0.02 * jax.random.normal(jax.random.key(1), (size, d, r))
            b = 0.02 * jax.random.normal(jax.random.key(2), (size, r, d))
            ids = jnp.arange(args.batch, dtype=jnp.int32) % size

            @jax.jit
            def gather(x, a, b, ids):
                t = jnp.einsum("bmk,bkr->bmr", x, a[ids])
                return jnp.einsum("bmr,brn->bmn", t, b[ids])

            @jax.jit
            def group(x, a, b, ids):
                order = jnp.argsort(ids)
                rows = x[order].reshape(-1, d)
                sizes = jnp.bincount(ids, length=size).astype(jnp.int32) * length
                t = jax.lax.ragged_dot(rows, a, sizes)
                y = jax.lax.ragged_dot(t, b, sizes).reshape(x.shape)
                return y[jnp.argsort(order)]

            np.testing.assert_allclose(gather(x, a, b, ids), group(x, a, b, ids), rtol=1e-4, atol=1e-5)
            g = median_time(lambda: gather(x, a, b, ids), max(args.repeats, 5))
            p = median_time(lambda: group(x, a, b, ids), max(args.repeats, 5))
            print(f"{length:>4} {size:>5} {g * 1e3:>10.3f} {p * 1e3:>9.3f} {p / g:>13.2f}")


def memory(args):
    """Bytes of K adapters of the LLaMA-2-7B shape (q, v), and the RSS growth of 1,000 LorettaRep ones."""
    shapes = {"layers": {"attn": {name: {"kernel": jax.ShapeDtypeStruct((32, 4096, 4096), jnp.float16)}
                                  for name in ("q_proj", "k_proj", "v_proj", "o_proj")}}}
    layouts = {r"layers/.*": "layer in out"}
    methods = {"lora": lrtt.LoRA(rank=8, targets="qv", layouts=layouts),
               "loretta_rep": lrtt.LorettaRep(rank=8, tt_rank=5, targets="qv", layouts=layouts)}
    print("\nmemory of K adapters of the LLaMA-2-7B shape (q, v; 32 layers of 4096 x 4096), float32 factors")
    per = {}
    for name, method in methods.items():
        template = lrtt.adapter_shapes(method, shapes)
        numbers = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(template))
        per[name] = numbers
        print(f"  {name:<12} {numbers:>12,} numbers per adapter; 1,000 adapters: {numbers * 4 * 1000 / 1e9:.2f} GB")
    method = methods["loretta_rep"]
    template = lrtt.adapter_shapes(method, shapes)
    before = rss_bytes()
    leaves, tree = jax.tree.flatten(template)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    stacked = lrtt.AdapterStack(jax.tree.unflatten(tree, [
        jax.random.normal(k, (1000, *x.shape), jnp.float32) for x, k in zip(leaves, keys)]), 1000)
    jax.block_until_ready(stacked)
    grown = rss_bytes() - before
    held = sum(x.nbytes for x in jax.tree.leaves(stacked))
    print(f"  1,000 LorettaRep adapters as one stack: {held / 1e9:.3f} GB of arrays, process RSS grew "
          f"{grown / 1e9:.3f} GB (target <= 0.5 GB); LoRA r=8 would hold {per['lora'] * 4 * 1000 / 1e9:.1f} GB "
          f"({per['lora'] / per['loretta_rep']:.0f}x)")


def main(argv=None):
    args = parse_args(argv)
    config = dict(SMOLLM2, num_hidden_layers=args.layers)
    model = lrtt.models.Model.from_config(config)
    params = model.init(jax.random.key(0))
    factored = lrtt.factored(model)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, config["vocab_size"], (args.batch, args.prompt_len)).tolist()
    ks = [int(k) for k in args.ks.split(",")]
    print(f"SmolLM2-135M-shape random model ({args.layers} layers), float32, batch {args.batch}, prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens; {jax.devices()[0].platform}, jax {jax.__version__}")
    rows = [("base alone", "-", *throughput(model, params, model, prompts, args))]
    print(f"{'setting':<28} {'K':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill x':>10} {'decode x':>9}",
          flush=True)
    print(f"{rows[0][0]:<28} {'-':>5} {rows[0][2]:>14,.0f} {rows[0][3]:>13,.1f}", flush=True)
    methods = {"lora": lrtt.LoRA(rank=8, alpha=16, targets="qv"),
               "loretta_rep": lrtt.LorettaRep(rank=8, tt_rank=5, targets="qv")}
    for name in args.methods.split(","):
        method = methods[name]
        one = lrtt.member(random_stack(method, params, 1, jax.random.key(1)), 0)
        merged = lrtt.merge(method, params, one)
        m_pre, m_dec = throughput(model, merged, model, prompts, args)
        print(f"{name + ' merged':<28} {1:>5} {m_pre:>14,.0f} {m_dec:>13,.1f}", flush=True)
        s_pre, s_dec = throughput(model, lrtt.wrap(method, params, one), factored, prompts, args)
        print(f"{name + ' factored, one':<28} {1:>5} {s_pre:>14,.0f} {s_dec:>13,.1f} {1:>10.2f} {1:>9.2f}", flush=True)
        for k in ks:
            stacked = random_stack(method, params, k, jax.random.key(2))
            ids = np.arange(args.batch, dtype=np.int32) % k
            pre, dec = throughput(model, lrtt.wrap(method, params, stacked, adapter_ids=ids), factored, prompts, args)
            print(f"{name + ' stack, mixed':<28} {k:>5} {pre:>14,.0f} {dec:>13,.1f} {pre / s_pre:>10.2f} "
                  f"{dec / s_dec:>9.2f}", flush=True)
            del stacked
    if not args.skip_micro:
        micro(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
