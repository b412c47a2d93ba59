"""Bytes each training step moves between devices, per collective kind, read from the compiled program.

For each case (method x sharding rule x model shape) the Mesh training step
``lrtt.train.mesh_step(loss, lrtt.train.adamw(1e-4), mesh, method=, params=, rules=)`` on an
8-device mesh ``("data",)`` is lowered with abstract arguments only (``jax.ShapeDtypeStruct`` with
the step's shardings: no weight is ever allocated, the params come from
``model.params_shape_tree`` of a ``_do_init=False`` transformers Flax model) and compiled; the
optimized HLO of the SPMD-partitioned program (``compiled.as_text()``) is then parsed.

What is counted, per collective instruction of the compiled per-device program:

* kinds: ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all``, ``collective-permute``;
* bytes = the size of the instruction's RESULT shape on one device (a tuple result, e.g. the
  combined all-reduce XLA makes of many gradients, is the sum of its elements). For all-reduce,
  all-to-all and collective-permute that equals the operand size; for all-gather it is the
  gathered (full) size, for reduce-scatter the scattered (shard) size;
* an asynchronous pair ``X-start`` / ``X-done`` is counted once, at ``X-done`` (whose result is
  the collective's output); collectives wrapped in ``async-start`` computations are counted where
  they sit, inside the wrapped computation;
* a collective inside a while-loop body would run once per iteration: none of the models here
  has one (transformers' Flax GPT-2 and LLaMA unroll their layers), and the script says so if
  one appears.

Also shown (clearly an estimate, not read from the program): "ring est." = bytes each device
SENDS under the textbook ring algorithms over the instruction's group of n devices: all-reduce
2(n-1)/n x S, all-gather (n-1)/n x S_result, reduce-scatter (n-1) x S_result, all-to-all
(n-1)/n x S, collective-permute S.

Next to them: "grad bytes", the trainable leaves' sizes in their dtype (the adapter's gradient;
for full fine-tuning, every weight's), "sharded frozen bytes", the frozen leaves the rule splits,
and the differences "all-reduce - grad" and "all-gather - sharded frozen".

The compiler is the CPU backend's (8 simulated host devices,
``--xla_force_host_platform_device_count=8``). The SPMD partitioner that places the collectives
is shared by every backend; later passes differ on TPU/GPU (e.g. an all-reduce followed by a
slice becomes a reduce-scatter there, never here; async scheduling; combining). In particular,
with bfloat16 weights the program right after SPMD partitioning reduces and gathers bfloat16,
but the CPU backend's later passes move its float32 upcasts ahead of the collectives, so the
compiled CPU program moves float32: the default dtype is therefore float32 for every shape
(``--dtype bfloat16`` shows the CPU's counts anyway).

Cases: LoRA r=8 on q,v; LorettaRep r=8, TT rank 5 on q,v; FullFineTune (every leaf trains), each
under three placements:

* ``dp``: ``rules=None``, params and adapter replicated, batch sharded over "data"; the step's
  default ``reduce="auto"`` = ``"gradients"``: each device's adapter gradients, then a ``pmean``;
* ``dp-compiler``: the same placement with ``reduce="compiler"``: one global program, XLA's
  partitioner places the sums (what ``dp`` was before lrtt reduced the adapter's own gradients);
* ``fsdp``: ``rules="fsdp"``, each >= 2-D frozen leaf sharded over "data" on its largest
  divisible axis, adapter factors following their kernels; the step's default
  ``gather_at_use=True`` constrains the weights and the adapter whole along "data" where the loss
  uses them: the textbook FSDP pattern (all-gather each weight, compute on the local batch shard);
* ``fsdp-xla``: the same rule with ``gather_at_use=False``: the placement of everything else left to
  XLA's propagation (what ``fsdp`` was before the Mesh step gathered at use).

Deterministic forward (``train=False``: no dropout), next-token cross-entropy (mean, float32),
global batch of 8 sequences x 128 tokens (``--batch``, ``--seq``).

Run:  python benchmarks/collectives.py --detail 6              (GPT-2 small and LLaMA-2-7B shapes)
      python benchmarks/collectives.py --models gpt2-small     (one shape)
      python benchmarks/collectives.py --models tiny --json    (2 layers x 32 wide; what the test runs)
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # must precede the first import of jax; never set on import (the tests)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import lrtt  # noqa: E402

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
ASYNC = ("all-reduce", "all-gather", "collective-permute")  # the kinds with X-start / X-done pairs
N_DEVICES = 8
# the name -> the mesh_step keywords
RULES = {"dp": dict(rules=None), "dp-compiler": dict(rules=None, reduce="compiler"), "fsdp": dict(rules="fsdp"),
         "fsdp-xla": dict(rules="fsdp", gather_at_use=False)}
RULE_LABELS = {"dp": "data-parallel (rules=None)", "dp-compiler": "data-parallel, reduce='compiler'",
               "fsdp": "FSDP (rules='fsdp', gathers at use)", "fsdp-xla": "FSDP, gather_at_use=False"}

# --- parsing the optimized HLO text ----------------------------------------------------------

DTYPE_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0,
}
ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
WHILE_BODY = re.compile(r"\bbody=%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of the compiled program (per device)."""

    kind: str  # one of KINDS
    name: str  # the HLO instruction name
    computation: str  # the HLO computation it sits in
    element_bytes: tuple[int, ...]  # bytes of each element of the result (one entry if not a tuple)
    shapes: tuple[str, ...]  # e.g. ("f32[8,96]", "f32[]")
    group_size: int  # devices per replica group (collective-permute: 2, a send and a receive)
    op_name: str = ""  # the JAX operation it came from (HLO metadata), for --detail

    @property
    def bytes(self) -> int:
        return sum(self.element_bytes)

    @property
    def ring_bytes(self) -> float:
        """Bytes each device sends under the ring algorithm (an estimate, see the module docstring)."""
        n, size = self.group_size, self.bytes
        if self.kind == "collective-permute":
            return float(size)
        if n <= 1:
            return 0.0
        return {"all-reduce": 2 * (n - 1) / n * size, "all-gather": (n - 1) / n * size,
                "reduce-scatter": (n - 1) * size, "all-to-all": (n - 1) / n * size}[self.kind]


