"""The rules of factored execution that apply an adapted kernel: ``dot_general`` (any layout,
any adapter kind) and ``ragged_dot_general`` (mixture-of-experts kernels, LoRA and LorettaRep).
Everything else a rule does is carrying the view there (:mod:`lrtt._factored._rules`)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lrtt._factored._adapted import IN, OUT, LAYER, LeafKind, View
from lrtt._factored._binding import bind_on_w0, bind_params
from lrtt._factored._lowrank import DotPlan, adapter_after, adapter_before, low_rank_branch


# --- dot_general ---------------------------------------------------------------------------------
def dot_general(ctx, eqn, invals):
    lhs, rhs = invals
    if isinstance(lhs, View) and isinstance(rhs, View):
        return ctx.unsupported(eqn, invals, " as both operands of one dot_general")
    on_left = isinstance(lhs, View)
    view, x = (lhs, rhs) if on_left else (rhs, lhs)
    if view.meta.kind is LeafKind.QUANTIZED:  # a quantized W0 alone: dequantized for this product only
        return bind_on_w0(eqn, view, [None, x] if on_left else [x, None])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    wc, xc, wb, xb = (lc, rc, lb, rb) if on_left else (rc, lc, rb, lb)
    stack = view.axes(LAYER)
    if set(wb) != set(stack):
        return ctx.unsupported(eqn, invals, (
            f" with batch dimensions {tuple(wb)} that are not exactly its stack axes {tuple(stack)} "
            f"(axes {view.kinds}): slice the layer first (scan, indexing) or batch over it"))
    if set(wc) == set(view.axes(IN)):
        group, other = IN, OUT
    elif set(wc) == set(view.axes(OUT)) and view.meta.kind is LeafKind.LOW_RANK:
        group, other = OUT, IN
    else:
        return ctx.unsupported(eqn, invals, (
            f" contracting its axes {tuple(wc)}, which are not exactly its in axes {tuple(view.axes(IN))}"
            + (f" nor its out axes {tuple(view.axes(OUT))}" if view.meta.kind is LeafKind.LOW_RANK else "")))

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
    if view.meta.kind is LeafKind.ADAPTER and view.meta.position == "before":
        x_new = batched(functools.partial(adapter_before, plan, view.meta), x_front, parts)
        x_new = jnp.moveaxis(x_new, tuple(range(n_b)), xb) if n_b else x_new
        return bind_on_w0(eqn, view, [None, x_new] if on_left else [x_new, None])
    base = bind_on_w0(eqn, view, [None, x] if on_left else [x, None])[0]
    if view.meta.kind is LeafKind.ADAPTER:
        return [batched(functools.partial(adapter_after, plan, view.meta), base, parts)]
    precision = eqn.params.get("precision")
    if on_left and isinstance(precision, tuple):
        precision = precision[::-1]
    use = ctx.use(view.meta.path) if "key" in parts else 0
    branch = functools.partial(
        low_rank_branch, plan, view.meta, dtype, precision, eqn.params.get("preferred_element_type"), use)
    return [batched(branch, base, x_front, parts)]


# --- ragged_dot_general: mixture-of-experts kernels ------------------------------------------------
def ragged_dot_general(ctx, eqn, invals):
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
    if view.meta.kind is LeafKind.QUANTIZED:
        return bind_on_w0(eqn, view, [x, None, group_sizes])
    if view.meta.kind is not LeafKind.LOW_RANK:
        return ctx.unsupported(eqn, invals, " with a LoRETTA_adp adapter (ragged_dot_general takes LoRA and LorettaRep)")
    if "rows" in view.parts:
        return ctx.unsupported(eqn, invals, " with a stack of adapters (adapter_ids=): expert kernels take one adapter")
    stack, ins = view.axes(LAYER), view.axes(IN)
    if (lb or rb or tuple(numbers.rhs_group_dimensions) != tuple(stack) or len(stack) != 1
            or set(rc) != set(ins) or set(numbers.lhs_ragged_dimensions) & set(lc)):
        return ctx.unsupported(eqn, invals, (
            f" in a ragged_dot_general with dimension numbers {numbers}: the factored rule needs the "
            f"kernel's one stack axis {tuple(stack)} as the group axis, its in axes {tuple(ins)} "
            "contracted and no batch axes (axes {view.kinds})".replace("{view.kinds}", str(view.kinds))))
    base = bind_on_w0(eqn, view, [x, None, group_sizes])[0]
    dtype = view.w0.dtype
    # A as (E, *in, r) with the in axes in the kernel's order: contract x's matching axes.
    a = view.parts["a"].astype(dtype)
    in_pos = {axis: 1 + j for j, axis in enumerate(ins)}
    a_numbers = dataclasses.replace(numbers, dot_dimension_numbers=((tuple(lc), tuple(in_pos[c] for c in rc)), ((), ())),
                                    rhs_group_dimensions=(0,))
    t = bind_params(eqn, [x, a, group_sizes], ragged_dot_dimension_numbers=a_numbers)[0]
    t = t * jnp.asarray(view.meta.scale, t.dtype)
    # t: (x's free axes, r); B: (E, r, *out): the ragged axis keeps its place among x's free axes.
    x_free = [axis for axis in range(x.ndim) if axis not in lc]
    ragged = tuple(x_free.index(axis) for axis in numbers.lhs_ragged_dimensions)
    b_numbers = dataclasses.replace(numbers, dot_dimension_numbers=(((t.ndim - 1,), (1,)), ((), ())),
                                    lhs_ragged_dimensions=ragged, rhs_group_dimensions=(0,))
    delta = bind_params(eqn, [t.astype(x.dtype), view.parts["b"].astype(dtype), group_sizes],
                         ragged_dot_dimension_numbers=b_numbers)[0]
    return [base + delta.astype(base.dtype)]
