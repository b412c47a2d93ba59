"""Hugging Face parameter names: transformers Flax param paths ↔ PyTorch module and parameter names.

transformers' Flax and PyTorch classes of one architecture name their modules alike, so a Flax
leaf ``<module>/<leaf>`` is the PyTorch parameter ``<module with '.' for '/'>.<param>``; only the
leaf names and orientations differ (the rules of transformers' own PyTorch→Flax converter):

=============================  =======================  ====================================
Flax leaf                      PyTorch parameter        tensor
=============================  =======================  ====================================
``kernel`` (2-D)               ``weight``               transposed: ``weight = kernel.T``
``embedding``                  ``weight``               as is ``(vocab, dim)``
``scale`` (LayerNorm)          ``weight``               as is
``weight`` (Llama RMSNorm)     ``weight``               as is
``bias``                       ``bias``                 as is
=============================  =======================  ====================================

``weight = kernel.T`` holds for GPT-2's ``Conv1D`` too: PyTorch stores it ``(in, out)`` and the
Flax port ``(out, in)``. Examples (``FlaxGPT2LMHeadModel`` ↔ ``GPT2LMHeadModel``, …)::

    transformer/h/0/attn/c_attn/kernel             ↔ transformer.h.0.attn.c_attn.weight
    model/layers/0/self_attn/q_proj/kernel         ↔ model.layers.0.self_attn.q_proj.weight
    bert/encoder/layer/0/attention/self/query/kernel ↔ bert.encoder.layer.0.attention.self.query.weight
    roberta/encoder/layer/0/output/LayerNorm/scale ↔ roberta.encoder.layer.0.output.LayerNorm.weight

A model with a head nests its base model under a prefix (its family's ``hf_prefix``, :mod:`lrtt._families`) in both
frameworks; a bare model (``FlaxGPT2Model`` ↔ ``GPT2Model``) has none. :func:`align` bridges a
checkpoint of one kind and params of the other, as transformers does when loading.

The last section mirrors how PEFT matches those names (``target_modules``, ``rank_pattern``,
``modules_to_save``), so that lrtt selects exactly the modules PEFT does.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Sequence

import numpy as np

from lrtt import _families

TIED_OUTPUT = "lm_head"  # the PyTorch module tied to a reused input embedding

TORCH_PARAM = {"kernel": "weight", "embedding": "weight", "scale": "weight", "weight": "weight", "bias": "bias"}


def _family(name: str | None) -> _families.Family | None:
    return None if name is None else _families.by_name(name)


def hf_families() -> tuple[str, ...]:
    """The families with a transformers PyTorch twin (a ``base_model_prefix``), by name."""
    return tuple(f.name for f in _families.FAMILIES if f.hf_prefix is not None)


def resolve_family(paths: Sequence[str], family: str | None = None) -> str | None:
    """The model family of a Flax param tree: ``family`` if given, else detected from ``paths``
    (:func:`lrtt._families.detect`). None for a tree of no known family (names are still mapped
    by the generic rules).

    Raises:
      ValueError: ``family`` is not one of :func:`hf_families`.
    """
    if family is not None:
        if family not in hf_families():
            raise ValueError(
                f"`family` must be one of {list(hf_families())} or None (detected from the param "
                f"paths), got {family!r}.")
        return family
    detected = _families.detect(paths)
    return None if detected is None else detected.name


def conv1d(family: str | None) -> bool:
    """Whether the family's linear layers are ``Conv1D`` (PEFT's ``fan_in_fan_out``)."""
    found = _family(family)
    return bool(found and found.conv1d)


def split_leaf(path: str) -> tuple[str, str]:
    """``"a/b/kernel"`` → ``("a/b", "kernel")``."""
    module, _, leaf = path.rpartition("/")
    return module, leaf


def torch_module(module: str) -> str:
    """A Flax module path → its PyTorch module name (``"transformer/h/0"`` → ``"transformer.h.0"``)."""
    return module.replace("/", ".")


def flax_module(name: str) -> str:
    """Inverse of :func:`torch_module`."""
    return name.replace(".", "/")


def torch_param(path: str) -> str | None:
    """The PyTorch parameter name of a Flax leaf path, or None when its leaf name has no rule."""
    module, leaf = split_leaf(path)
    param = TORCH_PARAM.get(leaf)
    if param is None:
        return None
    return f"{torch_module(module)}.{param}" if module else param


def to_torch(path: str, value: Any) -> np.ndarray:
    """A Flax leaf's value in PyTorch's layout (a 2-D ``kernel`` transposed, the rest as is).

    Raises:
      ValueError: a ``kernel`` that is not 2-D (no PyTorch ``Linear``/``Conv1D`` weight).
    """
    value = np.asarray(value)
    if split_leaf(path)[1] == "kernel":
        if value.ndim != 2:
            raise ValueError(
                f"{path!r} has shape {value.shape}: only 2-D kernels have a PyTorch Linear/Conv1D "
                "weight to map to. Leave it out of the adapter's `trainable` leaves."
            )
        return np.ascontiguousarray(value.T)
    return value


def from_torch(path: str, value: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_torch` for the leaf at ``path``."""
    if split_leaf(path)[1] == "kernel" and value.ndim == 2:
        return np.ascontiguousarray(value.T)
    return value


