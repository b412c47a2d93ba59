"""The rule table of factored execution: one rule per primitive that may receive an adapted
value (:data:`RULES`), and the jaxpr helpers the rules and the interpreter share."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from lrtt._factored._adapted import IN, OUT, STACK, View
from lrtt._factored._lowrank import DotPlan, adapter_after, adapter_before, low_rank_branch
from lrtt._jaxpr import open_jaxpr, reshape_groups, scan_counts
from lrtt._paths import is_quantized
from lrtt._quant import dequantize_leaf, unpacked


def _bind(eqn, invals: list) -> list:
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


def _flatten(values: list, *, unstack: bool = False, restack: bool = False):
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


def _signature(values: list) -> tuple:
    """The static form of a list of values: None per array, the view's signature per view."""
    return tuple(v.signature if isinstance(v, View) else None for v in values)


# --- W0 itself: a float array or a quantized one --------------------------------------------------
QUANTIZED_UNSUPPORTED = (
    "lrtt.factored: the quantized leaf {path!r} (shape {shape}, {qtype}) reached `{name}`, which a "
    "quantized kernel cannot pass through{reason}. Quantized kernels pass through dtype "
    "conversion, transpose, reshape/squeeze/expand_dims, slices, scan/remat/cond bodies and "
    "dot_general (where they are dequantized, per use). Dequantize it first "
    "(lrtt.dequantize(params)), or leave it out of lrtt.quantize's targets."
)


def _w0_op(eqn, view, *operands):
    """``eqn`` applied to W0 (its other operands after it): bound as is on a float W0, mirrored on
    a quantized one (a ``qwix.QArray``: values and scales move together)."""
    w0 = view.w0
    if not is_quantized(w0):
        return _bind(eqn, [w0, *operands])[0]
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


def _bind_on_w0(eqn, view, operands: list) -> list:
    """Bind ``eqn`` on ``operands``, ``None`` marking W0's place. A quantized W0 is dequantized
    inside a checkpointed function: the float copy is not saved for the backward pass, which
    dequantizes again (QLoRA's memory between the passes)."""
    slot = operands.index(None)
    others = operands[:slot] + operands[slot + 1:]
    if not is_quantized(view.w0):
        return _bind(eqn, others[:slot] + [view.w0] + others[slot:])

    def product(w0, *rest):
        # The barrier ties W0 to this product's other operands, so that its dequantization is
        # not scheduled before the activation it multiplies exists.
        w0, rest = lax.optimization_barrier((w0, rest))
        return _bind(eqn, list(rest[:slot]) + [dequantize_leaf(w0)] + list(rest[slot:]))

    return jax.checkpoint(product, policy=jax.checkpoint_policies.nothing_saveable)(view.w0, *others)


# --- structural rules ----------------------------------------------------------------------------
def _on_w0(ctx, eqn, invals):
    """The primitive applied to W0 alone (dtype conversion, a sharding constraint)."""
    (view,) = invals
    return [view.with_w0(_w0_op(eqn, view))]


def _identity(ctx, eqn, invals):
    return [invals[0]]


def _stop_gradient(ctx, eqn, invals):
    (view,) = invals
    arrays, rebuild = view.flatten()
    return [rebuild([lax.stop_gradient(a) for a in arrays])]


def _transpose(ctx, eqn, invals):
    (view,) = invals
    return [view.transpose(_w0_op(eqn, view), tuple(eqn.params["permutation"]))]


def _reshape_kinds(kinds, old, new) -> tuple[str, ...] | None:
    """Kinds of the axes of ``new``, or None when the reshape mixes the groups."""
    groups = reshape_groups(old, new)
    if groups is None:
        return None
    out = []
    for seg_old, seg_new in groups:
        found = {kinds[k] for k in seg_old if old[k] != 1} or {kinds[k] for k in seg_old}
        if len(found) > 1:
            return None
        kind = found.pop() if found else (out[-1] if out else None)
        out.extend([kind] * len(seg_new))
    if None in out:  # new unit axes before any other: take the kind of the first known axis
        first = next((k for k in out if k is not None), STACK)
        out = [first if k is None else k for k in out]
    return tuple(out)


