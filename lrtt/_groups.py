"""An unrolled model's LorettaRep entries held as one stacked entry per target kind.

A model whose layers are unrolled (transformers' Flax classes, most hand-written models) gets one
adapter entry per layer and target: GPT-2 small's 48 all-linear targets give LorettaRep 420 TT
cores. XLA compiles each core's AdamW update and each layer's TT contractions on their own, so
the training step compiles in 2.2x LoRA's time (docs/factored.md, "Compile time"; 1.2x grouped).

``group_layers(adapter)`` stacks the ``TTFactors`` entries whose paths differ only in a layer
index (``h/0/attn/c_attn/kernel``, ``h/1/...`` → group ``h/*/attn/c_attn/kernel``) and
whose cores have equal shapes into one entry with a leading layer axis ``L``: each core
``(t, k, t')`` of ``L`` entries becomes one ``(L, t, k, t')``. Other entries stay as they are.

:class:`LayerGroups` is a pytree whose leaves are the stacked cores (and the other entries'
arrays), so ``jax.grad``, optax, ``jax.jit`` and checkpoints take it as they take the adapter:
the optimizer holds one state per group (GPT-2 small: 35 leaves instead of 420).
:func:`lrtt.wrap` over it contracts all cores but the last of each group once for all layers,
then forms layer ``l``'s ``A_l``, ``B_l`` with one product each, and runs the model with
``LoraFactors(A_l, B_l)`` — ``ΔW_l`` is the layer's own entry's; the backward pass writes each
layer's gradient into its row of the group in place. ``resolve``, ``merge``, ``delta``,
``unmerge``, ``save_peft``, ``stack``, ``combine`` and checkpoints (the adapter and every
grouped part of an optimizer state) read it as the tree :func:`ungroup_layers` returns, the
exact inverse; functions that select leaves by path (``lrtt.optim``'s masks) need the tree.
Grouping changes where the arrays live, not what they compute.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from lrtt._adapter import LoraFactors, TTFactors, is_entry
from lrtt._paths import path_str
from lrtt.tt import _core as _tt


@dataclasses.dataclass(frozen=True)
class LayerGroups:
    """An adapter's LorettaRep entries stacked per target kind (:func:`group_layers`).

    ``stacked``: ``{group: TTFactors}``, each core with a leading axis over the group's layers;
    ``others``: ``{path: entry}``, the entries left as they are. ``structure`` (the adapter's
    tree structure, entries as leaves), ``members`` (``((group, positions), ...)``) and
    ``positions`` (``((path, position), ...)``: where the others sit) are static: with them
    :func:`ungroup_layers` rebuilds the adapter exactly.
    """

    stacked: dict
    others: dict
    structure: Any
    members: tuple
    positions: tuple


jax.tree_util.register_dataclass(LayerGroups, data_fields=["stacked", "others"],
                                 meta_fields=["structure", "members", "positions"])


_INDEX = re.compile(r"^(.*_)?\d+$")  # "3", and Flax linen's "layers_3", "Block_3"


def _group_key(path: str, entry: Any) -> tuple:
    leaves, structure = jax.tree.flatten(entry)
    pattern = "/".join(_INDEX.sub(lambda m: (m.group(1) or "") + "*", part) for part in path.split("/"))
    return (pattern, structure, tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in leaves))


def group_layers(adapter: Any) -> LayerGroups:
    """The adapter with its LorettaRep entries stacked per target kind (module docstring).

    ``TTFactors`` entries group when their paths are equal once each layer index reads ``*`` (a
    path part that is an integer, ``3``, or ends in one, Flax linen's ``layers_3``) and their
    cores and static fields are equal; an entry with no such partner (every entry of a model
    whose layers are scanned: its cores hold all layers already) and the other entries (LoRA's
    factors, whose arrays are the matrices themselves, bottleneck adapters, fully trained
    leaves) stay as they are.

    >>> import jax, jax.numpy as jnp, lrtt
    >>> params = {"h": {str(i): {"q": {"kernel": jnp.ones((64, 64))}} for i in range(3)}}
    >>> adapter = lrtt.LorettaRep(rank=4, tt_rank=2, targets="q").init(jax.random.key(0), params)
    >>> groups = lrtt.group_layers(adapter)
    >>> list(groups.stacked), len(jax.tree.leaves(adapter)), len(jax.tree.leaves(groups))
    (['h/*/q/kernel'], 18, 6)
    >>> same = lrtt.ungroup_layers(groups)
    >>> all(bool((x == y).all()) for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(adapter)))
    True

    Raises:
      ValueError: ``adapter`` is not an adapter tree (already grouped, an :class:`lrtt.AdapterStack`)
        or holds no entries.
    """
    if not isinstance(adapter, Mapping):  # a LayerGroups, an AdapterStack, an entry
        raise ValueError(f"group_layers takes one adapter tree (the dict method.init returns, or one "
                         f"restored from a checkpoint), got a {type(adapter).__name__}: group an adapter "
                         "once, and do not group a stack of adapters (lrtt.stack).")
    flat, structure = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=is_entry)
    if not any(is_entry(e) for _, e in flat):
        raise ValueError("group_layers found no adapter entries in its argument: pass the tree "
                         "method.init returns (or one restored from a checkpoint).")
    names: dict[tuple, str] = {}
    members: dict[str, list[int]] = {}
    for position, (keypath, entry) in enumerate(flat):
        if not isinstance(entry, TTFactors):
            continue
        key = _group_key(path_str(keypath), entry)
        if key not in names:
            name, n = key[0], 1
            while name in members:  # one pattern, entries of other shapes: a group of their own
                n += 1
                name = f"{key[0]}#{n}"
            names[key] = name
            members[name] = []
        members[names[key]].append(position)
    # an entry with no partner (a scanned model's) stays as it is, like every other entry
    groups = tuple((name, tuple(where)) for name, where in members.items() if len(where) > 1)
    grouped = {i for _, where in groups for i in where}
    positions = tuple((path_str(keypath), i) for i, (keypath, _) in enumerate(flat) if i not in grouped)
    return _assemble([entry for _, entry in flat], structure, groups, positions)


def _assemble(flat: list, structure: Any, members: tuple, positions: tuple) -> LayerGroups:
    """The groups of the entries ``flat`` (in ``structure``'s order): each group's stacked."""
    stacked = {name: jax.tree.map(lambda *xs: jnp.stack(xs), *[flat[i] for i in where]) for name, where in members}
    return LayerGroups(stacked, {path: flat[i] for path, i in positions}, structure, members, positions)


def _rebuild(groups: LayerGroups, layers_of) -> Any:
    flat: list[Any] = [None] * groups.structure.num_leaves
    for name, where in groups.members:
        for position, entry in zip(where, layers_of(groups.stacked[name], len(where))):
            flat[position] = entry
    for path, position in groups.positions:
        flat[position] = groups.others[path]
    return jax.tree.unflatten(groups.structure, flat)


def ungroup_layers(groups: LayerGroups) -> Any:
    """The adapter :func:`group_layers` was given, exactly (the same tree, types and values).

    Raises:
      TypeError: ``groups`` is not a :class:`LayerGroups`.
    """
    if not isinstance(groups, LayerGroups):
        raise TypeError(f"ungroup_layers takes what group_layers returns, got a {type(groups).__name__}.")

    def layers(entry, n):
        return [jax.tree.map(lambda x, i=i: _row(x, i), entry) for i in range(n)]

    return _rebuild(groups, layers)


def _row(x: Any, i: int) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    if hasattr(x, "shape"):
        return x[i]
    return x  # a Sharding (a tree of them places the groups): the same for every row


def group_as(adapter: Any, like: LayerGroups) -> LayerGroups:
    """``adapter`` (a tree of ``like``'s structure) grouped as ``like`` is: a restored tree back
    into the groups a run trains."""
    flat, structure = jax.tree_util.tree_flatten(adapter, is_leaf=is_entry)
    if structure != like.structure:
        raise ValueError("the adapter does not have the structure of the groups it should be grouped as: "
                         "group the tree that lrtt.ungroup_layers returned for them.")
    return _assemble(flat, structure, like.members, like.positions)


def _is_groups(x: Any) -> bool:
    return isinstance(x, LayerGroups)


def ungroup_all(tree: Any) -> Any:
    """``tree`` with every :class:`LayerGroups` in it ungrouped (an optimizer state of groups
    holds one per moment)."""
    return jax.tree.map(as_tree, tree, is_leaf=_is_groups)


def regroup_all(tree: Any, like: Any) -> Any:
    """The inverse of :func:`ungroup_all`: each subtree of ``tree`` where ``like`` has a
    :class:`LayerGroups` grouped as that one is."""
    return jax.tree.map(lambda l, t: group_as(t, l) if _is_groups(l) else t, like, tree, is_leaf=_is_groups)


def as_tree(adapter: Any) -> Any:
    """``adapter``, or the tree it groups when it is a :class:`LayerGroups`."""
    return ungroup_layers(adapter) if isinstance(adapter, LayerGroups) else adapter


@functools.lru_cache(maxsize=None)
def _unstacker(n: int):
    """``x: (n, ...)`` → its ``n`` rows at runtime indices (one slicing kernel serves every row;
    static offsets would give XLA one kernel per offset), with a backward pass that writes each
    row's gradient into one buffer in place (the default transpose adds ``n`` padded copies)."""

    @jax.custom_vjp
    def rows(x, where):
        return tuple(lax.dynamic_index_in_dim(x, where[i], keepdims=False) for i in range(n))

    def forward(x, where):
        return rows(x, where), where

    def backward(where, grads):
        full = jnp.zeros((n,) + grads[0].shape, grads[0].dtype)
        for i in range(n):
            full = lax.dynamic_update_index_in_dim(full, grads[i], where[i], 0)
        return full, None

    rows.defvjp(forward, backward)
    return rows


def _layer_rows(x, n):
    # the barrier keeps XLA from folding the indices into constants (see _unstacker)
    return _unstacker(n)(x, lax.optimization_barrier(jnp.arange(n, dtype=jnp.int32)))


def _layer_matrices(cores, n_in: int, n_out: int, n: int) -> list:
    """Each layer's TT matrix ``(*stack, n_in, n_out)`` from cores stacked over ``n`` layers.

    All cores but the last are contracted once for every layer (one batched chain, ``(n,
    *stack, 1, K, t)``); each layer's matrix is then its row of that times its last core,
    ``(K, t)·(t, k_d)``: a product of its own, so the model's loops read a plain array (a slice
    of the stack would be fused into them and index it at every element).
    """
    last = _layer_rows(cores[-1], n)
    if len(cores) == 1:
        return [c.reshape(c.shape[:-3] + (n_in, n_out)) for c in last]
    prefix = _layer_rows(_tt._chain(cores[:-1]), n)  # each (*stack, 1, K, t)
    products = [jnp.matmul(p.reshape(p.shape[:-3] + p.shape[-2:]), c.reshape(c.shape[:-3] + c.shape[-3:-1]))
                for p, c in zip(prefix, last)]  # the cores' stack axes broadcast
    return [m.reshape(m.shape[:-2] + (n_in, n_out)) for m in products]


def per_layer(groups: LayerGroups) -> Any:
    """The adapter tree the model runs with: ``LoraFactors(A_l, B_l)`` for each grouped layer.

    Each group's ``TT_A`` and ``TT_B`` are formed for all its layers at once (all cores but the
    last in one batched chain, then one product per layer), with ``ΔW_l = scale·A_l·B_l`` as the
    layer's own entry gives; the other entries pass through. Differentiable: every layer's
    gradient lands in its group's row.
    """

    def layers(entry, n):
        a = _layer_matrices(entry.a, entry.n_in, entry.rank, n)
        b = _layer_matrices(entry.b, entry.rank, entry.n_out, n)
        return [LoraFactors(a_l, b_l, scale=entry.scale) for a_l, b_l in zip(a, b)]

    return _rebuild(groups, layers)
