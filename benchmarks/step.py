"""Training-step time of factored execution against full fine-tuning, the norms-only floor and merge.

One transformers Flax GPT-2 (random weights; GPT-2-small shape by default: 12 layers, 768 hidden,
seq 128, batch 4), one process, every variant compiled first, then timed in interleaved rounds (the order rotates
each round; each variant's first step of a round is an untimed warm-up).
Each step is ``jax.value_and_grad`` of the next-token loss plus an AdamW update of the trainable
tree; the frozen weights are jit *arguments* (closing over them would make them XLA constants).

Variants:
  full FT        every weight trained
  norms (floor)  only the layer norms trained: the backward pass, no weight gradient
  LoRA merged    model(lrtt.merge(params, adapter)): forms W0 + ΔW and its dense gradient
  LoRA factored  lrtt.factored(model)(lrtt.wrap(params, adapter))
  rep factored   LorettaRep, factored
  rep grouped    LorettaRep, factored, its per-layer entries stacked per target kind
                 (lrtt.group_layers: the TT matrices of all layers formed in one contraction, one
                 AdamW state per kind); on a scanned model it is "rep factored"
  adp factored   LorettaAdp (bottleneck 64, TT rank 5, norms trained), factored

Run:  python benchmarks/step.py              (GPT-2 small)
      python benchmarks/step.py --small      (a quick check)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lrtt  # noqa: E402
from lrtt._paths import named_leaves, replace_leaves  # noqa: E402

NORMS = r"(^|/)(ln_\d+|ln_f)/(scale|bias)$"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=None, help="default: hidden // 64")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8, help="LoRA / LorettaRep rank")
    parser.add_argument("--targets", default="all-linear", help="LoRA / LorettaRep targets")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them, each round")
    parser.add_argument("--compile-rounds", type=int, default=2,
                        help="interleaved rounds of compiling every variant (the minimum is reported; at least 1)")
    parser.add_argument("--variants", default="full,norms,lora-merged,lora,rep,rep-grouped,adp")
    parser.add_argument("--small", action="store_true", help="4 layers, 256 hidden, vocab 1024, seq 64")
    parser.add_argument("--model", default="gpt2", choices=("gpt2", "smollm2"),
                        help="gpt2: transformers' Flax GPT-2 of the shape above (layers unrolled); smollm2: "
                             "lrtt.models' Llama of SmolLM2-135M's config (30 layers scanned, random weights)")
    args = parser.parse_args(argv)
    if args.small:
        args.layers, args.hidden, args.vocab, args.seq = 4, 256, 1024, 64
        args.rounds, args.steps = min(args.rounds, 3), min(args.steps, 3)
    args.heads = args.heads or max(1, args.hidden // 64)
    return args


SMOLLM2 = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
               rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
LLAMA_NORMS = r"(^|/)(attn_norm|mlp_norm|final_norm)/scale$"


class _LrttModel:
    """lrtt.models' decoder with the call convention of transformers' models below."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ids, params):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.model(params, ids))


def build_model(args):
    if args.model == "smollm2":
        import lrtt.models

        model = lrtt.models.Model.from_config(SMOLLM2)
        args.vocab = SMOLLM2["vocab_size"]
        return _LrttModel(model), model.init(0)
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    config = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads, vocab_size=args.vocab,
                        n_positions=max(args.seq, 16))
    model = FlaxGPT2LMHeadModel(config, _do_init=False)
    params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(0), (1, args.seq))
    return model, params


