"""Hugging Face PEFT's LoRA format: what saving (:mod:`lrtt.io._peft_save`) and loading
(:mod:`lrtt.io._peft_load`) share: the file and key names, :class:`PeftFileError`, the families
with no PEFT names, the ``lora_alpha`` rule, and the one refusal of NaN / inf tensors.

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

import math
from typing import Any

from lrtt import _families
from lrtt._errors import Error
from lrtt._targets import first_match
from lrtt.io._array_checks import non_finite
from lrtt.io._checkpoint_errors import NonFiniteError
from lrtt.methods._lora import LoRA


class PeftFileError(Error, ValueError):
    """A file of a PEFT adapter directory does not read: truncated safetensors, invalid JSON."""


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


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


def _rslora(method: Any) -> bool:
    """PEFT's ``use_rslora`` (``s = alpha / √r``): LoRA's option; LorettaRep scales by ``alpha / r``."""
    return isinstance(method, LoRA) and method.rslora


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


def _refuse_non_finite(tensors: dict[str, Any], subject: str, outcome: str) -> None:
    """Refuse floating-point tensors holding NaN or inf (a diverged run's adapter): one
    :class:`NonFiniteError` naming up to five of them, ``"<n> tensor(s) <subject> hold NaN or inf:
    [...]. <outcome>"`` and what to do; :func:`lrtt.save_peft` and :func:`lrtt.load_peft` differ
    only in ``subject`` and ``outcome``."""
    bad = non_finite(tensors)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteError(
            f"{len(bad)} tensor(s) {subject} hold NaN or inf: {bad[:5]}{more}. {outcome} The adapter comes "
            "from a run that diverged: use an earlier checkpoint of that run, or retrain with a lower "
            "learning rate.", names=tuple(bad)
        )
