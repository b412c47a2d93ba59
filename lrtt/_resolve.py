"""Does this adapter fit these params? One answer, used by wrap, merge, delta and save_peft.

:func:`resolve` pairs each entry of an adapter with the leaf it adapts and checks three things:
every entry names a leaf the params have, every entry fits its leaf (``Entry.misfit``), and
every leaf the method selects in the params has an entry (else it would silently stay
unadapted). Whatever differs is raised together as one :class:`AdapterMismatchError` whose
fields hold the differences.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from lrtt._adapter import entries, is_entry
from lrtt._errors import Error
from lrtt._groups import as_tree
from lrtt._paths import exact_patterns, named_leaves
from lrtt._targets import Target, select

_SHOWN = 5


class AdapterMismatchError(Error, ValueError):
    """The adapter was made for other params. Its fields hold the differences:

    Attributes:
      unknown: paths the adapter names that are not leaves of the params (or, for an entry
        that reads its leaf as a matrix, not a leaf the method's layouts can read).
      misfit: ``{path: what differs}`` for entries whose shapes do not fit their leaf.
      uncovered: leaves the method selects in the params that the adapter has no entry for.
    """

    def __init__(self, message: str, *, unknown: tuple[str, ...] = (), misfit: Mapping[str, str] | None = None,
                 uncovered: tuple[str, ...] = ()):
        super().__init__(message)
        self.unknown = tuple(unknown)
        self.misfit = dict(misfit or {})
        self.uncovered = tuple(uncovered)

    def __reduce__(self):
        return (_rebuild, (str(self), self.unknown, self.misfit, self.uncovered))


def _rebuild(message, unknown, misfit, uncovered):
    return AdapterMismatchError(message, unknown=unknown, misfit=misfit, uncovered=uncovered)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """An adapter paired with the params it fits.

    Attributes:
      entries: ``{path: entry}`` of the adapter.
      targets: ``{path: Target}`` of the entries that read their leaf as a matrix.
      leaves: ``{path: leaf}`` of the params (all of them).
    """

    entries: dict[str, Any]
    targets: dict[str, Target]
    leaves: dict[str, Any]


def _some(paths) -> str:
    paths = sorted(paths)
    more = f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
    return f"{paths[:_SHOWN]}{more}"


def _member(entry: Any) -> Any:
    """One member of a stacked entry, as shapes (the leading stack axis dropped)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype), entry)


def _message(method: Any, unknown, misfit, uncovered, planned: int) -> str:
    lines = ["the adapter does not fit these params: it was made for another model, layout or targets."]
    if unknown:
        lines.append(f"- it names {len(unknown)} leaves that are not a leaf of the params: {_some(unknown)}.")
    for path in sorted(misfit)[:_SHOWN]:
        lines.append(f"- {path!r}: {misfit[path]}.")
    if len(misfit) > _SHOWN:
        lines.append(f"- and {len(misfit) - _SHOWN} more entries whose shapes do not fit.")
    if uncovered:
        lines.append(
            f"- it has no entry for {len(uncovered)} of the {planned} leaves that {type(method).__name__} "
            f"selects in these params, e.g. {_some(uncovered)}: it was made for other params (a model with "
            "fewer layers, or other targets), and those leaves would silently stay unadapted.")
    lines.append("Use the adapter made for this model, or the params it was made for; "
                 "method.init(key, params) creates one for these params.")
    return "\n".join(lines)


def matrix_targets(method: Any, params: Any, flat: Mapping[str, Any]) -> dict[str, Target]:
    """``{path: Target}`` for the entries of ``flat`` (``{path: entry}``) that adapt a matrix leaf
    the params have (read with ``method.layouts``); paths the params lack are left out."""
    on_matrix = [p for p, e in flat.items() if is_entry(e) and e.matrix_target]
    return {t.path: t for t in select(params, exact_patterns(on_matrix), layouts=method.layouts, require=False)}


def resolve(method: Any, params: Any, adapter: Any, *, stacked: bool = False, covers: bool = True) -> Resolved:
    """Pair ``adapter``'s entries with the leaves of ``params`` they adapt, checking they fit.

    Args:
      method: the method that made the adapter (its ``layouts`` read the leaves; ``plan`` says
        which leaves it selects).
      params: the frozen params (any pytree).
      adapter: the adapter tree (or the tree of an :class:`lrtt.AdapterStack`, ``stacked=True``:
        every array has a leading member axis; or a :class:`lrtt.LayerGroups`, read as the tree
        it groups).
      covers: also require an entry for every leaf ``method.plan(params)`` selects.

    Returns:
      A :class:`Resolved` (entries, targets, leaves).

    Raises:
      AdapterMismatchError: the adapter names leaves the params lack, an entry's shapes do not
        fit its leaf, or (``covers``) a selected leaf has no entry; all differences at once.

    Example:
      >>> import jax, jax.numpy as jnp, lrtt
      >>> method = lrtt.LoRA(rank=2, targets="q")
      >>> adapter = method.init(jax.random.key(0), {"q": {"kernel": jnp.ones((8, 8))}})
      >>> try:
      ...     lrtt.resolve(method, {"q": {"kernel": jnp.ones((8, 16))}}, adapter)
      ... except lrtt.AdapterMismatchError as err:
      ...     print(list(err.misfit))
      ['q/kernel']
    """
    flat = entries(as_tree(adapter))
    strays = sorted(p for p, e in flat.items() if not is_entry(e))
    if strays:
        raise AdapterMismatchError(
            f"the adapter holds {len(strays)} leaves that are not adapter entries, e.g. {_some(strays)}: pass "
            "the tree method.init(key, params) returned (or lrtt.load_peft / a checkpoint restored), not the "
            "params or a tree with other arrays in it.", unknown=tuple(strays))
    leaves = dict(named_leaves(params))
    unknown = {p for p in flat if p not in leaves}
    targets = matrix_targets(method, params, flat)
    unknown |= {p for p, e in flat.items() if e.matrix_target} - set(targets)
    misfit = {}
    for path, entry in flat.items():
        if path in unknown:
            continue
        why = (_member(entry) if stacked else entry).misfit(targets.get(path), leaves[path])
        if why is not None:
            misfit[path] = why
    uncovered, planned = (), 0
    if covers:
        selected = [t.path for t in method.plan(params)]
        planned = len(selected)
        uncovered = tuple(p for p in selected if p not in flat)
    if unknown or misfit or uncovered:
        raise AdapterMismatchError(_message(method, unknown, misfit, uncovered, planned),
                                   unknown=tuple(sorted(unknown)), misfit=misfit, uncovered=uncovered)
    return Resolved(flat, targets, leaves)
