"""Save lrtt adapters as Hugging Face PEFT LoRA directories (for PyTorch serving): the
tensors, ``adapter_config.json`` (ranks and alphas as PEFT's patterns, ``target_modules``,
``modules_to_save``) and the vLLM check. The format: :mod:`lrtt.io._peft_format`; stacked
layers: :mod:`lrtt.io._peft_stacked`; tunix / gemma einsum kernels: :mod:`lrtt.io._peft_einsum`.
"""

from __future__ import annotations

import collections
import json
import os
import re
import warnings
from typing import Any, Iterable

import numpy as np

from lrtt._adapter import entries, is_entry
from lrtt._extras import needs_extra
from lrtt._groups import as_tree
from lrtt._paths import named_leaves
from lrtt._resolve import resolve
from lrtt._targets import Target
from lrtt.io import _hf_names as names
from lrtt.io._peft_einsum import _einsum_tensors
from lrtt.io._peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    KEY_PREFIX,
    _alpha,
    _refuse_non_finite,
    _refuse_unnamed,
    _rslora,
    _stacked_family,
)

TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

NO_PEFT_EQUIVALENT = (
    "{method} has no PEFT equivalent: PEFT's LoRA format holds only linear low-rank updates "
    "W0 + s·A·B (LoRA, and LorettaRep materialized as LoRA), and LorettaAdp's adapters "
    "f(h) = s·U(act(D(h))) are non-linear bottlenecks. Serve it through lrtt.factored, or train "
    "with lrtt.LoRA / lrtt.LorettaRep to export to PEFT."
)


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
    _refuse_non_finite(tensors, "of the adapter", f"Nothing was written to {str(directory)!r}.")
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


def _savable_entries(method: Any, adapter: Any, params: Any):
    """``({path: low-rank entry}, {path: trained array}, {path: Target})`` of an adapter PEFT can
    hold, checked against ``params`` (:func:`lrtt.resolve`; an adapter of part of the method's
    targets saves what it holds).

    Raises:
      ValueError: a non-mergeable method, an entry of another kind, or no low-rank entry.
      AdapterMismatchError: the adapter does not fit ``params``.
    """
    if not method.mergeable:
        raise ValueError(NO_PEFT_EQUIVALENT.format(method=type(method).__name__))
    found = entries(as_tree(adapter))
    low_rank = {p: e for p, e in found.items() if is_entry(e) and e.low_rank}
    trained = {p: e.value for p, e in found.items() if is_entry(e) and e.whole_leaf}
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
    return low_rank, trained, resolve(method, params, adapter, covers=False).targets


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
