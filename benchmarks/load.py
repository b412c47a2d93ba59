"""Peak memory of ``lrtt.models.load`` streaming a LLaMA-2-7B-shape bf16 checkpoint into NF4.

``--write DIR`` writes a transformers checkpoint directory of LLaMA-2-7B's shapes
(``LlamaForCausalLM``: hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000,
untied head; ``--layers N`` for a smaller one): ``config.json``, bf16 safetensors with PyTorch
names and layouts (``model.layers.N.self_attn.q_proj.weight`` ``(out, in)``, ...) in shards of at
most 5 GB plus ``model.safetensors.index.json``, random values, written one tensor at a time
with lrtt.models' own writer (only one tensor exists in memory at a time).

``--load DIR`` then, in a fresh process per case (as benchmarks/memory.py), loads it with
``lrtt.models.load(DIR, dtype="bfloat16", quantize={"qtype": "nf4", "packed": True,
"scale_dtype": float32})`` — the base benchmarks/memory.py's 7B NF4 case builds: packed NF4
kernels in blocks of 64, float32 scales, bf16 embedding, norms and head — and reports the peak RSS
(``VmHWM``, the process's peak RSS) against ``final params + the checkpoint's largest tensor + 1 GiB``. ``--step``
then runs one LoRA step in the same process (r = 8 on q and v, AdamW, batch 1 x 128 tokens, the
factored loss: benchmarks/memory.py's settings) and reports the peak of load + step against
8 GiB (the load's own peak is read before the step).

    python benchmarks/load.py --write /tmp/llama2-7b --load /tmp/llama2-7b --step   # writes, measures, deletes
    python benchmarks/load.py --write /tmp/tiny --layers 2 --load /tmp/tiny --step  # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..")]

from _proc import status_bytes  # noqa: E402  (benchmarks/_proc.py)

GIB = 2**30
STEP_LIMIT_GIB = 8.0
LLAMA2_7B = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
    max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
    tie_word_embeddings=False, attention_bias=False, mlp_bias=False, torch_dtype="bfloat16",
    bos_token_id=1, eos_token_id=2, initializer_range=0.02)


def _tensors(config: dict):
    """``(name, shape)`` of every tensor of a LlamaForCausalLM checkpoint, in transformers' order."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    yield "model.embed_tokens.weight", (v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "mlp.gate_proj.weight", (f, h)
        yield p + "mlp.up_proj.weight", (f, h)
        yield p + "mlp.down_proj.weight", (h, f)
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def write(directory: str, layers: int, max_shard_size: str = "5GB") -> dict:
    """The checkpoint directory, one tensor in memory at a time. Random values: a bf16 weight is a
    random sign and mantissa with an exponent of 2^-7 or 2^-6 (|w| in [0.0078, 0.031), about the
    scale of a 7B model's weights), drawn as random bits (fast: 6.7 G values); norms are ones."""
    import ml_dtypes
    import numpy as np

    from lrtt.models._safetensors import write_sharded

    config = dict(LLAMA2_7B, num_hidden_layers=layers)
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)

    def produce(shape):
        def make():
            if len(shape) == 1:
                return np.ones(shape, ml_dtypes.bfloat16)
            bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
            bits &= 0x80FF  # sign, lowest exponent bit, mantissa
            bits |= 0x3C00  # exponent 120 (+1): 2^-7 .. 2^-5
            return bits.view(ml_dtypes.bfloat16)
        return make

    bf16 = np.dtype(ml_dtypes.bfloat16)
    start = time.perf_counter()
    files = write_sharded(directory, [(n, s, bf16, produce(s)) for n, s in _tensors(config)], max_shard_size)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    size = sum(os.path.getsize(os.path.join(directory, n)) for n in files)
    return {"write_s": time.perf_counter() - start, "files": files, "checkpoint_bytes": size}


def _nbytes(tree) -> int:
    """Bytes of the arrays of a params tree (quantized leaves: their values and scales; 4-bit
    values not packed counted at half a byte, as XLA would store them packed)."""
    import jax

    total = 0
    for a in jax.tree.leaves(tree):
        n = int(a.size) * a.dtype.itemsize
        total += n // 2 if str(a.dtype) in ("uint4", "int4") else n
    return total


def _largest(directory: str) -> tuple[str, int]:
    from lrtt.models._safetensors import tensor_index

    best = ("", 0)
    for name, (file, key) in tensor_index(directory).items():
        info = file.header[key]
        size = info["data_offsets"][1] - info["data_offsets"][0]
        best = max(best, (name, size), key=lambda x: x[1])
    return best


