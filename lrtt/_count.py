"""Trainable-parameter counts from shapes only, and the per-target table users print."""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax

from lrtt._adapter import entries
from lrtt._paths import named_leaves
from lrtt.methods._base import Method


def num_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ``jax.ShapeDtypeStruct`` leaves."""
    return sum(math.prod(leaf.shape) for _, leaf in named_leaves(tree) if hasattr(leaf, "shape"))


def abstract(params: Any) -> Any:
    """``params`` as ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


def adapter_shapes(method: Any, params: Any) -> Any:
    """The adapter ``method.init`` would make, as shapes only (``jax.eval_shape``)."""
    return jax.eval_shape(method.init, jax.random.key(0), abstract(params))


def _group(path: str) -> str:
    """Layer indices become ``*`` so that the rows read per kind of target."""
    return re.sub(r"(?<=/)\d+(?=/)", "*", path)


def count_rows(method: Any, params: Any) -> list[tuple[str, int, int]]:
    """``[(target group, number of leaves, trainable scalars), ...]`` for ``method`` on ``params``."""
    rows: dict[str, list[int]] = {}
    for path, entry in entries(adapter_shapes(method, params)).items():
        row = rows.setdefault(_group(path), [0, 0])
        row[0] += 1
        row[1] += num_params(entry)
    return [(group, n, count) for group, (n, count) in rows.items()]


def parameter_table(params: Any, methods: Sequence[Any] | Mapping[str, Any]) -> str:
    """A text table: per method, each target group's leaves and trainable counts, then totals.

    ``methods`` is a sequence of methods (labelled by their class and ranks) or a mapping
    ``{label: method}``. Counts come from shapes only, so ``params`` may be
    ``jax.ShapeDtypeStruct`` leaves of a 70B-parameter model.
    """
    labelled = list(methods.items()) if isinstance(methods, Mapping) else [(None, m) for m in methods]
    for label, method in labelled:
        if not isinstance(method, Method):
            raise TypeError(
                f"parameter_table got {method!r}{f' under {label!r}' if label else ''} where a method "
                "(lrtt.LoRA, lrtt.LorettaRep, ...) was expected; pass a list of methods or a "
                "{label: method} mapping."
            )
    total = num_params(params)
    lines: list[str] = []
    summary = []
    for label, method in labelled:
        label = label or method.label
        rows = count_rows(method, params)
        trainable = sum(r[2] for r in rows)
        summary.append((label, trainable))
        width = max([len(r[0]) for r in rows] + [20])
        lines.append(label)
        lines.append(f"  {'target':<{width}}  {'leaves':>6}  {'trainable':>13}")
        for group, n, count in rows:
            lines.append(f"  {group:<{width}}  {n:>6}  {count:>13,}")
        lines.append(f"  {'total':<{width}}  {sum(r[1] for r in rows):>6}  {trainable:>13,}")
        lines.append("")
    name_width = max([len(s[0]) for s in summary] + [len("full fine-tune")])
    lines.append(f"{'method':<{name_width}}  {'trainable':>15}  {'% of base':>9}")
    lines.append(f"{'full fine-tune':<{name_width}}  {total:>15,}  {100.0:>8.4f}%")
    for label, trainable in summary:
        lines.append(f"{label:<{name_width}}  {trainable:>15,}  {100.0 * trainable / total:>8.4f}%")
    return "\n".join(lines)


def print_trainable_parameters(params: Any, *methods: Any) -> None:
    """Print :func:`parameter_table` (PEFT's ``print_trainable_parameters``, per method/target)."""
    print(parameter_table(params, methods))
