"""Hugging Face PEFT's LoRA format: save lrtt adapters for PyTorch serving, load PEFT adapters.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
are ``base_model.model.<module>.lora_A.weight: (r, in)`` and ``….lora_B.weight: (out, r)`` in
PyTorch orientation, with ``ΔW_torch = (lora_alpha / r) · B_w @ A_w`` (``/ √r`` with
``use_rslora``). lrtt's ``A: (in, r)``, ``B: (r, out)`` are their transposes, whatever the
kernel's layout (GPT-2's ``Conv1D`` included: ``fan_in_fan_out`` only changes how PEFT merges).
Full-weight ``modules_to_save`` are stored as ``base_model.model.<module>.<param>``. Module names
come from :mod:`lrtt.io._hf_names`; PEFT's matching rules (``target_modules``, ``rank_pattern``,
``modules_to_save``) are mirrored from peft 0.21 and checked against it in the tests.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import re
import warnings
from typing import Any, Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from lrtt._errors import Error
from lrtt import _families
from lrtt._adapter import LoraFactors, Trainable, entries
from lrtt._extras import needs_extra
from lrtt._paths import exact_patterns, named_leaves, nest
from lrtt._resolve import resolve
from lrtt._targets import Target, first_match, select
from lrtt.io import _hf_names as names
from lrtt.io._array_checks import non_finite
from lrtt.io._checkpoint_errors import NonFiniteError
from lrtt.methods._lora import LoRA

class PeftFileError(Error, ValueError):
    """A file of a PEFT adapter directory does not read: truncated safetensors, invalid JSON."""


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# LoraConfig fields that turn LoRA into a variant lrtt does not compute (any truthy value).
_VARIANT_FIELDS = ("lora_bias", "use_qalora", "alora_invocation_tokens", "layer_replication", "target_parameters",
                   "trainable_token_indices", "use_bdlora", "arrow_config", "velora_config", "kasa_config",
                   "monteclora_config", "megatron_config")
# `init_lora_weights` values that rewrite the base weights (the adapter needs the residual model).
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

NO_PEFT_EQUIVALENT = (
    "{method} has no PEFT equivalent: PEFT's LoRA format holds only linear low-rank updates "
    "W0 + s·A·B (LoRA, and LorettaRep materialized as LoRA), and LorettaAdp's adapters "
    "f(h) = s·U(act(D(h))) are non-linear bottlenecks. Serve it through lrtt.factored, or train "
    "with lrtt.LoRA / lrtt.LorettaRep to export to PEFT."
)
NOT_LORA = (
    "{directory!r} holds a PEFT {kind} adapter; lrtt reads plain LoRA only (peft_type 'LORA' "
    "without use_dora). {kind} computes a different update than W0 + (alpha/r)·B·A, so loading "
    "it as LoRA would give a different model. Convert it with peft (e.g. merge_and_unload) or "
    "train a LoRA adapter."
)
EMPTY_ADAPTER = (
    "{file!r} contains no tensors. This is what FSDP / DeepSpeed ZeRO-3 writes when the adapter "
    "is saved from a sharded model without gathering its parameters (PEFT would load it as an "
    "adapter that does nothing). Save again with the full state dict gathered (e.g. "
    "accelerator.get_state_dict(model) passed to save_pretrained(state_dict=...))."
)
NO_PREFIX = (
    "these tensors in {file!r} do not start with 'base_model.model.': {keys}. PEFT loads such "
    "keys as an adapter that does nothing (only a warning). Rename them to "
    "'base_model.model.<module name>.lora_A.weight' (the module names of the PyTorch model)."
)
NOT_IN_PARAMS = (
    "the adapter names modules that the params do not have: {missing}. The params' modules "
    "are e.g. {known}. Was the adapter made for another model? Load it onto the Flax class that "
    "matches the PyTorch one it was trained on (FlaxGPT2LMHeadModel for GPT2LMHeadModel, …) "
    "or pass `family`."
)
UNTIED = (
    "{why} The Flax params tie the LM head to {embedding!r} (they hold no lm_head), so the "
    "adapter's model cannot be reproduced. Save from PEFT with both modules in "
    "modules_to_save and ensure_weight_tying=True, or load onto params with an untied lm_head."
)


# --- save -------------------------------------------------------------------------------------


def save_peft(
    directory: str | os.PathLike,
    method: Any,
    adapter: Any,
    params: Any,
    *,
    family: str | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    check: str | None = None,
) -> dict:
    """Write ``adapter`` as a PEFT LoRA directory that ``PeftModel.from_pretrained`` loads.

    Each low-rank entry becomes ``lora_A.weight = Aᵀ: (r, in)``, ``lora_B.weight = Bᵀ: (out, r)``
    with ``lora_alpha = scale·r`` (``scale·√r`` with rslora), so PEFT's ``lora_alpha / r`` is
    the entry's scale; the most common ``r`` / ``lora_alpha`` go to ``r`` / ``lora_alpha``, the
    others to ``rank_pattern`` / ``alpha_pattern``. A :class:`lrtt.LorettaRep` entry is written
    as the plain LoRA it equals, ``ΔW = (α/r)·TT_A·TT_B``, with ``TT_A``, ``TT_B`` materialized.
    ``Trainable`` leaves are saved as ``modules_to_save``: whole PyTorch modules, their
    untrained parameters taken from ``params``.

    On google-tunix NNX trees (Llama 3, Qwen 2/3, Gemma, Gemma 3) and the gemma package's params,
    modules get the Hugging Face names of the checkpoint :func:`lrtt.models.save_tunix` /
    :func:`lrtt.models.save_gemma` write (``model.layers.N.self_attn.q_proj``, ...): each einsum
    kernel is read as the ``(in, out)`` matrix of its family layout (``q_proj/w (D, N, H)``: in D,
    out N·H), and a fused kernel (``kv_einsum``, ``qkv_einsum``, ``gating_einsum``) becomes one
    LoRA per module, sharing ``A``, each with its column block of ``B``.

    Args:
      directory: created if missing; ``adapter_config.json`` and ``adapter_model.safetensors``
        are overwritten.
      method: the :class:`lrtt.LoRA` or :class:`lrtt.LorettaRep` that made ``adapter``.
      adapter: the adapter tree.
      params: the Flax params the adapter was made for (paths, layouts, base values).
      family: a family name of :mod:`lrtt._families` with a PyTorch twin (``"gpt2"``, ``"llama"``, ``"bert"``, ...); None detects it.
      base_model_name_or_path: written to the config (the Hub id PEFT loads the base from).
      task_type: PEFT's task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, …) or None.
      check: ``"vllm"``: refuse, before anything is written, an adapter vLLM does not serve
        (:func:`check_vllm`): a rank that is not one of vLLM's ``max_lora_rank`` values
        :data:`VLLM_RANKS`, LoRA on an embedding or the head, ``modules_to_save`` (lrtt's
        ``trainable`` leaves), DoRA. None (default): no serving check.

    Returns:
      The ``adapter_config.json`` dict written.

    Raises:
      NonFiniteError: a factor or trained tensor holds NaN or inf (nothing is written).
      ValueError: LorettaAdp (no PEFT equivalent), an empty adapter, stacked (``nn.scan``)
        factors of a family with no per-layer PyTorch names (``lrtt.models``' params have them:
        ``model.layers.N.self_attn.q_proj``, :mod:`lrtt.io._peft_stacked`), LoRA on a leaf that is not a kernel, a ``trainable`` leaf inside a LoRA target,
        or an unknown ``family`` / ``task_type`` / ``check``; with ``check="vllm"``, what vLLM
        would refuse (the message says what to change). On tunix / gemma-package trees: an entry
        on a leaf with no PyTorch Linear (embeddings, norms, Qwen 3 MoE experts), a layout other than
        the family's (per-head adapters), ``trainable`` leaves; MaxText params (no PyTorch names:
        the message names MaxText's conversion scripts).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, lrtt
      >>> params = {"layers": {"0": {"self_attn": {"q_proj": {"kernel": jnp.ones((16, 32))}}}}}
      >>> method = lrtt.LoRA(rank=4, alpha=8, targets="q_proj")
      >>> adapter = jax.tree.map(lambda x: x + 1.0, method.init(jax.random.key(0), params))
      >>> directory = tempfile.mkdtemp()
      >>> config = lrtt.save_peft(directory, method, adapter, params)
      >>> config["r"], config["lora_alpha"], config["target_modules"]
      (4, 8, ['q_proj'])
      >>> method, loaded = lrtt.load_peft(directory, params)
      >>> jax.tree.map(jnp.shape, loaded)["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
      LoraFactors(a=(16, 4), b=(4, 32), scale=2.0)
    """
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"`task_type` must be one of {list(TASK_TYPES)} or None, got {task_type!r}.")
    if check not in CHECKS:
        raise ValueError(f"`check` must be one of {list(CHECKS)}, got {check!r}.")
    leaves = dict(named_leaves(params))
    family = names.resolve_family(list(leaves), family)
    low_rank, trained, targets = _savable_entries(method, adapter, params)
    if check == "vllm" and trained:
        raise ValueError(
            f"vLLM does not serve modules_to_save, and the adapter trains {len(trained)} leaf/leaves in full "
            f"(lrtt's `trainable`): {sorted(trained)[:3]}. Train without `trainable` (method.trainable=None), "
            "or export the merged model instead (lrtt.models.save / lrtt export --format hf).")
    _refuse_unnamed(family, "saved")
    stacked = _stacked_family(family)
    if stacked is not None:  # layers stacked on a leading axis: one PyTorch module per layer
        from lrtt.io import _peft_stacked

        tensors, ranks, alphas, candidates = _peft_stacked.save_tensors(method, low_rank, trained, stacked, leaves)
        modules_to_save, tie = [], False
    elif family in names.EINSUM_FAMILIES:  # tunix NNX, gemma package: einsum kernels, fused q/k/v, gate/up
        tensors, ranks, alphas, candidates = _einsum_tensors(method, low_rank, trained, family, targets, leaves)
        modules_to_save, tie = [], False
    else:
        tensors, ranks, alphas = _lora_tensors(method, low_rank, targets)
        modules_to_save, saved, tie = _modules_to_save(trained, leaves, family, task_type, set(ranks))
        tensors.update(saved)
        modules = _flax_modules(leaves)
        candidates = {names.torch_module(m) for m, ls in modules.items() if {"kernel", "embedding"} & set(ls)}
    config = _adapter_config(method, ranks, alphas, candidates, modules_to_save, tie, family, task_type)
    config["base_model_name_or_path"] = base_model_name_or_path  # the Hub id PEFT loads the base from
    if check == "vllm":
        check_vllm(config, ranks)
    bad = non_finite(tensors)
    if bad:
        raise NonFiniteError(
            f"refusing to write {directory}: {len(bad)} tensor(s) of the adapter hold NaN or inf: {bad[:5]}. "
            "Nothing was written. The training run diverged: save an earlier checkpoint's adapter, or "
            "retrain with a lower learning rate."
        )
    _write(directory, config, tensors)
    return config


CHECKS = (None, "vllm")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM's ``max_lora_rank`` choices (``--max-lora-rank``); ``check="vllm"`` keeps every rank to one of them."""
_VLLM_NOT_LORA = re.compile(r"(^|\.)(embed_tokens|embed_in|embed_out|wte|wpe|word_embeddings|embeddings|lm_head|"
                            r"score|classifier|output)$")
"""PyTorch module names vLLM has no LoRA layer for (embeddings, the head, classification heads)."""


def check_vllm(config: dict, ranks: dict[str, int]) -> None:
    """Refuse a PEFT LoRA adapter vLLM does not serve, saying what to change (one ValueError).

    ``config`` is the ``adapter_config.json`` dict :func:`save_peft` would write, ``ranks`` each
    adapted PyTorch module's rank. vLLM's rules: every rank one of :data:`VLLM_RANKS` (its
    ``max_lora_rank`` choices), LoRA only on linear layers of the decoder (not embeddings nor
    ``lm_head``), no ``modules_to_save``, no DoRA (``use_dora``), bias ``"none"``.
    """
    problems = []
    choices = "{" + ", ".join(map(str, VLLM_RANKS)) + "}"
    for rank in sorted(set(ranks.values())):
        if rank not in VLLM_RANKS:
            up = [r for r in VLLM_RANKS if r >= rank]
            fix = f"use rank={up[0]}" if up else f"use rank={VLLM_RANKS[-1]} or less"
            where = sorted(m for m, r in ranks.items() if r == rank)
            shown = "" if len(set(ranks.values())) == 1 else f" (at {where[:2]}{', ...' if len(where) > 2 else ''})"
            problems.append(f"rank {rank}{shown} is not one vLLM serves: {fix} (max_lora_rank ∈ {choices})")
    bad = sorted(m for m in ranks if _VLLM_NOT_LORA.search(m))
    if bad:
        problems.append(f"vLLM serves LoRA on linear layers of the decoder only, not on {bad[:3]}: drop them from "
                        "`targets` (e.g. targets='all-linear' or 'attention')")
    if config.get("modules_to_save"):
        problems.append(f"vLLM does not serve modules_to_save {config['modules_to_save'][:3]}: train without "
                        "`trainable`, or export the merged model")
    if config.get("use_dora"):
        problems.append("vLLM does not serve DoRA (use_dora=True): train plain LoRA")
    if config.get("bias", "none") != "none":
        problems.append(f"vLLM serves bias='none' only, got {config['bias']!r}")
    if problems:
        raise ValueError("not written: " + "; ".join(problems) + ".")


def _stacked_family(family: str | None):
    """The :class:`lrtt._families.Family` of stacked-layer params with per-layer PyTorch modules, or None."""
    if family is None:
        return None
    found = _families.by_name(family)
    if found.name == "lrtt_models_gpt2":
        raise ValueError(
            "PEFT files of lrtt.models' GPT-2 are not supported: lrtt holds q, k and v apart, PEFT's GPT-2 "
            "adapts the fused c_attn. Export the merged model with lrtt.models.save instead.")
    return found if found.peft_modules else None


_UNNAMED = {
    "maxtext": (
        "MaxText params (decoder/layers/self_attention/query/kernel, ...) have no Hugging Face module names in lrtt "
        "(they depend on MaxText's decoder block and scan settings), so no PEFT file can be {verb} for them. "
        "Convert the checkpoint with MaxText's conversion scripts (MaxText/utils/ckpt_conversion, to Hugging "
        "Face) and train on lrtt.models.load(<it>), whose adapters lrtt.save_peft writes; or export the merged "
        "params with lrtt.merge and convert those."
    ),
}
"""Families of :mod:`lrtt._families` whose params have no PyTorch twin in lrtt: why, and what to do."""
_SAVER = {"tunix_llama": "save_tunix", "tunix_gemma": "save_tunix", "gemma": "save_gemma"}
"""The :mod:`lrtt.models` function writing the Hugging Face checkpoint of an einsum family's params."""


def _refuse_unnamed(family: str | None, verb: str) -> None:
    if family in _UNNAMED:
        raise ValueError(_UNNAMED[family].format(verb=verb))


def _einsum_tensors(method: Any, low_rank: dict[str, Any], trained: dict[str, Any], family: str,
                    targets: dict[str, Target], leaves: dict[str, Any]):
    """``(tensors, {module: rank}, {module: lora_alpha}, candidate modules)`` of an adapter on a
    google-tunix NNX tree or gemma-package params, under the Hugging Face names
    :func:`lrtt.models.save_tunix` / :func:`lrtt.models.save_gemma` write.

    Each kernel is read as the ``(in, out)`` matrix of its family layout (``q_proj/w (D, N, H)``
    ``'in out out'``: in = D, out = N·H in row-major order, the rows of PyTorch's ``q_proj.weight
    (N·H, D)``; ``o_proj/w (N, H, D)`` ``'in in out'``: in = N·H), so ``lora_A = Aᵀ: (r, in)``,
    ``lora_B = Bᵀ: (out, r)``. A fused kernel (Gemma's ``kv_einsum (2, K, D, H)``: out = (2, K, H))
    is one LoRA per part: the shared ``A``, and ``B``'s column block of that part (the gemma
    package's ``gating_einsum (2, F, D)``: out = (2, F), gate then up).
    """
    found = _families.by_name(family)
    saver = f"lrtt.models.{_SAVER[family]}"
    if trained:
        raise ValueError(
            f"cannot write trainable leaves {sorted(trained)[:3]} of {found.stack} as PEFT modules_to_save "
            "(lrtt maps only their linear kernels to PyTorch modules). Save the LoRA factors alone (method "
            f"without `trainable`), or export the merged model with {saver}.")
    shapes = {p: tuple(v.shape) for p, v in leaves.items()}
    candidates = {m for p in leaves for m in (names.einsum_modules(p) or ())}
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, Any] = {}
    all_zero = True
    for path in sorted(low_rank):
        entry, target = low_rank[path], targets[path]
        modules = names.einsum_modules(path)
        if modules is None:
            if re.search(r"(^|/)mlp/(gate|up|down)_proj$", path):
                why = ("it is a tunix Qwen 3 mixture-of-experts kernel (E, in, out): lrtt writes no per-expert PEFT "
                       "modules. Target the attention projections (targets='attention')")
            else:
                why = ("only the attention projections, the MLP kernels and lm_head have PyTorch Linear modules "
                       "(PEFT adapts those). Target those (targets='qv', 'attention' or 'all-linear')")
            raise ValueError(f"cannot write the LoRA entry at {path!r} in PEFT's format: {why}, or export the "
                             f"merged model with {saver}.")
        expected = found.layout_of(path, shapes[path], shapes) or ("in out" if len(shapes[path]) == 2 else None)
        if expected is None and re.search(r"(^|/)mlp/gating_einsum$", path):
            # (2, F, D) or (2, D, F), not decidable from the shapes (F == D): either reading puts gate, up first
            expected = str(target.layout) if str(target.layout) in ("out out in", "out in out") else "out out in"
        if str(target.layout) != expected:
            raise ValueError(
                f"cannot write the LoRA entry at {path!r} in PEFT's format: the adapter reads the kernel "
                f"{shapes[path]} as layout {str(target.layout)!r}, but the PyTorch weight of "
                f"{list(modules)} is its (in, out) matrix under {expected!r}"
                + (" (a 'layer' axis makes one adapter per head or per slice, not one per module)" if target.stack
                   else "")
                + f". Train with the family's layout (drop `layouts` for {path!r}), or export the merged model "
                f"with {saver}.")
        a, b = (np.asarray(m, np.float32) for m in entry.factor_matrices())
        rank = a.shape[-1]
        if a.shape != (target.n_in, rank) or b.shape != (rank, target.n_out) or target.n_out % len(modules):
            raise ValueError(
                f"the factors at {path!r} have shapes A {a.shape}, B {b.shape} but the kernel is a "
                f"({target.n_in}, {target.n_out}) matrix: the adapter was made for another model.")
        width = target.n_out // len(modules)
        for j, module in enumerate(modules):
            tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b[:, j * width:(j + 1) * width].T)
            ranks[module] = rank
            alphas[module] = _alpha(method, path, rank, entry.scale)
        all_zero = all_zero and not (np.any(a) and np.any(b))
    if all_zero:
        warnings.warn("every LoRA update of the adapter is zero (B = 0): was it trained?", stacklevel=3)
    return tensors, ranks, alphas, candidates