def _reshape(ctx, eqn, invals):
    view = invals[0]
    if len(invals) > 1 or eqn.params.get("dimensions") is not None:
        return ctx.unsupported(eqn, invals, " in a reshape with dynamic shape or dimensions")
    new = tuple(eqn.params["new_sizes"])
    kinds = _reshape_kinds(view.kinds, tuple(view.w0.shape), new)
    if kinds is None:
        return ctx.unsupported(eqn, invals, (
            f" in a reshape {tuple(view.w0.shape)} -> {new} that mixes its in, out and stack axes "
            f"(axes are {view.kinds}; s = stack, i = in, o = out)"))
    return [view.relayout(_w0_op(eqn, view), kinds)]


def _squeeze(ctx, eqn, invals):
    (view,) = invals
    dims = {d % view.w0.ndim for d in eqn.params["dimensions"]}
    kinds = tuple(k for a, k in enumerate(view.kinds) if a not in dims)
    if set(kinds) >= {IN, OUT}:
        return [view.relayout(_w0_op(eqn, view), kinds)]
    return ctx.unsupported(eqn, invals, " in a squeeze that removes its whole in or out group")


def _broadcast_in_dim(ctx, eqn, invals):
    """``expand_dims``: new unit axes become stack axes (a scan or an index can take them off)."""
    view = invals[0]
    shape, dims = tuple(eqn.params["shape"]), tuple(eqn.params["broadcast_dimensions"])
    old = tuple(view.w0.shape)
    if len(invals) > 1 or any(shape[d] != n for d, n in zip(dims, old)) or any(
            shape[a] != 1 for a in range(len(shape)) if a not in dims) or list(dims) != sorted(dims):
        return ctx.unsupported(eqn, invals, " in a broadcast that does more than add unit axes")
    kinds = [STACK] * len(shape)
    for d, kind in zip(dims, view.kinds):
        kinds[d] = kind
    return [view.relayout(_w0_op(eqn, view), tuple(kinds))]


def _stack_only(view, starts_full) -> str | None:
    """None when every non-stack axis is taken whole, else a reason."""
    for axis, full in enumerate(starts_full):
        if view.kinds[axis] != STACK and not full:
            return f" sliced along a non-stack axis {axis} (axes are {view.kinds}); only stack axes can be sliced"
    return None


def _slice(ctx, eqn, invals):
    (view,) = invals
    p = eqn.params
    shape = view.w0.shape
    strides = p["strides"] or (1,) * len(shape)
    full = [s == 0 and e == n and st == 1 for s, e, st, n in zip(p["start_indices"], p["limit_indices"], strides, shape)]
    reason = _stack_only(view, full)
    if reason:
        return ctx.unsupported(eqn, invals, reason)
    stack = view.axes(STACK)

    def cut(part):
        starts = [p["start_indices"][a] for a in stack] + [0] * (part.ndim - len(stack))
        limits = [p["limit_indices"][a] for a in stack] + list(part.shape[len(stack):])
        steps = [strides[a] for a in stack] + [1] * (part.ndim - len(stack))
        return lax.slice(part, starts, limits, steps)

    return [view.map_stack(_w0_op(eqn, view), view.kinds, cut)]


def _dynamic_slice(ctx, eqn, invals):
    view, *index = invals
    if any(isinstance(v, View) for v in index):
        return ctx.unsupported(eqn, invals, " as a slice index")
    sizes = eqn.params["slice_sizes"]
    reason = _stack_only(view, [s == n for s, n in zip(sizes, view.w0.shape)])
    if reason:
        return ctx.unsupported(eqn, invals, reason)
    stack = view.axes(STACK)

    def cut(part):
        starts = [index[a] for a in stack] + [0] * (part.ndim - len(stack))
        return lax.dynamic_slice(part, starts, [sizes[a] for a in stack] + list(part.shape[len(stack):]))

    return [view.map_stack(_w0_op(eqn, view, *index), view.kinds, cut)]