def make_variants(args, model, params):
    """``{name: (loss(trainable, frozen, ids), trainable, frozen)}``."""

    def logits(p, ids):
        return model(ids, params=p).logits

    def next_token_loss(out, ids):
        return optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], ids[:, 1:]).mean()

    norms = {p: leaf for p, leaf in named_leaves(params) if re.search(LLAMA_NORMS if args.model == "smollm2" else NORMS, p)}
    key = jax.random.key(1)
    lora = lrtt.LoRA(rank=args.rank, alpha=2 * args.rank, targets=args.targets)
    rep = lrtt.LorettaRep(rank=args.rank, targets=args.targets)
    adp = lrtt.LorettaAdp()
    factored_logits = lrtt.factored(logits)

    variants = {
        "full FT": (lambda t, f, ids: next_token_loss(logits(t, ids), ids), params, {}),
        "norms (floor)": (
            lambda t, f, ids: next_token_loss(logits(replace_leaves(f, t), ids), ids), norms, params),
    }
    for name, method in (("LoRA merged", lora), ("LoRA factored", lora), ("rep factored", rep),
                         ("adp factored", adp)):
        adapter = method.init(key, params)
        if name == "LoRA merged":
            loss = lambda t, f, ids, m=method: next_token_loss(logits(lrtt.merge(m, f, t), ids), ids)  # noqa: E731
        else:
            loss = lambda t, f, ids, m=method: next_token_loss(  # noqa: E731
                factored_logits(lrtt.wrap(m, f, t), ids), ids)
        variants[name] = (loss, adapter, params)
    variants["rep grouped"] = (variants["rep factored"][0], lrtt.group_layers(variants["rep factored"][1]), params)
    wanted = {"full": "full FT", "norms": "norms (floor)", "lora-merged": "LoRA merged", "lora": "LoRA factored",
              "rep": "rep factored", "rep-grouped": "rep grouped", "adp": "adp factored"}
    return {wanted[v]: variants[wanted[v]] for v in args.variants.split(",")}


def make_step(loss):
    optimizer = optax.adamw(1e-4)

    def step(trainable, opt_state, frozen, ids):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, ids)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return optimizer, jax.jit(step, donate_argnums=(0, 1))


def compile_seconds(variants, ids, rounds: int) -> dict:
    """``{variant: (seconds, optimizer, compiled step)}``: the seconds from its trace and lowering
    to its compiled step (what a user waits for before the first step), the minimum over
    ``rounds`` (at least 1) interleaved rounds, each with JAX's caches cleared first (one compile
    on this machine varies by up to 30 %); the step compiled in the last round, to run."""
    seconds: dict = {}
    built: dict = {}
    for r in range(max(rounds, 1)):
        for name, (loss, trainable, frozen) in variants.items():
            jax.clear_caches()
            optimizer, step = make_step(loss)
            opt_state = jax.eval_shape(optimizer.init, trainable)
            start = time.perf_counter()
            lowered = step.lower(trainable, opt_state, frozen, ids)
            traced = time.perf_counter()
            built[name] = (optimizer, lowered.compile())
            seconds.setdefault(name, []).append((time.perf_counter() - start, traced - start))
        print(f"  compile round {r + 1}/{rounds} (s, of which trace + lower): " + ", ".join(
            f"{n} {v[-1][0]:.1f} ({v[-1][1]:.1f})" for n, v in seconds.items()), flush=True)
    return {name: (min(v)[0], *built[name]) for name, v in seconds.items()}


def memory_mb(compiled) -> float:
    """Peak bytes XLA plans for one step: arguments + outputs + temporaries − aliased (donated)."""
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return total / 2**20


