"""Host time of lrtt's path lookups on LLaMA-2-70B shapes with ``targets="all-linear"``.

80 layers × 7 kernels = 560 targets, shapes only (``params_shape_tree``: no weights). Times
``method.init`` (under ``jax.eval_shape``), ``lrtt.wrap`` and ``lrtt.merge`` (both traced with
``jax.eval_shape``, so only the host-side work of building the trees is measured), each the best
of 3 calls after one warm-up. Target: < 0.2 s each.

    python benchmarks/lookup_70b.py
"""

from __future__ import annotations

import os
import sys
import time
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

import lrtt  # noqa: E402

TARGET_S = 0.2


def best_of(fn, n: int = 3) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=32000)
    params = FlaxLlamaForCausalLM(config, _do_init=False).params_shape_tree
    method = lrtt.LoRA(rank=8, targets="all-linear")
    adapter = jax.eval_shape(method.init, jax.random.key(0), params)
    n_targets = len(lrtt.select(params, method.targets))
    rows = {
        "init": lambda: jax.eval_shape(method.init, jax.random.key(0), params),
        "wrap": lambda: jax.eval_shape(lambda p, a: jax.tree.leaves(lrtt.wrap(method, p, a))[0], params, adapter),
        "merge": lambda: jax.eval_shape(lambda p, a: lrtt.merge(method, p, a), params, adapter),
    }
    print(f"LLaMA-2-70B shapes, LoRA r=8, targets='all-linear': {n_targets} targets")
    print("| call | seconds | target |")
    print("|---|---|---|")
    for name, fn in rows.items():
        seconds = best_of(fn)
        print(f"| {name} | {seconds:.3f} | {'met' if seconds < TARGET_S else 'MISSED'} (< {TARGET_S}) |")


if __name__ == "__main__":
    main()