def _savable_entries(method: Any, adapter: Any, params: Any):
    """``({path: low-rank entry}, {path: trained array}, {path: Target})`` of an adapter PEFT can
    hold, checked against ``params`` (:func:`lrtt.resolve`).

    Raises:
      ValueError: a non-mergeable method, an entry of another kind, or no low-rank entry.
      AdapterMismatchError: the adapter does not fit ``params``.
    """
    if not method.mergeable:
        raise ValueError(NO_PEFT_EQUIVALENT.format(method=type(method).__name__))
    found = entries(adapter)
    low_rank = {p: e for p, e in found.items() if e.low_rank}
    trained = {p: e.value for p, e in found.items() if e.whole_leaf}
    others = sorted(set(found) - set(low_rank) - set(trained))
    if others:
        kinds = sorted({type(found[p]).__name__ for p in others})
        what = f"{type(method).__name__} ({', '.join(kinds)} at {others[:3]})"
        raise ValueError(NO_PEFT_EQUIVALENT.format(method=what))
    if not low_rank:
        raise ValueError(
            "the adapter has no LoRA factors to save (PEFT's format needs at least one target). "
            "Pass the adapter returned by method.init(key, params) after training."
        )
    return low_rank, trained, resolve(method, params, adapter).targets


def _lora_tensors(method: Any, low_rank: dict[str, Any], targets: dict[str, Target]):
    """``(tensors, {module: rank}, {module: lora_alpha})``: ``lora_A.weight = Aᵀ: (r, in)`` and
    ``lora_B.weight = Bᵀ: (out, r)`` per adapted kernel, under PEFT's key names."""
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    all_zero = True
    for path in sorted(low_rank):
        entry, target = low_rank[path], targets[path]
        module, leaf = names.split_leaf(path)
        if leaf != "kernel" or target.stack:
            raise ValueError(
                f"cannot write the LoRA entry at {path!r} (layout {str(target.layout)!r}) in PEFT's "
                "format: PEFT adapts one PyTorch Linear/Conv1D weight per module, i.e. an unstacked "
                "'kernel' leaf. Unstack nn.scan layers first; LoRA on embeddings is not exported."
            )
        a, b = (np.asarray(m) for m in entry.factor_matrices())
        if a.shape != (target.n_in, a.shape[-1]) or b.shape != (a.shape[-1], target.n_out):
            raise ValueError(
                f"the factors at {path!r} have shapes A {a.shape}, B {b.shape} but the kernel is a "
                f"({target.n_in}, {target.n_out}) matrix: the adapter was made for another model."
            )
        name = names.torch_module(module)
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
        ranks[name] = rank = a.shape[-1]
        alphas[name] = _alpha(method, path, rank, entry.scale)
        all_zero = all_zero and not (np.any(a) and np.any(b))
    if all_zero:
        warnings.warn("every LoRA update of the adapter is zero (B = 0): was it trained?", stacklevel=3)
    return tensors, ranks, alphas