class _Sampler(threading.Thread):
    """The RSS (``/proc/self/statm``) every 50 ms, with the largest seen and when: what ``ru_maxrss``
    does not say (when in the load the peak was)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.t0 = time.perf_counter()
        self.peak, self.at = 0, 0.0
        self.stop = False

    def run(self):
        while not self.stop:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * self.page
            if rss > self.peak:
                self.peak, self.at = rss, time.perf_counter() - self.t0
            time.sleep(0.05)


def _peak_rss() -> int:
    """This process image's peak RSS in bytes: ``VmHWM`` of ``/proc/self/status``, which starts
    afresh at ``exec`` (``ru_maxrss`` does not: it keeps the pre-exec image's peak, so a child of
    the process that wrote the 13.5 GB checkpoint would inherit the writer's RSS as a floor)."""
    peak = status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def case(directory: str, step: bool) -> dict:
    """One measurement in this (fresh) process."""
    import jax
    import jax.numpy as jnp

    import lrtt
    import lrtt.models

    jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()
    runtime_rss = _peak_rss()
    sampler = _Sampler()
    sampler.start()
    start = time.perf_counter()
    model, params = lrtt.models.load(directory, dtype="bfloat16",
                                     quantize={"qtype": "nf4", "block_size": 64, "packed": True,
                                               "scale_dtype": jnp.float32})
    jax.block_until_ready(params)
    load_s = time.perf_counter() - start
    out = {"case": "load+step" if step else "load", "load_s": load_s, "runtime_rss_bytes": runtime_rss,
           "load_peak_rss_bytes": _peak_rss(),
           "load_peak_at_s": sampler.at, "params_bytes": _nbytes(params)}
    name, largest = _largest(directory)
    out.update(largest_tensor=name, largest_bytes=largest)
    if step:
        import optax

        method = lrtt.LoRA(rank=8, targets="qv")
        optimizer = optax.adamw(1e-4)

        def loss_fn(logits, batch):
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
            return -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1).mean()

        loss = lrtt.train.make_loss(method, lambda p, batch, rng: model(p, batch), loss_fn, forward="factored")
        batch = jax.random.randint(jax.random.key(1), (1, 128), 3, model.config.vocab_size)
        state = lrtt.train.init_state(method.init(jax.random.key(0), params), optimizer)
        start = time.perf_counter()
        compiled = lrtt.train.jit_step(loss, optimizer).lower(state, params, batch).compile()
        out["compile_s"] = time.perf_counter() - start
        analysis = compiled.memory_analysis()
        out["temp_bytes"] = int(getattr(analysis, "temp_size_in_bytes", 0))
        start = time.perf_counter()
        state, value = compiled(state, params, batch)
        out["loss"] = float(value)
        out["step_s"] = time.perf_counter() - start
        out["adapter_opt_bytes"] = _nbytes(state.adapter) + _nbytes(state.opt_state)
        out["step_peak_rss_bytes"] = _peak_rss()
    sampler.stop = True
    return out


def _run_case(directory: str, step: bool) -> dict:
    args = [sys.executable, os.path.abspath(__file__), "--case", directory] + (["--step"] if step else [])
    proc = subprocess.run(args, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:] or ["no output"]
        return {"case": "load+step" if step else "load", "failed": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(line[len("RESULT "):])


def _table(results: list[dict]) -> str:
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    rows = ["| case | load s | runtime GiB | params GiB | largest tensor GiB | bound GiB (params + largest + 1) "
            "| load peak RSS GiB | bound met | step s | load+step peak RSS GiB | ≤ 8 GiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "failed" in r:
            rows.append(f"| {r['case']} | failed: {r['failed'][:300]} |")
            continue
        bound = r["params_bytes"] + r["largest_bytes"] + GIB
        step = r.get("step_peak_rss_bytes")
        rows.append(
            f"| {r['case']} | {r['load_s']:.0f} | {gib(r['runtime_rss_bytes'])} | {gib(r['params_bytes'])} | "
            f"{gib(r['largest_bytes'])} | {gib(bound)} | {gib(r['load_peak_rss_bytes'])} | "
            f"{'yes' if r['load_peak_rss_bytes'] <= bound else 'no'} | "
            + (f"{r['step_s']:.0f} (compile {r['compile_s']:.0f}) | {gib(step)} | "
               f"{'yes' if step <= STEP_LIMIT_GIB * GIB else 'no'} |" if step else "– | – | – |"))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="DIR", help="write the checkpoint here (under /tmp: 13.5 GB at 32 layers)")
    parser.add_argument("--layers", type=int, default=32, help="layers of the checkpoint written (32: LLaMA-2-7B)")
    parser.add_argument("--load", metavar="DIR", help="measure loading this checkpoint, in a fresh process")
    parser.add_argument("--step", action="store_true", help="also measure load + one LoRA step in one process")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint --write wrote")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # run one case here (the child)
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(case(args.case, args.step)), flush=True)
        return
    if not (args.write or args.load):
        parser.error("give --write DIR and/or --load DIR")
    try:
        if args.write:
            w = write(args.write, args.layers)
            print(f"wrote {len(w['files'])} files, {w['checkpoint_bytes'] / 1e9:.2f} GB, in {w['write_s']:.0f} s "
                  f"({args.layers} layers) to {args.write}", flush=True)
        if args.load:
            results = []
            for step in [args.step]:  # with --step, one process: its load peak is read before the step
                r = _run_case(args.load, step)
                print(json.dumps(r), flush=True)
                results.append(r)
            print(_table(results))
    finally:
        if args.write and not args.keep:
            shutil.rmtree(args.write, ignore_errors=True)


if __name__ == "__main__":
    main()
