"""Read the files of a Hugging Face PEFT LoRA directory: ``adapter_config.json``
(plain LoRA only: DoRA, other PEFT types, LoRA variants and residual initializations are refused,
naming the field) and ``adapter_model.safetensors`` (no tensors, keys without
``base_model.model.``, NaN / inf and tensors of LoRA variants are refused), each error naming the
file. :mod:`lrtt.io._peft_load` matches what they hold onto the params.
"""

from __future__ import annotations

import collections
import json
import os
import re

import numpy as np

from lrtt._extras import needs_extra
from lrtt.io._peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, KEY_PREFIX, PeftFileError, _refuse_non_finite

# LoraConfig fields that turn LoRA into a variant lrtt does not compute (any truthy value).
_VARIANT_FIELDS = ("lora_bias", "use_qalora", "alora_invocation_tokens", "layer_replication", "target_parameters",
                   "trainable_token_indices", "use_bdlora", "arrow_config", "velora_config", "kasa_config",
                   "monteclora_config", "megatron_config")
# `init_lora_weights` values that rewrite the base weights (the adapter needs the residual model).
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

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
    _refuse_non_finite(tensors, f"in {file!r}", "Loading them would make every output of the adapted layers NaN "
                       "(if the file was damaged in a copy, fetch it again).")
    return {k[len(KEY_PREFIX) :]: v for k, v in tensors.items()}


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