def array_bytes(dtype: str, dims: str) -> int:
    """Bytes of one HLO array type, e.g. ``("f32", "8,96")`` -> 3072; ``("f32", "")`` (a scalar) -> 4."""
    if dtype not in DTYPE_BYTES:
        if dtype.startswith("f8"):
            return math.prod(int(d) for d in dims.split(",") if d)
        raise ValueError(f"unknown HLO element type {dtype!r}")
    return DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)


def split_result_type(rest: str) -> tuple[str, str]:
    """``"(f32[2]{0}, f32[]) all-reduce(...)"`` -> ``("(f32[2]{0}, f32[])", "all-reduce(...)")``."""
    rest = rest.lstrip()
    if not rest.startswith("("):
        head, _, tail = rest.partition(" ")
        return head, tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[: i + 1], rest[i + 1:].lstrip()
    raise ValueError(f"unbalanced tuple type in {rest[:200]!r}")


def opcode_of(tail: str) -> str:
    """The opcode an instruction's text starts with: ``"all-reduce(%a), ..."`` -> ``"all-reduce"``."""
    match = re.match(r"([a-z][\w\-]*)\(", tail)
    return match.group(1) if match else ""


def collective_kind(opcode: str) -> str | None:
    """``KINDS`` member counted for ``opcode``, or None (``X-start`` is skipped: its ``X-done`` counts)."""
    if opcode in KINDS:
        return opcode
    if opcode.endswith("-done") and opcode[: -len("-done")] in ASYNC:
        return opcode[: -len("-done")]
    return None


def group_size(attributes: str, n_devices: int) -> int:
    """Devices per replica group, from any of the replica_groups spellings XLA prints.

    ``{{0,1,2,3},{4,5,6,7}}`` (explicit), ``[2,4]<=[8]`` (iota: 2 groups of 4),
    ``mesh['data'=8] {'data'}`` (the named-mesh form: the product of the named axes), ``{}`` (all).
    """
    match = re.search(r"replica_groups=(\{\{[^}]*\}|\[[\d,]+\]<=|mesh\[([^\]]*)\]\s*\{([^}]*)\}|\{\})", attributes)
    if match is None:
        return n_devices
    text = match.group(1)
    if text.startswith("{{"):
        return len([d for d in text[2:-1].split(",") if d.strip()])
    if text.startswith("["):
        return int(text[1:-3].split(",")[-1])
    if text.startswith("mesh"):
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", match.group(2)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", match.group(3)))
    return n_devices


