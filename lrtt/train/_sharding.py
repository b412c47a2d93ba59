"""Sharding rules for the Mesh step: a ``PartitionSpec`` per frozen leaf and per adapter leaf.

Frozen weights follow user rules or a preset (replicated, FSDP, Megatron tensor parallelism);
each LoRA factor inherits the sharding of the kernel it adapts: ``A: (*stack, in, r)`` the
kernel's in-axis spec, ``B: (*stack, r, out)`` its out-axis spec.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
from jax.sharding import Mesh, PartitionSpec as P

from lrtt import _families
from lrtt._adapter import entries, is_entry
from lrtt._count import adapter_shapes
from lrtt._groups import LayerGroups
from lrtt._paths import is_quantized, named_leaves, path_str
from lrtt._resolve import matrix_targets
from lrtt._targets import first_match, select

PARAM_RULE_PRESETS = ("replicated", "fsdp", "tensor")


def _axis_size(mesh: Mesh, entry: Any) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names if n is not None)


def _check_spec(path: str, shape: tuple, spec: tuple, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule for {path!r} has {len(spec)} entries {P(*spec)} but the leaf is {shape}.")
    for dim, entry in zip(shape, spec):
        names = entry if isinstance(entry, tuple) else (entry,)
        unknown = [n for n in names if n is not None and n not in mesh.shape]
        if unknown:
            raise ValueError(
                f"sharding rule for {path!r} names mesh axes {unknown} but the mesh has "
                f"{dict(mesh.shape)}; use those axis names."
            )
        if dim % _axis_size(mesh, entry):
            raise ValueError(
                f"sharding rule {P(*spec)} for {path!r} of shape {shape} splits a dimension of "
                f"{dim} over {_axis_size(mesh, entry)} devices, which does not divide it; change "
                "the rule or the mesh."
            )


def param_specs(params: Any, mesh: Mesh, rules: Any = None, *, layouts=(), data_axis: str = "data") -> Any:
    """A ``PartitionSpec`` per frozen leaf, from user rules or a preset.

    Args:
      params: the frozen tree (arrays or ``ShapeDtypeStruct``).
      mesh: the device mesh.
      rules: ``None``/``"replicated"``; ``"fsdp"`` (the largest axis the mesh's ``"fsdp"`` axis, or
        ``data_axis``, divides, of every leaf with >= 2 dims, is sharded over it); ``"tensor"``
        (Megatron: column-parallel kernels split an out axis over ``"model"``, row-parallel
        kernels an in axis, the first of the group that ``"model"`` divides; the kinds of each
        come from the params' family, :data:`lrtt._families.ROW_PARALLEL`; everything else
        replicated); or ``{regex: PartitionSpec}`` (first
        match wins, unmatched leaves replicated).
      layouts: extra ``(regex, layout)`` pairs for the ``"tensor"`` preset (as a method's).
    """
    leaves = named_leaves(params)
    specs: dict[str, tuple] = {}
    if rules is None or rules == "replicated":
        specs = {p: () for p, _ in leaves}
    elif rules == "fsdp":
        axis = "fsdp" if "fsdp" in mesh.shape else data_axis
        size = mesh.shape[axis]
        for path, leaf in leaves:
            spec = [None] * len(leaf.shape)
            if len(leaf.shape) >= 2:
                order = sorted(range(len(leaf.shape)), key=lambda i: -leaf.shape[i])
                fit = [i for i in order if leaf.shape[i] % size == 0]
                if fit:
                    spec[fit[0]] = axis
            specs[path] = tuple(spec)
    elif rules == "tensor":
        if "model" not in mesh.shape:
            raise ValueError(f"`rules`='tensor' shards over a mesh axis 'model'; the mesh has {dict(mesh.shape)}.")
        specs = {p: () for p, _ in leaves}
        column, row = _families.tensor_parallel_patterns([p for p, _ in leaves])
        for patterns, group in ((column, "out"), (row, "in")):
            for target in select(params, patterns, layouts=layouts, require=False):
                axes = target.layout.axes(group)
                split = next((a for a in axes if target.shape[a] % mesh.shape["model"] == 0), None)
                if split is None:
                    continue  # no axis of the group divides over "model": replicated
                spec = [None] * target.layout.ndim
                spec[split] = "model"
                specs[target.path] = tuple(spec)
                bias = target.path.rsplit("/", 1)[0] + "/bias"
                if group == "out" and bias in specs:
                    specs[bias] = _bias_spec(dict(leaves)[bias], target, axes.index(split))
    elif isinstance(rules, (Mapping, list, tuple)):
        pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
        for path, leaf in leaves:
            spec = first_match(path, pairs)
            specs[path] = () if spec is None else tuple(spec)
    else:
        raise ValueError(
            f"`rules` must be one of {list(PARAM_RULE_PRESETS)} or a {{regex: PartitionSpec}} mapping, got {rules!r}."
        )
    out = {}
    for path, leaf in leaves:
        spec = specs[path]
        _check_spec(path, tuple(leaf.shape), spec, mesh)
        out[path] = P(*spec)
    return _like(params, out, mesh)


def _bias_spec(bias: Any, target: Any, out_index: int) -> tuple:
    """A column-parallel kernel's bias ``(*stack, *out)``: sharded on the out axis its kernel is."""
    stack, _, outs = target.layout.split(target.shape)
    if tuple(bias.shape) != stack + outs:
        return ()  # a bias of another shape: replicated
    spec = [None] * (len(stack) + len(outs))
    spec[len(stack) + out_index] = "model"
    return tuple(spec)


def _like(tree: Any, by_path: dict[str, Any], mesh: Any) -> Any:
    """The specs in ``tree``'s structure; a quantized kernel gets a QArray of specs, its spec on
    each of its arrays (values, scales) where the array's axis divides, else that axis replicated."""
    def spec(keypath, leaf):
        kernel_spec = by_path[path_str(keypath)]
        if not is_quantized(leaf):
            return kernel_spec
        return jax.tree.map(lambda array: _fitting(kernel_spec, array.shape, mesh), leaf)

    return jax.tree_util.tree_map_with_path(spec, tree, is_leaf=is_quantized)


def _fitting(spec: P, shape: tuple, mesh: Any) -> P:
    def size(name):
        names = name if isinstance(name, tuple) else (name,)
        return math.prod(mesh.shape[n] for n in names)

    return P(*(n if n is None or shape[a] % size(n) == 0 else None for a, n in enumerate(tuple(spec))))


def _kernel_spec(spec: Any) -> Any:
    """A kernel's own spec: a quantized kernel's is its values' (packed values: the same axes)."""
    if is_quantized(spec):
        values = spec.qvalue
        return getattr(values, "data", values)
    return spec


def adapter_specs(method: Any, params: Any, param_spec_tree: Any, adapter: Any = None) -> Any:
    """A ``PartitionSpec`` per adapter leaf, inherited from the kernel each entry adapts.

    ``LoraFactors``: ``A: (*stack, in, r)`` gets the kernel's stack specs and its in-axis spec,
    ``B: (*stack, r, out)`` the stack specs and the out-axis spec (a 2-D ``(in, out)`` kernel
    ``P('x', 'y')`` gives ``A: P('x', None)``, ``B: P(None, 'y')``; GPT-2's ``(out, in)`` Conv1D
    is read through its layout). ``Trainable`` copies its leaf's spec. TT cores and bottleneck
    adapters are small and replicated. Each entry type says its own (``Entry.partition_specs``).
    An adapter grouped by :func:`lrtt.group_layers` is replicated whole.
    """
    if adapter is None:
        adapter = adapter_shapes(method, params)
    if isinstance(adapter, LayerGroups):  # stacked over layers: small, replicated
        return jax.tree.map(lambda _: P(), adapter)
    kernel_specs = dict(named_leaves(param_spec_tree, is_leaf=lambda x: isinstance(x, P)))
    targets = matrix_targets(method, params, entries(adapter))

    def spec_of(keypath, entry):
        path = path_str(keypath)
        if not is_entry(entry) or (entry.matrix_target and path not in targets):
            return jax.tree.map(lambda _: P(), entry)
        return entry.partition_specs(_kernel_spec(kernel_specs.get(path)), targets.get(path))

    return jax.tree_util.tree_map_with_path(spec_of, adapter, is_leaf=is_entry)
