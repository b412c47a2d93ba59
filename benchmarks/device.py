"""One command for whatever ``jax.devices()`` holds (GPU, TPU or CPU): training-step time,
tokens/s, step memory and MFU of full fine-tuning, LoRA, LorettaRep and QLoRA-NF4, plus merged
against factored inference — one table, in minutes.

Models: ``lrtt.models.Model`` decoders with random weights (``Model.init``; no download), their
layers scanned (one compile whatever the depth), each layer recomputed in the backward pass:

* ``gpt2-small``: GPT-2's shapes (12 layers, 768 wide, vocab 50257);
* ``llama-1b``: Llama-3.2-1B's (16 layers, 2048 wide, MLP 8192, 32 heads / 8 KV heads, vocab
  128256, tied embeddings);
* ``llama2-7b``: LLaMA-2-7B's (32 layers, 4096, MLP 11008, vocab 32000) — run only when the device
  holds its bf16 weights plus a full-FT step's AdamW state twice over (otherwise "not run").

Methods per model, each a jitted step (``lrtt.train.jit_step`` over ``lrtt.train.make_loss``, or a
plain ``optax.adamw`` step over every weight for full FT) on ``--batch`` x ``--seq`` random tokens:
``full FT``; ``LoRA`` r=8 and ``LorettaRep`` r=8 (TT rank 5) on ``--targets``; ``QLoRA-NF4``: LoRA
over ``lrtt.quantize(params, "all-linear", "nf4", block_size=64)``. Weights in ``--dtype``
(default bfloat16 on an accelerator, float32 on CPU), adapters float32.

Columns: ``compile s`` (lower + compile); ``step ms`` (median of ``--steps`` timed steps after one
untimed); ``tokens/s`` (batch x seq / step); ``step GiB`` (XLA's plan for the compiled step:
arguments + outputs + temporaries - donated, i.e. what the step needs on the device);
``TFLOP/s`` (XLA's cost analysis of the compiled step / step time) and ``MFU`` (that over the
device's peak dense bf16 FLOP/s from a table of known devices, or ``--peak-tflops``; "-" where
unknown, e.g. CPU). After the table: the device's own peak bytes in use (``memory_stats``), where
it reports one, and per model the forward time of the LoRA model merged (``lrtt.merge``, plain
matmuls) against factored (``lrtt.factored(model)`` over ``lrtt.wrap``).

``--budget-s`` (default 420): no new case starts after that many seconds; what was skipped is
printed. ``--tiny``: 2-layer models 64 wide, batch 2 x 16 tokens (the CI smoke test).

Run:  python benchmarks/device.py                    (accelerator: the default models)
      python benchmarks/device.py --tiny             (CPU smoke test, seconds)
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
import optax  # noqa: E402

import lrtt  # noqa: E402
import lrtt.models  # noqa: E402
import lrtt.train  # noqa: E402

CONFIGS = {
    "gpt2-small": dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                     rope_theta=500000.0, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                      rms_norm_eps=1e-5),
}
TINY = {
    "gpt2-small": dict(CONFIGS["gpt2-small"], n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64),
    "llama-1b": dict(CONFIGS["llama-1b"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=64),
    "llama2-7b": dict(CONFIGS["llama2-7b"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=512, max_position_embeddings=64),
}
# peak dense bfloat16 FLOP/s (vendor figures, without sparsity), by device_kind
PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
               "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
               "NVIDIA L4": 121.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
               "TPU v6 lite": 918.0}
METHODS = ("full FT", "LoRA", "LorettaRep", "QLoRA-NF4")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="gpt2-small,llama-1b,llama2-7b")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--targets", default="qv")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default=None, help="weights' dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.steps = 2, 16, 2
    platform = jax.devices()[0].platform
    args.dtype = jnp.dtype(args.dtype or ("float32" if platform == "cpu" else "bfloat16"))
    return args


def random_params(model, dtype):
    """Normal(0, 0.02) weights, norm scales 1, drawn on the device in one jitted call (the
    ``Model.init`` of tests draws on the host with numpy: minutes at 7B)."""
    from lrtt.models._decoder import param_shapes

    shapes = param_shapes(model.config, dtype)

    @jax.jit
    def draw(key):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
        keys = jax.random.split(key, len(leaves))
        out = [jnp.ones(x.shape, x.dtype) if jax.tree_util.keystr(path).endswith("['scale']")
               else (0.02 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
               for (path, x), k in zip(leaves, keys)]
        return jax.tree.unflatten(treedef, out)

    return draw(jax.random.key(0))


def next_token_loss(logits, batch):
    ids = batch["input_ids"]
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()


def build_step(name: str, model, params, args):
    """``(step, state, params)``: a jitted training step of one method, its state and frozen params."""
    apply = lambda p, batch, rng: model(p, batch["input_ids"])  # noqa: E731
    if name == "full FT":
        optimizer = optax.adamw(1e-5)

        def full_step(state, params, batch):
            weights, opt_state = state
            value, grads = jax.value_and_grad(lambda w: next_token_loss(apply(w, batch, None), batch))(weights)
            updates, opt_state = optimizer.update(grads, opt_state, weights)
            return (optax.apply_updates(weights, updates), opt_state), value

        weights = jax.tree.map(jnp.copy, params)  # trained (and donated): not the shared tree
        return jax.jit(full_step, donate_argnums=(0,)), (weights, optimizer.init(weights)), {}
    if name == "QLoRA-NF4":
        params = lrtt.quantize(params, "all-linear", qtype="nf4", block_size=64)
    method = {"LoRA": lrtt.LoRA(rank=8, alpha=16, targets=args.targets),
              "LorettaRep": lrtt.LorettaRep(rank=8, tt_rank=5, targets=args.targets),
              "QLoRA-NF4": lrtt.LoRA(rank=8, alpha=16, targets=args.targets)}[name]
    optimizer = lrtt.train.adamw(1e-4)
    adapter = method.init(jax.random.key(1), params)
    state = lrtt.train.init_state(adapter, optimizer)
    return lrtt.train.jit_step(lrtt.train.make_loss(method, apply, next_token_loss), optimizer), state, params


def step_bytes(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def measure(step, state, params, batch, args) -> dict:
    start = time.perf_counter()
    compiled = step.lower(state, params, batch).compile()
    compile_s = time.perf_counter() - start
    state, value = compiled(state, params, batch)
    jax.block_until_ready(value)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, value = compiled(state, params, batch)
        jax.block_until_ready(value)
        times.append(time.perf_counter() - start)
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    if isinstance(flops, (list, tuple)):  # older JAX: one dict per program
        flops = flops[0].get("flops", float("nan"))
    return dict(compile_s=compile_s, step_s=statistics.median(times), bytes=step_bytes(compiled), flops=flops,
                loss=float(value))


def inference(model, params, args, batch) -> tuple[float, float]:
    """Forward seconds of the LoRA model, merged against factored (median of --steps)."""
    method = lrtt.LoRA(rank=8, alpha=16, targets=args.targets)
    adapter = method.init(jax.random.key(1), params)
    adapter = jax.tree.map(lambda x: x + 0.01, adapter)  # a non-zero ΔW
    merged = jax.jit(lambda p, ids: model(p, ids))
    factored_model = lrtt.factored(lambda p, ids: model(p, ids))
    factored = jax.jit(lambda p, a, ids: factored_model(lrtt.wrap(method, p, a), ids))
    merged_params = jax.jit(lambda p, a: lrtt.merge(method, p, a))(params, adapter)
    runs = {"merged": lambda: merged(merged_params, batch["input_ids"]),
            "factored": lambda: factored(params, adapter, batch["input_ids"])}
    out = {}
    for name, run in runs.items():
        jax.block_until_ready(run())
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            jax.block_until_ready(run())
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out["merged"], out["factored"]


def fits(name: str, config: dict, args) -> str | None:
    """Why ``name`` is not run on this device, or None. Full FT's weights + grads + AdamW (m, v in
    the weights' dtype) are about 4x the weights; the device must hold that plus activations."""
    if args.tiny or jax.devices()[0].platform == "cpu" and name != "llama2-7b":
        return None
    from lrtt.models._decoder import param_shapes

    shapes = param_shapes(lrtt.models.Model.from_config(config).config, args.dtype)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit is None:
        return "the device reports no memory limit" if name == "llama2-7b" else None
    if 4.5 * weights > limit:
        return f"full FT needs ~{4.5 * weights / 2**30:.0f} GiB, the device has {limit / 2**30:.0f} GiB"
    return None


