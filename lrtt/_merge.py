"""Dense merge: ``W = W0 + ΔW`` for every adapted leaf (the export path), and its inverse."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lrtt._adapter import BottleneckAdapter, LoraFactors, Trainable, TTFactors, TTKernel, entries
from lrtt._paths import exact_patterns, is_quantized, named_leaves, replace_leaves
from lrtt._quant import dequantize_leaf
from lrtt._targets import Layout, Target, select

NOT_MERGEABLE = (
    "{method} cannot be merged into the base weights: its adapter f(h) = s·U(act(D(h))) is "
    "non-linear, so no dense ΔW reproduces it. Run the model through lrtt.factored(fn) with "
    "lrtt.wrap(method, params, adapter) instead (zero-overhead export exists for LoRA and "
    "LorettaRep only)."
)


def _leaf_targets(params: Any, paths: set[str], layouts) -> dict[str, Target]:
    """Targets (path, shape, layout) of the adapted paths, reusing the method's layout rules."""
    found = {t.path: t for t in select(params, exact_patterns(paths), layouts=layouts, require=False)}
    missing = paths - set(found)
    if missing:
        raise ValueError(
            f"the adapter names leaves the params do not have: {sorted(missing)[:5]}. Was the "
            "adapter made for another model? Re-create it with method.init(key, params)."
        )
    return found


def check_covers(method: Any, params: Any, adapted: "set[str] | frozenset[str]") -> None:
    """Every leaf ``method`` selects in ``params`` (``method.plan(params)``) has an adapter entry.

    Raises:
      ValueError: the adapter has no entry for some selected leaves: it was made for other params
        (e.g. a model with fewer layers), and those leaves would silently stay unadapted.
    """
    planned = [t.path for t in method.plan(params)]
    missing = [p for p in planned if p not in adapted]
    if missing:
        raise ValueError(
            f"the adapter has no entry for {len(missing)} of the {len(planned)} leaves that "
            f"{type(method).__name__} selects in these params, e.g. {missing[:5]}: it was made for "
            "other params (a model with fewer layers, or other targets), and those leaves would "
            "silently stay unadapted. Use the adapter made for this model (method.init(key, params) "
            "creates one), or the params it was made for."
        )


def low_rank_delta(entry: "LoraFactors | TTFactors", target: Target) -> jax.Array:
    """``ΔW = scale · A @ B`` in the leaf's own layout and shape (float32 or the factors' dtype)."""
    a, b = entry.factor_matrices()
    if a.shape[-2] != target.n_in or b.shape[-1] != target.n_out:
        raise ValueError(
            f"adapter factors of {target.path!r} are ({a.shape[-2]}, r)·(r, {b.shape[-1]}) but the "
            f"leaf is a ({target.n_in}, {target.n_out}) matrix: the adapter was made for another "
            "model or layout."
        )
    return target.layout.from_matrix(_scaled_product(a, b, entry.scale), target.shape)


def _as(x: jax.Array, dtype) -> jax.Array:
    """``x`` in ``dtype``; no conversion is traced when it already is."""
    return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def _scaled_product(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale · A @ B`` over the stack axes, in the promoted dtype of the factors.

    Written with ``lax`` primitives: under a trace each ``jnp`` operator is a nested ``jit`` of its
    own, which on LLaMA-2-70B's 560 targets costs more than the whole rest of ``merge``.
    """
    dtype = jnp.promote_types(a.dtype, b.dtype)
    a, b = _as(a, dtype), _as(b, dtype)
    stack = tuple(range(a.ndim - 2))
    dw = lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 2,)), (stack, stack)), precision=lax.Precision.HIGHEST)
    return lax.mul(dw, np.asarray(scale, dtype))


def delta(method: Any, params: Any, adapter: Any) -> dict[str, jax.Array]:
    """``{path: ΔW}`` of every low-rank entry, each in the shape of the leaf it adapts.

    Raises:
      ValueError: the method is not mergeable (LorettaAdp), or the adapter does not fit: it names
        leaves the params lack, its factors have other shapes, or it has no entry for a leaf the
        method selects in ``params`` (made for a model with fewer layers).
    """
    _require_mergeable(method)
    found = entries(adapter)
    low_rank = {p: e for p, e in found.items() if isinstance(e, (LoraFactors, TTFactors))}
    targets = _leaf_targets(params, set(low_rank), method.layouts)
    check_covers(method, params, set(found))
    return {p: low_rank_delta(e, targets[p]) for p, e in low_rank.items()}


def _require_mergeable(method: Any) -> None:
    if not method.mergeable:
        raise ValueError(NOT_MERGEABLE.format(method=type(method).__name__))


def _apply(method: Any, params: Any, adapter: Any, sign: float, dtype: Any = None) -> Any:
    _require_mergeable(method)
    base = dict(named_leaves(params))
    deltas = delta(method, params, adapter)
    replacements = {}
    for path, entry in entries(adapter).items():
        w0 = base.get(path)
        if w0 is None:
            raise ValueError(f"the adapter names {path!r}, which is not a leaf of the params.")
        out_dtype = (dtype or w0.dtype) if is_quantized(w0) else w0.dtype
        if path in deltas:
            w0 = dequantize_leaf(w0) if is_quantized(w0) else w0
            w, dw = (_as(x, jnp.float32) for x in (w0, deltas[path]))
            summed = lax.add(w, dw) if sign > 0 else lax.sub(w, dw)
            replacements[path] = _as(summed, out_dtype)
        elif isinstance(entry, Trainable):
            replacements[path] = entry.value.astype(out_dtype) if sign > 0 else w0
        elif isinstance(entry, TTKernel):
            replacements[path] = Layout.parse("in out").from_matrix(entry.matrix(), w0.shape).astype(out_dtype)
        elif isinstance(entry, BottleneckAdapter):  # unreachable for mergeable methods
            raise ValueError(NOT_MERGEABLE.format(method=type(method).__name__))
    for path, leaf in base.items():  # a quantized leaf that is not adapted: its float value
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
      ValueError: for LorettaAdp (non-linear, see ``NOT_MERGEABLE``) or an adapter made for
        other params (leaves they lack, other shapes, or selected leaves it has no entry for).
    """
    return _apply(method, params, adapter, +1.0, dtype)


def unmerge(method: Any, merged: Any, adapter: Any) -> Any:
    """Inverse of :func:`merge` on the low-rank leaves: ``W0 = W - ΔW``.

    Leaves trained in full cannot be recovered from a merged tree; they are returned as found.
    """
    return _apply(method, merged, adapter, -1.0)
