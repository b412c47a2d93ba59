"""Optimizer masking for users who keep frozen and adapter leaves in one tree.

The recommended training path differentiates the adapter tree alone and passes the frozen params
as a separate, non-differentiated argument (:mod:`lrtt.train`); the optimizer then never sees a
frozen leaf. Users who keep one tree (``{"params": params, "adapter": adapter}``, or adapter
entries spliced into the params) wrap their optimizer instead::

    tx = lrtt.optim.adapter_only(optax.adamw(1e-3))  # trains the leaves of lrtt entries only
    opt_state = tx.init(tree)                        # adapter-sized moments, nothing frozen
    updates, opt_state = tx.update(grads, opt_state, tree)
    tree = lrtt.optim.apply_updates(tree, updates)   # frozen leaves returned as they came

Under :func:`adapter_only` the frozen leaves get ``optax.set_to_zero()`` through ``optax.partition``:
its state is ``EmptyState()`` and the inner optimizer is masked with ``MaskedNode`` placeholders,
so the optimizer state holds arrays for the trainable leaves only (plus scalar counters), and
weight decay never touches a frozen leaf. It is ``optax.transforms.selective_transform`` with
the freeze mask read off each tree (``where``) instead of given once. Not ``optax.masked``:
that one passes the updates of masked-out leaves through unchanged (the gradient itself).

Which leaves train (``where``, one spec language everywhere in this module):

* ``None`` (default): every leaf inside an lrtt adapter entry (``LoraFactors``, ``TTFactors``,
  ``BottleneckAdapter``, ``TTKernel``, ``Trainable``); a tree holding no entry is an error.
* a regex or a list of regexes, searched in each leaf's ``/``-joined path;
* a set/frozenset of exact paths;
* a callable ``(path, leaf) -> bool``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import optax

from lrtt._adapter import ENTRY_TYPES, is_entry
from lrtt._groups import LayerGroups
from lrtt._paths import named_leaves, path_str

TRAINABLE = "trainable"
FROZEN = "frozen"

NO_ENTRIES = (
    "`where`=None selects the leaves of lrtt adapter entries ({types}), but the tree holds no "
    "entry; its leaves are e.g.:\n  {paths}\nPass the tree that contains the adapter (e.g. "
    "{{'params': params, 'adapter': adapter}}), or select the trainable leaves with `where`: a "
    "regex over the '/'-joined paths, a set of paths, or a callable (path, leaf) -> bool."
)


def _leaf_rule(where: Any) -> Callable[[str, Any], bool]:
    if callable(where):
        return lambda path, leaf: bool(where(path, leaf))
    if isinstance(where, (set, frozenset)):
        paths = frozenset(where)
        return lambda path, leaf: path in paths
    if isinstance(where, str):
        where = (where,)
    if isinstance(where, Sequence) and all(isinstance(p, str) for p in where):
        patterns = []
        for pattern in where:
            try:
                patterns.append(re.compile(pattern))
            except re.error as err:
                raise ValueError(f"`where` pattern {pattern!r} is not a valid regex: {err}.") from None
        return lambda path, leaf: any(p.search(path) for p in patterns)
    raise ValueError(
        f"`where` must be None, a regex, a list of regexes, a set of paths or a callable "
        f"(path, leaf) -> bool, got {where!r} ({type(where).__name__})."
    )


def trainable_mask(tree: Any, where: Any = None) -> Any:
    """A pytree of bools shaped like ``tree``: True for the leaves that train.

    Args:
      tree: the one tree of frozen and adapter leaves (or its gradients / updates: any tree of
        the same structure gives the same mask).
      where: which leaves train; see the module docstring. ``None`` means the leaves of lrtt
        adapter entries.

    Returns:
      A tree of Python bools, the structure of ``tree`` (usable as an ``optax.masked`` mask).

    Raises:
      ValueError: ``where`` is not a valid spec, or it is ``None`` and ``tree`` holds no entry.

    Example:
      >>> import jax.numpy as jnp, lrtt
      >>> tree = {"w": jnp.ones((4, 4)), "lora": lrtt.LoraFactors(jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0)}
      >>> lrtt.optim.trainable_mask(tree)
      {'lora': LoraFactors(a=True, b=True, scale=1.0), 'w': False}
    """
    if where is None:
        flat = named_leaves(tree, is_leaf=is_entry)
        if not any(is_entry(node) for _, node in flat):
            paths = "\n  ".join(p for p, _ in flat[:8]) or "(no leaves)"
            raise ValueError(NO_ENTRIES.format(types=", ".join(t.__name__ for t in ENTRY_TYPES), paths=paths))

        def mark(keypath, node):
            if is_entry(node):
                return jax.tree.map(lambda _: True, node)
            return False

        return jax.tree_util.tree_map_with_path(mark, tree, is_leaf=is_entry)
    if any(isinstance(x, LayerGroups) for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, LayerGroups))):
        raise ValueError(
            "`where` selects leaves by path, and a lrtt.LayerGroups holds its layers under group paths "
            "(stacked/h/*/...): build the mask on the tree (lrtt.ungroup_layers), or use where=None "
            "(the leaves of every adapter entry, grouped or not).")
    rule = _leaf_rule(where)
    return jax.tree_util.tree_map_with_path(lambda kp, leaf: rule(path_str(kp), leaf), tree)


def adapter_labels(tree: Any, where: Any = None) -> Any:
    """``trainable_mask`` as ``optax.partition`` labels: ``"trainable"`` / ``"frozen"`` per leaf."""
    return jax.tree.map(lambda m: TRAINABLE if m else FROZEN, trainable_mask(tree, where))


def adapter_only(optimizer: optax.GradientTransformation, where: Any = None) -> optax.GradientTransformationExtraArgs:
    """``optimizer`` on the trainable leaves; frozen leaves get no state and a zero update.

    .. math::  u_i = \\mathrm{optimizer}(g)_i \\;(i \\text{ trainable}), \\qquad u_i = 0 \\;(i \\text{ frozen})

    Built as ``optax.partition({"trainable": optimizer, "frozen": optax.set_to_zero()}, labels)``,
    as ``optax.transforms.selective_transform`` is, with labels from :func:`adapter_labels`:
    ``set_to_zero`` keeps ``EmptyState()`` and the inner optimizer sees ``MaskedNode`` at every
    frozen leaf, so no moment, no weight decay and no schedule state is kept for frozen leaves.
    Any optax schedule given to ``optimizer`` (e.g. ``optax.adamw(optax.warmup_cosine_decay_schedule(...))``)
    advances once per update as usual.

    Args:
      optimizer: any optax gradient transformation.
      where: which leaves train (see the module docstring); default: the leaves of lrtt entries.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lrtt
      >>> tree = {"w": jnp.ones((64, 64)), "lora": lrtt.LoraFactors(jnp.ones((64, 2)), jnp.zeros((2, 64)), scale=1.0)}
      >>> state = lrtt.optim.adapter_only(optax.adam(1e-3)).init(tree)
      >>> sorted({x.shape for x in jax.tree.leaves(state)})
      [(), (2, 64), (64, 2)]
    """
    return optax.partition(
        {TRAINABLE: optimizer, FROZEN: optax.set_to_zero()},
        lambda tree: adapter_labels(tree, where),
    )


def apply_updates(tree: Any, updates: Any, where: Any = None) -> Any:
    """``optax.apply_updates`` on the trainable leaves; frozen leaves are returned untouched.

    ``optax.apply_updates`` computes ``p + 0`` for a frozen leaf, which is the same value but
    not the same bits for ``-0.0`` and NaN; this returns the frozen leaf object itself.
    """
    mask = trainable_mask(tree, where)
    return jax.tree.map(
        lambda p, u, m: optax.apply_updates(p, u) if m else p,
        tree,
        updates,
        mask,
    )


def partition(tree: Any, where: Any = None) -> tuple[Any, Any]:
    """``(trainable, frozen)``: two trees of ``tree``'s structure with ``None`` at the other's leaves.

    Differentiate the trainable half only (``jax.grad(lambda t: loss(combine(t, frozen)))``) so
    that no gradient is ever formed for a frozen leaf.
    """
    mask = trainable_mask(tree, where)
    trainable = jax.tree.map(lambda x, m: x if m else None, tree, mask)
    frozen = jax.tree.map(lambda x, m: None if m else x, tree, mask)
    return trainable, frozen


def combine(*trees: Any) -> Any:
    """Inverse of :func:`partition`: at each leaf, the first tree's value that is not ``None``."""

    def first(*leaves):
        return next((x for x in leaves if x is not None), None)

    return jax.tree.map(first, *trees, is_leaf=lambda x: x is None)
