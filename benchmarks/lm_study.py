"""LoRA against LorettaRep on a language model: a learning-rate sweep per method, held-out loss
at several budgets, on SmolLM2-135M-Instruct over BBC News text.

Setting (the ``configs/smollm2_bbc_*.yaml`` task): the bundled SmolLM2-135M-Instruct (its GGUF
converted once, float32), BBC News articles cut into blocks of ``--max-len`` tokens (2,000
training blocks, ``--eval-blocks`` held-out test blocks), batch ``--batch``, next-token loss,
AdamW with ``--warmup`` linear warmup steps then a **constant** learning rate — so one run's
held-out loss after 30, 100 and 300 steps is that of a 30-, 100- and 300-step run
(a cosine schedule would tie each budget to its own run). Every run sees the same batches in the
same order (``--seed``) and the same adapter initial values per method.

Phases (each result is appended to ``--out`` as a JSON line the moment it is measured; a rerun
skips what the file already holds, so a killed study continues where it stopped):

1. **sweep**: each method of ``--methods`` on q,v at each of its learning rates, ``--sweep-steps``
   steps, held-out loss at every budget of ``--budgets`` up to it;
2. **long**: the best learning rate of each method (lowest held-out loss at ``--sweep-steps``)
   continued to the last budget (``--budgets``' largest): the state after the sweep is kept in
   memory when the sweep ran in this process (else its steps are replayed: the same batches),
   and a constant learning rate makes the continuation equal to one long run;
3. **targets**: each method on ``--wide-targets`` (all-linear) at its best q,v learning rate
   (or at each of ``--wide-lrs``), ``--sweep-steps`` steps.

The table printed at the end gives, per method and budget, the loss reduction (held-out loss of
the base − after) and its fraction of LoRA's at the same budget and targets, with the trainable
count and its ratio to LoRA's.

Methods: LoRA r = 8 (``lora``), LorettaRep r = 8 at TT rank 5 and 10 (``rep_t5``, ``rep_t10``), and
TT rank 5 with alpha 32 / 64 or every core Gaussian (``rep_a32``, ``rep_a64``, ``rep_gauss``), and
LorettaRep r = 16 / 32 / 64 at TT rank 5 with alpha = 2r (``rep_r16``, ``rep_r32``, ``rep_r64``),
LorettaRep r = 8 at TT rank 5 in 3 or 2 cores per matrix (``rep_d3``, ``rep_d2``: ``tt_shape=3``, ``2``),
the default and 3 cores with the largest core of ``TT_B`` zero at step 0 instead of the last
(``rep_zl``, ``rep_d3_zl``), and r = 16 in 3 cores (``rep_d3_r16``);
``--lrs`` replaces each method's own learning rates in the sweep.

Run:  python benchmarks/lm_study.py                       (hours on 2 CPU cores: see docs/results.md)
      python benchmarks/lm_study.py --table-only          (the table from --out, no training)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lrtt  # noqa: E402
import lrtt.train  # noqa: E402


class _ZeroLargest(lrtt.LorettaRep):
    """LorettaRep with the largest core of ``TT_B`` zero instead of the last (``ΔW = 0`` at step 0
    either way: ``ΔW`` is linear in every core); the last core Gaussian as the others. The zero
    core is the only one with a gradient at the first step, so this gives the first steps the
    largest core of ``TT_B`` to move instead of the last, often the smallest."""

    def init(self, key, params):
        adapter = super().init(key, params)

        def rezero(path, entry):
            if not isinstance(entry, lrtt.TTFactors):
                return entry
            b = list(entry.b)
            sizes = [c.size for c in b]
            largest = sizes.index(max(sizes))
            if largest != len(b) - 1:
                fresh = lrtt.tt.init_gaussian(jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode())),
                                              [c.shape[-2] for c in b], self.tt_rank,
                                              n_in=entry.rank, n_out=entry.n_out, stack=b[0].shape[:-3])
                b[-1] = fresh[-1]
                b[largest] = jnp.zeros_like(b[largest])
            return dataclasses.replace(entry, b=tuple(b))

        return jax.tree_util.tree_map_with_path(rezero, adapter, is_leaf=lambda x: isinstance(x, lrtt.TTFactors))


# name -> (method, learning rates of the sweep)
METHODS = {
    "lora": (lambda targets: lrtt.LoRA(rank=8, alpha=16, targets=targets), (1e-3, 3e-3, 1e-2)),
    "rep_t5": (lambda targets: lrtt.LorettaRep(rank=8, alpha=16, tt_rank=5, targets=targets), (3e-3, 1e-2, 3e-2)),
    "rep_t10": (lambda targets: lrtt.LorettaRep(rank=8, alpha=16, tt_rank=10, targets=targets), (1e-2,)),
    # alpha and the initializer (TT rank 5): a larger alpha scales ΔW = (alpha / r)·TT_A·TT_B, so
    # AdamW's step moves ΔW further without moving the inner cores faster, as a larger lr would
    "rep_a32": (lambda targets: lrtt.LorettaRep(rank=8, alpha=32, tt_rank=5, targets=targets), (3e-3, 1e-2)),
    "rep_a64": (lambda targets: lrtt.LorettaRep(rank=8, alpha=64, tt_rank=5, targets=targets), (3e-3, 1e-2)),
    "rep_gauss": (lambda targets: lrtt.LorettaRep(rank=8, alpha=16, tt_rank=5, targets=targets,
                                                  initializer="gaussian"), (1e-2,)),
    # the rank r of ΔW = TT_A·TT_B at TT rank 5: the TT cores grow little with r (58,950 trainable
    # at r = 8, 75,300 / 76,800 / 82,950 at r = 16 / 32 / 64 on SmolLM2's q,v); alpha = 2r keeps
    # the default's scale alpha / r = 2
    "rep_r16": (lambda targets: lrtt.LorettaRep(rank=16, alpha=32, tt_rank=5, targets=targets), (1e-2,)),
    "rep_r32": (lambda targets: lrtt.LorettaRep(rank=32, alpha=64, tt_rank=5, targets=targets), (1e-2,)),
    "rep_r64": (lambda targets: lrtt.LorettaRep(rank=64, alpha=128, tt_rank=5, targets=targets), (1e-2,)),
    # fewer, larger cores at TT rank 5 (tt_shape=d: the balanced factorization into d cores; the
    # default has 4 per matrix on SmolLM2's q,v): 69,900 / 73,200 trainable for 3 / 2 cores
    "rep_d3": (lambda targets: lrtt.LorettaRep(rank=8, alpha=16, tt_rank=5, tt_shape=3, targets=targets), (1e-2,)),
    "rep_d2": (lambda targets: lrtt.LorettaRep(rank=8, alpha=16, tt_rank=5, tt_shape=2, targets=targets), (1e-2,)),
    # the largest core of TT_B zero at step 0 instead of the last (_ZeroLargest)
    "rep_zl": (lambda targets: _ZeroLargest(rank=8, alpha=16, tt_rank=5, targets=targets), (1e-2,)),
    "rep_d3_zl": (lambda targets: _ZeroLargest(rank=8, alpha=16, tt_rank=5, tt_shape=3, targets=targets), (1e-2,)),
    # r = 16 (alpha 32) in 3 cores: 88,200 trainable, still 5.2x fewer than LoRA on SmolLM2's q,v
    "rep_d3_r16": (lambda targets: lrtt.LorettaRep(rank=16, alpha=32, tt_rank=5, tt_shape=3, targets=targets),
                   (1e-2,)),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--budgets", type=int, nargs="*", default=[30, 100, 300])
    parser.add_argument("--sweep-steps", type=int, default=100)
    parser.add_argument("--wide-targets", default="all-linear")
    parser.add_argument("--skip-long", action="store_true")
    parser.add_argument("--long-methods", nargs="*", default=None, help="the long phase's methods (default: --methods)")
    parser.add_argument("--wide-methods", nargs="*", default=None, help="the targets phase's (default: --methods)")
    parser.add_argument("--skip-targets", action="store_true")
    parser.add_argument("--wide-lrs", type=float, nargs="*", default=None,
                        help="the targets phase's learning rates (default: each method's best on q,v)")
    parser.add_argument("--lrs", type=float, nargs="*", default=None,
                        help="the sweep's learning rates for every method of --methods (default: each method's own)")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/lm_study.jsonl")
    parser.add_argument("--table-only", action="store_true")
    return parser.parse_args(argv)


def load_task(args):
    """The SmolLM2 BBC task of the bundled configs (model, frozen params, train/test blocks)."""
    from lrtt.cli import _config, _tasks

    config = _config.load("configs/smollm2_bbc_lora.yaml", [
        f"data.max_len={args.max_len}", f"data.eval_limit={args.eval_blocks}", f"data.seed={args.seed}"])
    return _tasks.build_task(config)


class Study:
    """One method's training run: constant learning rate, its state kept between calls."""

    def __init__(self, task, method, lr: float, args):
        self.task, self.args = task, args
        self.method = method
        optimizer = lrtt.train.adamw(lr, warmup=args.warmup)
        adapter = self.method.init(jax.random.key(args.seed), task.params)
        self.trainable = lrtt.num_params(adapter)
        self.state = lrtt.train.init_state(adapter, optimizer, rng=args.seed)
        loss = lrtt.train.make_loss(self.method, task.apply, task.loss, forward="factored")
        self.step_fn = lrtt.train.jit_step(loss, optimizer)
        self.evaluate = evaluator(task, method)
        self.steps = 0
        train = task.splits["train"]["input_ids"]
        self.order = np.random.default_rng(args.seed).permutation(len(train))
        self.train = train

    def batch(self, index: int):
        per_epoch = len(self.order) // self.args.batch
        i = index % per_epoch
        rows = self.order[i * self.args.batch:(i + 1) * self.args.batch]
        return {"input_ids": jnp.asarray(self.train[rows])}

    def run_to(self, steps: int) -> float:
        """Train up to ``steps`` in all; the seconds it took."""
        t0 = time.perf_counter()
        while self.steps < steps:
            self.state, loss = self.step_fn(self.state, self.task.params, self.batch(self.steps))
            self.steps += 1
            if not np.isfinite(float(loss)):
                raise FloatingPointError(f"loss {float(loss)} at step {self.steps}")
        return time.perf_counter() - t0

    def held_out(self) -> float:
        return self.evaluate(self.state.adapter)