def computations(hlo: str) -> dict[str, list[str]]:
    """``{computation name: its instruction lines}`` of an HLO module's text; ENTRY's is ``"ENTRY"``."""
    out: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        if line and not line[0].isspace():
            header = HEADER.match(line)
            if header and not line.startswith("HloModule"):
                current = "ENTRY" if line.startswith("ENTRY") else header.group("name")
                out[current] = []
                continue
            if line.startswith("}"):
                current = None
                continue
        if current is not None and line.strip():
            out[current].append(line)
    return out


def loop_computations(comps: dict[str, list[str]]) -> set[str]:
    """Computations that run inside a while loop (its bodies and everything they call)."""
    callees = {name: set(CALLEES.findall(" ".join(lines))) | {
        c.strip().lstrip("%") for b in BRANCHES.findall(" ".join(lines)) for c in b.split(",")} for name, lines in comps.items()}
    todo = [b for lines in comps.values() for line in lines if " while(" in line for b in WHILE_BODY.findall(line)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(callees.get(name, ()))
    return seen


def parse_collectives(hlo: str, n_devices: int = N_DEVICES) -> list[Collective]:
    """Every counted collective instruction of an optimized HLO module's text (see the docstring)."""
    found = []
    for comp, lines in computations(hlo).items():
        for line in lines:
            match = INSTRUCTION.match(line)
            if not match:
                continue
            result, tail = split_result_type(match.group("rest"))
            kind = collective_kind(opcode_of(tail))
            if kind is None:
                continue
            arrays = ARRAY.findall(result)
            size = 2 if kind == "collective-permute" else group_size(tail, n_devices)
            op_name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', tail)
            found.append(Collective(kind, match.group("name"), comp, tuple(array_bytes(t, d) for t, d in arrays),
                                    tuple(f"{t}[{d}]" for t, d in arrays), size, op_name.group(1) if op_name else ""))
    return found


def in_loops(hlo: str, found: list[Collective]) -> list[Collective]:
    """The collectives of ``found`` that sit inside a while loop (they run once per iteration)."""
    loops = loop_computations(computations(hlo))
    return [c for c in found if c.computation in loops]


def totals(found: list[Collective]) -> dict[str, dict[str, float]]:
    """``{kind: {"bytes", "ring_bytes", "ops"}}`` summed over ``found``."""
    out = {k: {"bytes": 0, "ring_bytes": 0.0, "ops": 0} for k in KINDS}
    for c in found:
        out[c.kind]["bytes"] += c.bytes
        out[c.kind]["ring_bytes"] += c.ring_bytes
        out[c.kind]["ops"] += 1
    return out


# --- the models (shapes only) ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model shape: the transformers class and config, and how its step is run."""

    label: str
    family: str  # "gpt2" or "llama"
    config: dict
    dtype: str  # dtype of the frozen weights and of the model's compute
    batch: int = 8
    seq: int = 128


SHAPES = {
    "tiny": Shape("tiny GPT-2 (2 layers, 32 wide, vocab 64)", "gpt2",
                  dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16), "float32", 8, 16),
    "gpt2-small": Shape("GPT-2 small (12 layers, 768, vocab 50257)", "gpt2",
                        dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024), "float32"),
    "llama2-7b": Shape("LLaMA-2-7B (32 layers, 4096, MLP 11008, 32 heads, vocab 32000)", "llama",
                       dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                            num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096), "float32"),
}


def build_model(shape: Shape):
    """``(model, params as ShapeDtypeStructs)``: no weight allocated (``_do_init=False``)."""
    dtype = jnp.dtype(shape.dtype)
    if shape.family == "gpt2":
        from transformers import FlaxGPT2LMHeadModel as cls, GPT2Config as config_cls
    else:
        from transformers import FlaxLlamaForCausalLM as cls, LlamaConfig as config_cls
    model = cls(config_cls(**shape.config), dtype=dtype, _do_init=False)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), model.params_shape_tree)
    return model, params


def methods() -> dict[str, lrtt.Method]:
    return {
        "LoRA r=8 qv": lrtt.LoRA(rank=8, alpha=16, targets="qv"),
        "LorettaRep r=8 tt5 qv": lrtt.LorettaRep(rank=8, tt_rank=5, targets="qv"),
        "full FT": lrtt.FullFineTune(),
    }


def tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# --- one case: compile the step, count its collectives -----------------------------------------