def _gather(ctx, eqn, invals):
    view, indices = invals
    if isinstance(indices, View):
        return ctx.unsupported(eqn, invals, " as gather indices")
    p = eqn.params
    dn = p["dimension_numbers"]
    sizes = p["slice_sizes"]
    stack = view.axes(STACK)
    ok = not dn.operand_batching_dims and all(
        a in stack or (sizes[a] == view.w0.shape[a] and a not in dn.start_index_map) for a in range(view.w0.ndim))
    if not ok:
        return ctx.unsupported(eqn, invals, " gathered along a non-stack axis; only stack axes can be indexed")
    w0 = _w0_op(eqn, view, indices)
    kept = [a for a in range(view.w0.ndim) if a not in dn.collapsed_slice_dims]
    kinds = [STACK] * w0.ndim
    for pos, axis in zip(dn.offset_dims, kept):
        kinds[pos] = view.kinds[axis]
    new_stack = [pos for pos, k in enumerate(kinds) if k == STACK]
    offset_of = dict(zip(kept, dn.offset_dims))

    def cut(part):
        n_s = len(stack)
        rest = list(range(n_s, part.ndim))
        offsets = [new_stack.index(offset_of[a]) for a in stack if a in offset_of]
        offsets += [len(new_stack) + t for t in range(len(rest))]
        numbers = lax.GatherDimensionNumbers(
            offset_dims=tuple(offsets),
            collapsed_slice_dims=tuple(q for q, a in enumerate(stack) if a in dn.collapsed_slice_dims),
            start_index_map=tuple(stack.index(a) for a in dn.start_index_map),
        )
        slice_sizes = tuple(sizes[a] for a in stack) + tuple(part.shape[n_s:])
        return lax.gather(part, indices, numbers, slice_sizes, indices_are_sorted=p["indices_are_sorted"],
                          unique_indices=p["unique_indices"], mode=p["mode"], fill_value=p["fill_value"])

    return [view.map_stack(w0, tuple(kinds), cut)]


# --- higher-order rules --------------------------------------------------------------------------
# A body (remat, scan, cond) is re-run through ``ctx.eval`` under the same JAX transform; views
# cross its boundary as their arrays (``_flatten``), in and out, and are rebuilt on the other
# side, so a body may return an adapted leaf (``nnx.remat``/``nnx.scan`` return module state).
def _jit(ctx, eqn, invals):
    jaxpr, consts = open_jaxpr(eqn.params["jaxpr"])
    return ctx.eval(jaxpr, consts, invals)


def _remat(ctx, eqn, invals):
    jaxpr, consts = open_jaxpr(eqn.params["jaxpr"])
    flat, unflatten = _flatten(invals)
    rebuild = []

    def body(*flat):
        out_flat, out_unflatten = _flatten(ctx.eval(jaxpr, consts, unflatten(flat)))
        rebuild.append(out_unflatten)
        return out_flat

    fn = jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True), policy=eqn.params.get("policy"))
    out = fn(*flat)
    return rebuild[-1](list(out))


def _cond(ctx, eqn, invals):
    index, *operands = invals
    if isinstance(index, View):
        return ctx.unsupported(eqn, invals, " as a cond predicate")
    flat, unflatten = _flatten(operands)
    forms, rebuild = [], []

    def branch(closed, dense, *flat):
        jaxpr, consts = open_jaxpr(closed)
        outs = ctx.eval(jaxpr, consts, unflatten(flat))
        if dense:  # the branches return different views: dense outputs (materialize) or an error
            return ctx.outputs(outs, "cond branch (the branches return different adapted leaves)")
        forms.append(_signature(outs))
        out_flat, out_unflatten = _flatten(outs)
        rebuild.append(out_unflatten)
        return out_flat

    def run(dense):
        return lax.switch(index, [functools.partial(branch, b, dense) for b in eqn.params["branches"]], *flat)

    try:
        out = run(False)
    except TypeError:
        if len(set(forms)) < 2:
            raise
        return list(run(True))
    if len(set(forms)) > 1:
        return list(run(True))
    return rebuild[-1](list(out))


