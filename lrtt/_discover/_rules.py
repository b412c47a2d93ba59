"""The rule table of layout discovery: one rule per primitive (:data:`RULES`), and :func:`default`
for every other one, as the factored interpreter's table (:mod:`lrtt._factored._rules`) is.

A rule is ``rule(walker, eqn, views, marks) -> (views, marks)`` for the equation's operands and
results. A *view* (a tuple of :class:`lrtt._discover._parts.Part`, or None) is how a value
relates to the parameter leaves; a *mark* (a frozenset of leaf numbers) says which kernels'
``dot_general`` outputs flowed into a value, to find the output head. Rules report uses to the
walker (``walker.use``, ``walker.other``) and walk sub-jaxprs with ``walker.walk``.
"""

from __future__ import annotations

import functools
from typing import Callable

from lrtt._discover._parts import NONE, Untracked, layout, structural
from lrtt._discover._report import DOTS
from lrtt._jaxpr import aval_shape, call_body, describe, scan_counts

Rule = Callable  # (walker, eqn, views: list, marks: list) -> (views: list, marks: list)


def _merged(vin: list, min_: list) -> frozenset:
    """The marks of the untracked operands (a tracked one's mark is not carried further)."""
    return frozenset().union(*(m for m, v in zip(min_, vin) if not v))


def _untracked(eqn, marks: frozenset) -> tuple[list, list]:
    """Every result untracked, marked ``marks``."""
    n_out = len(eqn.outvars)
    return [None] * n_out, [marks] * n_out


def _on_tracked(rule: Rule) -> Rule:
    """``rule`` for equations with a tracked operand; without one, the marks pass through."""
    @functools.wraps(rule)
    def wrapped(walker, eqn, vin: list, min_: list) -> tuple[list, list]:
        if not any(vin):
            return _untracked(eqn, _merged(vin, min_))
        return rule(walker, eqn, vin, min_)

    return wrapped


# --- the default: calls walked into, anything else a use of kind other --------------------------
@_on_tracked
def _other(walker, eqn, vin, min_):
    for v in vin:
        if v:
            walker.other(v, eqn)
    return _untracked(eqn, _merged(vin, min_))


def default(walker, eqn, vin, min_):
    """A primitive with no rule: a call (jit, checkpoint, custom_jvp/vjp, ...) is walked into,
    its operands as its body's inputs; for anything else each tracked operand is a use of kind
    ``other`` (a norm scale, a bias, ...)."""
    body = call_body(eqn)
    if body is not None:
        return walker.walk(body, vin, min_)
    return _other(walker, eqn, vin, min_)


# --- structural primitives: the tracked operand's axes move ------------------------------------
def _moves_axes(tracked: tuple[int, ...] | None = None) -> Rule:
    """The rule of a structural primitive: the first operand's view moved by
    :func:`lrtt._discover._parts.structural`. ``tracked``: the operand positions that may be
    tracked (the others are indices or values: a tracked one there is a use of kind other);
    None: not checked."""
    @_on_tracked
    def rule(walker, eqn, vin, min_):
        merged = _merged(vin, min_)
        if tracked is not None:
            for i, v in enumerate(vin):
                if v and i not in tracked:
                    walker.other(v, eqn)
        if vin[0]:
            try:
                return [structural(eqn, vin[0])], [merged]
            except Untracked:
                walker.other(vin[0], eqn)
        return _untracked(eqn, merged)

    return rule


_SAME_AXES = ("convert_element_type", "copy", "copy_p", "sharding_constraint", "reduce_precision",
              "stop_gradient", "mesh_cast", "reshard", "pvary", "slice", "rev", "transpose", "reshape",
              "squeeze", "broadcast_in_dim")
_indexed = _moves_axes(tracked=(0,))


@_on_tracked
def _gather(walker, eqn, vin, min_):
    """A gather of many indices from a table of two or more axes is an embedding lookup; one by
    scalars is indexing (a structural move, the indexed axes becoming layers)."""
    if vin[0] and not vin[1]:
        n_batch = len(aval_shape(eqn.outvars[0])) - len(eqn.params["dimension_numbers"].offset_dims)
        if n_batch > 0:
            if len(aval_shape(eqn.invars[0])) >= 2:
                walker.use(vin[0], "gather", None, describe(eqn))
            else:
                walker.other(vin[0], eqn)
            return [None], [_merged(vin, min_)]
    return _indexed(walker, eqn, vin, min_)


@_on_tracked
def _per_operand(walker, eqn, vin, min_):
    """Applied operand by operand (``optimization_barrier``, ``device_put``): each result is its
    operand's view; marks pass through the untracked ones."""
    if len(eqn.outvars) != len(vin):
        return _other(walker, eqn, vin, min_)
    return list(vin), [NONE if v else m for v, m in zip(vin, min_)]


@_on_tracked
def _concatenate(walker, eqn, vin, min_):
    """E.g. q, k, v kernels fused: each part keeps its axes."""
    return [tuple(p for v in vin if v for p in v)], [_merged(vin, min_)]


@_on_tracked
def _stack(walker, eqn, vin, min_):
    """A new axis in front of ``axis``, covering no leaf axis."""
    axis = eqn.params["axis"]
    return [tuple(p.moved(p.axes[:axis] + ((),) + p.axes[axis:]) for v in vin if v for p in v)], [_merged(vin, min_)]