def make_loss(model, method):
    def apply_fn(p, batch, rng):
        return model(batch["input_ids"], params=p, train=False).logits

    def loss_fn(logits, batch):
        ids = batch["input_ids"]
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()

    return lrtt.train.make_loss(method, apply_fn, loss_fn)


def abstract_args(ms, method, params, optimizer, shape: Shape):
    """``(state, params, batch)`` as ShapeDtypeStructs carrying the step's shardings."""
    adapter = lrtt.adapter_shapes(method, params)
    state = jax.eval_shape(lambda a: lrtt.train.init_state(a, optimizer, 0), adapter)
    placed = lambda tree, shardings: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    batch = {"input_ids": jax.ShapeDtypeStruct((shape.batch, shape.seq), jnp.int32, sharding=ms.batch_sharding)}
    return placed(state, ms.state_sharding), placed(params, ms.params_sharding), batch


def compiled_hlo(model, params, method, rule: str, mesh, shape: Shape):
    """``(optimized HLO text of the compiled Mesh step, seconds to lower + compile, the MeshStep,
    XLA's temporary bytes per device)``."""
    optimizer = lrtt.train.adamw(1e-4)
    loss = make_loss(model, method)
    ms = lrtt.train.mesh_step(loss, optimizer, mesh, method=method, params=params, **RULES[rule])
    start = time.perf_counter()
    compiled = ms.step.lower(*abstract_args(ms, method, params, optimizer, shape)).compile()
    memory = compiled.memory_analysis()
    return compiled.as_text(), time.perf_counter() - start, ms, getattr(memory, "temp_size_in_bytes", -1)


