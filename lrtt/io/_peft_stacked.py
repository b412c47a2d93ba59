"""PEFT LoRA files for params whose layers are stacked (``"layer in out"`` kernels, e.g.
``lrtt.models``' decoder): one PyTorch module per layer in the file, one stacked entry in lrtt.

A family with ``peft_modules`` (:mod:`lrtt._families`) names each stacked kernel's per-layer
PyTorch module (``layers/attn/q_proj/kernel`` layer ``i`` -> ``model.layers.{i}.self_attn.q_proj``).
Saving slices the factors ``A: (L, in, r)``, ``B: (L, r, out)`` per layer; loading stacks them
back, a layer the file does not adapt getting zero factors (the same function). LoRA factors
only: ``trainable`` leaves (``modules_to_save``) of stacked params are refused.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from lrtt._adapter import LoraFactors
from lrtt._families import Family
from lrtt._paths import named_leaves, nest
from lrtt.io import _hf_names as names
from lrtt.io import _peft_format as peft_format
from lrtt.io import _peft_load as peft_load
from lrtt.io import _peft_read as peft_read


def module_map(family: Family, leaves: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """``{PyTorch module: (stacked kernel path, layer)}`` of every stacked kernel of the params."""
    out = {}
    for path, leaf in leaves.items():
        for pattern, template in family.peft_modules:
            if re.search(pattern, path):
                for i in range(leaf.shape[0]):
                    out[re.sub(pattern, template, path).replace("{i}", str(i))] = (path, i)
                break
    return out


def save_tensors(method: Any, low_rank: dict[str, Any], trained: dict[str, Any], family: Family,
                 leaves: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, Any], set[str]]:
    """``(tensors, {module: rank}, {module: lora_alpha}, candidate modules)`` of a stacked adapter."""
    if trained:
        raise ValueError(
            f"cannot write trainable leaves {sorted(trained)[:3]} of {family.stack} as PEFT modules_to_save: "
            "with stacked layers they have no one-module PyTorch twin here. Save the LoRA factors alone "
            "(method without `trainable`), or export the merged model with lrtt.models.save.")
    modules = module_map(family, leaves)
    by_path: dict[str, list[tuple[int, str]]] = {}
    for module, (path, i) in modules.items():
        by_path.setdefault(path, []).append((i, module))
    tensors, ranks, alphas = {}, {}, {}
    for path in sorted(low_rank):
        if path not in by_path:
            raise ValueError(f"cannot write the LoRA entry at {path!r} in PEFT's format: {family.stack} maps "
                             f"only {sorted(by_path)} to PyTorch modules.")
        a, b = (np.asarray(m, np.float32) for m in low_rank[path].factor_matrices())
        rank = a.shape[-1]
        for i, module in sorted(by_path[path]):
            tensors[f"{peft_format.KEY_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{peft_format.KEY_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
            ranks[module] = rank
            alphas[module] = peft_format._alpha(method, path, rank, low_rank[path].scale)
    return tensors, ranks, alphas, set(modules)


def load(directory: str | os.PathLike, params: Any, family: Family):
    """``(method, adapter)`` of a PEFT LoRA directory on stacked params."""
    config = peft_read._read_config(directory)
    file = os.path.join(directory, peft_format.ADAPTER_WEIGHTS)
    lora, full = peft_read._split_tensors(peft_read._read_tensors(directory), file)
    if full:
        raise ValueError(f"{file!r} holds full weights {sorted(full)[:3]} (modules_to_save): not read onto "
                         f"{family.stack}, whose layers are stacked. Load the LoRA factors alone.")
    leaves = dict(named_leaves(params))
    modules = module_map(family, leaves)
    unknown = sorted(set(lora) - set(modules))
    if unknown:
        raise ValueError(peft_load.NOT_IN_PARAMS.format(missing=unknown[:5], known=sorted(modules)[:5]))
    half = sorted(m for m, t in lora.items() if len(t) != 2)
    if half:
        raise ValueError(f"{file!r}: {half[:3]} have lora_A or lora_B but not both.")
    grouped: dict[str, dict[int, str]] = {}
    for module in lora:
        path, i = modules[module]
        grouped.setdefault(path, {})[i] = module
    entries, scales, rank_of = {}, {}, {}
    for path, layers in sorted(grouped.items()):
        shape = leaves[path].shape
        found = {(lora[m]["lora_A"].shape[0], _alpha(config, m)) for m in layers.values()}
        if len(found) != 1:
            raise ValueError(f"{file!r}: the layers of {path!r} ({sorted(layers.values())[:3]}, ...) have different "
                             f"ranks or alphas {sorted(found)}; a stacked lrtt entry has one of each.")
        ((rank, alpha),) = found
        a = np.zeros((shape[0], shape[1], rank), np.float32)  # layers the file does not adapt: ΔW = 0
        b = np.zeros((shape[0], rank, shape[2]), np.float32)
        for i, module in layers.items():
            a_t, b_t = lora[module]["lora_A"], lora[module]["lora_B"]
            if a_t.shape != (rank, shape[1]) or b_t.shape != (shape[2], rank):
                raise ValueError(f"{file!r}: {module} has lora_A {a_t.shape}, lora_B {b_t.shape}; the kernel "
                                 f"{path!r} layer {i} is a ({shape[1]}, {shape[2]}) matrix: made for another model?")
            a[i], b[i] = a_t.T, b_t.T
        scale = alpha / (np.sqrt(rank) if config.get("use_rslora") else rank)
        entries[path] = LoraFactors(jnp.asarray(a), jnp.asarray(b), float(scale))
        scales[path], rank_of[path] = alpha, rank
    ranks = dict(rank_of)
    method = peft_load._method({**config, "r": max(set(ranks.values()), key=list(ranks.values()).count),
                                "lora_alpha": max(set(scales.values()), key=list(scales.values()).count),
                                "use_rslora": bool(config.get("use_rslora"))}, ranks, scales, [], leaves)
    return method, nest(entries)


def _alpha(config: dict, module: str) -> Any:
    return names.pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])