def _adapter_config(method, ranks, alphas, candidates, modules_to_save, tie, family, task_type) -> dict:
    """PEFT's ``adapter_config.json``: the most common rank and alpha, the others as patterns."""
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    scope = {"modules_to_save": modules_to_save, "task_type": task_type}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": float(method.dropout),
        "use_rslora": _rslora(method),
        "target_modules": _target_names(set(ranks), candidates, scope),
        "rank_pattern": _pattern_keys({m: v for m, v in ranks.items() if v != r}, ranks, r),
        "alpha_pattern": _pattern_keys({m: v for m, v in alphas.items() if v != lora_alpha}, alphas, lora_alpha),
        "fan_in_fan_out": names.conv1d(family),
        "bias": "none",
        "modules_to_save": modules_to_save or None,
        "ensure_weight_tying": tie,
        "init_lora_weights": True,
        "use_dora": False,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }


def _write(directory, config: dict, tensors: dict[str, np.ndarray]) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with needs_extra():
        from safetensors.numpy import save_file

    save_file(dict(sorted(tensors.items())), os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})


def _rslora(method: Any) -> bool:
    """PEFT's ``use_rslora`` (``s = alpha / √r``): LoRA's option; LorettaRep scales by ``alpha / r``."""
    return isinstance(method, LoRA) and method.rslora