def modules(paths: Iterable[str]) -> dict[str, dict[str, str]]:
    """``{pytorch module name: {pytorch param name: flax path}}`` of every mappable leaf."""
    out: dict[str, dict[str, str]] = {}
    for path in paths:
        name = torch_param(path)
        if name is None:
            continue
        module, _, param = name.rpartition(".")
        out.setdefault(module, {})[param] = path
    return out


def tied_embedding(paths: Sequence[str], family: str | None) -> str | None:
    """The Flax embedding module that is also the LM head (GPT-2's ``transformer/wte``), or None.

    True of a causal-LM tree (base prefix present) that holds no ``lm_head`` of its own: the
    PyTorch class then has an ``lm_head`` whose weight is tied to that embedding.
    """
    found = _family(family)
    module = found.tied_embedding if found else None
    if module is None or f"{module}/embedding" not in paths:
        return None
    if any(p.startswith(f"{TIED_OUTPUT}/") for p in paths):
        return None
    return module


@dataclasses.dataclass(frozen=True)
class Alignment:
    """How PyTorch module names of a checkpoint map onto the Flax params' module names.

    ``torch_only``: a prefix the checkpoint has and the params lack (an adapter made on
    ``LlamaForCausalLM`` loaded onto ``FlaxLlamaModel`` params: ``"model."``); ``flax_only``:
    the reverse. At most one is set.
    """

    torch_only: str = ""
    flax_only: str = ""

    def to_flax(self, name: str) -> str | None:
        """A checkpoint module name → the name of the same module in the params (or None)."""
        if self.torch_only:
            return name[len(self.torch_only) :] if name.startswith(self.torch_only) else None
        return self.flax_only + name

    def to_torch(self, name: str) -> str | None:
        """A params module name → its name in the checkpoint's model (or None: not in it)."""
        if self.flax_only:
            return name[len(self.flax_only) :] if name.startswith(self.flax_only) else None
        return self.torch_only + name


def align(names: Iterable[str], known: set[str], family: str | None) -> Alignment | None:
    """The :class:`Alignment` under which every checkpoint module in ``names`` is in ``known``.

    Tries the identity, then dropping and adding the family's base prefix. None if none fits.
    """
    names = set(names)
    candidates = [Alignment()]
    found = _family(family)
    prefix = found.hf_prefix if found else None
    if prefix:
        candidates += [Alignment(torch_only=prefix + "."), Alignment(flax_only=prefix + ".")]
    for candidate in candidates:
        if all(candidate.to_flax(n) in known for n in names):
            return candidate
    return None


# --- PEFT's rules for module names (peft 0.21: tuners_utils.check_target_module_exists, ----------
# --- utils.other.get_pattern_key, utils.other._set_trainable, PeftModelFor<task>) ---------------

