"""Packed rows against padded rows: real (non-pad) tokens per second of a LoRA training step.

A synthetic chat-like data set of examples of mixed lengths — ``--examples`` lengths drawn from a
skewed (log-normal) distribution, median ``--median`` tokens, clipped to [``--min-len``,
``--max-len``] — each with a prompt part (no loss) and a reply part (the loss), is turned into
batches of ``--batch`` rows of ``--max-len`` tokens by ``lrtt.data.batches`` twice: one example
per row (``packing=False``) and several per row (``packing=True``). Both modes run the same
jitted step — ``lrtt.train.jit_step`` over ``lrtt.train.make_loss``: the mean of
``lrtt.data.masked_lm_loss`` of the factored model (``positions``, ``segment_ids`` passed) and an
AdamW update of the LoRA adapter, the frozen params a jit argument — on a random Llama
built by ``lrtt.models.Model.from_config`` (hidden 256, 4 layers, vocab 8192 by default). The
batches are made before timing (the pipeline's own cost: benchmarks/input_pipeline.py).

Timing: one compile (both modes have the same shapes), then ``--rounds`` interleaved rounds of
``--steps`` steps per mode (each mode's first step of a round untimed). Reported per mode: the
median over rounds of (real tokens of the timed batches) / (their time), the step time, and the
time of one epoch (every example once) = batches per epoch × median step time. As a check that
packing changes the arithmetic only, the summed masked loss of the whole epoch at the initial
adapter is computed both ways (the same examples: equal up to float error).

Run:  python benchmarks/packing.py            (about a minute on 2 CPU cores)
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
import optax  # noqa: E402

import lrtt  # noqa: E402
import lrtt.data  # noqa: E402
import lrtt.models  # noqa: E402
import lrtt.train  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--median", type=float, default=60.0, help="median example length (tokens)")
    parser.add_argument("--sigma", type=float, default=0.7, help="log-normal sigma of the lengths")
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256, help="tokens per row (and the longest example)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode per round")
    return parser.parse_args(argv)


def make_examples(args, rng: np.random.Generator) -> list[dict]:
    """``{"input_ids", "loss_mask"}`` per example, as ``lrtt.data.tokenize`` yields them: the first
    ~60 % a prompt (mask 0), the rest a reply (mask 1); token 0 is never a target."""
    lengths = np.clip(np.round(rng.lognormal(np.log(args.median), args.sigma, args.examples)),
                      args.min_len, args.max_len).astype(int)
    examples = []
    for n in lengths:
        ids = rng.integers(3, args.vocab, n).astype(np.int32)
        mask = np.zeros(n, np.int32)
        mask[max(1, int(0.6 * n)):] = 1
        examples.append({"input_ids": ids, "loss_mask": mask})
    return examples


def main(argv=None):
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    examples = make_examples(args, rng)
    lengths = np.array([len(e["input_ids"]) for e in examples])
    total_tokens = int(lengths.sum())

    modes = {}
    for name, packing in (("padded", False), ("packed", True)):
        batches = list(lrtt.data.batches(examples, args.batch, max_len=args.max_len, packing=packing, pad_id=0,
                                         shuffle_buffer=len(examples), seed=0, drop_last=False))
        real = [int((b["segment_ids"] > 0).sum()) for b in batches]
        modes[name] = {"batches": batches, "real": real}
        assert sum(real) == total_tokens, (name, sum(real), total_tokens)

    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=args.vocab,
                  hidden_size=args.hidden, intermediate_size=688 * args.hidden // 256,
                  num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                  rms_norm_eps=1e-6, max_position_embeddings=max(512, args.max_len), tie_word_embeddings=False)
    model = lrtt.models.Model.from_config(config)
    params = model.init(jax.random.key(0))
    method = lrtt.LoRA(rank=args.rank, targets=args.targets)
    adapter = method.init(jax.random.key(1), params)
    optimizer = optax.adamw(1e-3)

    def forward(params, batch, rng=None):
        return model(params, batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])

    def sums(adapter, params, batch):
        return lrtt.data.masked_lm_loss(lrtt.factored(forward)(lrtt.wrap(method, params, adapter), batch), batch)

    def mean_loss(logits, batch):
        total, count = lrtt.data.masked_lm_loss(logits, batch)
        return total / jnp.maximum(count, 1)

    step = lrtt.train.jit_step(lrtt.train.make_loss(method, forward, mean_loss), optimizer, donate=False)

    # the check: the epoch's summed loss at the initial adapter, both ways (B = 0: the base model's)
    loss_sums = jax.jit(sums)
    check = {}
    for name, mode in modes.items():
        total, count = 0.0, 0
        for batch in mode["batches"]:
            t, c = loss_sums(adapter, params, batch)
            total, count = total + float(t), count + int(c)
        check[name] = (total, count)

    state = lrtt.train.init_state(adapter, optimizer)
    started = time.perf_counter()
    jax.block_until_ready(step(state, params, modes["packed"]["batches"][0]))
    compile_s = time.perf_counter() - started

    rates = {name: [] for name in modes}
    step_times = {name: [] for name in modes}
    cursor = {name: 0 for name in modes}
    for round_ in range(args.rounds):
        for name in (list(modes) if round_ % 2 == 0 else list(modes)[::-1]):
            mode = modes[name]
            n = len(mode["batches"])
            state_r, value = step(state, params, mode["batches"][cursor[name] % n])  # warm-up
            jax.block_until_ready(value)
            cursor[name] += 1
            tokens, started = 0, time.perf_counter()
            for _ in range(args.steps):
                i = cursor[name] % n
                state_r, value = step(state_r, params, mode["batches"][i])
                tokens += mode["real"][i]
                cursor[name] += 1
            jax.block_until_ready(value)
            elapsed = time.perf_counter() - started
            rates[name].append(tokens / elapsed)
            step_times[name].append(elapsed / args.steps)

    print(f"random Llama (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}), LoRA r={args.rank} "
          f"{args.targets}, batch {args.batch} x {args.max_len} tokens; {jax.devices()[0].platform}, "
          f"jax {jax.__version__}")
    print(f"{args.examples} examples, lengths {args.min_len}-{args.max_len} (log-normal, median {args.median:g}): "
          f"mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, "
          f"max {lengths.max()}; {total_tokens:,} tokens")
    print(f"compile {compile_s:.1f} s; {args.rounds} rounds x {args.steps} steps per mode, median over rounds\n")
    print(f"{'mode':<7} {'batches/epoch':>13} {'fill':>6} {'step s':>8} {'real tokens/s':>14} {'epoch s':>8}")
    out = {}
    for name, mode in modes.items():
        n = len(mode["batches"])
        fill = total_tokens / (n * args.batch * args.max_len)
        rate, step_s = statistics.median(rates[name]), statistics.median(step_times[name])
        out[name] = (rate, n * step_s)
        print(f"{name:<7} {n:>13} {fill:>6.1%} {step_s:>8.3f} {rate:>14,.0f} {n * step_s:>8.1f}")
    print(f"\npacked / padded: {out['packed'][0] / out['padded'][0]:.2f}x real tokens per second, "
          f"epoch {out['padded'][1] / out['packed'][1]:.2f}x faster")
    print(f"per-round real tokens/s: padded {[round(r) for r in rates['padded']]}, "
          f"packed {[round(r) for r in rates['packed']]}")
    (pt, pc), (kt, kc) = check["padded"], check["packed"]
    print(f"check: summed loss of the epoch at the initial adapter, padded {pt:.4f} over {pc} targets, "
          f"packed {kt:.4f} over {kc} targets (relative difference {abs(pt - kt) / abs(pt):.1e})")


if __name__ == "__main__":
    main()
