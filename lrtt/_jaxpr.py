"""The jaxpr toolkit :func:`lrtt.discover` and :func:`lrtt.factored` share: what counts as an
array leaf, the abstract placeholder a leaf is traced as, opening a (closed) sub-jaxpr, and facts
about equations (how a ``scan`` groups its operands, how a ``reshape`` groups its axes, the body
a call-like equation runs, where an equation came from).

Kept in one place so that the discovery of layouts and the factored interpreter cannot disagree.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from lrtt._private import source_summary

CALL_BODY_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")  # jit, checkpoint, custom_jvp/vjp, closed_call, ...


def is_array(x: Any, *, abstract: bool = False) -> bool:
    """A leaf traced as an input (an array; with ``abstract``, a ``jax.ShapeDtypeStruct`` too),
    as opposed to a static Python value."""
    kinds = (jax.Array, np.ndarray, np.generic) + ((jax.ShapeDtypeStruct,) if abstract else ())
    return isinstance(x, kinds)


def placeholder(x: Any) -> jax.ShapeDtypeStruct:
    """The ``jax.ShapeDtypeStruct`` an array leaf is traced as (its weak type kept)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=getattr(x, "weak_type", False))
    if isinstance(x, jax.Array):
        aval = jax.typeof(x) if hasattr(jax, "typeof") else x.aval
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def is_jaxpr(x: Any) -> bool:
    """A jaxpr, open or closed (as an equation's params hold a sub-function)."""
    return isinstance(x, (jcore.Jaxpr, jcore.ClosedJaxpr))


def open_jaxpr(jaxpr: Any) -> tuple[Any, tuple]:
    """``(jaxpr, consts)`` of a ``ClosedJaxpr`` (its consts) or a plain ``Jaxpr`` (none)."""
    if isinstance(jaxpr, jcore.ClosedJaxpr):
        return jaxpr.jaxpr, tuple(jaxpr.consts)
    return jaxpr, ()


def scan_counts(params) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a ``scan`` equation, on every supported JAX.

    jax <= 0.10 stores the counts; jax >= 0.12 stores ``ft_in``, a flat tree with one group of
    operands each for the consts, the carry and the scanned inputs.
    """
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    ft_in = params["ft_in"]
    consts, carry, _ = ft_in.unpack() if hasattr(ft_in, "unpack") else ft_in
    return len(consts), len(carry)


def reshape_groups(old: tuple, new: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Minimal groups ``(old axes, new axes)`` of equal product, in order (None: the reshape
    does not split into such groups). """
    groups, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        seg_old, seg_new, p_old, p_new = [], [], 1, 1
        if i < len(old):
            seg_old.append(i)
            p_old *= old[i]
            i += 1
        if j < len(new):
            seg_new.append(j)
            p_new *= new[j]
            j += 1
        while p_old != p_new:
            if p_old < p_new and i < len(old):
                seg_old.append(i)
                p_old *= old[i]
                i += 1
            elif j < len(new):
                seg_new.append(j)
                p_new *= new[j]
                j += 1
            else:
                return None
        groups.append((seg_old, seg_new))
    return groups


def aval_shape(var: Any) -> tuple[int, ...]:
    """The shape of a jaxpr variable or literal (``()`` for one without a shaped aval: a token)."""
    return tuple(getattr(var.aval, "shape", ()))


def call_body(eqn: Any) -> Any | None:
    """The jaxpr a call-like equation runs with its operands as the body's inputs and the body's
    outputs as its results (``jit``, ``checkpoint``, ``custom_jvp_call``, ``custom_vjp_call``,
    ``closed_call``, ...); None for any other equation, a loop's or a ``cond``'s included (their
    bodies take other inputs than the equation's operands)."""
    sub = next((eqn.params[k] for k in CALL_BODY_KEYS if is_jaxpr(eqn.params.get(k))), None)
    if sub is None:
        return None
    body = open_jaxpr(sub)[0]
    return sub if len(body.invars) == len(eqn.invars) and len(body.outvars) == len(eqn.outvars) else None


def describe(eqn: Any) -> str:
    """``"file.py:line (fn): primitive f32[8,16] x f32[2,8]"``: where an equation was traced from
    (when JAX recorded it) and its primitive with its operand shapes, for messages to the user."""
    text = f"{eqn.primitive.name} {' x '.join(_aval_str(v) for v in eqn.invars)}"
    src = source_summary(eqn.source_info)
    if src and src != "unknown":
        head, _, rest = src.partition(":")
        text = f"{os.path.basename(head)}:{rest}: {text}"
    return text


def _aval_str(v: Any) -> str:
    aval = getattr(v, "aval", None)
    try:
        return aval.str_short(short_dtypes=True)
    except Exception:  # noqa: BLE001 - any aval without the short form
        return str(aval)
