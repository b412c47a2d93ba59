"""Binding a primitive of a jaxpr equation: on plain arrays (:func:`bind`, :func:`bind_params`),
on an adapted leaf's W0, float or quantized (:func:`w0_op`, :func:`bind_on_w0`), and views
carried across a function body's boundary as their arrays (:func:`flatten`, :func:`signature`).
The interpreter and every rule of factored execution bind through these."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lrtt._factored._adapted import View
from lrtt._paths import is_quantized
from lrtt._quant import dequantize_leaf, unpacked


def bind(eqn, invals: list) -> list:
    """Bind ``eqn``'s primitive on ``invals`` (arrays), with its params and its context."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = []
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    if ctx is not None:
        with ctx:
            out = eqn.primitive.bind(*subfuns, *invals, **params)
    else:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def flatten(values: list, *, unstack: bool = False, restack: bool = False):
    """Views and arrays → a flat list of arrays and a function that rebuilds them."""
    flat, rebuilders = [], []
    for value in values:
        if isinstance(value, View):
            arrays, rebuild = value.flatten(unstack=unstack, restack=restack)
            rebuilders.append((len(arrays), rebuild))
            flat.extend(arrays)
        else:
            rebuilders.append((1, None))
            flat.append(value)

    def unflatten(flat):
        out, i = [], 0
        for n, rebuild in rebuilders:
            out.append(flat[i] if rebuild is None else rebuild(list(flat[i:i + n])))
            i += n
        return out

    return flat, unflatten


def signature(values: list) -> tuple:
    """The static form of a list of values: None per array, the view's signature per view."""
    return tuple(v.signature if isinstance(v, View) else None for v in values)


def bind_params(eqn, invals: list, **changes) -> list:
    """Bind ``eqn``'s primitive with some of its params changed."""
    return bind(eqn.replace(params={**eqn.params, **changes}), invals)


# --- W0 itself: a float array or a quantized one --------------------------------------------------
QUANTIZED_UNSUPPORTED = (
    "lrtt.factored: the quantized leaf {path!r} (shape {shape}, {qtype}) reached `{name}`, which a "
    "quantized kernel cannot pass through{reason}. Quantized kernels pass through dtype "
    "conversion, transpose, reshape/squeeze/expand_dims, slices, scan/remat/cond bodies and "
    "dot_general (where they are dequantized, per use). Dequantize it first "
    "(lrtt.dequantize(params)), or leave it out of lrtt.quantize's targets."
)


def w0_op(eqn, view, *operands):
    """``eqn`` applied to W0 (its other operands after it): bound as is on a float W0, mirrored on
    a quantized one (a ``qwix.QArray``: values and scales move together)."""
    w0 = view.w0
    if not is_quantized(w0):
        return bind(eqn, [w0, *operands])[0]
    name, out_shape = eqn.primitive.name, tuple(eqn.outvars[0].aval.shape)
    try:
        if name == "convert_element_type":
            return w0.astype(eqn.params["new_dtype"])
        if name == "sharding_constraint":
            return w0  # a placement hint for the dense array; the quantized leaves keep theirs
        if name == "dynamic_slice" and tuple(eqn.params["slice_sizes"])[-1] == w0.shape[-1]:
            return _quantized_dynamic_slice(w0, list(operands), tuple(eqn.params["slice_sizes"]))
        w0 = unpacked(w0)  # packed 4-bit values are sliced as bytes along any axis but the last only
        if name == "transpose":
            return w0.transpose(tuple(eqn.params["permutation"]))
        if name in ("reshape", "squeeze", "broadcast_in_dim"):
            return w0.reshape(out_shape)
        if name == "slice":
            strides = eqn.params["strides"] or (1,) * w0.ndim
            return w0[tuple(slice(s, e, st) for s, e, st in zip(eqn.params["start_indices"], eqn.params["limit_indices"], strides))]
        if name == "dynamic_slice":
            return _quantized_dynamic_slice(w0, list(operands), tuple(eqn.params["slice_sizes"]))
    except Exception as err:  # qwix cannot mirror it on the scales (e.g. a reshape across tiles)
        raise ValueError(QUANTIZED_UNSUPPORTED.format(
            path=view.meta.path, shape=tuple(w0.shape), qtype=w0.qtype, name=name,
            reason=f" ({type(err).__name__}: {err})")) from None
    raise ValueError(QUANTIZED_UNSUPPORTED.format(path=view.meta.path, shape=tuple(w0.shape), qtype=w0.qtype,
                                                  name=name, reason=""))


def _quantized_dynamic_slice(w0, index: list, sizes: tuple):
    """A slice along stack axes of each array of a QArray: an axis a scale holds whole is sliced
    with the values; an axis it holds once (size 1) is kept (and so is the last axis of packed
    4-bit values, which the slice keeps whole)."""
    def cut(x):
        idx = [i if x.shape[a] == w0.shape[a] else jnp.zeros_like(i) for a, i in enumerate(index)]
        size = [n if x.shape[a] == w0.shape[a] else x.shape[a] for a, n in enumerate(sizes)]
        return lax.dynamic_slice(x, idx, size)

    return jax.tree.map(cut, w0)


def bind_on_w0(eqn, view, operands: list) -> list:
    """Bind ``eqn`` on ``operands``, ``None`` marking W0's place. A quantized W0 is dequantized
    inside a checkpointed function: the float copy is not saved for the backward pass, which
    dequantizes again (QLoRA's memory between the passes)."""
    slot = operands.index(None)
    others = operands[:slot] + operands[slot + 1:]
    if not is_quantized(view.w0):
        return bind(eqn, others[:slot] + [view.w0] + others[slot:])

    def product(w0, *rest):
        # The barrier ties W0 to this product's other operands, so that its dequantization is
        # not scheduled before the activation it multiplies exists.
        w0, rest = lax.optimization_barrier((w0, rest))
        return bind(eqn, list(rest[:slot]) + [dequantize_leaf(w0)] + list(rest[slot:]))

    return jax.checkpoint(product, policy=jax.checkpoint_policies.nothing_saveable)(view.w0, *others)
