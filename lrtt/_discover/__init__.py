"""Layout discovery: read how a model uses each parameter leaf off the model itself.

:func:`discover` traces ``fn(params, *args)`` abstractly (``jax.make_jaxpr`` on
``jax.ShapeDtypeStruct`` placeholders: no FLOPs, no memory for the weights) and follows every
parameter leaf through the jaxpr. A leaf stays *tracked* through the structural primitives
models apply to their kernels (dtype casts, ``transpose``, ``reshape``, ``squeeze``, unit
``broadcast_in_dim``, slicing and scalar indexing, ``concatenate``, ``jit``, ``checkpoint``,
``cond``, ``scan``/``while`` bodies, ``custom_jvp``/``custom_vjp``), each axis of each tracked
value remembering the set of leaf axes it covers. Where a tracked value meets a
``dot_general``

.. math::

    y = \\operatorname{dot\\_general}(x, W'), \\qquad W' = T(W) \\text{ (a view of the leaf } W),

each leaf axis of ``W`` gets the word of the axes of ``W'`` that cover it: ``in`` when
contracted, ``layer`` when a batch axis (or a ``ragged_dot`` group axis, or consumed earlier by
indexing / by ``scan`` over it), ``out`` otherwise. The words, in leaf-axis order, are the
leaf's *layout* (``"in out"`` for a Flax ``Dense`` kernel ``(in, out)``, ``"out in"`` for
GPT-2's ``Conv1D`` or a tied embedding ``(vocab, d)`` used as ``h @ E.T``, ``"layer in out"``
for an ``nn.scan``-stacked kernel ``(L, in, out)``, ``"out in out"`` for Gemma's
``q_einsum`` ``(N, D, H)``).

A ``gather`` reading a leaf of two or more axes with a batch of indices (token ids ``(B, T)``)
is an embedding lookup. Any other primitive touching a tracked value is a use of kind
``other`` (a norm scale, a bias, ...). The output head is found by propagating a mark from
every kernel's ``dot_general`` output through every non-dot primitive: a kernel whose mark
reaches an output of ``fn`` is the head (e.g. ``lm_head``), as is the embedding reused there.

The package: :mod:`lrtt._discover._parts` (tracked values and how structural primitives move
their axes), :mod:`lrtt._discover._rules` (the rule table, one rule per primitive),
:mod:`lrtt._discover._walker` (the walk), :mod:`lrtt._discover._report` (:class:`LeafUse`,
:class:`LeafInfo`, :class:`Discovery`, roles) and :func:`discover` here.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from lrtt._discover._parts import NONE, Part
from lrtt._discover._report import Discovery, LeafInfo, LeafUse, role_of
from lrtt._discover._walker import Walker
from lrtt._jaxpr import is_array, placeholder
from lrtt._paths import path_str

__all__ = ["Discovery", "LeafInfo", "LeafUse", "discover"]


def discover(fn: Callable, params: Any, *example_args: Any, **example_kwargs: Any) -> Discovery:
    """Reads the role and the kernel layout of every leaf of ``params`` off ``fn`` itself.

    ``fn(params, *example_args, **example_kwargs)`` is traced once with ``jax.ShapeDtypeStruct``
    placeholders for every array leaf (``params`` may itself be a tree of
    ``ShapeDtypeStruct``; nothing is computed). For each leaf ``W`` of shape
    ``(d_0, ..., d_{k-1})`` used as a ``dot_general`` operand, possibly after casts,
    transposes, reshapes, indexing or a ``scan`` over one of its axes, the layout names each
    ``d_i``: ``in`` (contracted with the activations), ``out`` (a free axis of the result) or
    ``layer`` (a batch / expert-group axis, or one indexed or scanned away before the dot). So
    ``x @ W`` with ``W: (in, out)`` gives ``"in out"``, ``x @ W.T`` gives ``"out in"``, and
    ``jnp.einsum("BTD,NDH->BTNH", x, W)`` gives ``"out in out"``.

    Args:
      fn: the model function, called as ``fn(params, *example_args, **example_kwargs)``, e.g.
        ``lambda p, ids: model(ids, params=p).logits``.
      params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``); its array leaves are
        the ones analysed, named as everywhere in lrtt (key path joined with ``/``).
      *example_args: example inputs (arrays or ``ShapeDtypeStruct``) of the shapes ``fn``
        expects; use more than one token for token ids, so that an embedding lookup reads as
        one. Non-array leaves are passed as they are (static).
      **example_kwargs: keyword inputs, likewise.

    Returns:
      A :class:`Discovery`: ``path -> layout`` for the ``linear`` and ``tied_head`` leaves, with
      a :class:`LeafInfo` for every leaf in ``.leaves``, ``.linear()`` (the kernels to adapt,
      the output head left out) and ``.conflicts()``.

    Raises:
      ValueError: ``params`` holds no array leaf.
      Exception: whatever tracing ``fn`` raised, with a note that the example inputs must match
        what ``fn`` expects.

    Example:
      >>> import jax.numpy as jnp, lrtt
      >>> params = {"up": {"kernel": jnp.ones((8, 16))}, "down": {"kernel": jnp.ones((8, 16))},
      ...           "scale": jnp.ones((8,))}
      >>> fn = lambda p, x: (x * p["scale"]) @ p["up"]["kernel"] @ p["down"]["kernel"].T
      >>> found = lrtt.discover(fn, params, jnp.ones((2, 8)))
      >>> dict(found)
      {'down/kernel': 'out in', 'up/kernel': 'in out'}
      >>> found.leaves["down/kernel"].head, found.leaves["scale"].role
      (True, 'other')
      >>> found.linear()
      ['up/kernel']
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    names, leaves = [], []
    for kp, leaf in flat:
        if is_array(leaf, abstract=True):
            names.append(path_str(kp))
            leaves.append(leaf)
    if not leaves:
        raise ValueError(
            "lrtt.discover: the params argument holds no array leaf (got "
            f"{type(params).__name__}); pass the parameter pytree (arrays or "
            "jax.ShapeDtypeStruct) as the first argument after fn, and the model inputs after it.")
    p_flat, p_def = jax.tree_util.tree_flatten(params)
    a_flat, a_def = jax.tree_util.tree_flatten((example_args, example_kwargs))
    p_dyn = [is_array(x, abstract=True) for x in p_flat]
    a_dyn = [is_array(x, abstract=True) for x in a_flat]
    placeholders = [placeholder(x) for x, d in zip(p_flat + a_flat, p_dyn + a_dyn) if d]

    def flat_fn(*values):
        it = iter(values)
        p_full = [next(it) if d else x for x, d in zip(p_flat, p_dyn)]
        a_full = [next(it) if d else x for x, d in zip(a_flat, a_dyn)]
        args, kwargs = jax.tree_util.tree_unflatten(a_def, a_full)
        return fn(jax.tree_util.tree_unflatten(p_def, p_full), *args, **kwargs)

    try:
        closed = jax.make_jaxpr(flat_fn)(*placeholders)
    except Exception as err:
        shapes = jax.tree_util.tree_map(
            lambda x: f"{tuple(x.shape)} {x.dtype}" if is_array(x, abstract=True) else repr(x), (example_args, example_kwargs))
        err.add_note(
            "lrtt.discover: tracing fn(params, *example_args, **example_kwargs) failed; the example "
            f"inputs must match what fn expects (got args/kwargs {shapes}).")
        raise

    walker = Walker([len(leaf.shape) for leaf in leaves])
    in_views = [(Part.whole(i, tuple(leaf.shape)),) for i, leaf in enumerate(leaves)]
    in_views += [None] * (len(placeholders) - len(leaves))
    out_views, out_marks = walker.walk(closed.jaxpr, in_views, [NONE] * len(placeholders))
    for v in out_views:
        if v:
            walker.use(v, "output", None, "returned by fn")
    heads = frozenset().union(*out_marks)

    infos = {}
    for i, (name, leaf) in enumerate(zip(names, leaves)):
        role, layout = role_of(walker.uses[i])
        infos[name] = LeafInfo(
            path=name, shape=tuple(int(d) for d in leaf.shape), role=role, layout=layout,
            head=i in heads and role in ("linear", "tied_head"), uses=tuple(walker.uses[i]))
    return Discovery(infos)