# Modules PeftModelFor<task> adds to `modules_to_save` by itself.
AUTO_MODULES_TO_SAVE = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def peft_targets(config: dict, module: str) -> bool:
    """Whether PEFT puts LoRA on ``module`` (a name relative to the base model)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, module):
            return False
        if not isinstance(exclude, str) and (module in exclude or any(module.endswith(f".{e}") for e in exclude)):
            return False
    for m in modules_to_save_names(config):
        if re.match(rf"(^|.*\.){m}($|\..*)", module):
            return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    found = any(module.endswith(f".{t}") for t in targets)
    layers = config.get("layers_to_transform")
    if found and layers is not None and (not isinstance(layers, list) or layers):
        patterns = config.get("layers_pattern")
        match = None
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
                if match:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers
    return found


def pattern_value(pattern: dict, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: first key ``k`` with ``(.*\\.)?(k)$``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def modules_to_save_names(config: dict) -> list[str]:
    """``modules_to_save`` of a config plus those its ``task_type`` adds."""
    return list(config.get("modules_to_save") or []) + list(AUTO_MODULES_TO_SAVE.get(config.get("task_type"), ()))


def saved_root(module: str, saved_names: Sequence[str]) -> str | None:
    """The module PEFT wraps as ``modules_to_save`` that holds ``module`` (itself or an ancestor)."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        candidate = ".".join(parts[:i])
        if any(candidate.endswith(n) for n in saved_names):
            return candidate
    return None


# --- einsum-shaped trees: google-tunix NNX models and the gemma package ----------------------------

EINSUM_FAMILIES = ("tunix_llama", "tunix_gemma", "gemma")
"""Families (:mod:`lrtt._families`) whose kernels are einsum-shaped, one per layer: PEFT names from
:func:`einsum_modules`, as :func:`lrtt.models.save_tunix` / :func:`lrtt.models.save_gemma` write
the checkpoint."""

_TUNIX_LAYER = r"(?:^|/)layers/(\d+)/"
_GEMMA_LAYER = r"(?:^|/)layer_(\d+)/"
_ATTN = "model.layers.{0}.self_attn."
_EINSUM_MODULES = (
    (_TUNIX_LAYER + r"attn/(q|k|v|o)_proj/w$", (_ATTN + "{1}_proj",)),  # tunix Llama 3, Qwen 2/3
    (_TUNIX_LAYER + r"mlp/(gate|up|down)_proj/kernel$", ("model.layers.{0}.mlp.{1}_proj",)),  # every tunix family
    (r"(?:^|/)lm_head/w$", ("lm_head",)),  # tunix Llama 3 / Qwen untied head
    ((_TUNIX_LAYER, _GEMMA_LAYER), None),  # Gemma attention, below, for both
    (_GEMMA_LAYER + r"mlp/gating_einsum$", ("model.layers.{0}.mlp.gate_proj", "model.layers.{0}.mlp.up_proj")),
    (_GEMMA_LAYER + r"mlp/linear$", ("model.layers.{0}.mlp.down_proj",)),
)
_GEMMA_ATTENTION = (
    (r"attn/q_einsum/w$", (_ATTN + "q_proj",)),
    (r"attn/kv_einsum/w$", (_ATTN + "k_proj", _ATTN + "v_proj")),
    (r"attn/qkv_einsum/w$", (_ATTN + "q_proj", _ATTN + "k_proj", _ATTN + "v_proj")),
    (r"attn/attn_vec_einsum/w$", (_ATTN + "o_proj",)),
)


def einsum_modules(path: str) -> tuple[str, ...] | None:
    """The PyTorch modules of a tunix / gemma-package kernel, or None.

    A fused kernel is several modules, its out columns split evenly among them in order:
    ``layers/3/attn/kv_einsum/w (2, K, D, H)`` -> ``("model.layers.3.self_attn.k_proj",
    "model.layers.3.self_attn.v_proj")``, ``layer_0/mlp/gating_einsum`` -> ``(…gate_proj, …up_proj)``.
    """
    for pattern, modules in _EINSUM_MODULES:
        if modules is None:  # Gemma's attention einsums, under tunix's layers/N/ or gemma's layer_N/
            for layer in pattern:
                for suffix, parts in _GEMMA_ATTENTION:
                    match = re.search(layer + suffix, path)
                    if match:
                        return tuple(m.format(*match.groups()) for m in parts)
            continue
        match = re.search(pattern, path)
        if match:
            return tuple(m.format(*match.groups()) for m in modules)
    return None
