"""Dense merge: ``W = W0 + ΔW`` for every adapted leaf (the export path), and its inverse."""

from __future__ import annotations

from typing import Any

import jax

from lrtt._adapter import NOT_MERGEABLE, NotMergeableError, as_dtype
from lrtt._paths import is_quantized, replace_leaves
from lrtt._quant import dequantize_leaf
from lrtt._resolve import resolve

__all__ = ["NOT_MERGEABLE", "delta", "merge", "unmerge"]


def delta(method: Any, params: Any, adapter: Any) -> dict[str, jax.Array]:
    """``{path: ΔW}`` of every low-rank entry, each in the shape of the leaf it adapts.

    Raises:
      NotMergeableError: the method is not mergeable (LorettaAdp).
      AdapterMismatchError: the adapter does not fit: it names leaves the params lack, its
        factors have other shapes, or it has no entry for a leaf the method selects in
        ``params`` (made for a model with fewer layers).
    """
    _require_mergeable(method)
    resolved = resolve(method, params, adapter)
    found = {p: e.delta(resolved.targets.get(p)) for p, e in resolved.entries.items()}
    return {p: dw for p, dw in found.items() if dw is not None}


def _require_mergeable(method: Any) -> None:
    if not method.mergeable:
        raise NotMergeableError(NOT_MERGEABLE.format(method=type(method).__name__))


def _apply(method: Any, params: Any, adapter: Any, sign: float, dtype: Any = None) -> Any:
    _require_mergeable(method)
    resolved = resolve(method, params, adapter)
    replacements = {}
    for path, entry in resolved.entries.items():
        w0 = resolved.leaves[path]
        out_dtype = (dtype or w0.dtype) if is_quantized(w0) else w0.dtype
        w0 = dequantize_leaf(w0) if is_quantized(w0) else w0
        target = resolved.targets.get(path)
        value = entry.merged(w0, target) if sign > 0 else entry.unmerged(w0, target)
        replacements[path] = as_dtype(value, out_dtype)
    for path, leaf in resolved.leaves.items():  # a quantized leaf that is not adapted: its float value
        if path not in replacements and is_quantized(leaf):
            replacements[path] = dequantize_leaf(leaf, dtype)
    return replace_leaves(params, replacements)


def merge(method: Any, params: Any, adapter: Any, *, dtype: Any = None) -> Any:
    """The params with every adapted kernel replaced by ``W0 + ΔW`` (dtype of the base kept).

    Leaves trained in full (``Trainable``) replace their base leaf. The tree structure, shapes
    and dtypes of ``params`` are preserved, so the result loads where the base loads.

    A quantized base (``qwix.QArray`` leaves, :func:`lrtt.quantize`) is dequantized: each
    adapted kernel becomes ``dequantize(W0) + ΔW`` (summed in float32) and every other
    quantized leaf its float value, in ``dtype`` (default: the dtype of its scales), so the
    result is a float tree that loads anywhere; float leaves keep their dtype.

    Raises:
      NotMergeableError: for LorettaAdp (non-linear, see ``NOT_MERGEABLE``).
      AdapterMismatchError: an adapter made for other params (leaves they lack, other shapes,
        or selected leaves it has no entry for); both are ValueErrors.
    """
    return _apply(method, params, adapter, +1.0, dtype)


def unmerge(method: Any, merged: Any, adapter: Any) -> Any:
    """Inverse of :func:`merge` on the low-rank leaves: ``W0 = W - ΔW``.

    Leaves trained in full cannot be recovered from a merged tree; they are returned as found.
    """
    return _apply(method, merged, adapter, -1.0)
