"""Compile seconds of the GPT-2-small training step with the adapter held in other layouts.

Why LorettaRep's step compiles slower than LoRA's on a model whose layers are unrolled
(docs/factored.md, "Compile time"): its adapter has ~4.4 TT cores per matrix (420 leaves on
GPT-2 small's 48 all-linear targets, LoRA's 96), and XLA compiles AdamW leaf by leaf. This
script compiles (``jit(step).lower(...).compile()``, one process, each variant once per round,
rounds interleaved) the step of ``benchmarks/step.py`` — ``value_and_grad`` of the next-token
loss plus ``optax.adamw`` — for LoRA and LorettaRep with the adapter in these layouts:

  tree      the adapter as lrtt holds it (one leaf per factor / TT core)
  grad      the forward + backward alone (no optimizer): what the model's trace costs
  split     two programs, the forward + backward and the AdamW update (the sum of both compiles)
  packed    the optimizer run on one vector per factor matrix (each matrix's TT cores raveled and
            concatenated; LoRA's A and B each one vector already): its state is per vector, the
            updates split back into the tree's leaves (420 -> 96 optimizer leaves for rep)
  held      the adapter *held* as those vectors (one leaf per factor matrix, as if an entry stored
            its cores in one array), split into the cores inside the loss: no split or
            concatenation around the optimizer, 96 leaves for both methods
  stacked   every target kind's entries stacked over the layers (one leaf per core position and
            kind: 35 for rep, 8 for LoRA), split per layer inside the loss
  grouped   the same stacking through lrtt.group_layers, which lrtt.wrap takes as it is: each
            kind's A and B formed once for all layers (one batched contraction of the cores),
            layer l handed row l at a runtime index, gradients written into the rows in place

Run:  python benchmarks/compile_layouts.py                 (GPT-2 small, 2 rounds)
      python benchmarks/compile_layouts.py --small --rounds 1
"""

from __future__ import annotations

import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import step as step_benchmark  # noqa: E402
import lrtt  # noqa: E402
from lrtt import Entry  # noqa: E402

LAYOUTS = ("tree", "grad", "split", "packed", "held", "stacked", "grouped")


def _is_entry(x) -> bool:
    return isinstance(x, Entry)


def _groups(entry) -> list[list]:
    """The entry's arrays in the groups that are packed together: one per data field."""
    fields = jax.tree.leaves(entry, is_leaf=lambda x: x is not entry)  # the entry's children
    return [jax.tree.leaves(field) for field in fields]


def pack(tree) -> list:
    """One vector per factor matrix (an entry's data field), in tree order."""
    return [jnp.concatenate([x.ravel() for x in group]) for e in jax.tree.leaves(tree, is_leaf=_is_entry)
            for group in _groups(e)]