def _targets(params: Any, paths: Iterable[str], layouts) -> dict[str, Target]:
    """``{path: Target}`` (shape, layout; the family's layout presets apply) of the given leaves."""
    paths = set(paths)
    found = {t.path: t for t in select(params, exact_patterns(paths), layouts=layouts, require=False)}
    if paths - set(found):
        raise ValueError(
            f"the adapter names leaves the params do not have: {sorted(paths - set(found))[:5]}. Was "
            "the adapter made for another model?"
        )
    return found


def _alpha(method: Any, path: str, rank: int, scale: float) -> float:
    """``lora_alpha`` giving ``scale`` under PEFT's rule; the method's own alpha when it agrees."""
    divisor = math.sqrt(rank) if _rslora(method) else rank
    declared = method.alpha  # LorettaRep: one alpha
    if isinstance(method, LoRA):
        declared = first_match(path, method.alpha_pattern)
        if declared is None:
            declared = rank if method.alpha is None else method.alpha
    alpha = declared if declared is not None and float(declared) / divisor == scale else scale * divisor
    return int(alpha) if float(alpha).is_integer() else float(alpha)


def _flax_modules(leaves: Iterable[str]) -> dict[str, dict[str, str]]:
    """``{flax module path: {leaf name: path}}``."""
    out: dict[str, dict[str, str]] = {}
    for path in leaves:
        module, leaf = names.split_leaf(path)
        out.setdefault(module, {})[leaf] = path
    return out


