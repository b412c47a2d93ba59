"""The rule table of factored execution: one rule per primitive that may receive an adapted
value (:data:`RULES`). The structural and higher-order rules, which carry a view to where it is
applied, are here; the rules that apply it (``dot_general``, ``ragged_dot_general``) are in
:mod:`lrtt._factored._dots`, and binding on arrays and on W0 in :mod:`lrtt._factored._binding`."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from lrtt._factored._adapted import IN, OUT, LAYER, View
from lrtt._factored._binding import flatten, signature, w0_op
from lrtt._factored._dots import dot_general, ragged_dot_general
from lrtt._jaxpr import open_jaxpr, reshape_groups, scan_counts


# --- structural rules ----------------------------------------------------------------------------
def _on_w0(ctx, eqn, invals):
    """The primitive applied to W0 alone (dtype conversion, a sharding constraint)."""
    (view,) = invals
    return [view.with_w0(w0_op(eqn, view))]


def _identity(ctx, eqn, invals):
    return [invals[0]]


def _stop_gradient(ctx, eqn, invals):
    (view,) = invals
    arrays, rebuild = view.flatten()
    return [rebuild([lax.stop_gradient(a) for a in arrays])]


def _transpose(ctx, eqn, invals):
    (view,) = invals
    return [view.transpose(w0_op(eqn, view), tuple(eqn.params["permutation"]))]


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
        first = next((k for k in out if k is not None), LAYER)
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
    return [view.relayout(w0_op(eqn, view), kinds)]


def _squeeze(ctx, eqn, invals):
    (view,) = invals
    dims = {d % view.w0.ndim for d in eqn.params["dimensions"]}
    kinds = tuple(k for a, k in enumerate(view.kinds) if a not in dims)
    if set(kinds) >= {IN, OUT}:
        return [view.relayout(w0_op(eqn, view), kinds)]
    return ctx.unsupported(eqn, invals, " in a squeeze that removes its whole in or out group")


def _broadcast_in_dim(ctx, eqn, invals):
    """``expand_dims``: new unit axes become stack axes (a scan or an index can take them off)."""
    view = invals[0]
    shape, dims = tuple(eqn.params["shape"]), tuple(eqn.params["broadcast_dimensions"])
    old = tuple(view.w0.shape)
    if len(invals) > 1 or any(shape[d] != n for d, n in zip(dims, old)) or any(
            shape[a] != 1 for a in range(len(shape)) if a not in dims) or list(dims) != sorted(dims):
        return ctx.unsupported(eqn, invals, " in a broadcast that does more than add unit axes")
    kinds = [LAYER] * len(shape)
    for d, kind in zip(dims, view.kinds):
        kinds[d] = kind
    return [view.relayout(w0_op(eqn, view), tuple(kinds))]


def _stack_only(view, starts_full) -> str | None:
    """None when every non-stack axis is taken whole, else a reason."""
    for axis, full in enumerate(starts_full):
        if view.kinds[axis] != LAYER and not full:
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
    stack = view.axes(LAYER)

    def cut(part):
        starts = [p["start_indices"][a] for a in stack] + [0] * (part.ndim - len(stack))
        limits = [p["limit_indices"][a] for a in stack] + list(part.shape[len(stack):])
        steps = [strides[a] for a in stack] + [1] * (part.ndim - len(stack))
        return lax.slice(part, starts, limits, steps)

    return [view.map_stack(w0_op(eqn, view), view.kinds, cut)]


def _dynamic_slice(ctx, eqn, invals):
    view, *index = invals
    if any(isinstance(v, View) for v in index):
        return ctx.unsupported(eqn, invals, " as a slice index")
    sizes = eqn.params["slice_sizes"]
    reason = _stack_only(view, [s == n for s, n in zip(sizes, view.w0.shape)])
    if reason:
        return ctx.unsupported(eqn, invals, reason)
    stack = view.axes(LAYER)

    def cut(part):
        starts = [index[a] for a in stack] + [0] * (part.ndim - len(stack))
        return lax.dynamic_slice(part, starts, [sizes[a] for a in stack] + list(part.shape[len(stack):]))

    return [view.map_stack(w0_op(eqn, view, *index), view.kinds, cut)]


def _gather(ctx, eqn, invals):
    view, indices = invals
    if isinstance(indices, View):
        return ctx.unsupported(eqn, invals, " as gather indices")
    p = eqn.params
    dn = p["dimension_numbers"]
    sizes = p["slice_sizes"]
    stack = view.axes(LAYER)
    ok = not dn.operand_batching_dims and all(
        a in stack or (sizes[a] == view.w0.shape[a] and a not in dn.start_index_map) for a in range(view.w0.ndim))
    if not ok:
        return ctx.unsupported(eqn, invals, " gathered along a non-stack axis; only stack axes can be indexed")
    w0 = w0_op(eqn, view, indices)
    kept = [a for a in range(view.w0.ndim) if a not in dn.collapsed_slice_dims]
    kinds = [LAYER] * w0.ndim
    for pos, axis in zip(dn.offset_dims, kept):
        kinds[pos] = view.kinds[axis]
    new_stack = [pos for pos, k in enumerate(kinds) if k == LAYER]
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
# cross its boundary as their arrays (``flatten``), in and out, and are rebuilt on the other
# side, so a body may return an adapted leaf (``nnx.remat``/``nnx.scan`` return module state).
def _jit(ctx, eqn, invals):
    jaxpr, consts = open_jaxpr(eqn.params["jaxpr"])
    return ctx.eval(jaxpr, consts, invals)


def _remat(ctx, eqn, invals):
    jaxpr, consts = open_jaxpr(eqn.params["jaxpr"])
    flat, unflatten = flatten(invals)
    rebuild = []

    def body(*flat):
        out_flat, out_unflatten = flatten(ctx.eval(jaxpr, consts, unflatten(flat)))
        rebuild.append(out_unflatten)
        return out_flat

    fn = jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True), policy=eqn.params.get("policy"))
    out = fn(*flat)
    return rebuild[-1](list(out))


def _cond(ctx, eqn, invals):
    index, *operands = invals
    if isinstance(index, View):
        return ctx.unsupported(eqn, invals, " as a cond predicate")
    flat, unflatten = flatten(operands)
    forms, rebuild = [], []

    def branch(closed, dense, *flat):
        jaxpr, consts = open_jaxpr(closed)
        outs = ctx.eval(jaxpr, consts, unflatten(flat))
        if dense:  # the branches return different views: dense outputs (materialize) or an error
            return ctx.outputs(outs, "cond branch (the branches return different adapted leaves)")
        forms.append(signature(outs))
        out_flat, out_unflatten = flatten(outs)
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
        if isinstance(x, View) and x.kinds[0] != LAYER:
            return ctx.unsupported(eqn, invals, f" scanned over its axis 0, which is not a stack axis (axes {x.kinds})")
    jaxpr, jconsts = open_jaxpr(p["jaxpr"])
    carry_vars = jaxpr.invars[n_consts:n_consts + n_carry]
    init = [v if isinstance(v, (jax.Array, View)) else jnp.asarray(v, var.aval.dtype) for v, var in zip(init, carry_vars)]
    const_flat, const_unflatten = flatten(consts)
    init_flat, init_unflatten = flatten(init)
    xs_flat, xs_unflatten = flatten(xs, unstack=True)
    init_form = signature(init)
    rebuild_ys = []

    def body(carry_flat, xs_flat):
        args = const_unflatten(const_flat) + init_unflatten(list(carry_flat)) + xs_unflatten(xs_flat)
        outs = ctx.eval(jaxpr, jconsts, args)
        carry, ys = outs[:n_carry], outs[n_carry:]
        if signature(carry) != init_form:
            carry = ctx.outputs(carry, "scan body (an adapted leaf in the carry must leave the body in "
                                       "the form it entered)")
        ys_flat, ys_unflatten = flatten(ys, restack=True)
        rebuild_ys.append(ys_unflatten)
        return flatten(carry)[0], ys_flat

    carry, ys = lax.scan(body, init_flat, xs_flat, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    return init_unflatten(list(carry)) + rebuild_ys[-1](list(ys))


def _opaque(ctx, eqn, invals):
    return ctx.unsupported(eqn, invals, " (custom_jvp/custom_vjp functions receive dense arrays only)")


RULES: dict[str, Callable] = {
    "dot_general": dot_general,
    "ragged_dot_general": ragged_dot_general,
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