def unpack(vectors, like):
    """The inverse of :func:`pack`: ``vectors`` split into ``like``'s leaves and shapes."""
    vectors, leaves = iter(vectors), []
    for e in jax.tree.leaves(like, is_leaf=_is_entry):
        for group in _groups(e):
            bounds = np.cumsum([x.size for x in group])[:-1]
            leaves += [p.reshape(x.shape) for p, x in zip(jnp.split(next(vectors), bounds), group)]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def packed_optimizer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` on :func:`pack`'s vectors (exact for an elementwise optimizer such as AdamW)."""

    def update(grads, state, params):
        updates, state = inner.update(pack(grads), state, pack(params))
        return unpack(updates, grads), state

    return optax.GradientTransformation(lambda params: inner.init(pack(params)), update)


def packed_difference(adapter) -> float:
    """The largest relative difference between two AdamW steps' updates on :func:`pack`'s vectors
    and per leaf (0.0 on jax 0.10.2; float32 rounding, ~3e-7, where XLA fuses them differently)."""
    grads = jax.tree.map(lambda x: jnp.sin(3.0 * x) + 0.1, adapter)
    results = []
    for optimizer in (optax.adamw(1e-2), packed_optimizer(optax.adamw(1e-2))):
        def two_steps(adapter, grads, optimizer=optimizer):
            state, updates = optimizer.init(adapter), []
            for _ in range(2):
                u, state = optimizer.update(grads, state, adapter)
                updates.append(u)
            return updates
        results.append(jax.tree.leaves(jax.jit(two_steps)(adapter, grads)))
    return max(float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-30))) for a, b in zip(*results))


def _layer_groups(adapter) -> tuple[list, dict]:
    """The adapter's entries in order, and ``{path with the layer index as '*': entry indices}``."""
    flat = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=_is_entry)[0]
    groups: dict = {}
    for i, (key_path, _) in enumerate(flat):
        path = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)
        groups.setdefault(re.sub(r"/\d+/", "/*/", path), []).append(i)
    return [e for _, e in flat], groups


def stack_layers(adapter) -> dict:
    entries, groups = _layer_groups(adapter)
    return {g: jax.tree.map(lambda *xs: jnp.stack(xs), *[entries[i] for i in idx]) for g, idx in groups.items()}


def unstack_layers(stacked: dict, like):
    entries, groups = _layer_groups(like)
    out = [None] * len(entries)
    for g, idx in groups.items():
        pieces = jax.tree.map(lambda x: [y[0] for y in jnp.split(x, len(idx))], stacked[g])
        for j, i in enumerate(idx):
            out[i] = jax.tree.map(lambda p: p[j], pieces, is_leaf=lambda x: isinstance(x, list))
    return jax.tree.unflatten(jax.tree.structure(like, is_leaf=_is_entry), out)


# layout -> (the adapter in that form, its inverse given the adapter's tree)
HELD_AS = {"held": (pack, unpack), "stacked": (stack_layers, unstack_layers)}


def compile_seconds(loss, trainable, frozen, ids, layout: str) -> tuple[float, int]:
    """(seconds to compile the step, optimizer leaves) for ``layout``."""
    optimizer = optax.adamw(1e-4)
    if layout in HELD_AS:  # the step holds the adapter in another form, turned back inside the loss
        to_layout, from_layout = HELD_AS[layout]
        like, trainable = trainable, to_layout(trainable)
        loss = (lambda inner: lambda t, f, x: inner(from_layout(t, like), f, x))(loss)
    if layout == "grouped":  # lrtt.wrap takes the groups as they are
        trainable = lrtt.group_layers(trainable)
    if layout == "packed":
        optimizer = packed_optimizer(optimizer)
    if layout in ("grad", "split"):
        programs = [jax.jit(jax.value_and_grad(loss)).lower(trainable, frozen, ids)]
        leaves = 0
        if layout == "split":
            opt_state = optimizer.init(trainable)

            def update(grads, opt_state, trainable):
                updates, opt_state = optimizer.update(grads, opt_state, trainable)
                return optax.apply_updates(trainable, updates), opt_state

            programs.append(jax.jit(update, donate_argnums=(1, 2)).lower(trainable, opt_state, trainable))
            leaves = len(jax.tree.leaves(opt_state)) // 2
    else:
        def step(trainable, opt_state, frozen, ids):
            value, grads = jax.value_and_grad(loss)(trainable, frozen, ids)
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, value

        opt_state = optimizer.init(trainable)
        programs = [jax.jit(step, donate_argnums=(0, 1)).lower(trainable, opt_state, frozen, ids)]
        leaves = len(jax.tree.leaves(opt_state)) // 2  # AdamW: mu and nu per leaf (+ the count)
    start = time.perf_counter()
    for program in programs:
        program.compile()
    return time.perf_counter() - start, leaves


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    rounds = 2
    if "--rounds" in argv:
        i = argv.index("--rounds")
        rounds = int(argv[i + 1])
        del argv[i:i + 2]
    args = step_benchmark.parse_args(argv + ["--variants", "lora,rep"])
    model, params = step_benchmark.build_model(args)
    variants = step_benchmark.make_variants(args, model, params)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq), dtype=np.int32))
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} cpus; GPT-2 layers={args.layers} "
          f"hidden={args.hidden}, rank {args.rank}, targets {args.targets!r}; {rounds} rounds", flush=True)
    for name in ("LoRA factored", "rep factored"):
        print(f"  {name}: AdamW on packed vectors against AdamW per leaf, largest relative difference: "
              f"{packed_difference(variants[name][1]):.1e}", flush=True)
    seconds: dict = {}
    for r in range(rounds):
        for layout in LAYOUTS:
            for name in ("LoRA factored", "rep factored"):
                loss, trainable, frozen = variants[name]
                s, leaves = compile_seconds(loss, trainable, frozen, ids, layout)
                seconds.setdefault((name, layout), []).append(s)
                print(f"  round {r}: {name:13s} {layout:8s} {s:5.2f} s  ({leaves} optimizer leaves)", flush=True)
    if not rounds:
        return
    print("\n| layout | LoRA s | rep s | rep / LoRA | rep / LoRA as a tree |\n|---|---|---|---|---|")
    lora_tree = min(seconds[("LoRA factored", "tree")])
    for layout in LAYOUTS:
        lora, rep = min(seconds[("LoRA factored", layout)]), min(seconds[("rep factored", layout)])
        print(f"| {layout} | {lora:.2f} | {rep:.2f} | {rep / lora:.2f} | {rep / lora_tree:.2f} |")
    print("(min over rounds)")


if __name__ == "__main__":
    main()
