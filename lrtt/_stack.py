"""Many adapters on one base: a stack of adapters of one method with a leading adapter axis.

``stack(method, [adapter_0, ..., adapter_{K-1}])`` gives an :class:`AdapterStack`: one adapter
tree whose every array has a leading axis of size ``K``. ``lrtt.wrap(method, params, stacked,
adapter_ids=ids)`` with ``ids: int32 (batch,)`` then runs row ``i`` of a batch with member
``ids[i]`` (``-1``: the base alone) under :func:`lrtt.factored`::

    y[i] = x[i]·W0 + s·(x[i]·A[ids[i]])·B[ids[i]]

=================  ====================================  ======================================
member entry       stacked arrays                         members may differ in
=================  ====================================  ======================================
``LoraFactors``    ``a: (K, *stack, in, R)``,             rank (padded with zeros to the
                   ``b: (K, *stack, R, out)``             largest ``R``: exact), scale (folded
                                                          into ``b`` when members differ)
``TTFactors``      every core ``(K, *stack, t, k, t')``   nothing (same TT dims and ranks)
=================  ====================================  ======================================

Padding is exact in both directions: a zero column of ``A`` meets a zero row of ``B``, so the
padded member computes the same ``ΔW``, and the padded entries get zero gradients (they stay
zero under any optimizer whose update of a zero gradient is zero: SGD, Adam, AdamW).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lrtt._adapter import entries, is_entry
from lrtt._groups import as_tree
from lrtt._paths import nest
from lrtt.methods import LoRA, LorettaRep


@dataclasses.dataclass(frozen=True)
class AdapterStack:
    """``K`` adapters of one method as one tree: ``tree`` holds the entries with a leading axis
    of size ``size`` on every array. A pytree (its leaves are the stacked arrays), so optax,
    ``jax.jit`` and checkpoints take it as they take one adapter."""

    tree: Any
    size: int


jax.tree_util.register_dataclass(AdapterStack, data_fields=["tree"], meta_fields=["size"])


def _kind(entry: Any, path: str) -> type:
    if is_entry(entry) and entry.low_rank:
        return type(entry)
    raise ValueError(
        f"the adapter entry at {path!r} is a {type(entry).__name__}: a stack holds LoRA and LorettaRep "
        "factors only (a per-row bottleneck, TT kernel or fully trained leaf has no per-row form). "
        "Drop `trainable=` from the method, or run such adapters one at a time.")


def _stack_path(path: str, members: list[Any]) -> Any:
    kinds = {_kind(e, path) for e in members}
    if len(kinds) > 1:
        raise ValueError(f"the adapters hold different entry types at {path!r} ({sorted(k.__name__ for k in kinds)}): "
                         "stack adapters of one method.")
    members = kinds.pop().aligned(members, path)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *members)


def stack(method: Any, adapters: Sequence[Any], *, capacity: int | None = None) -> AdapterStack:
    """``K`` adapters of ``method`` (LoRA or LorettaRep) as one :class:`AdapterStack`.

    Args:
      method: the method the adapters were made with (``wrap`` uses its layouts and targets).
      adapters: adapter trees over the same paths (``method.init``, ``lrtt.load_peft``, a
        checkpoint); LoRA members may differ in rank and scale (see the module docstring).
      capacity: the number of slots (default ``len(adapters)``); slots past the adapters hold
        zero factors (the base alone) until :func:`set_member` loads one — a stack of fixed
        shapes, so loading a member compiles nothing.

    Returns:
      An :class:`AdapterStack` of ``size = capacity``.

    Example:
      >>> import jax, jax.numpy as jnp, lrtt
      >>> params = {"q": {"kernel": jnp.ones((8, 8))}}
      >>> method = lrtt.LoRA(rank=2, targets="q")
      >>> adapters = [method.init(jax.random.key(k), params) for k in range(3)]
      >>> stacked = lrtt.stack(method, adapters)
      >>> stacked.size, stacked.tree["q"]["kernel"].a.shape
      (3, (3, 8, 2))
    """
    adapters = [as_tree(a) for a in adapters]
    if not adapters:
        raise ValueError("stack() got no adapters: pass a list of one or more adapter trees.")
    if capacity is None:
        capacity = len(adapters)
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < len(adapters):
        raise ValueError(f"capacity={capacity!r}: give an int ≥ the number of adapters ({len(adapters)}).")
    if not isinstance(method, (LoRA, LorettaRep)):
        raise ValueError(f"stack() takes LoRA and LorettaRep adapters, not {type(method).__name__}'s: their "
                         "per-row form is x·W0 + s·(x·A[id])·B[id].")
    flats = [entries(a) for a in adapters]
    paths = set(flats[0])
    for k, flat in enumerate(flats[1:], 1):
        if set(flat) != paths:
            differ = sorted(paths ^ set(flat))
            raise ValueError(f"adapter {k} adapts other leaves than adapter 0 (e.g. {differ[:3]}): stack adapters "
                             "with the same targets (one method over one model).")
    stacked = {}
    for path in sorted(paths):
        members = [flat[path] for flat in flats]
        stacked[path] = _stack_path(path, members)
        if capacity > len(adapters):
            stacked[path] = jax.tree.map(
                lambda x: jnp.concatenate([x, jnp.zeros((capacity - len(adapters), *x.shape[1:]), x.dtype)]),
                stacked[path])
    return AdapterStack(nest(stacked), int(capacity))


def member(stacked: AdapterStack, k: int) -> Any:
    """Member ``k`` of a stack as an adapter tree (LoRA members at the stack's padded rank and
    common scale: the same ``ΔW``)."""
    _check_slot(stacked, k)
    return jax.tree.map(lambda x: x[k], stacked.tree)


def set_member(stacked: AdapterStack, k: Any, adapter: Any) -> AdapterStack:
    """The stack with slot ``k`` holding ``adapter`` (a slot update: same shapes, so a jitted
    function of the stack compiles nothing new; ``k`` may be traced).

    A LoRA member of a lower rank than the stack's is zero-padded, one of another scale has it
    folded into ``B``; a higher rank or other shapes raise.
    """
    if isinstance(k, (int, np.integer)):
        _check_slot(stacked, k)
    slots = entries(stacked.tree)
    flat = entries(as_tree(adapter))
    if set(flat) != set(slots):
        raise ValueError(f"the adapter adapts other leaves than the stack (e.g. {sorted(set(flat) ^ set(slots))[:3]}): "
                         "load an adapter of the stack's method and model.")
    new = {}
    for path, slot in slots.items():
        entry = flat[path]
        if _kind(entry, path) is not type(slot):
            raise ValueError(f"the adapter holds a {type(entry).__name__} at {path!r}, the stack {type(slot).__name__}s.")
        entry = entry.fitted_to(slot, path)
        if jax.tree.structure(entry) != jax.tree.structure(jax.tree.map(lambda x: x[0], slot)) or any(
                tuple(e.shape) != tuple(s.shape[1:]) for e, s in zip(jax.tree.leaves(entry), jax.tree.leaves(slot))):
            raise ValueError(f"the adapter's factors at {path!r} do not fit the stack's slots "
                             f"({[tuple(x.shape) for x in jax.tree.leaves(entry)]} vs "
                             f"{[tuple(x.shape[1:]) for x in jax.tree.leaves(slot)]}).")
        new[path] = jax.tree.map(lambda s, e: s.at[k].set(e.astype(s.dtype)), slot, entry)
    return AdapterStack(nest(new), stacked.size)


def _check_slot(stacked: AdapterStack, k: int) -> None:
    if not isinstance(stacked, AdapterStack):
        raise TypeError(f"expected an AdapterStack (from lrtt.stack), got {type(stacked).__name__}.")
    if not -stacked.size <= int(k) < stacked.size:
        raise IndexError(f"slot {k} of a stack of {stacked.size}: give 0 ≤ k < {stacked.size}.")


def check_ids(adapter_ids: Any, size: int) -> jax.Array:
    """``adapter_ids`` as an int32 ``(batch,)`` array; concrete values are checked to lie in
    ``[-1, size)`` (traced ones cannot be: an id ≥ size then reads a clamped slot)."""
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"adapter_ids must be a 1-D integer array (one id per batch row), got "
                         f"{ids.dtype}{tuple(ids.shape)}.")
    try:
        values = np.asarray(ids)
    except jax.errors.TracerArrayConversionError:
        values = None
    if values is not None:
        bad = values[(values < -1) | (values >= size)]
        if bad.size:
            raise ValueError(f"adapter_ids holds {int(bad[0])}, outside [-1, {size}): ids index the stack's "
                             f"{size} members, -1 runs a row on the base alone.")
    return ids.astype(jnp.int32)