def sharded_bytes(tree, shardings) -> int:
    """Bytes of the leaves of ``tree`` whose sharding splits them (not fully replicated)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)) if not s.is_fully_replicated)


def leaf_bytes(tree) -> list[int]:
    return sorted(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def count_case(model, params, method, rule: str, mesh, shape: Shape) -> dict:
    """Collective bytes of one case, next to the adapter-gradient and frozen-weight bytes."""
    hlo, seconds, ms, temp = compiled_hlo(model, params, method, rule, mesh, shape)
    found = parse_collectives(hlo, mesh.size)
    adapter = lrtt.adapter_shapes(method, params)
    return {
        "totals": totals(found),
        "grad_bytes": tree_bytes(adapter),
        "grad_leaf_bytes": leaf_bytes(adapter),
        "frozen_bytes": tree_bytes(params),
        "frozen_sharded_bytes": sharded_bytes(params, ms.params_sharding),
        "all_reduce_elements": sorted(b for c in found if c.kind == "all-reduce" for b in c.element_bytes),
        "all_reduce_shapes": [s for c in found if c.kind == "all-reduce" for s in c.shapes],
        "in_loops": [c.name for c in in_loops(hlo, found)],
        "compile_s": seconds,
        "temp_bytes": temp,
        "detail": [dataclasses.asdict(c) for c in found],
    }


def run_shape(shape: Shape, method_names, rules, mesh) -> dict:
    model, params = build_model(shape)
    out = {}
    for name, method in methods().items():
        if name not in method_names:
            continue
        for rule in rules:
            out[f"{name} | {rule}"] = count_case(model, params, method, rule, mesh, shape)
            print(f"  {shape.label}: {name}, {RULE_LABELS[rule]}: compiled in "
                  f"{out[f'{name} | {rule}']['compile_s']:.1f} s", file=sys.stderr, flush=True)
    return out


# --- output ------------------------------------------------------------------------------------


def fmt(n: float) -> str:
    return f"{int(round(n)):,}"


def table(rows: dict[str, dict]) -> str:
    """A markdown table: per case, bytes (instructions) per kind, the ring estimate and the comparisons."""
    head = ["case", "grad bytes", "sharded frozen bytes"] + list(KINDS) + [
        "total", "ring est. sent/device", "all-reduce - grad", "all-gather - sharded frozen", "XLA temp/device"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, r in rows.items():
        t = r["totals"]
        total = sum(t[k]["bytes"] for k in KINDS)
        ring = sum(t[k]["ring_bytes"] for k in KINDS)
        cells = [case, fmt(r["grad_bytes"]), fmt(r["frozen_sharded_bytes"])] + [
            f"{fmt(t[k]['bytes'])} ({fmt(t[k]['ops'])})" if t[k]["ops"] else "0" for k in KINDS] + [
            fmt(total), fmt(ring), fmt(t["all-reduce"]["bytes"] - r["grad_bytes"]),
            fmt(t["all-gather"]["bytes"] - r["frozen_sharded_bytes"]), fmt(r.get("temp_bytes", -1))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown(detail: list[dict], n: int) -> list[str]:
    """The ``n`` largest groups of like collectives: bytes, count, kind, result shapes, JAX op."""
    groups: dict[tuple, list[int]] = {}
    for c in detail:
        shapes = ", ".join(c["shapes"][:2]) + (f", ... ({len(c['shapes'])} arrays)" if len(c["shapes"]) > 2 else "")
        key = (c["kind"], shapes, c["op_name"][:60] or "-")
        groups.setdefault(key, [0, 0])
        groups[key][0] += sum(c["element_bytes"])
        groups[key][1] += 1
    top = sorted(groups.items(), key=lambda kv: -kv[1][0])[:n]
    return [f"    {fmt(b):>15} = {k} x {kind} {shapes}  [{op}]" for (kind, shapes, op), (b, k) in top]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2-small,llama2-7b", help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument("--methods", default="lora,rep,full", help="comma-separated, of lora, rep, full")
    parser.add_argument("--rules", default="dp,dp-compiler,fsdp,fsdp-xla", help=f"comma-separated, of {list(RULES)}")
    parser.add_argument("--batch", type=int, default=None, help="global batch (sequences); default 8 (tiny: 8)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence; default 128 (tiny: 16)")
    parser.add_argument("--dtype", default=None, help="weights and compute dtype, e.g. bfloat16; default float32 "
                        "(the CPU compiler upcasts bfloat16 collectives to float32: see the docstring)")
    parser.add_argument("--detail", type=int, default=0, help="also list each case's N largest groups of collectives")
    parser.add_argument("--json", action="store_true", help="print one JSON object (every count) on the last line")
    return parser.parse_args(argv)


def method_names(spec: str) -> list[str]:
    names = {"lora": "LoRA r=8 qv", "rep": "LorettaRep r=8 tt5 qv", "full": "full FT"}
    return [names[m] for m in spec.split(",")]


def print_shape(shape: Shape, rows: dict, seconds: float, detail: int) -> None:
    """One model shape's header line, table, optional breakdown and any while-loop warning."""
    print(f"\n{shape.label}; weights {shape.dtype}, LoRA/LorettaRep factors float32 (full FT trains the weights "
          f"in {shape.dtype}); batch {shape.batch} x {shape.seq} tokens (global); frozen weights "
          f"{fmt(next(iter(rows.values()))['frozen_bytes'])} bytes; {seconds:.0f} s")
    print(table({f"{case.split(' | ')[0]}, {RULE_LABELS[case.split(' | ')[1]]}": r for case, r in rows.items()}))
    for case, r in rows.items() if detail else ():
        print(f"  {case}:", *breakdown(r["detail"], detail), sep="\n")
    looped = sorted({n for r in rows.values() for n in r["in_loops"]})
    if looped:
        print(f"WARNING: collectives inside while loops (counted once, run once per iteration): {looped}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if jax.device_count() < N_DEVICES:
        raise SystemExit(f"needs {N_DEVICES} devices (run as a script: it sets "
                         f"--xla_force_host_platform_device_count={N_DEVICES}); found {jax.device_count()}")
    mesh = Mesh(np.array(jax.devices()[:N_DEVICES]), ("data",))
    print(f"jax {jax.__version__}, {jax.devices()[0].platform} x{N_DEVICES} (simulated), mesh {dict(mesh.shape)}; "
          f"optimizer lrtt.train.adamw(1e-4)")
    report = {"jax": jax.__version__, "models": {}}
    for key in args.models.split(","):
        base = SHAPES[key]
        shape = dataclasses.replace(base, batch=args.batch or base.batch, seq=args.seq or base.seq,
                                    dtype=args.dtype or base.dtype)
        start = time.perf_counter()
        rows = report["models"][key] = run_shape(shape, method_names(args.methods), args.rules.split(","), mesh)
        print_shape(shape, rows, time.perf_counter() - start, args.detail)
    print("\nbytes = result size per device of each collective, (n) = its instructions; ring est. = textbook "
          "ring-algorithm bytes sent per device (an estimate, not read from the program)")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