def _target_names(selected: set[str], candidates: set[str], scope: dict) -> list[str]:
    """``target_modules``: the short names (``["c_attn"]``) when PEFT's rule picks exactly
    ``selected`` among the model's modules with them, else every full module name."""
    short = sorted({m.rsplit(".", 1)[-1] for m in selected})
    config = {**scope, "target_modules": short}
    if {c for c in candidates | selected if names.peft_targets(config, c)} == selected:
        return short
    return sorted(selected)


def _pattern_keys(overrides: dict[str, Any], every: dict[str, Any], default: Any) -> dict[str, Any]:
    """``rank_pattern`` / ``alpha_pattern`` keys that give each module of ``every`` its value
    under PEFT's lookup: short names where they are unambiguous, full module names otherwise."""
    if not overrides:
        return {}
    by_short = collections.defaultdict(set)
    for module, value in every.items():
        by_short[module.rsplit(".", 1)[-1]].add(value)
    for keys in (
        {m.rsplit(".", 1)[-1]: v for m, v in overrides.items() if len(by_short[m.rsplit(".", 1)[-1]]) == 1}
        | {m: v for m, v in overrides.items() if len(by_short[m.rsplit(".", 1)[-1]]) > 1},
        {m: v for m, v in sorted(overrides.items())},
        {re.escape(m): v for m, v in sorted(overrides.items())},
    ):
        if all(names.pattern_value(keys, m, default) == v for m, v in every.items()):
            return keys
    raise AssertionError("no rank_pattern keys reproduce the ranks")  # re.escape'd names always do


def _modules_to_save(
    trained: dict[str, Any], leaves: dict[str, Any], family: str | None, task_type: str | None, lora_modules: set[str]
) -> tuple[list[str], dict[str, np.ndarray], bool]:
    """``(modules_to_save, their tensors, ensure_weight_tying)`` for the ``Trainable`` leaves."""
    auto = names.AUTO_MODULES_TO_SAVE.get(task_type, ())
    unknown = sorted(set(trained) - set(leaves))
    if unknown:
        raise ValueError(f"the adapter trains leaves the params do not have: {unknown[:5]}; made for another model?")
    modules: dict[str, str] = {}  # torch module → flax module
    for path in trained:
        module = names.split_leaf(path)[0]
        root = names.saved_root(names.torch_module(module), auto) or names.torch_module(module)
        modules[root] = names.flax_module(root)
    tensors: dict[str, np.ndarray] = {}
    for root, flax_root in sorted(modules.items()):
        for path, leaf in leaves.items():
            if not (path.startswith(flax_root + "/")):
                continue
            name = names.torch_param(path)
            if name is None:
                raise ValueError(f"the trainable module {root!r} holds {path!r}, which has no PyTorch name rule.")
            tensors[KEY_PREFIX + name] = names.to_torch(path, trained.get(path, leaf))
        clash = sorted(m for m in lora_modules if re.match(rf"(^|.*\.){re.escape(root)}($|\..*)", m))
        if clash:
            raise ValueError(
                f"the adapter trains {root!r} in full (trainable) and puts LoRA on {clash[:3]} inside "
                "it; PEFT never adds LoRA to a module in modules_to_save. Drop one of the two."
            )
    tie = False
    embedding = names.tied_embedding(list(leaves), family)
    if embedding is not None and names.torch_module(embedding) in modules:
        # The PyTorch LM head is a separate module tied to the embedding: save it too, and ask
        # PEFT to keep the two tied, so the served model uses the trained table for both.
        table = tensors[f"{KEY_PREFIX}{names.torch_module(embedding)}.weight"]
        tensors[f"{KEY_PREFIX}{names.TIED_OUTPUT}.weight"] = table
        modules[names.TIED_OUTPUT] = names.TIED_OUTPUT
        tie = True
    return sorted(modules), tensors, tie


# --- load -------------------------------------------------------------------------------------