@_on_tracked
def _split(walker, eqn, vin, min_):
    """Pieces of one axis: each piece keeps the axes."""
    if not vin[0]:
        return _other(walker, eqn, vin, min_)
    return [vin[0]] * len(eqn.outvars), [_merged(vin, min_)] * len(eqn.outvars)


# --- dot_general: where a view becomes a layout ------------------------------------------------
def _dot(walker, eqn, vin, min_):
    """Each tracked operand's leaf axes get the words of the dot's axes covering them: ``in``
    contracted, ``layer`` batch (or a ragged dot's group axis), ``out`` otherwise. The result is
    marked with those leaves (the head search); marks of the operands stop here."""
    p = eqn.params
    group = ((), ())
    if eqn.primitive.name == "ragged_dot_general":
        rdn = p["ragged_dot_dimension_numbers"]
        dn = rdn.dot_dimension_numbers
        group = ((), tuple(rdn.rhs_group_dimensions))
        for v in vin[2:]:
            if v:
                walker.other(v, eqn, "ragged_dot_general (group sizes)")
    else:
        dn = p["dimension_numbers"]
    (lc, rc), (lb, rb) = dn
    head = set()
    where = describe(eqn)
    for side, (view, c, b, g) in enumerate(((vin[0], lc, lb, group[0]), (vin[1], rc, rb, group[1]))):
        if not view:
            continue
        words = ["out"] * len(aval_shape(eqn.invars[side]))
        for a in c:
            words[a] = "in"
        for a in (*b, *g):
            words[a] = "layer"
        for part in view:
            walker.use([part], eqn.primitive.name, layout(part, words, walker.ndims[part.leaf]), where)
            head.add(part.leaf)
    return [None], [frozenset(head)]


# --- control flow: bodies walked, loops until their carry's marks stop growing ------------------
def _scan(walker, eqn, vin, min_):
    """Consts keep their views; a scanned-over input loses its leading axis to a layer; a
    tracked carry is a use of kind other."""
    n_c, n_carry = scan_counts(eqn.params)
    consts, carry, xs = vin[:n_c], vin[n_c:n_c + n_carry], vin[n_c + n_carry:]
    for v in carry:
        if v:
            walker.other(v, eqn, "scan (carry)")
    xs_in = [tuple(q.moved(q.axes[1:], q.axes[0]) for q in v) if v else v for v in xs]
    in_views = list(consts) + [None] * n_carry + xs_in
    return _loop(walker, eqn, eqn.params["jaxpr"], in_views, min_, n_c, n_carry, lambda outs: outs[:n_carry])


def _while(walker, eqn, vin, min_):
    p = eqn.params
    n_cc, n_bc = p["cond_nconsts"], p["body_nconsts"]
    cond_c, body_c, carry = vin[:n_cc], vin[n_cc:n_cc + n_bc], vin[n_cc + n_bc:]
    for v in carry:
        if v:
            walker.other(v, eqn, "while (carry)")
    walker.walk(p["cond_jaxpr"], list(cond_c) + [None] * len(carry), list(min_[:n_cc]) + [NONE] * len(carry))
    in_views = list(body_c) + [None] * len(carry)
    return _loop(walker, eqn, p["body_jaxpr"], in_views, list(min_[n_cc:]), n_bc, len(carry), lambda outs: outs)


def _loop(walker, eqn, body, in_views, in_marks, n_c, n_carry, carry_out):
    """Walk a loop body until the marks of its carry stop growing."""
    in_marks = list(in_marks)
    while True:
        out_views, out_marks = walker.walk(body, in_views, in_marks)
        grown = False
        for k, m in enumerate(carry_out(out_marks)):
            if not m <= in_marks[n_c + k]:
                in_marks[n_c + k] = in_marks[n_c + k] | m
                grown = True
        if not grown:
            break
    for v in out_views:
        if v:
            walker.other(v, eqn, f"{eqn.primitive.name} (output)")
    return [None] * len(eqn.outvars), out_marks


def _cond(walker, eqn, vin, min_):
    """Every branch walked; a result keeps its view where all branches agree on it."""
    if vin[0]:
        walker.other(vin[0], eqn, "cond (predicate)")
    results = [walker.walk(b, vin[1:], min_[1:]) for b in eqn.params["branches"]]
    views, marks = [], []
    for k in range(len(eqn.outvars)):
        vs = [r[0][k] for r in results]
        if vs[0] and all(v == vs[0] for v in vs):
            views.append(vs[0])
        else:
            for v in vs:
                if v:
                    walker.other(v, eqn, "cond (output)")
            views.append(None)
        marks.append(frozenset().union(*(r[1][k] for r in results)))
    return views, marks


RULES: dict[str, Rule] = {
    **{name: _dot for name in DOTS},
    **{name: _moves_axes() for name in _SAME_AXES},
    "dynamic_slice": _indexed,
    "pad": _indexed,
    "gather": _gather,
    "optimization_barrier": _per_operand,
    "device_put": _per_operand,
    "concatenate": _concatenate,
    "stack": _stack,
    "split": _split,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
}
"""Primitive name -> rule; any other primitive gets :func:`default`."""