def main(argv=None):
    args = parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"{os.cpu_count()} cpus; " + ("SmolLM2-135M config, " if args.model == "smollm2" else f"GPT-2 layers={args.layers} hidden={args.hidden} heads={args.heads} ") +
          f"vocab={args.vocab} seq={args.seq} batch={args.batch}; LoRA/rep rank={args.rank} "
          f"targets={args.targets!r}; {args.rounds} rounds x {args.steps} steps", flush=True)
    model, params = build_model(args)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq), dtype=np.int32))
    runs = {}
    variants = make_variants(args, model, params)
    compiled_steps = compile_seconds(variants, ids, args.compile_rounds)
    for name, (loss, trainable, frozen) in variants.items():
        compile_s, optimizer, compiled = compiled_steps[name]
        opt_state = optimizer.init(trainable)
        trainable = jax.tree.map(jnp.copy, trainable)  # donated: never the shared params
        flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
        trainable, opt_state, value = compiled(trainable, opt_state, frozen, ids)  # warm-up
        jax.block_until_ready(value)
        n_train = sum(x.size for x in jax.tree.leaves(trainable))
        runs[name] = dict(compiled=compiled, state=[trainable, opt_state], frozen=frozen, times=[], cpu=[],
                          compile_s=compile_s, memory=memory_mb(compiled), flops=flops, n_train=n_train)
        print(f"  compiled {name:14s} in {compile_s:5.1f} s, loss {float(value):.4f}, "
              f"{n_train:,} trainable", flush=True)
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # the order rotates each round
            run = runs[name]
            for i in range(args.warmup + args.steps):
                start, start_cpu = time.perf_counter(), time.process_time()
                trainable, opt_state, value = run["compiled"](*run["state"], run["frozen"], ids)
                jax.block_until_ready(value)
                if i >= args.warmup:
                    run["times"].append(time.perf_counter() - start)
                    run["cpu"].append(time.process_time() - start_cpu)
                run["state"] = [trainable, opt_state]
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {1e3 * statistics.median(v['times'][-args.steps:]):.0f}" for n, v in runs.items()), flush=True)
    median = {n: statistics.median(v["times"]) for n, v in runs.items()}
    cpu = {n: statistics.median(v["cpu"]) for n, v in runs.items()}
    full, floor = median.get("full FT"), median.get("norms (floor)")

    def paired(name, base):
        """Median over rounds of the per-round ratio: robust to load that changes between rounds."""
        per_round = lambda n: [statistics.median(runs[n]["times"][i:i + args.steps])  # noqa: E731
                               for i in range(0, len(runs[n]["times"]), args.steps)]
        return statistics.median(a / b for a, b in zip(per_round(name), per_round(base)))

    print()
    print("| variant | median step ms | min ms | / full FT | / floor | CPU ms | CPU / full FT | CPU / floor | GFLOP | "
          "compile s | peak MiB (XLA) | trainable |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        ratio = lambda base: f"{median[name] / base:.2f}" if base else "-"  # noqa: E731
        cpu_ratio = lambda base: f"{cpu[name] / cpu[base]:.2f}" if base in cpu else "-"  # noqa: E731
        print(f"| {name} | {1e3 * median[name]:.0f} | {1e3 * min(run['times']):.0f} | {ratio(full)} | {ratio(floor)} | "
              f"{1e3 * cpu[name]:.0f} | {cpu_ratio('full FT')} | {cpu_ratio('norms (floor)')} | "
              f"{run['flops'] / 1e9:.1f} | "
              f"{run['compile_s']:.1f} | {run['memory']:.0f} | {run['n_train']:,} |")
    compile_targets = [("LoRA factored", "full FT", 1.3), ("rep factored", "LoRA factored", 1.2),
                       ("rep grouped", "LoRA factored", 1.2)]
    print()
    print("compile time: ratio of compile seconds (target)")
    for name, base, limit in compile_targets:
        if {name, base} <= set(runs):
            value = runs[name]["compile_s"] / runs[base]["compile_s"]
            print(f"{'met   ' if value <= limit else 'MISSED'} {name} <= {limit:.1f} x {base}: {value:.2f} "
                  f"({runs[name]['compile_s']:.1f} s / {runs[base]['compile_s']:.1f} s)")
    targets = [("LoRA factored", "norms (floor)", 1.10), ("LoRA factored", "full FT", 0.55),
               ("LoRA factored", "LoRA merged", 1 / 1.2), ("rep factored", "LoRA factored", 1.05),
               ("rep grouped", "LoRA factored", 1.05)]
    print()
    print("target: ratio of median step times [median of per-round ratios; ratio of median CPU times]")
    for name, base, limit in targets:
        if {name, base} <= set(median):
            value, robust = median[name] / median[base], paired(name, base)
            verdict = "met   " if value <= limit else "MISSED"
            print(f"{verdict} {name} <= {limit:.3f} x {base}: {value:.3f} [{robust:.3f}; {cpu[name] / cpu[base]:.3f}]")


if __name__ == "__main__":
    main()
