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

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from lrtt._extras import needs_extra
from lrtt._paths import is_quantized, named_leaves, quantized_array, replace_leaves
from lrtt._targets import normalize_patterns, select

QTYPES = ("nf4", "int8", "int4")
_FOUR_BIT = ("uint4", "int4")


@jax.tree_util.register_pytree_node_class
class Packed4:
    """4-bit values stored two to a byte: ``data: uint8 (..., n/2)`` stands for ``(..., n)``.

    The qvalue of a 4-bit ``qwix.QArray`` held by :func:`quantize` with ``packed=True``. Any
    axis but the last is sliced on ``data`` exactly as on the values it stands for, so a scan
    over stacked layers slices the packed bytes; the values are unpacked (a bitcast, no
    arithmetic) where the kernel is dequantized. Why: XLA's CPU backend converts a ``uint4``
    array that a loop slices into one byte per value, for the whole stack, before the loop
    (measured: ``benchmarks/memory.py``, docs/quantization.md); bytes it slices as they are.
    """

    def __init__(self, data: jax.Array, dtype: Any):
        self.data = data
        self.value_dtype = jnp.dtype(dtype)

    shape = property(lambda self: (*self.data.shape[:-1], 2 * self.data.shape[-1]))
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.value_dtype)

    def tree_flatten(self):
        return (self.data,), self.value_dtype

    @classmethod
    def tree_unflatten(cls, dtype, children):
        return cls(children[0], dtype)

    def __repr__(self) -> str:
        return f"Packed4(shape={self.shape}, dtype={self.value_dtype.name}, bytes={self.data.shape})"