def evaluator(task, method):
    """``held_out(adapter) -> float``: the mean next-token loss over the test blocks (one compile);
    ``method`` None: the base model (``adapter`` ignored)."""
    def sums(adapter, params, batch):
        if method is None:
            return task.metrics(task.apply(params, batch, None), batch)["loss"]
        adapted = lrtt.train.make_loss(method, task.apply, lambda out, b: task.metrics(out, b)["loss"])
        return adapted(adapter, params, batch, jax.random.key(0))

    sums = jax.jit(sums)
    ids = task.splits["test"]["input_ids"]

    def held_out(adapter) -> float:
        total, count = 0.0, 0
        for i in range(0, len(ids), 8):
            s, n = sums(adapter, task.params, {"input_ids": jnp.asarray(ids[i:i + 8])})
            total, count = total + float(s), count + int(n)
        return total / count

    return held_out


def done_runs(path: str) -> dict:
    """(phase, method, targets, lr) -> its record, from the JSON lines of earlier runs."""
    runs = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                runs[(r["phase"], r["method"], r["targets"], r["lr"])] = r
    return runs


def record(path: str, entry: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    print("  " + json.dumps(entry), flush=True)


def run(task, name, targets, lr, budgets, args, phase, study=None):
    """Train ``name`` at ``lr`` (continuing ``study`` if given) and record the held-out loss at
    each of ``budgets``; returns the :class:`Study` (its state kept)."""
    make, _ = METHODS[name]
    study = study or Study(task, make(targets), lr, args)
    losses, seconds = {}, 0.0
    for budget in budgets:
        try:
            seconds += study.run_to(budget)
        except FloatingPointError as err:  # a diverged run: recorded as such, the study goes on
            print(f"  {name} lr {lr}: {err}", flush=True)
            losses.update({str(b): None for b in budgets if str(b) not in losses})
            break
        losses[str(budget)] = study.held_out()
        print(f"  {name} {targets} lr {lr}: held-out loss {losses[str(budget)]:.4f} after {budget} steps", flush=True)
    record(args.out, {"phase": phase, "method": name, "targets": targets, "lr": lr, "trainable": study.trainable,
                      "held_out": losses, "train_seconds": round(seconds, 1)})
    return study


def best_lr(runs: dict, name: str, targets: str, budget: int) -> float:
    rows = [r for (phase, n, t, _), r in runs.items() if phase == "sweep" and n == name and t == targets]
    return min(rows, key=lambda r: _or_inf(r["held_out"].get(str(budget))))["lr"]  # a shorter sweep: inf


def _or_inf(loss):
    return float("inf") if loss is None else loss


def table(runs: dict, base: float) -> list[str]:
    """Per (targets, budget, method): best-of-sweep reduction and its fraction of LoRA's."""
    best = {}  # (targets, method, budget) -> (reduction, lr, trainable)
    for (_, name, targets, lr), r in runs.items():
        for budget, loss in r["held_out"].items():
            if loss is None:
                continue
            key = (targets, name, int(budget))
            if key not in best or base - loss > best[key][0]:
                best[key] = (base - loss, lr, r["trainable"])
    lines = [f"held-out loss of the base model: {base:.4f}",
             f"{'targets':<11} {'steps':>5} {'method':<9} {'trainable':>10} {'x fewer':>7} {'best lr':>8} "
             f"{'loss':>7} {'reduction':>9} {'of LoRA':>7}"]
    for targets, name, budget in sorted(best, key=lambda k: (k[0] != "qv", k[0], k[2], list(METHODS).index(k[1]))):
        reduction, lr, trainable = best[(targets, name, budget)]
        lora = best.get((targets, "lora", budget))
        fewer = f"{lora[2] / trainable:.1f}" if lora else "-"
        share = f"{reduction / lora[0]:.1%}" if lora and lora[0] > 0 else "-"
        lines.append(f"{targets:<11} {budget:>5} {name:<9} {trainable:>10,} {fewer:>7} {lr:>8.0e} "
                     f"{base - reduction:>7.4f} {reduction:>9.4f} {share:>7}")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = done_runs(args.out)
    base_key = ("base", "base", "-", 0.0)
    if args.table_only:
        print("\n".join(table({k: v for k, v in runs.items() if k != base_key}, runs[base_key]["held_out"]["0"])))
        return
    task = load_task(args)
    print(f"{len(task.splits['train']['input_ids'])} training blocks, {len(task.splits['test']['input_ids'])} "
          f"test blocks of {args.max_len} tokens; {jax.devices()[0].platform}", flush=True)
    if base_key not in runs:
        record(args.out, {"phase": "base", "method": "base", "targets": "-", "lr": 0.0, "trainable": 0,
                          "held_out": {"0": evaluator(task, None)(None)}, "train_seconds": 0})
        runs = done_runs(args.out)
    sweep_budgets = [b for b in args.budgets if b < args.sweep_steps] + [args.sweep_steps]
    studies = {}
    for name in args.methods:
        for lr in args.lrs or METHODS[name][1]:
            if ("sweep", name, "qv", lr) not in runs:
                studies[(name, lr)] = run(task, name, "qv", lr, sweep_budgets, args, "sweep")
    runs = done_runs(args.out)
    last = max(args.budgets)
    if not args.skip_long and last > args.sweep_steps:
        for name in args.long_methods or args.methods:
            lr = best_lr(runs, name, "qv", args.sweep_steps)
            if ("long", name, "qv", lr) in runs:
                continue
            study = studies.get((name, lr))
            if study is None:  # the sweep ran in an earlier process: replay its steps (same batches)
                study = Study(task, METHODS[name][0]("qv"), lr, args)
            run(task, name, "qv", lr, [b for b in args.budgets if b > args.sweep_steps], args, "long", study)
    if not args.skip_targets:
        for name in args.wide_methods or args.methods:
            for lr in args.wide_lrs or [best_lr(runs, name, "qv", args.sweep_steps)]:
                if ("sweep", name, args.wide_targets, lr) not in runs:
                    run(task, name, args.wide_targets, lr, sweep_budgets, args, "sweep")
    runs = done_runs(args.out)
    print("\n".join(table({k: v for k, v in runs.items() if k != base_key}, runs[base_key]["held_out"]["0"])))


if __name__ == "__main__":
    main()