def main(argv=None) -> None:
    args = parse_args(argv)
    device = jax.devices()[0]
    peak = args.peak_tflops or PEAK_TFLOPS.get(device.device_kind)
    began = time.perf_counter()
    print(f"jax {jax.__version__}; {device.platform} {device.device_kind} x{jax.device_count()}; weights "
          f"{args.dtype.name}; batch {args.batch} x {args.seq} tokens; targets {args.targets!r}; peak "
          f"{f'{peak:g} TFLOP/s' if peak else 'unknown'}", flush=True)
    rows, skipped, inference_rows = [], [], []
    configs = TINY if args.tiny else CONFIGS
    for model_name in args.models.split(","):
        config = configs[model_name]
        reason = fits(model_name, config, args)
        if reason:
            skipped.append(f"{model_name}: {reason}")
            continue
        model = lrtt.models.Model.from_config(config)
        params = random_params(model, args.dtype)
        ids = jax.random.randint(jax.random.key(2), (args.batch, args.seq), 0, model.config.vocab_size)
        batch = {"input_ids": ids}
        for name in args.methods.split(","):
            if time.perf_counter() - began > args.budget_s:
                skipped.append(f"{model_name} {name}: past --budget-s {args.budget_s:g}")
                continue
            step, state, frozen = build_step(name, model, params, args)
            r = measure(step, state, frozen, batch, args)
            del step, state, frozen
            tflops = r["flops"] / r["step_s"] / 1e12
            mfu = f"{tflops / peak:.1%}" if peak else "-"
            rows.append(f"| {model_name} | {name} | {r['compile_s']:.1f} | {1e3 * r['step_s']:.1f} | "
                        f"{args.batch * args.seq / r['step_s']:,.0f} | {r['bytes'] / 2**30:.2f} | {tflops:.2f} | "
                        f"{mfu} | {r['loss']:.3f} |")
            print("  " + rows[-1], flush=True)
        if time.perf_counter() - began <= args.budget_s:
            merged, factored = inference(model, params, args, batch)
            inference_rows.append(f"| {model_name} | {1e3 * merged:.1f} | {1e3 * factored:.1f} | "
                                  f"{factored / merged:.2f} |")
        del params
    print()
    print("| model | method | compile s | step ms | tokens/s | step GiB (XLA) | TFLOP/s | MFU | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("| model | LoRA forward, merged ms | factored ms | factored / merged |")
    print("|---|---|---|---|")
    print("\n".join(inference_rows))
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"\ndevice peak bytes in use (whole run): {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
    for line in skipped:
        print(f"not run: {line}")
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