def pack_values(values: jax.Array) -> Packed4:
    """``(..., n)`` 4-bit values (``n`` even) as a :class:`Packed4`."""
    if values.shape[-1] % 2:
        raise ValueError(f"4-bit values of shape {values.shape} cannot be packed two to a byte: the last axis is odd.")
    pairs = values.reshape(*values.shape[:-1], values.shape[-1] // 2, 2)
    return Packed4(jax.lax.bitcast_convert_type(pairs, jnp.uint8), values.dtype)


def unpack_values(packed: Packed4) -> jax.Array:
    """The 4-bit values a :class:`Packed4` stands for."""
    pairs = jax.lax.bitcast_convert_type(packed.data, packed.value_dtype)
    return pairs.reshape(packed.shape)


def unpacked(leaf: Any) -> Any:
    """A quantized array with its values as values (a :class:`Packed4` qvalue unpacked)."""
    array = quantized_array(leaf)
    if isinstance(array.qvalue, Packed4):
        return dataclasses.replace(array, qvalue=unpack_values(array.qvalue))
    return array


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
    packed: bool = False,
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
      packed: hold 4-bit values (NF4, int4) two to a byte (:class:`Packed4`); what a model that
        scans over stacked quantized layers needs on XLA's CPU backend (docs/quantization.md).

    Returns:
      The tree with ``qwix.QArray`` leaves at the targets.

    Raises:
      ValueError: an unknown ``qtype``, no leaf matched, an input axis that ``block_size``
        does not divide, or (``packed=True``, 4-bit formats) a kernel whose last axis is odd,
        so its values cannot go two to a byte (each message names the leaf).

    Example:
      >>> import jax, jax.numpy as jnp, lrtt
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (128, 16))}}
      >>> q = lrtt.quantize(params, "dense/kernel", qtype="nf4", block_size=64)
      >>> kernel = q["dense"]["kernel"]
      >>> kernel.shape, kernel.qvalue.dtype, kernel.scale.shape
      ((128, 16), dtype(uint4), (2, 16))
    """
    leaves = dict(named_leaves(params))
    plan = _plan(params, targets, qtype, block_size, layouts, scale_dtype, packed)
    replacements = {path: quantize_leaf(leaves[path]) for path, quantize_leaf in plan.items()
                    if not is_quantized(leaves[path])}  # an already quantized leaf is kept as it is
    return replace_leaves(params, replacements)


def load_quantized(
    shapes: Any,
    read: Callable[[str], Any],
    targets: "str | Sequence[str]" = "all-linear",
    *,
    qtype: str = "nf4",
    block_size: int | None = 64,
    layouts: Any = (),
    scale_dtype: Any = None,
    packed: bool = False,
    dtype: Any = None,
) -> Any:
    """The tree ``shapes`` describes, read one leaf at a time, its target kernels quantized as read.

    ``read(path)`` returns the float value of one leaf (a numpy or jax array, e.g. one tensor of a
    safetensors file or of a GGUF); a target kernel is quantized before the next leaf is read, so
    the model never exists in float: the peak is the quantized tree plus one float kernel. The
    result equals ``quantize(tree_of_all_reads, targets, ...)`` (tested).

    Args:
      shapes: the tree to build, leaves with ``.shape`` (``jax.ShapeDtypeStruct``, e.g. a Flax
        model's ``params_shape_tree`` or ``jax.eval_shape(model.init, ...)``): targets,
        presets and layouts are resolved on it, as :func:`quantize` does on arrays.
      read: ``read(path) -> array`` for every ``/``-joined leaf path of ``shapes``.
      targets, qtype, block_size, layouts, scale_dtype, packed: as :func:`quantize`.
      dtype: the dtype of the leaves that are not quantized (default: as read).

    Raises:
      ValueError: what :func:`quantize` raises, or a leaf read with a shape other than ``shapes``'.
    """
    plan = _plan(shapes, targets, qtype, block_size, layouts, scale_dtype, packed)
    values = {}
    for path, like in named_leaves(shapes):
        value = read(path)
        if tuple(value.shape) != tuple(like.shape):
            raise ValueError(f"{path!r} was read with shape {tuple(value.shape)}, but the tree to build has "
                             f"{tuple(like.shape)} there: the checkpoint does not belong to this model (config).")
        if path in plan:
            values[path] = plan[path](value)
        else:
            values[path] = jnp.asarray(value, dtype or getattr(value, "dtype", None))
        del value
    return replace_leaves(shapes, values)


def _plan(params, targets, qtype, block_size, layouts, scale_dtype, packed) -> dict[str, Callable[[Any], Any]]:
    """``{path: quantize_leaf}`` for each selected kernel: blocks of ``block_size`` along its last
    ``in`` axis, every other axis (``out``, ``layer``, other ``in``) channelwise."""
    qwix = _qwix()
    kind = _qtype(qtype)
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"`block_size` must be a positive integer or None, got {block_size!r}.")
    plan = {}
    for target in select(params, normalize_patterns(targets), layouts=layouts):
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
        if packed and qtype in ("nf4", "int4") and target.shape[-1] % 2:
            raise ValueError(
                f"cannot pack the {qtype} values of {target.path!r} of shape {target.shape} two to a byte: its "
                "last axis is odd. Pass packed=False, or leave this leaf out of `targets`."
            )
        plan[target.path] = functools.partial(
            _quantize_in_chunks, qwix, kind=kind, channelwise=tuple(channelwise), tiled=tiled or None,
            scale_dtype=scale_dtype, out_axes=target.layout.axes("out"), packed=packed)
    return plan


CHUNK = 1 << 23
"""Elements quantized per qwix call: NF4's nearest-code search makes 16 floats per element, so a
LLaMA-2-7B MLP kernel quantized whole would need 2.9 GB of temporaries (8M elements: 0.5 GB)."""


def _quantize_in_chunks(qwix, leaf, *, kind, channelwise, tiled, scale_dtype, out_axes, packed):
    """``qwix.quantize`` of ``leaf``, split along its largest output axis into pieces of at most
    :data:`CHUNK` elements: every output channel has its own scales, so the pieces quantize
    exactly as the whole (the values and scales are joined back along that axis)."""
    size = math.prod(leaf.shape)
    axis = max(out_axes, key=lambda a: leaf.shape[a])
    pieces = min(leaf.shape[axis], -(-size // CHUNK))
    if pieces <= 1:
        whole = qwix.quantize(jnp.asarray(leaf), kind, channelwise_axes=channelwise, tiled_axes=tiled,
                             scale_dtype=scale_dtype)
        return _packed(whole) if packed else whole
    bounds = [round(i * leaf.shape[axis] / pieces) for i in range(pieces + 1)]
    parts = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        piece = jax.lax.slice_in_dim(jnp.asarray(leaf), start, stop, axis=axis)
        parts.append(qwix.quantize(piece, kind, channelwise_axes=channelwise, tiled_axes=tiled, scale_dtype=scale_dtype))
    joined = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=axis), *parts)
    return _packed(joined) if packed else joined


def _packed(array):
    """``array`` (a QArray) with its values packed two to a byte if they are 4-bit."""
    if jnp.dtype(array.qvalue.dtype).name not in _FOUR_BIT:
        return array
    return dataclasses.replace(array, qvalue=pack_values(array.qvalue))


def dequantize(params: Any, dtype: Any = None) -> Any:
    """``params`` with every quantized leaf replaced by the float array it stands for (in
    ``dtype``, default the dtype of its scales); other leaves as they are."""
    replacements = {}
    for path, leaf in named_leaves(params):
        if is_quantized(leaf):
            replacements[path] = dequantize_leaf(leaf, dtype)
    return replace_leaves(params, replacements) if replacements else params


def dequantize_leaf(leaf: Any, dtype: Any = None) -> jax.Array:
    """One quantized leaf as the float array it stands for (``dtype``: default its scales').

    NF4 codes are decoded by a select tree over their 4 bits (:func:`_nf4_values`), then scaled
    per block: the values of ``qwix.dequantize``, bit for bit, without its per-element ``vmap``
    of an indexing (a gather: 79 ms against the tree's 49 ms for a 4096 × 4096 kernel on XLA's
    CPU backend; the 7B step over NF4 is 1.11× int8's, benchmarks/memory.py). Other formats:
    ``qwix.dequantize``.
    """
    array = unpacked(leaf)
    if getattr(array, "qtype", None) == "nf4" and getattr(array, "zero_point", None) is None:
        dense = _blockwise_scaled(_nf4_values(array.qvalue).astype(array.scale.dtype), array.scale)
    else:
        dense = _qwix().dequantize(array)
    return dense if dtype is None else dense.astype(dtype)


# QLoRA's NF4 values (Dettmers et al. 2023, appendix E), index = the 4-bit code qwix stores;
# tests/test_quant.py checks the dequantized values against qwix.dequantize bit for bit.
NF4_CODE_BOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def _nf4_values(codes: jax.Array) -> jax.Array:
    """float32 NF4 values of 4-bit ``codes``: ``NF4_CODE_BOOK[codes]`` as 15 elementwise selects
    (one per node of the binary tree over the code's bits, low bit first). Elementwise, so XLA
    fuses it with the scaling and the conversion into the matmul's input: no index array, no gather.

    >>> import jax.numpy as jnp
    >>> _nf4_values(jnp.arange(16, dtype=jnp.uint8)).tolist() == [jnp.float32(v).item() for v in NF4_CODE_BOOK]
    True
    """
    bits = codes.astype(jnp.uint8)
    level = [jnp.float32(v) for v in NF4_CODE_BOOK]
    for bit in range(4):
        high = ((bits >> bit) & 1).astype(bool)
        level = [jnp.where(high, odd, even) for even, odd in zip(level[0::2], level[1::2])]
    return level[0]


def _blockwise_scaled(values: jax.Array, scale: jax.Array) -> jax.Array:
    """``values * scale`` where each axis of ``scale`` is 1, equal to ``values``' or a divisor of
    it (one scale per block of ``n / s`` consecutive entries), as qwix stores block scales."""
    v_shape, s_shape = [], []
    for n, s in zip(values.shape, scale.shape):
        if s in (1, n):
            v_shape.append(n)
            s_shape.append(s)
        else:
            v_shape += [s, n // s]
            s_shape += [s, 1]
    return (values.reshape(v_shape) * scale.reshape(s_shape)).reshape(values.shape)
