"""Key paths: how lrtt names the leaves of any parameter pytree.

A leaf is addressed by its key path with each key turned into text and joined with ``/``:
``transformer/h/0/attn/c_attn/kernel`` for a transformers Flax GPT-2, ``layers/0/kernel`` for an
``nnx.State`` (the trailing ``.value`` of an NNX variable is dropped, so a linen tree and the
equivalent NNX state name their leaves alike).
"""

from __future__ import annotations

import re
import sys
from typing import Any, Callable, Sequence

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from lrtt._private import is_qarray, qwix_with_aux

PyTree = Any


def key_name(key: Any) -> str:
    """The text of one key-path entry (`DictKey`, `SequenceKey`, `GetAttrKey`, …)."""
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(keypath: tuple) -> str:
    """Join a JAX key path into lrtt's ``/``-separated leaf name.

    A final ``GetAttrKey('value')`` (an NNX ``Variable``'s payload) is dropped.
    """
    names = [key_name(k) for k in keypath]
    if names and isinstance(keypath[-1], GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return "/".join(names)


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a quantized array: a ``qwix.QArray`` (``qvalue``, ``scale``, ...), or
    the ``WithAux`` wrapper around one that ``qwix.quantize_params`` puts in a param tree.

    lrtt names a quantized kernel by its own path (``…/kernel``, not ``…/kernel/qvalue``), with
    the shape of the array it stands for. No qwix import: a QArray exists only if qwix is loaded.
    """
    qwix = sys.modules.get("qwix")
    if qwix is None:
        return False
    if isinstance(x, qwix.QArray):
        return True
    with_aux = qwix_with_aux()
    return with_aux is not None and isinstance(x, with_aux) and isinstance(x.array, qwix.QArray)


def quantized_array(x: Any) -> Any:
    """The ``qwix.QArray`` of a quantized leaf (unwrapping ``qwix.quantize_params``' ``WithAux``)."""
    return x if is_qarray(x) else x.array


def _with_quantized(is_leaf: Callable[[Any], bool] | None) -> Callable[[Any], bool]:
    if is_leaf is None:
        return is_quantized
    return lambda x: is_quantized(x) or is_leaf(x)


def named_leaves(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` in the tree's flattening order; a quantized array is one leaf."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_with_quantized(is_leaf))
    return [(path_str(kp), leaf) for kp, leaf in flat]


def replace_leaves(tree: PyTree, replacements: dict[str, Any]) -> PyTree:
    """A copy of ``tree`` whose leaves named in ``replacements`` are swapped; structure kept.

    Raises:
      KeyError: a name in ``replacements`` is not a leaf of ``tree``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
    names = [path_str(kp) for kp, _ in flat]
    missing = set(replacements) - set(names)
    if missing:
        raise KeyError(
            f"these adapter paths are not leaves of the params: {sorted(missing)[:5]}; "
            "was the adapter made for another model?"
        )
    leaves = [replacements.get(name, leaf) for name, (_, leaf) in zip(names, flat)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def nest(flat: dict[str, Any]) -> dict:
    """``{"a/b/c": x}`` → ``{"a": {"b": {"c": x}}}`` (the adapter's nested layout)."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    return out


def exact_patterns(paths: Sequence[str]) -> tuple[str, ...]:
    """One anchored regex per path, matching that path only (looked up by dict, not searched)."""
    return tuple("^" + re.escape(p) + "$" for p in paths)


def exact_path(pattern: str) -> str | None:
    """The path an :func:`exact_patterns` regex stands for, or None for any other regex."""
    if len(pattern) < 2 or pattern[0] != "^" or pattern[-1] != "$" or pattern.endswith("\\$"):
        return None
    inner = pattern[1:-1]
    path = re.sub(r"\\(.)", r"\1", inner)
    return path if re.escape(path) == inner else None