def load_peft(directory: str | os.PathLike, params: Any, *, family: str | None = None) -> tuple[LoRA, dict]:
    """Read a PEFT LoRA directory as an lrtt ``(method, adapter)`` for ``params``.

    ``lora_A.weight: (r, in)``, ``lora_B.weight: (out, r)`` become ``LoraFactors(a = Aᵀ,
    b = Bᵀ, scale = lora_alpha / r)`` (``/ √r`` with ``use_rslora``; ``r`` and ``lora_alpha``
    per module through ``rank_pattern`` / ``alpha_pattern``, matched as PEFT does), factors in
    float32; ``modules_to_save`` tensors become ``Trainable`` leaves in the params' dtype. The
    returned :class:`lrtt.LoRA` selects exactly the loaded kernels, so ``method.init(key,
    params)`` has the adapter's tree structure.

    Args:
      directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the Flax params of the model the adapter was trained on (the class that matches
        the PyTorch one; a base-model prefix difference such as ``model.`` is bridged).
      family: a family name of :mod:`lrtt._families` with a PyTorch twin (``"gpt2"``, ``"llama"``, ``"bert"``, ...); None detects it.

    Returns:
      ``(method, adapter)``; ``lrtt.merge(method, params, adapter)`` gives the adapted params.

    Raises:
      PeftFileError: ``adapter_config.json`` is not valid JSON (line and column named), or
        ``adapter_model.safetensors`` does not parse (truncated or damaged).
      NonFiniteError: a tensor of the file holds NaN or inf.
      ValueError: a PEFT type other than plain LoRA (DoRA, LoHa, LoKr, IA3, …) or a LoRA variant;
        ``r``, ``lora_alpha`` or ``target_modules`` missing from the config; no tensors; keys
        without ``base_model.model.``; ``target_modules`` matching no module of the params;
        missing or extra tensors; shape mismatches; params of google-tunix, the gemma package or
        MaxText (load onto ``lrtt.models.load``'s params of the Hugging Face checkpoint instead).
    """
    leaves = dict(named_leaves(params))
    family = names.resolve_family(list(leaves), family)
    _refuse_unnamed(family, "loaded")
    if family in names.EINSUM_FAMILIES:
        raise ValueError(
            f"load_peft onto {_families.by_name(family).stack} params is not supported (lrtt writes PEFT files "
            "of these trees, it does not read them back onto their einsum kernels). Load the adapter onto the "
            "Hugging Face checkpoint's params instead: model, params = lrtt.models.load(<checkpoint>) (write one "
            f"from these params with lrtt.models.{_SAVER[family]}), then lrtt.load_peft(directory, params).")
    stacked = _stacked_family(family)
    if stacked is not None:
        from lrtt.io import _peft_stacked

        return _peft_stacked.load(directory, params, stacked)
    config = _read_config(directory)
    file = os.path.join(directory, ADAPTER_WEIGHTS)
    lora, full = _split_tensors(_read_tensors(directory), file)
    flax_modules = names.modules(leaves)
    embedding = names.tied_embedding(list(leaves), family)
    tied_head = full.pop(f"{names.TIED_OUTPUT}.weight", None) if embedding else None
    alignment = names.align(set(lora) | {k.rpartition(".")[0] for k in full}, set(flax_modules), family)
    if alignment is None:
        unknown = sorted(m for m in set(lora) | {k.rpartition(".")[0] for k in full} if m not in flax_modules)
        raise ValueError(NOT_IN_PARAMS.format(missing=unknown[:5], known=sorted(flax_modules)[:5]))
    _check_sets(_targeted_modules(config, lora, flax_modules, alignment, directory), lora, file)
    flat, ranks, alphas = _lora_factors(config, lora, flax_modules, alignment, params)
    flat.update(_load_saved(config, full, flax_modules, alignment, leaves, set(flat), file))
    if embedding is not None:
        _check_tied(embedding, tied_head, full, alignment)
    method = _method(config, ranks, alphas, sorted(p for p, e in flat.items() if isinstance(e, Trainable)), leaves)
    return method, nest(flat)


def _split_tensors(tensors: dict[str, np.ndarray], file: str):
    """``({module: {"lora_A": A, "lora_B": B}}, {full weight key: tensor})`` of a PEFT file.

    Raises:
      ValueError: a tensor of a LoRA variant (LoRA on embeddings, DoRA magnitudes, ...).
    """
    lora: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    full: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"(.+)\.(lora_[AB])\.weight", key)
        if match:
            lora[match.group(1)][match.group(2)] = value
        elif re.search(r"(^|\.)(lora_|modules_to_save\.)", key):
            raise ValueError(
                f"unexpected tensor {KEY_PREFIX}{key!r} in {file!r}: plain LoRA stores only "
                "'<module>.lora_A.weight', '<module>.lora_B.weight' and the full weights of "
                "modules_to_save (LoRA on embeddings and other variants are not read)."
            )
        else:
            full[key] = value
    return lora, full


def _targeted_modules(config: dict, lora: dict, flax_modules: dict, alignment, directory) -> set[str]:
    """The PyTorch modules the config's ``target_modules`` selects among the params' kernels and
    embeddings (as PEFT would on the PyTorch model).

    Raises:
      ValueError: it selects none.
    """
    candidates = {}
    for module, params_of in flax_modules.items():
        torch_name = alignment.to_torch(module)
        if torch_name is not None and {"kernel", "embedding"} & {names.split_leaf(p)[1] for p in params_of.values()}:
            candidates[torch_name] = module
    if config["target_modules"] == "all-linear":
        # Which linears PEFT chose depends on the PyTorch model; the file is the record. Within it,
        # a module kind (its name with layer indices as '*') present in one layer must be present
        # in every layer, unless the config restricts the layers: a truncated file is caught.
        targeted = set(lora)
        if config.get("layers_to_transform") in (None, []):
            kind = functools.partial(re.sub, r"\.\d+\.", ".*.")  # 'h.3.attn.c_attn' -> 'h.*.attn.c_attn'
            kinds = {kind(m) for m in lora}
            targeted |= {m for m in candidates if kind(m) in kinds}
    else:
        targeted = {m for m in candidates if names.peft_targets(config, m)}
    if not targeted:
        raise ValueError(
            f"`target_modules` {config['target_modules']!r} of {directory!r} matches no module of the "
            f"params (PEFT matches a list by exact name or '.'-suffix, a string by re.fullmatch). "
            f"The params' modules are e.g. {sorted(candidates)[:8]}. Was the adapter made for "
            "another model?"
        )
    return targeted


