"""Quantized frozen bases (QLoRA): kernels held as ``qwix.QArray`` (NF4, int8, int4).

:func:`quantize` maps a float param tree to the same tree with its linear kernels quantized by
qwix; every lrtt transform then takes such a tree as it takes a float one (a tree quantized by
``qwix.quantize_params`` for tunix or MaxText is accepted as it is). A quantized kernel is
named by its own path (``…/kernel``) with the shape of the array it stands for.

.. math::  W_0 \\approx \\mathrm{dequantize}(q) = q_{\\text{value}} \\cdot s
   \\qquad (s \\text{ broadcast over each block of } \\texttt{block\\_size} \\text{ inputs})

Blocks run along the kernel's input axis (the last ``in`` axis of its layout), one scale per
block and output channel, as in QLoRA (NF4, blocks of 64); stacked (layer/expert) axes always
get their own scales, so a scan over layers slices the scales with the values. qwix does the
numerics: its NF4 code book, absmax calibration and tiling. QLoRA's double quantization (the
scales themselves in 8 bits) is not done: qwix has no such mode, and at block 64 the float32
scales cost 0.5 bit per weight (bf16 scales: ``scale_dtype=jnp.bfloat16``, 0.25 bit).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from lrtt._extras import needs_extra
from lrtt._paths import is_quantized, named_leaves, quantized_array, replace_leaves
from lrtt._targets import normalize_patterns, select

QTYPES = ("nf4", "int8", "int4")


def _qwix():
    with needs_extra():
        import qwix
    return qwix


def _qtype(qtype: str) -> Any:
    if qtype not in QTYPES:
        raise ValueError(f"`qtype` must be one of {list(QTYPES)}, got {qtype!r}.")
    return {"nf4": "nf4", "int8": jnp.int8, "int4": jnp.int4}[qtype]


def quantize(
    params: Any,
    targets: "str | Sequence[str]" = "all-linear",
    *,
    qtype: str = "nf4",
    block_size: int | None = 64,
    layouts: Any = (),
    scale_dtype: Any = None,
) -> Any:
    """``params`` with the kernels ``targets`` selects quantized; every other leaf as it was.

    Args:
      params: a float param tree (arrays; linen, NNX state, transformers, any pytree).
      targets: a preset (``"all-linear"``: every linear kernel but the head, the default),
        a regex or a list of regexes, as for the methods.
      qtype: ``"nf4"`` (QLoRA's 4-bit NormalFloat), ``"int8"`` or ``"int4"`` (symmetric).
      block_size: inputs per scale along the kernel's input axis (QLoRA: 64), or None for one
        scale per output channel (over all inputs).
      layouts: ``{regex: layout}`` for kernels that are not 2-D ``(in, out)`` (as the methods').
      scale_dtype: dtype of the scales (and of the dequantized kernel); default the kernel's.

    Returns:
      The tree with ``qwix.QArray`` leaves at the targets.

    Raises:
      ValueError: an unknown ``qtype``, no leaf matched, or an input axis that ``block_size``
        does not divide (the message names the leaf).

    Example:
      >>> import jax, jax.numpy as jnp, lrtt
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (128, 16))}}
      >>> q = lrtt.quantize(params, "dense/kernel", qtype="nf4", block_size=64)
      >>> kernel = q["dense"]["kernel"]
      >>> kernel.shape, kernel.qvalue.dtype, kernel.scale.shape
      ((128, 16), dtype(uint4), (2, 16))
    """
    qwix = _qwix()
    kind = _qtype(qtype)
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"`block_size` must be a positive integer or None, got {block_size!r}.")
    leaves = dict(named_leaves(params))
    replacements = {}
    for target in select(params, normalize_patterns(targets), layouts=layouts):
        leaf = leaves[target.path]
        if is_quantized(leaf):
            continue  # already quantized: kept as it is
        ins = target.layout.axes("in")
        channelwise = [a for a in range(target.layout.ndim) if a not in ins]
        tiled = {}
        if block_size is not None:
            axis = ins[-1]
            if target.shape[axis] % block_size:
                raise ValueError(
                    f"cannot quantize {target.path!r} of shape {target.shape} in blocks of {block_size}: its "
                    f"input axis {axis} has {target.shape[axis]} entries, which {block_size} does not divide. "
                    "Pass a block_size that divides it, block_size=None (one scale per output channel), "
                    "or leave this leaf out of `targets`."
                )
            tiled = {axis: block_size}
            channelwise += [a for a in ins if a != axis]
        replacements[target.path] = _quantize_in_chunks(
            qwix, leaf, kind, tuple(channelwise), tiled or None, scale_dtype, target.layout.axes("out"))
    return replace_leaves(params, replacements)


CHUNK = 1 << 23
"""Elements quantized per qwix call: NF4's nearest-code search makes 16 floats per element, so a
LLaMA-2-7B MLP kernel quantized whole would need 2.9 GB of temporaries (8M elements: 0.5 GB)."""


def _quantize_in_chunks(qwix, leaf, kind, channelwise, tiled, scale_dtype, out_axes):
    """``qwix.quantize`` of ``leaf``, split along its largest output axis into pieces of at most
    :data:`CHUNK` elements: every output channel has its own scales, so the pieces quantize
    exactly as the whole (the values and scales are joined back along that axis)."""
    size = math.prod(leaf.shape)
    axis = max(out_axes, key=lambda a: leaf.shape[a])
    pieces = min(leaf.shape[axis], -(-size // CHUNK))
    if pieces <= 1:
        return qwix.quantize(jnp.asarray(leaf), kind, channelwise_axes=channelwise, tiled_axes=tiled,
                             scale_dtype=scale_dtype)
    bounds = [round(i * leaf.shape[axis] / pieces) for i in range(pieces + 1)]
    parts = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        piece = jax.lax.slice_in_dim(jnp.asarray(leaf), start, stop, axis=axis)
        parts.append(qwix.quantize(piece, kind, channelwise_axes=channelwise, tiled_axes=tiled, scale_dtype=scale_dtype))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=axis), *parts)


def dequantize(params: Any, dtype: Any = None) -> Any:
    """``params`` with every quantized leaf replaced by the float array it stands for (in
    ``dtype``, default the dtype of its scales); other leaves as they are."""
    replacements = {}
    for path, leaf in named_leaves(params):
        if is_quantized(leaf):
            replacements[path] = dequantize_leaf(leaf, dtype)
    return replace_leaves(params, replacements) if replacements else params


def dequantize_leaf(leaf: Any, dtype: Any = None) -> jax.Array:
    """One quantized leaf as the float array it stands for (``dtype``: default its scales')."""
    dense = _qwix().dequantize(quantized_array(leaf))
    return dense if dtype is None else dense.astype(dtype)
