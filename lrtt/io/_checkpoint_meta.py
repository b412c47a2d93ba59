"""What an lrtt checkpoint step's ``meta`` item holds, and how it is compared on restore.

The format's name and version, the items every step has, the adapter's entries (kind and static
fields) and leaves (shape and dtype), the rng as JSON, and the differences between a checkpoint
and the current adapter (:class:`_Diff` lines and their summary, the text of a
:class:`CheckpointMismatchError`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrtt._adapter import entries, is_entry
from lrtt._paths import named_leaves

FORMAT = "lrtt-adapter-checkpoint"
FORMAT_VERSION = 1
MAX_DIFF_LINES = 12  # CheckpointMismatchError: the first differences shown, the rest counted
LRTT_ITEMS = ("adapter", "meta")  # the items every lrtt step has (``opt_state`` is optional)


def _flat(tree: Any, what: str) -> dict[str, Any]:
    flat = named_leaves(tree)
    names = [p for p, _ in flat]
    if len(set(names)) != len(names):
        raise ValueError(f"two leaves of the {what} share one '/'-joined path; rename the keys that contain '/'.")
    return dict(flat)


def _leaf_info(flat: dict[str, Any]) -> dict[str, list]:
    return {p: [list(x.shape), jnp.dtype(x.dtype).name] for p, x in flat.items()}


def _entry_info(adapter: Any) -> dict[str, dict]:
    """Kind and static fields of every entry (the arrays are described by ``_leaf_info``)."""
    out = {}
    for path, entry in entries(adapter).items():
        if not is_entry(entry):
            continue
        static = {
            f.name: getattr(entry, f.name)
            for f in dataclasses.fields(entry)
            if isinstance(getattr(entry, f.name), (bool, int, float, str))
        }
        out[path] = {"kind": type(entry).__name__, **static}
    return out


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _rng_meta(rng: Any) -> dict | None:
    if rng is None:
        return None
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return {"impl": str(jax.random.key_impl(rng)), "data": np.asarray(jax.random.key_data(rng)).tolist()}
    return {"impl": None, "data": np.asarray(rng).tolist()}


def _rng_from_meta(meta: dict | None) -> Any:
    if meta is None:
        return None
    data = jnp.asarray(np.asarray(meta["data"], np.uint32))
    return data if meta["impl"] is None else jax.random.wrap_key_data(data, impl=meta["impl"])


class _Diff(NamedTuple):
    """One line of a :class:`CheckpointMismatchError`: its kind, its text, how many it stands for."""

    kind: str
    line: str
    count: int = 1


_PLURAL = {"method field": "method fields", "entry": "entries", "leaf": "leaves",
           "optimizer state leaf": "optimizer state leaves"}


def _diff_lines(saved: dict, now: dict) -> list[_Diff]:
    """The method config fields that differ (kind ``"method field"``)."""
    lines = []
    for key in sorted(set(saved) | set(now), key=lambda k: (k != "method", k)):
        a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if a != b:
            lines.append(_Diff("method field", f"{key}: checkpoint {a!r}, now {b!r}"))
    return lines


def _tree_diff(saved: dict, now: dict, what: str) -> list[_Diff]:
    """Paths on one side only (one line per side, counting them all), then each differing path."""
    lines = []
    only_saved = sorted(set(saved) - set(now))
    only_now = sorted(set(now) - set(saved))
    if only_saved:
        lines.append(_Diff(what, f"{what} only in the checkpoint ({len(only_saved)}): {only_saved[:6]}", len(only_saved)))
    if only_now:
        lines.append(_Diff(what, f"{what} only in the current adapter ({len(only_now)}): {only_now[:6]}", len(only_now)))
    for path in sorted(set(saved) & set(now)):
        if saved[path] != now[path]:
            lines.append(_Diff(what, f"{what} {path}: checkpoint {saved[path]}, now {now[path]}"))
    return lines


def _summary(diffs: list[_Diff], limit: int = MAX_DIFF_LINES) -> str:
    """A count per kind, then the first ``limit`` lines and how many differences they leave out."""
    counts: dict[str, int] = {}
    for d in diffs:
        counts[d.kind] = counts.get(d.kind, 0) + d.count
    head = f"{sum(counts.values())} in all: " + ", ".join(
        f"{n} {kind if n == 1 else _PLURAL.get(kind, kind)}" for kind, n in counts.items()
    )
    shown = [d.line for d in diffs[:limit]]
    rest = sum(d.count for d in diffs[limit:])
    if rest:
        shown.append(f"… and {rest} more difference{'s' if rest > 1 else ''}")
    return head + "\n  " + "\n  ".join(shown)
