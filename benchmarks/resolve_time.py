"""Seconds :func:`lrtt.resolve` spends checking an adapter against its params, and what reading
the factor shapes costs when they are traced (``jax.eval_shape`` of the TT contraction, what
``Entry.misfit`` did before ``lrtt.tt._core.matrix_shape``) against read off the cores.

``resolve`` runs at every trace of ``wrap``/``merge``/``delta`` (and so at every compile of a
step), once per entry. Params: ``--layers`` layers of two ``(--dim, --dim)`` kernels (q, v).
Each timing is the minimum of ``--repeats`` eager calls in this process after one warm-up call; the ratio is of two
timings of this run.

Run:  python benchmarks/resolve_time.py
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lrtt  # noqa: E402
from lrtt._adapter import _LowRank, entries  # noqa: E402
from lookup_70b import best_of  # noqa: E402  (one warm-up call, then the minimum of n)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=150)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    params = {f"layer_{i}": {n: {"kernel": jnp.zeros((args.dim, args.dim))} for n in ("q_proj", "v_proj")}
              for i in range(args.layers)}
    targets = r"(q|v)_proj/kernel$"
    print(f"{2 * args.layers} targets of ({args.dim}, {args.dim}); min of {args.repeats} calls after a warm-up, seconds")
    for name, method in [("LoRA", lrtt.LoRA(rank=8, targets=targets)),
                         ("LorettaRep", lrtt.LorettaRep(rank=8, targets=targets))]:
        adapter = method.init(jax.random.key(0), params)
        flat = list(entries(adapter).values())
        resolve = best_of(lambda: lrtt.resolve(method, params, adapter), args.repeats)
        read = best_of(lambda: [e.factor_shapes() for e in flat], args.repeats)
        traced = best_of(lambda: [_LowRank.factor_shapes(e) for e in flat], args.repeats)
        print(f"{name:<11} resolve {resolve:.4f}   factor shapes read {read:.4f}, traced {traced:.4f} "
              f"(traced / read {traced / read:.0f}x)")


if __name__ == "__main__":
    main()