def _lora_factors(config: dict, lora: dict, flax_modules: dict, alignment, params: Any):
    """``({kernel path: LoraFactors}, {path: r}, {path: lora_alpha})``: ``a = Aᵀ: (in, r)``,
    ``b = Bᵀ: (r, out)`` in float32, ``scale = alpha / r`` (``/ √r`` with ``use_rslora``).

    Raises:
      ValueError: LoRA on a leaf that is not a kernel, or factors of the wrong shape.
    """
    kernels = {}
    for module in sorted(lora):
        path = flax_modules[alignment.to_flax(module)].get("weight")
        if path is None or names.split_leaf(path)[1] != "kernel":
            raise ValueError(
                f"LoRA on {module!r} (the params' {path!r}) is not read: only kernels (PyTorch "
                "Linear/Conv1D weights) are, not embeddings or norms."
            )
        kernels[module] = path
    targets = _targets(params, kernels.values(), ())
    flat: dict[str, Any] = {}
    ranks, alphas = {}, {}
    for module, path in kernels.items():
        a, b, target = lora[module]["lora_A"], lora[module]["lora_B"], targets[path]
        r = names.pattern_value(config["rank_pattern"], module, config["r"])
        expected = {"lora_A": (r, target.n_in), "lora_B": (target.n_out, r)}
        for name, value in (("lora_A", a), ("lora_B", b)):
            if value.shape != expected[name] or target.stack:
                raise ValueError(
                    f"shape mismatch: {KEY_PREFIX}{module}.{name}.weight has shape {value.shape}, but "
                    f"{path!r} is a ({target.n_in}, {target.n_out}) (in, out) matrix and the config "
                    f"gives this module r={r}, so PEFT expects {expected[name]}. Was the adapter made "
                    "for another model, or is `r` / `rank_pattern` wrong?"
                )
        alpha = names.pattern_value(config["alpha_pattern"], module, config["lora_alpha"])
        scale = float(alpha) / (math.sqrt(r) if config["use_rslora"] else r)
        flat[path] = LoraFactors(jnp.asarray(a.T, jnp.float32), jnp.asarray(b.T, jnp.float32), scale=scale)
        ranks[path], alphas[path] = r, alpha
    return flat, ranks, alphas


def _load_json(path: str) -> dict:
    """The JSON object in ``path``.

    Raises:
      PeftFileError: the file is not UTF-8 JSON (naming the line and column), or not an object.
    """
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise PeftFileError(
            f"{path!r} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}. An "
            "interrupted save or a hand edit? Fix that line, or save the adapter again "
            "(PeftModel.save_pretrained / lrtt.save_peft)."
        ) from None
    except UnicodeDecodeError as err:
        raise PeftFileError(
            f"{path!r} is not UTF-8 text (byte {err.start}: {err.reason}), so not a PEFT adapter "
            "config. Save the adapter again (PeftModel.save_pretrained / lrtt.save_peft)."
        ) from None
    if not isinstance(config, dict):
        raise PeftFileError(
            f"{path!r} holds a JSON {type(config).__name__}, not an object of LoraConfig fields: it "
            "is not a PEFT adapter config. Save the adapter again."
        )
    return config


def _read_config(directory) -> dict:
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} does not exist: `directory` must be a PEFT adapter directory.")
    config = _load_json(path)
    if "peft_type" not in config:
        raise ValueError(f"{path!r} has no `peft_type`: it is not a PEFT adapter config.")
    kind = str(config["peft_type"]).upper()
    if kind == "LORA" and config.get("use_dora"):
        kind = "DORA"
    if kind != "LORA":
        raise ValueError(NOT_LORA.format(directory=str(directory), kind=kind))
    for field in _VARIANT_FIELDS:
        if config.get(field):
            raise ValueError(
                f"{path!r} sets `{field}` = {config[field]!r}: a LoRA variant whose forward lrtt does not "
                "compute (only plain LoRA loads). Merge it with peft or retrain without it."
            )
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_RESIDUAL_INITS):
        raise ValueError(
            f"{path!r} has init_lora_weights={config['init_lora_weights']!r}: that initialization "
            "rewrites the base weights, so the adapter only fits the residual model. Convert it to a "
            "plain LoRA with peft (save_pretrained(path_initial_model_for_weight_conversion=...))."
        )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{path!r} has bias={config['bias']!r}: the base model's biases were trained too. lrtt "
            "reads bias='none' adapters; put the modules whose biases train in modules_to_save."
        )
    for field, default in (("r", 8), ("lora_alpha", 8)):
        if config.get(field) is None:
            raise ValueError(
                f"{path!r} has no `{field}`. PEFT would silently use its default {field}={default}, so "
                f"the scale lora_alpha / r could be wrong; write the value used in training into the config."
            )
    if config.get("target_modules") is None:
        raise ValueError(
            f"{path!r} has no `target_modules` (PEFT would fill in a per-architecture default). "
            "Write the modules the adapter was trained on into the config."
        )
    config.setdefault("rank_pattern", {})
    config.setdefault("alpha_pattern", {})
    config["rank_pattern"] = config["rank_pattern"] or {}
    config["alpha_pattern"] = config["alpha_pattern"] or {}
    config["use_rslora"] = bool(config.get("use_rslora", False))
    return config


