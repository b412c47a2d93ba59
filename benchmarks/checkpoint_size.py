"""Bytes on disk of an lrtt checkpoint next to the bytes of the frozen weights it never writes.

GPT-2-small shape (12 layers, 768 hidden, vocab 50257, 1024 positions), float32 weights, known
from shapes only (``jax.eval_shape``: no weights are downloaded or even allocated). LoRA r=8 on
q,v (GPT-2's fused ``c_attn``, ``"qv"``); AdamW; every array filled with trained-looking
random values (at init ``B = 0`` and the moments are zero, which compress away). Two checkpoints with ``lrtt.CheckpointManager``:
the adapter alone, and the adapter + AdamW state + step + data position + config (what a
resumable run saves).

Run:  python benchmarks/checkpoint_size.py [--rank 8] [--layers 12 --hidden 768]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("USE_TORCH", "0")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

import lrtt  # noqa: E402


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    args = parser.parse_args(argv)
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    config = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=max(1, args.hidden // 64), vocab_size=args.vocab)
    model = FlaxGPT2LMHeadModel(config, _do_init=False)
    shapes = jax.eval_shape(lambda key: model.init_weights(key, (1, 1)), jax.random.key(0))
    frozen_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))

    method = lrtt.LoRA(rank=args.rank, targets="qv")
    adapter = method.init(jax.random.key(1), shapes)  # LoRA's init needs the shapes only
    optimizer = lrtt.train.adamw(1e-4, warmup=100, total=1000, weight_decay=0.01)
    opt_state = optimizer.init(adapter)
    # Trained-looking values: B = 0 and zero moments would compress to nothing on disk.
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape, x.dtype), adapter)
    _, opt_state = optimizer.update(grads, opt_state, adapter)
    adapter = jax.tree.map(lambda x, g: x + 1e-2 * g, adapter, grads)
    adapter_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(adapter))

    with tempfile.TemporaryDirectory() as tmp:
        alone = lrtt.CheckpointManager(os.path.join(tmp, "adapter"), method)
        alone.save(1000, adapter)
        alone.wait()
        resumable = lrtt.CheckpointManager(os.path.join(tmp, "resumable"), method)
        resumable.save(1000, adapter, opt_state, data_position={"epoch": 0, "index": 8000}, rng=jax.random.key(0))
        resumable.wait()
        alone_bytes, resumable_bytes = du(os.path.join(tmp, "adapter", "1000")), du(os.path.join(tmp, "resumable", "1000"))
        alone.close()
        resumable.close()

    print(f"GPT-2 shape: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; "
          f"LoRA r={args.rank} on c_attn (q,v preset); float32")
    print(f"frozen weights (never written):            {frozen_bytes:>13,} bytes  ({frozen_bytes / 2**20:8.1f} MiB, "
          f"{sum(x.size for x in jax.tree.leaves(shapes)):,} params)")
    print(f"adapter arrays in memory:                  {adapter_bytes:>13,} bytes  ({adapter_bytes / 2**20:8.2f} MiB, "
          f"{lrtt.num_params(adapter):,} params)")
    print(f"checkpoint, adapter alone (on disk):       {alone_bytes:>13,} bytes  ({alone_bytes / 2**20:8.2f} MiB)")
    print(f"checkpoint, adapter + AdamW + meta (disk): {resumable_bytes:>13,} bytes  ({resumable_bytes / 2**20:8.2f} MiB)")
    print(f"adapter-alone checkpoint / frozen weights: {alone_bytes / frozen_bytes:.5f}  "
          f"(1/{frozen_bytes / alone_bytes:.0f})")
    print(f"resumable checkpoint / frozen weights:     {resumable_bytes / frozen_bytes:.5f}  "
          f"(1/{frozen_bytes / resumable_bytes:.0f})")


if __name__ == "__main__":
    main()
