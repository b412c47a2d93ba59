"""Factored execution: run any JAX function on adapted leaves without forming ``W0 + ΔW``.

:func:`factored` traces the function with dense placeholders (``jax.make_jaxpr``) and evaluates
the jaxpr with an interpreter in which each adapted leaf stays symbolic (a
:class:`lrtt._factored._adapted.View`). The rules of :data:`RULES`, one per primitive name, carry a view
through the structural primitives models apply to their kernels and rewrite each
``dot_general`` that consumes one:

.. math::

    x W \\;\\to\\; x W_0 + s\\,(x A) B \\quad\\text{(LoRA, LoRETTA_rep)}, \\qquad
    x W \\;\\to\\; x W_0 + f(x W_0 + b_0) \\;\\text{or}\\; (x + f(x)) W_0 \\quad\\text{(LoRETTA_adp)}.

Every other primitive that receives an adapted value raises :data:`UNSUPPORTED` (or, with
``materialize=True``, gets the dense ``W0 + ΔW`` there, on purpose). Primitives that receive
no adapted value are bound unchanged.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from lrtt._factored._adapted import View
from lrtt._leaves import AdaptedLeaf
from lrtt._factored._binding import bind
from lrtt._factored._rules import RULES
from lrtt._jaxpr import is_array, placeholder

UNSUPPORTED = (
    "lrtt.factored: {where} received the adapted leaf {path!r} (dense shape "
    "{shape}, {dtype}){reason}. Factored execution keeps W0 and the adapter apart; it passes an "
    "adapted kernel through {passes} and applies it at `dot_general`. Anything else would need "
    "the dense weight W0 + ΔW. To form it at this point on purpose (with its dense gradient), "
    "call lrtt.factored(fn, materialize=True); or leave this leaf out of the method's targets."
)
PASSES = (
    "convert_element_type, copy, transpose, reshape/squeeze/expand_dims that keep the in, out and "
    "stack axes apart, slicing/indexing along stack axes, jit, scan over stacked layers, "
    "checkpoint/remat and cond (as inputs and outputs of their bodies),"
)


def _is_adapted(x: Any) -> bool:
    return isinstance(x, AdaptedLeaf)



class _Interpreter:
    """Evaluates a jaxpr whose inputs may be views; one instance per call of a factored fn."""

    def __init__(self, materialize: bool):
        self.materialize = materialize
        self.uses: collections.Counter = collections.Counter()

    def eval(self, jaxpr: jcore.Jaxpr, consts, args) -> list:
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for var, val in zip(jaxpr.constvars, consts):
            env[var] = val
        for var, val in zip(jaxpr.invars, args):
            env[var] = val
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            if any(isinstance(v, View) for v in invals):
                rule = RULES.get(eqn.primitive.name)
                outs = rule(self, eqn, invals) if rule is not None else self.unsupported(eqn, invals)
            else:
                outs = bind(eqn, invals)
            for var, val in zip(eqn.outvars, outs):
                env[var] = val
        return [read(v) for v in jaxpr.outvars]

    def unsupported(self, eqn, invals: list, reason: str = "") -> list:
        """Densify the views of ``invals`` and bind (materialize=True), or raise."""
        if not self.materialize:
            view = next(v for v in invals if isinstance(v, View))
            raise ValueError(UNSUPPORTED.format(
                where=f"the primitive `{eqn.primitive.name}`", path=view.meta.path, shape=tuple(view.w0.shape),
                dtype=view.w0.dtype, reason=reason, passes=PASSES))
        return bind(eqn, [v.dense() if isinstance(v, View) else v for v in invals])

    def outputs(self, values: list, where: str) -> list:
        """Values leaving a function body: views are densified (materialize=True) or an error."""
        out = []
        for value in values:
            if isinstance(value, View):
                if not self.materialize:
                    raise ValueError(UNSUPPORTED.format(
                        where=where, path=value.meta.path, shape=tuple(value.w0.shape),
                        dtype=value.w0.dtype, reason=" as an output", passes=PASSES))
                value = value.dense()
            out.append(value)
        return out

    def use(self, path: str) -> int:
        """A counter per leaf, folded into its dropout key so two uses draw two masks."""
        self.uses[path] += 1
        return self.uses[path] - 1



# --- the transform -------------------------------------------------------------------------------
def _aval_key(x) -> tuple:
    aval = jax.typeof(x)
    return (tuple(aval.shape), str(aval.dtype), bool(getattr(aval, "weak_type", False)))


def factored(fn: Callable | None = None, *, materialize: bool = False) -> Callable:
    """Transforms ``fn`` so that the adapted leaves in its arguments run factored.

    ``fn`` is any JAX function: a linen ``apply``, an NNX functional call through
    ``nnx.merge``, a transformers Flax model call, plain ``jnp`` code; it is not modified. Its
    arguments may hold adapted leaves (from :func:`lrtt.wrap`). ``fn`` is traced once per input
    structure with dense placeholders; the jaxpr is then evaluated so that each ``dot_general``
    on an adapted kernel computes

    .. math::  x W_0 + s\\,(x A) B \\qquad (A: (\\text{in}, r),\\; B: (r, \\text{out}))

    (or the LoRETTA_adp forms), and neither ``ΔW`` nor its ``(in, out)`` gradient is formed.
    Array leaves of the arguments are traced; other leaves (Python scalars, strings, None) are
    static, part of the trace cache's key. Composes with ``jax.jit``, ``jax.grad``,
    ``jax.vmap`` and ``jax.checkpoint``.

    Args:
      fn: the function to transform (``lrtt.factored(fn)`` or ``@lrtt.factored``).
      materialize: at a primitive with no factored rule, form the dense ``W0 + ΔW`` there (on
        purpose, with its dense gradient) instead of raising. LoRETTA_adp kernels cannot be
        materialized.

    Returns:
      A function with ``fn``'s signature and outputs.

    Raises:
      ValueError: an adapted value reaches a primitive with no rule (see :data:`RULES`); the
        message names the primitive, the leaf's path and ``materialize=True``.

    Example:
      >>> import jax, jax.numpy as jnp, lrtt
      >>> params = {"dense": {"kernel": jnp.ones((16, 32))}}
      >>> method = lrtt.LoRA(rank=4, targets="dense/kernel")
      >>> adapter = method.init(jax.random.key(0), params)
      >>> fn = lambda p, x: x @ p["dense"]["kernel"]
      >>> lrtt.factored(fn)(lrtt.wrap(method, params, adapter), jnp.ones((2, 16))).shape
      (2, 32)
    """
    if fn is None:
        return functools.partial(factored, materialize=materialize)
    cache: dict = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs), is_leaf=_is_adapted)
        dynamic, key = [], [treedef]
        for leaf in leaves:
            if _is_adapted(leaf):
                dynamic.append(leaf)
                key.append(("array", tuple(leaf.shape), str(jnp.dtype(leaf.dtype)), False))
            elif is_array(leaf):
                dynamic.append(leaf)
                key.append(("array",) + _aval_key(leaf))
            else:
                key.append(("static", leaf))
        try:
            key = tuple(key)
            hash(key)
        except TypeError:
            raise TypeError(
                "lrtt.factored: a non-array leaf of the arguments is not hashable; non-array "
                "leaves are static (part of the trace's key). Pass it as an array, or close over "
                "it in `fn`.") from None
        traced = cache.get(key)
        if traced is None:
            traced = _trace(fn, leaves, treedef, dynamic)
            if not any(isinstance(c, jax.core.Tracer) for c in traced[0].consts):
                cache[key] = traced
        closed, out_tree = traced
        interp = _Interpreter(materialize)
        args_in = [View.of(v) if _is_adapted(v) else v for v in dynamic]
        outs = interp.outputs(interp.eval(closed.jaxpr, closed.consts, args_in), "the output of fn")
        return jax.tree_util.tree_unflatten(out_tree, outs)

    wrapper.trace_cache = cache
    return wrapper


def _trace(fn, leaves, treedef, dynamic):
    placeholders = []
    for leaf in dynamic:
        if _is_adapted(leaf):
            placeholders.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        else:
            placeholders.append(placeholder(leaf))
    is_dynamic = [_is_adapted(leaf) or is_array(leaf) for leaf in leaves]

    def flat_fn(*values):
        it = iter(values)
        full = [next(it) if d else leaf for d, leaf in zip(is_dynamic, leaves)]
        args, kwargs = jax.tree_util.tree_unflatten(treedef, full)
        return fn(*args, **kwargs)

    closed, shape = jax.make_jaxpr(flat_fn, return_shape=True)(*placeholders)
    return closed, jax.tree_util.tree_structure(shape)
