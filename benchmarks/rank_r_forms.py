"""Compile seconds and step time of the forms of factored LoRA's rank-r products, in one process.

``low_rank_add`` (lrtt/_factored/_lowrank.py) forms ``t·B`` (forward) and ``g·Bᵀ·Aᵀ`` (backward)
through ``_rank_r``. This script swaps each form into ``_rank_r`` while a variant's step is
traced, so every form runs in the same process, interleaved, through ``benchmarks/step.py``
(same model, compile measure, rounds and table):

  reduce   one broadcast multiply reduced over r (what lrtt does)
  unroll   r separate broadcast multiply-adds (what lrtt did before 2026-12-07)
  dot      a ``dot_general``, then the add

Variants are named ``LoRA <forward form>/<backward form>``; full FT is the reference.

Run:  python benchmarks/rank_r_forms.py --rounds 6 --steps 2 --compile-rounds 3
      python benchmarks/rank_r_forms.py --forms reduce/reduce,unroll/unroll --small
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax.numpy as jnp  # noqa: E402

import lrtt._factored._lowrank as lowrank  # noqa: E402
import step  # noqa: E402

_CURRENT = {"fwd": "reduce", "bwd": "reduce", "in_fwd": False}
_REDUCE, _FORWARD = lowrank._rank_r, lowrank._forward


def _unrolled(u, v):
    dtype = jnp.promote_types(u.dtype, v.dtype)
    acc = jnp.float32 if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32 else dtype
    u, v = u.astype(acc), v.astype(acc)
    out = u[:, 0:1] * v[0:1, :]
    for j in range(1, u.shape[1]):
        out = out + u[:, j:j + 1] * v[j:j + 1, :]
    return out.astype(dtype)


def _rank_r(u, v, precision, preferred):
    form = _CURRENT["fwd"] if _CURRENT["in_fwd"] else _CURRENT["bwd"]
    if form == "dot":
        return lowrank._dot(u, v, lowrank._MM, precision, preferred)
    if form == "unroll" and preferred is None:
        return _unrolled(u, v)
    return _REDUCE(u, v, precision, preferred)


def _forward(*args):  # the custom VJP's forward; its backward is traced later, outside it
    _CURRENT["in_fwd"] = True
    try:
        return _FORWARD(*args)
    finally:
        _CURRENT["in_fwd"] = False


class _Lowering:
    """A jitted step whose ``lower`` traces with one form in place."""

    def __init__(self, jitted, forms):
        self.jitted, self.forms = jitted, forms

    def lower(self, *args):
        _CURRENT["fwd"], _CURRENT["bwd"] = self.forms
        try:
            return self.jitted.lower(*args)
        finally:
            _CURRENT["fwd"], _CURRENT["bwd"] = "reduce", "reduce"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    parser.add_argument("--forms", default="unroll/unroll,reduce/reduce,dot/dot,reduce/unroll,unroll/reduce")
    args, rest = parser.parse_known_args(argv)
    forms = [tuple(f.split("/")) for f in args.forms.split(",")]
    for f in forms:
        if len(f) != 2 or not set(f) <= {"reduce", "unroll", "dot"}:
            raise SystemExit(f"--forms: each form is <forward>/<backward> of reduce, unroll, dot; got {'/'.join(f)!r}")
    lowrank._rank_r, lowrank._forward = _rank_r, _forward
    make_step, make_variants = step.make_step, step.make_variants

    def make_step_with_forms(loss):
        optimizer, jitted = make_step(loss)
        return optimizer, _Lowering(jitted, getattr(loss, "forms", ("reduce", "reduce")))

    def lora_forms(run_args, model, params):
        run_args.variants = "full,lora"
        variants = make_variants(run_args, model, params)
        loss, trainable, frozen = variants["LoRA factored"]
        out = {"full FT": variants["full FT"]}
        for fwd, bwd in forms:
            def formed(*a, _loss=loss):
                return _loss(*a)
            formed.forms = (fwd, bwd)
            out[f"LoRA {fwd}/{bwd}"] = (formed, trainable, frozen)
        return out

    step.make_step, step.make_variants = make_step_with_forms, lora_forms
    step.main(rest)


if __name__ == "__main__":
    main()