def _load_safetensors(file: str) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file.

    Raises:
      PeftFileError: the file does not parse (truncated, damaged or not safetensors).
    """
    with needs_extra():
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

    try:
        return load_file(file)
    except SafetensorError as err:
        raise PeftFileError(
            f"{file!r} ({os.path.getsize(file)} bytes) does not read as a safetensors file: {err}. "
            "It is truncated or damaged (an interrupted download or save?); download or save the "
            "adapter again."
        ) from None


def _check_finite(tensors: dict[str, np.ndarray], file: str) -> None:
    """Refuse floating-point tensors holding NaN or inf (a diverged run's adapter)."""
    bad = non_finite(tensors)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteError(
            f"{len(bad)} tensor(s) in {file!r} hold NaN or inf: {bad[:5]}{more}. Loading them would "
            "make every output of the adapted layers NaN. The adapter comes from a run that diverged "
            "(or a damaged file): use an earlier checkpoint of that run, or retrain with a lower "
            "learning rate."
        )


def _read_tensors(directory) -> dict[str, np.ndarray]:
    file = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(file):
        raise ValueError(f"{file!r} does not exist (lrtt reads safetensors adapters, not adapter_model.bin).")
    tensors = _load_safetensors(file)
    if not tensors:
        raise ValueError(EMPTY_ADAPTER.format(file=file))
    bad = sorted(k for k in tensors if not k.startswith(KEY_PREFIX))
    if bad:
        raise ValueError(NO_PREFIX.format(file=file, keys=bad[:5]))
    _check_finite(tensors, file)
    return {k[len(KEY_PREFIX) :]: v for k, v in tensors.items()}


def _check_sets(targeted: set[str], lora: dict[str, dict], file: str) -> None:
    extra = sorted(set(lora) - targeted)
    if extra:
        raise ValueError(
            f"extra tensors in {file!r}: LoRA weights for {extra[:5]}, which `target_modules` does "
            "not select (PEFT would ignore them with a warning). Fix `target_modules` or drop them."
        )
    missing = sorted(targeted - set(lora))
    half = sorted(f"{m}.{'lora_B' if 'lora_A' in t else 'lora_A'}.weight" for m, t in lora.items() if len(t) != 2)
    if missing or half:
        raise ValueError(
            f"missing tensors in {file!r}: `target_modules` selects {missing[:5]} but the file has no "
            f"LoRA weights for them{'; missing ' + str(half[:5]) if half else ''}. A truncated save? "
            "Save the adapter again, or narrow `target_modules`."
        )


def _load_saved(config, full, flax_modules, alignment, leaves, lora_paths, file) -> dict[str, Trainable]:
    """``Trainable`` leaves from the ``modules_to_save`` tensors, every wrapped module complete."""
    saved_names = names.modules_to_save_names(config)
    out: dict[str, Trainable] = {}
    roots: dict[str, set[str]] = collections.defaultdict(set)
    for key, value in full.items():
        module, _, param = key.rpartition(".")
        root = names.saved_root(module, saved_names)
        path = flax_modules.get(alignment.to_flax(module), {}).get(param)
        if root is None or path is None:
            why = "is in no module of `modules_to_save`" if root is None else "names no leaf of the params"
            raise ValueError(
                f"extra tensor {KEY_PREFIX}{key!r} in {file!r}: it {why}. modules_to_save = "
                f"{saved_names}. Was the adapter made for another model?"
            )
        base, shape = leaves[path], tuple(leaves[path].shape)
        flax_value = names.from_torch(path, value)
        if flax_value.shape != shape:
            torch_shape = shape[::-1] if names.split_leaf(path)[1] == "kernel" else shape
            raise ValueError(
                f"shape mismatch: {KEY_PREFIX}{key} has shape {value.shape}, but {path!r} of the params "
                f"is {shape}, so PyTorch's tensor is {torch_shape}. Was the adapter made for another model?"
            )
        out[path] = Trainable(jnp.asarray(flax_value, base.dtype))
        roots[root].add(path)
    for root, got in roots.items():
        flax_root = alignment.to_flax(root)
        inside = [ps for m, ps in flax_modules.items() if m == flax_root or m.startswith(flax_root + ".")]
        expected = {p for ps in inside for p in ps.values()}
        if expected & lora_paths:
            raise ValueError(f"{root!r} is a LoRA target and in modules_to_save in {file!r}: PEFT never does so.")
        if expected - got:
            raise ValueError(
                f"missing tensors in {file!r}: modules_to_save module {root!r} has "
                f"{sorted(got)} but not {sorted(expected - got)}. PEFT saves a module's every parameter."
            )
    return out


def _check_tied(embedding: str, tied_head, full: dict, alignment) -> None:
    key = f"{alignment.to_torch(names.torch_module(embedding))}.weight"
    table = full.get(key)
    if table is None and tied_head is not None:
        raise ValueError(UNTIED.format(why="The adapter trains lm_head but not the embedding.", embedding=embedding))
    if table is not None and (tied_head is None or not np.array_equal(table, tied_head)):
        why = (
            "The adapter trains the embedding but not lm_head: in PyTorch the LM head kept the original table."
            if tied_head is None
            else "The adapter's lm_head and embedding differ (they drifted apart in training)."
        )
        raise ValueError(UNTIED.format(why=why, embedding=embedding))


def _compact(paths: Sequence[str], universe: Iterable[str]) -> tuple[str, ...]:
    """Regexes selecting exactly ``paths`` among ``universe``: one per path with layer numbers
    generalized (``^model/layers/\\d+/self_attn/q_proj/kernel$``) when that selects no more,
    else one exact regex per path."""
    general = tuple(sorted({"^" + re.sub(r"(?<=/)\d+(?=/)", r"\\d+", re.escape(p)) + "$" for p in paths}))
    if {u for u in universe if any(re.search(g, u) for g in general)} == set(paths):
        return general
    return exact_patterns(paths)


def _method(config: dict, ranks: dict, alphas: dict, trainable: list[str], leaves: dict) -> LoRA:
    """The :class:`lrtt.LoRA` whose ``plan`` / ``scale_for`` reproduce the loaded entries."""
    r, alpha = config["r"], config["lora_alpha"]
    paths = sorted(ranks)
    rank_pattern, alpha_pattern = [], []
    for values, default, out in ((ranks, r, rank_pattern), (alphas, alpha, alpha_pattern)):
        groups = collections.defaultdict(list)
        for path in paths:
            if values[path] != default:
                groups[values[path]].append(path)
        for value, group in groups.items():
            out += [(p, value) for p in _compact(group, paths)]
    return LoRA(
        rank=r,
        alpha=alpha,
        targets=_compact(paths, leaves),
        dropout=float(config.get("lora_dropout") or 0.0),
        rslora=config["use_rslora"],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        trainable=_compact(trainable, leaves) if trainable else None,
    )
