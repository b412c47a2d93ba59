"""Greedy generation throughput: ``lrtt.models.generate`` against transformers 5's PyTorch ``generate``.

One random Llama checkpoint built and saved by transformers (hidden 256, 4 layers, 8 heads / 4 KV
heads, MLP 688, vocab 8192, float32), loaded by ``lrtt.models.load``. A batch of 8 prompts of
lengths 17 … 45 tokens, ``max_new_tokens=64``, EOS disabled on both sides (every row makes 64
tokens). transformers gets the batch left-padded with an ``attention_mask`` (its batched path).

Each side is warmed up first (lrtt: the compilation of its prefill and decode loop, reported
apart), then timed ``--rounds`` times, interleaved, median per side:

  total    a whole ``generate`` call of 64 new tokens (prefill included): B·64 / time tokens/s
  decode   (time of 64 new tokens - time of 1 new token) -> B·63 tokens / that time: the per-token
           loop alone, prefill excluded

Run under .venv-hf5 (jax + torch):  .venv-hf5/bin/python benchmarks/generate.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import transformers

    import lrtt.models

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=688 * args.hidden // 256,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    rng = np.random.default_rng(0)
    lengths = np.linspace(17, 45, args.batch).astype(int)
    prompts = [rng.integers(2, args.vocab, n).tolist() for n in lengths]
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, params = lrtt.models.load(tmp)

    width = max(lengths)
    ids = torch.zeros((args.batch, width), dtype=torch.long)
    mask = torch.zeros((args.batch, width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1

    def run_lrtt(n):
        return lrtt.models.generate(model, params, prompts, max_new_tokens=n, eos_token_id=[])

    def run_torch(n):
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        return out[:, width:].tolist()

    start = time.perf_counter()
    ours = run_lrtt(args.new)
    run_lrtt(1)  # its own compiled decode bucket (16): warmed too
    compile_s = time.perf_counter() - start
    theirs = run_torch(args.new)
    run_torch(1)
    same = sum(a == b for a, b in zip(ours, theirs))

    times = {k: [] for k in ("lrtt", "lrtt1", "torch", "torch1")}
    for _ in range(args.rounds):
        for key, fn, n in (("lrtt", run_lrtt, args.new), ("lrtt1", run_lrtt, 1),
                           ("torch", run_torch, args.new), ("torch1", run_torch, 1)):
            t = time.perf_counter()
            fn(n)
            times[key].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    B, N = args.batch, args.new
    total = {k: B * N / med[k] for k in ("lrtt", "torch")}
    decode = {k: B * (N - 1) / max(med[k] - med[k + "1"], 1e-9) for k in ("lrtt", "torch")}

    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"(threads {torch.get_num_threads()}), transformers {transformers.__version__}, {os.cpu_count()} CPUs")
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; batch {B}, prompts "
          f"{lengths.min()}-{lengths.max()} tokens, {N} new tokens, greedy; median of {args.rounds} rounds")
    print(f"identical completions: {same}/{B} rows")
    print(f"lrtt compilation (prefill + decode loop, 2 buckets): {compile_s:.2f} s (first call only)")
    print(f"{'':8s} {'generate s':>11s} {'total tok/s':>12s} {'1-token s':>10s} {'decode tok/s':>13s}")
    for k, label in (("lrtt", "lrtt"), ("torch", "torch")):
        print(f"{label:8s} {med[k]:11.3f} {total[k]:12.1f} {med[k + '1']:10.3f} {decode[k]:13.1f}")
    print(f"ratio lrtt / torch: total {total['lrtt'] / total['torch']:.2f}x, decode {decode['lrtt'] / decode['torch']:.2f}x")


if __name__ == "__main__":
    main()
