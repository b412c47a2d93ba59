"""The LoRETTA claim on real data: accuracy vs trainable parameters, measured in one run.

1. all-MiniLM-L6-v2 on BBC News (5 topics): full fine-tune, LoRA (r=8, q and v, head trainable),
   LorettaRep and LorettaAdp, the same step budget, over several seeds; prints test accuracy
   mean ± std next to the trainable-parameter count.
2. SmolLM2-135M-Instruct on BBC News text: held-out loss / perplexity before and after LoRA and
   LorettaRep.

    python benchmarks/paper_table.py                      # the full table (tens of minutes on 2 cores)
    python benchmarks/paper_table.py --steps 40 --seeds 1 --skip-lm   # a quick look

Every number printed is measured by this run; nothing is copied from a paper.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lrtt.cli import _config, _job, _tasks  # noqa: E402

CLASSIFICATION = ["full", "lora", "loretta_rep", "loretta_adp"]
LM = ["lora", "loretta_rep"]


def _overrides(args, seed, out):
    return [
        f"train.steps={args.steps}", f"train.seed={seed}", f"data.seed={seed}", f"output.dir={out}",
        f"train.eval_every={args.steps}", f"output.save_every={args.steps}", "output.export=false",
        f"data.max_len={args.max_len}",
    ]


def classification_table(args) -> list[str]:
    rows = []
    for name in CLASSIFICATION:
        accuracies, trainable, seconds = [], None, []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as out:
                config = _config.load(f"configs/minilm_bbc_{name}.yaml", _overrides(args, seed, out))
                summary = _job.train(config, progress=False)
            accuracies.append(summary["test"]["accuracy"])
            trainable = summary["trainable_params"]
            seconds.append(summary["train_seconds"])
            print(f"  minilm {name} seed {seed}: accuracy {accuracies[-1]:.4f}", flush=True)
        rows.append((name, trainable, np.mean(accuracies), np.std(accuracies), np.mean(seconds), accuracies))
    lines = [
        f"MiniLM-L6 on BBC News, {args.steps} steps x batch 16, max_len {args.max_len}, {args.seeds} seed(s)",
        f"{'method':<12} {'trainable':>12} {'test accuracy':>18} {'s/run':>7}  per seed",
    ]
    for name, trainable, mean, std, sec, accs in rows:
        per_seed = " ".join(f"{a:.4f}" for a in accs)
        lines.append(f"{name:<12} {trainable:>12,} {mean:>10.4f} ± {std:.4f} {sec:>7.0f}  {per_seed}")
    return lines


def lm_table(args) -> list[str]:
    lines = [f"SmolLM2-135M on BBC News text, {args.lm_steps} steps x batch 4, blocks of 128 tokens"]
    lines.append(f"{'method':<12} {'trainable':>10} {'loss before':>12} {'ppl before':>11} {'loss after':>11} {'ppl after':>10}")
    runs = [(name, "none") for name in args.lm_methods] + [("lora", q) for q in args.lm_qtypes]
    for name, qtype in runs:
        with tempfile.TemporaryDirectory() as out:
            overrides = [f"train.steps={args.lm_steps}", f"output.dir={out}", "output.export=false",
                         f"train.eval_every={args.lm_steps}", f"output.save_every={args.lm_steps}",
                         f"quantize.qtype={qtype}"]
            config = _config.load(f"configs/smollm2_bbc_{name}.yaml", overrides)
            method = _job.build_method(config)
            task = _tasks.build_task(config)
            import jax

            before = _job.evaluate_split(task, method, method.init(jax.random.key(0), task.params), "test", config.train.eval_batch_size)
            summary = _job.train(config, progress=False)
        after = summary["test"]
        label = name if qtype == "none" else f"{name} ({qtype} base)"
        lines.append(
            f"{label:<12} {summary['trainable_params']:>10,} {before['loss']:>12.4f} {before['perplexity']:>11.2f} "
            f"{after['loss']:>11.4f} {after['perplexity']:>10.2f}"
        )
        print("  " + lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="training steps per MiniLM run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=64, help="tokens per BBC article for MiniLM")
    parser.add_argument("--lm-steps", type=int, default=30)
    parser.add_argument("--skip-lm", action="store_true")
    parser.add_argument("--lm-methods", nargs="*", default=LM, choices=LM, help="LM methods over the float base")
    parser.add_argument("--lm-qtypes", nargs="*", default=[], choices=("int8", "int4", "nf4"),
                        help="also LoRA over the base quantized to these formats (QLoRA)")
    parser.add_argument("--skip-classification", action="store_true")
    args = parser.parse_args()
    os.chdir(os.path.join(os.path.dirname(__file__), ".."))
    started = time.perf_counter()
    out = []
    if not args.skip_classification:
        out += classification_table(args) + [""]
    if not args.skip_lm:
        out += lm_table(args)
    print()
    print("\n".join(out))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
