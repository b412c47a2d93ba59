"""Load Hugging Face PEFT LoRA directories as lrtt ``(method, adapter)``: PEFT's
``target_modules`` / ``rank_pattern`` matching on the params' modules, the LoRA factors and their
shapes, ``modules_to_save`` as ``Trainable`` leaves, a tied LM head, and the :class:`lrtt.LoRA`
that reproduces them. The files are read by :mod:`lrtt.io._peft_read`; the format:
:mod:`lrtt.io._peft_format`; stacked layers: :mod:`lrtt.io._peft_stacked`.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import re
from typing import Any, Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from lrtt import _families
from lrtt._adapter import LoraFactors, Trainable
from lrtt._paths import exact_patterns, named_leaves, nest
from lrtt._targets import Target, select
from lrtt.io import _hf_names as names
from lrtt.io._peft_format import _SAVER, ADAPTER_WEIGHTS, KEY_PREFIX, _refuse_unnamed, _stacked_family
from lrtt.io._peft_read import _read_config, _read_tensors, _split_tensors
from lrtt.methods._lora import LoRA

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
    method = _method(config, ranks, alphas, sorted(p for p, e in flat.items() if e.whole_leaf), leaves)
    return method, nest(flat)


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