def _scan(ctx, eqn, invals):
    p = eqn.params
    n_consts, n_carry = scan_counts(p)
    consts, init, xs = invals[:n_consts], invals[n_consts:n_consts + n_carry], invals[n_consts + n_carry:]
    for x in xs:
        if isinstance(x, View) and x.kinds[0] != STACK:
            return ctx.unsupported(eqn, invals, f" scanned over its axis 0, which is not a stack axis (axes {x.kinds})")
    jaxpr, jconsts = open_jaxpr(p["jaxpr"])
    carry_vars = jaxpr.invars[n_consts:n_consts + n_carry]
    init = [v if isinstance(v, (jax.Array, View)) else jnp.asarray(v, var.aval.dtype) for v, var in zip(init, carry_vars)]
    const_flat, const_unflatten = _flatten(consts)
    init_flat, init_unflatten = _flatten(init)
    xs_flat, xs_unflatten = _flatten(xs, unstack=True)
    init_form = _signature(init)
    rebuild_ys = []

    def body(carry_flat, xs_flat):
        args = const_unflatten(const_flat) + init_unflatten(list(carry_flat)) + xs_unflatten(xs_flat)
        outs = ctx.eval(jaxpr, jconsts, args)
        carry, ys = outs[:n_carry], outs[n_carry:]
        if _signature(carry) != init_form:
            carry = ctx.outputs(carry, "scan body (an adapted leaf in the carry must leave the body in "
                                       "the form it entered)")
        ys_flat, ys_unflatten = _flatten(ys, restack=True)
        rebuild_ys.append(ys_unflatten)
        return _flatten(carry)[0], ys_flat

    carry, ys = lax.scan(body, init_flat, xs_flat, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    return init_unflatten(list(carry)) + rebuild_ys[-1](list(ys))


def _opaque(ctx, eqn, invals):
    return ctx.unsupported(eqn, invals, " (custom_jvp/custom_vjp functions receive dense arrays only)")


# --- dot_general ---------------------------------------------------------------------------------
def _dot_general(ctx, eqn, invals):
    lhs, rhs = invals
    if isinstance(lhs, View) and isinstance(rhs, View):
        return ctx.unsupported(eqn, invals, " as both operands of one dot_general")
    on_left = isinstance(lhs, View)
    view, x = (lhs, rhs) if on_left else (rhs, lhs)
    if view.meta.kind == "quantized":  # a quantized W0 alone: dequantized for this product only
        return _bind_on_w0(eqn, view, [None, x] if on_left else [x, None])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    wc, xc, wb, xb = (lc, rc, lb, rb) if on_left else (rc, lc, rb, lb)
    stack = view.axes(STACK)
    if set(wb) != set(stack):
        return ctx.unsupported(eqn, invals, (
            f" with batch dimensions {tuple(wb)} that are not exactly its stack axes {tuple(stack)} "
            f"(axes {view.kinds}): slice the layer first (scan, indexing) or batch over it"))
    if set(wc) == set(view.axes(IN)):
        group, other = IN, OUT
    elif set(wc) == set(view.axes(OUT)) and view.meta.kind == "low_rank":
        group, other = OUT, IN
    else:
        return ctx.unsupported(eqn, invals, (
            f" contracting its axes {tuple(wc)}, which are not exactly its in axes {tuple(view.axes(IN))}"
            + (f" nor its out axes {tuple(view.axes(OUT))}" if view.meta.kind == "low_rank" else "")))

    # The problem without batch axes: x's batch axes go first (in the order of the pairs) and
    # each part's stack axes are put in the same order, then everything is vmapped over them.
    n_b = len(wb)
    x_front = jnp.moveaxis(x, xb, tuple(range(n_b))) if n_b else x
    x_rest = [a for a in range(x.ndim) if a not in xb]
    pair = {w: x_rest.index(c) for w, c in zip(wc, xc)}
    g_axes = [a for a in range(len(view.kinds)) if view.kinds[a] == group]
    x_con = [pair[a] for a in g_axes]  # x's contracted axes, in the order of the group in W
    x_free = [a for a in range(len(x_rest)) if a not in x_con]
    s_order = [stack.index(a) for a in wb]
    parts = {}
    for name, part in view.parts.items():
        perm = s_order + list(range(len(stack), part.ndim))
        parts[name] = part.transpose(perm) if perm != list(range(part.ndim)) else part
    plan = DotPlan(tuple(x_con), tuple(x_free), transposed=group == OUT, on_left=on_left,
                   g_shape=view.group_shape(group), o_shape=view.group_shape(other))

    def batched(fn, *args):
        for _ in range(n_b):
            fn = jax.vmap(fn)
        return fn(*args)

    dtype = view.w0.dtype
    if view.meta.kind == "adapter" and view.meta.position == "before":
        x_new = batched(functools.partial(adapter_before, plan, view.meta), x_front, parts)
        x_new = jnp.moveaxis(x_new, tuple(range(n_b)), xb) if n_b else x_new
        return _bind_on_w0(eqn, view, [None, x_new] if on_left else [x_new, None])
    base = _bind_on_w0(eqn, view, [None, x] if on_left else [x, None])[0]
    if view.meta.kind == "adapter":
        return [batched(functools.partial(adapter_after, plan, view.meta), base, parts)]
    precision = eqn.params.get("precision")
    if on_left and isinstance(precision, tuple):
        precision = precision[::-1]
    use = ctx.use(view.meta.path) if "key" in parts else 0
    branch = functools.partial(
        low_rank_branch, plan, view.meta, dtype, precision, eqn.params.get("preferred_element_type"), use)
    return [batched(branch, base, x_front, parts)]


# --- ragged_dot_general: mixture-of-experts kernels ------------------------------------------------
def _ragged_dot_general(ctx, eqn, invals):
    """``x·W_e`` per group of rows → ``x·W0_e + s·(x·A_e)·B_e``, with the same group sizes.

    The adapted kernel is the rhs, its one stack axis the expert (group) axis: factors
    ``A: (E, in, r)``, ``B: (E, r, out)`` (a kernel of layout ``"layer in out"``).
    """
    lhs, rhs, group_sizes = invals
    p = eqn.params
    numbers = p["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = numbers.dot_dimension_numbers
    if isinstance(lhs, View) or isinstance(group_sizes, View):
        return ctx.unsupported(eqn, invals, " as the lhs of a ragged_dot_general (only the rhs, the expert kernels, can be adapted)")
    view, x = rhs, lhs
    if view.meta.kind == "quantized":
        return _bind_on_w0(eqn, view, [x, None, group_sizes])
    if view.meta.kind != "low_rank":
        return ctx.unsupported(eqn, invals, " with a LoRETTA_adp adapter (ragged_dot_general takes LoRA and LorettaRep)")
    if "rows" in view.parts:
        return ctx.unsupported(eqn, invals, " with a stack of adapters (adapter_ids=): expert kernels take one adapter")
    stack, ins = view.axes(STACK), view.axes(IN)
    if (lb or rb or tuple(numbers.rhs_group_dimensions) != tuple(stack) or len(stack) != 1
            or set(rc) != set(ins) or set(numbers.lhs_ragged_dimensions) & set(lc)):
        return ctx.unsupported(eqn, invals, (
            f" in a ragged_dot_general with dimension numbers {numbers}: the factored rule needs the "
            f"kernel's one stack axis {tuple(stack)} as the group axis, its in axes {tuple(ins)} "
            "contracted and no batch axes (axes {view.kinds})".replace("{view.kinds}", str(view.kinds))))
    base = _bind_on_w0(eqn, view, [x, None, group_sizes])[0]
    dtype = view.w0.dtype
    # A as (E, *in, r) with the in axes in the kernel's order: contract x's matching axes.
    a = view.parts["a"].astype(dtype)
    in_pos = {axis: 1 + j for j, axis in enumerate(ins)}
    a_numbers = dataclasses.replace(numbers, dot_dimension_numbers=((tuple(lc), tuple(in_pos[c] for c in rc)), ((), ())),
                                    rhs_group_dimensions=(0,))
    t = _bind_params(eqn, [x, a, group_sizes], ragged_dot_dimension_numbers=a_numbers)[0]
    t = t * jnp.asarray(view.meta.scale, t.dtype)
    # t: (x's free axes, r); B: (E, r, *out): the ragged axis keeps its place among x's free axes.
    x_free = [axis for axis in range(x.ndim) if axis not in lc]
    ragged = tuple(x_free.index(axis) for axis in numbers.lhs_ragged_dimensions)
    b_numbers = dataclasses.replace(numbers, dot_dimension_numbers=(((t.ndim - 1,), (1,)), ((), ())),
                                    lhs_ragged_dimensions=ragged, rhs_group_dimensions=(0,))
    delta = _bind_params(eqn, [t.astype(x.dtype), view.parts["b"].astype(dtype), group_sizes],
                         ragged_dot_dimension_numbers=b_numbers)[0]
    return [base + delta.astype(base.dtype)]


def _bind_params(eqn, invals: list, **changes) -> list:
    """Bind ``eqn``'s primitive with some of its params changed."""
    return _bind(eqn.replace(params={**eqn.params, **changes}), invals)


RULES: dict[str, Callable] = {
    "dot_general": _dot_general,
    "ragged_dot_general": _ragged_dot_general,
    "convert_element_type": _on_w0,
    "copy": _identity,
    "stop_gradient": _stop_gradient,
    "sharding_constraint": _on_w0,
    "transpose": _transpose,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "broadcast_in_dim": _broadcast_in_dim,
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "gather": _gather,
    "jit": _jit,
    "scan": _scan,
    "remat2": _remat,
    "cond": _cond,
    "custom_jvp_call": _opaque,
    "custom_vjp_call": _opaque,
}
"""Primitive name → rule, for primitives that receive an adapted value. ``tests`` check that
every name exists in the running JAX, so a rename fails loudly instead of densifying."""


