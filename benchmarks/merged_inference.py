"""Inference step of the merged params against the base params (and against factored execution).

One transformers Flax GPT-2 (random weights; GPT-2-small shape by default: 12 layers, 768
hidden, seq 128, batch 4), LoRA r=8 on q,v (GPT-2's fused ``c_attn``), trained-looking factors
(B non-zero). Three jitted forward passes, each compiled first, then timed in interleaved rounds
(one call of each per round, ``block_until_ready``), median per variant:

  base      model(params)
  merged    model(lrtt.merge(method, params, adapter)): the exported tree (same structure,
            shapes and dtypes as the base, so the same compiled program)
  factored  lrtt.factored(model)(lrtt.wrap(method, params, adapter)): x·W0 + s·(x·A)·B

The line to read is ``merged / base`` (1.00 up to timing noise).

Run:  python benchmarks/merged_inference.py              (GPT-2 small)
      python benchmarks/merged_inference.py --small      (a quick check)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("USE_TORCH", "0")
warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lrtt  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--small", action="store_true", help="2 layers, 128 hidden, vocab 1000, seq 32")
    args = parser.parse_args(argv)
    if args.small:
        args.layers, args.hidden, args.vocab, args.seq = 2, 128, 1000, 32
    return args


def random_params(model, dtype, seed=0):
    """GPT-2-like random weights from the shapes alone (no download, no init compile)."""
    shapes = jax.eval_shape(lambda key: model.init_weights(key, (1, 1)), jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def leaf(keypath, s):
        path = lrtt._paths.path_str(keypath)
        if path.endswith("scale"):
            return jnp.ones(s.shape, dtype)
        if path.endswith("bias"):
            return jnp.zeros(s.shape, dtype)
        return jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32), dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def main(argv=None):
    args = parse_args(argv)
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    config = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=max(1, args.hidden // 64),
                        vocab_size=args.vocab, n_positions=max(1024, args.seq))
    model = FlaxGPT2LMHeadModel(config, _do_init=False, dtype=jnp.dtype(args.dtype))
    params = random_params(model, jnp.dtype(args.dtype))
    method = lrtt.LoRA(rank=args.rank, targets="qv")
    adapter = method.init(jax.random.key(1), params)
    adapter = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), adapter)
    merged = lrtt.merge(method, params, adapter)
    wrapped = lrtt.wrap(method, params, adapter)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)), jnp.int32)

    def logits(p, x):
        return model(x, params=p, train=False).logits

    infer = jax.jit(logits)
    factored = jax.jit(lrtt.factored(logits))
    same_program = infer.lower(merged, ids).as_text() == infer.lower(params, ids).as_text()
    variants = {"base": (infer, params), "merged": (infer, merged), "factored": (factored, wrapped)}
    for name, (fn, p) in variants.items():
        fn(p, ids).block_until_ready()  # compile + warm up
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (fn, p) in variants.items():
            start = time.perf_counter()
            fn(p, ids).block_until_ready()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}

    n_params = lrtt.num_params(params)
    print(f"GPT-2 shape: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
          f"batch {args.batch} x seq {args.seq}, {args.dtype}, {n_params:,} params; "
          f"LoRA r={args.rank} on c_attn; {args.rounds} interleaved rounds; device {jax.devices()[0].platform}")
    print(f"merged tree == base tree (structure, shapes, dtypes): "
          f"{jax.tree.structure(merged) == jax.tree.structure(params) and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)))}; "
          f"same compiled program (HLO text): {same_program}")
    for name in variants:
        print(f"{name:9s} median {med[name]:8.2f} ms   (min {min(times[name]) * 1e3:.2f}, max {max(times[name]) * 1e3:.2f})")
    print(f"merged / base   = {med['merged'] / med['base']:.3f}")
    print(f"factored / base = {med['factored'] / med['base']:.3f}")


if __name__ == "__main__":
    main()
