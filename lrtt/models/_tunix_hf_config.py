"""Which google-tunix / gemma-package model, and the transformers ``config.json`` that computes
what its JAX forward computes: :func:`tunix_hf_config` (tunix NNX Llama 3, Qwen 2, Qwen 3, Gemma,
Gemma 3), :func:`gemma_hf_config` (the gemma package's ``gm.nn.Transformer``), and the errors
naming the right function, or MaxText's conversion scripts, for a model of another stack.
:mod:`lrtt.models._tunix` writes the checkpoint's tensors.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Any, Callable

from lrtt import _families
from lrtt._paths import named_leaves
from lrtt._private import is_gemma_transformer_config

FAMILIES = ("llama3", "qwen2", "qwen3", "gemma", "gemma3")
"""The tunix model packages (``tunix.models.<name>``) :func:`lrtt.models.save_tunix` writes."""

_PARAMS_MODULE = {
    "llama3": "tunix.models.llama3.params", "qwen2": "tunix.models.qwen2.params",
    "qwen3": "tunix.models.qwen3.params", "gemma": "tunix.models.gemma.params_safetensors",
    "gemma3": "tunix.models.gemma3.params_safetensors",
}
"""Where each family's ``_get_key_and_transform_mapping`` (Hugging Face name -> tunix path) lives."""

ALTERNATIVES = (
    "export through a Hugging Face checkpoint another way: tunix's own "
    "`save_lora_merged_model_as_safetensors` (tunix.models.qwen3.params, ...) on the base checkpoint, or "
    "lrtt.models.load(<the HF checkpoint>) and train there, then lrtt.models.save / lrtt.save_peft"
)
GEMMA_ALTERNATIVES = (
    "convert the gemma checkpoint with transformers' Gemma conversion script (convert_gemma3_weights.py) and "
    "use lrtt.models.load on the result, then lrtt.models.save / lrtt.save_peft"
)
MAXTEXT = (
    "MaxText params (decoder/layers/...) have no Hugging Face name map in lrtt: it depends on MaxText's decoder "
    "block and scan settings. Convert with MaxText's checkpoint conversion scripts (MaxText/utils/ckpt_conversion, "
    "to Hugging Face) and use lrtt.models.load on the Hugging Face checkpoint."
)


def _what(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def _refuse_other_stacks(model_or_config: Any, params: Any, expected: str) -> None:
    """An error naming the right function (or MaxText's conversion) for a model of another stack."""
    module = type(model_or_config).__module__
    config_module = type(getattr(model_or_config, "config", None)).__module__
    if "maxtext" in module.lower() or "maxtext" in config_module.lower():
        raise ValueError(MAXTEXT)
    if params is not None:
        found = _families.detect([p for p, _ in named_leaves(params)])
        if found is not None and found.name == "maxtext":
            raise ValueError(MAXTEXT)
    if expected == "tunix" and (module.startswith("gemma.") or config_module.startswith("gemma.")):
        raise ValueError(f"{_what(model_or_config)} is the gemma package's model: write it with "
                         "lrtt.models.save_gemma, not save_tunix.")
    if expected == "gemma" and (module.startswith("tunix.") or config_module.startswith("tunix.")):
        raise ValueError(f"{_what(model_or_config)} is a tunix model: write it with lrtt.models.save_tunix, "
                         "not save_gemma.")


# --- which model ------------------------------------------------------------------------------


def _tunix_config(model_or_config: Any) -> tuple[str, Any, Any]:
    """``(family, ModelConfig, model module)`` of a tunix model or its ``ModelConfig``.

    Raises:
      ValueError: not a tunix model or config of :data:`FAMILIES` (the message names the alternative).
    """
    _refuse_other_stacks(model_or_config, None, "tunix")
    config = model_or_config
    if not type(config).__name__.endswith("ModelConfig") and hasattr(config, "config"):
        config = config.config  # a tunix model (nnx.Module) carries its ModelConfig
    parts = type(config).__module__.split(".")
    if len(parts) == 4 and parts[:2] == ["tunix", "models"] and parts[3] == "model":
        family = parts[2]
        if family in FAMILIES:
            return family, config, importlib.import_module(type(config).__module__)
        raise ValueError(
            f"tunix's {family!r} models are not written by save_tunix: lrtt.models (the Hugging Face decoder "
            f"it writes for) has no such family; supported: tunix.models.{{{', '.join(FAMILIES)}}}. Instead, "
            + ALTERNATIVES + ".")
    raise ValueError(f"save_tunix writes google-tunix NNX models (tunix.models.{{{', '.join(FAMILIES)}}}: the "
                     f"model or its ModelConfig); got {_what(model_or_config)}.")


def _gemma_config(model_or_config: Any) -> Any:
    """The ``gm.nn.config.TransformerConfig`` of a gemma-package ``gm.nn.Transformer`` or config."""
    _refuse_other_stacks(model_or_config, None, "gemma")
    config = model_or_config
    if type(config).__name__ != "TransformerConfig" and hasattr(config, "config"):
        config = config.config
    if is_gemma_transformer_config(config):
        return config
    raise ValueError(f"save_gemma writes the gemma package's gm.nn.Transformer (Gemma 1, 2, 3 text: the model or its "
                     f"gm.nn.config.TransformerConfig); got {_what(model_or_config)}. Gemma 3n and Gemma 4 have no "
                     "lrtt.models decoder: " + GEMMA_ALTERNATIVES + ".")


def _forward_rope_theta(family: str, module: Any, config: Any) -> float:
    """The ``rope_theta`` tunix's attention really rotates with: its config's when the attention
    block passes it, else the default of the module's ``apply_rope`` (tunix 0.1.7's Llama 3 and
    Qwen 3 pass none, so they use 1e6 whatever the config says)."""
    theta = config.rope_theta
    try:
        block = inspect.getsource(module.Attention.block)
        default = inspect.signature(module.apply_rope).parameters["rope_theta"].default
    except (OSError, TypeError, KeyError, AttributeError):
        return float(theta)
    if "rope_theta" in block or default is inspect.Parameter.empty:
        return float(theta)
    if float(default) != float(theta):
        warnings.warn(
            f"tunix's {family} forward ignores ModelConfig.rope_theta={theta} and rotates with its apply_rope "
            f"default {default}: the config.json written records rope_theta={default}, what the params were "
            "run with. Pass source=<the Hugging Face checkpoint> to write that checkpoint's config.json instead.",
            stacklevel=4)
    return float(default)


def _rope(theta: float) -> dict:
    return {"rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}


def _gemma_like(refuse: Callable[..., ValueError], c: Any, *, types: list[str], qk_norm: bool, post_attn: bool,
                post_ffw: bool, attn_softcap: float | None, final_softcap: float | None, query_scalar: float | None,
                local_base: float, global_base: float, local_scale: float, global_scale: float) -> dict:
    """The config.json of a Gemma-style model (tunix ``gemma`` / ``gemma3``, the gemma package):
    ``gemma3_text`` with q/k norms, ``gemma2`` with the post norms, else ``gemma``."""
    common = {
        "vocab_size": c.num_embed, "hidden_size": c.embed_dim, "intermediate_size": c.hidden_dim,
        "num_hidden_layers": len(types), "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": 1e-6,  # their RMSNorm's
        "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
    }
    if query_scalar is None:
        raise refuse("query_pre_attn_norm", "BY_EMBED_DIM_DIV_NUM_HEADS", "Hugging Face Gemma scales queries by "
                     "query_pre_attn_scalar^-1/2 only")
    if post_attn != post_ffw:
        raise refuse("use_post_attn_norm", post_attn, f"with use_post_ffw_norm={post_ffw}: Hugging Face Gemma has "
                     "neither norm, Gemma 2 and 3 both")
    if "sliding_attention" in types and not c.sliding_window_size:
        raise refuse("sliding_window_size", c.sliding_window_size, "sliding layers need a window")
    window = c.sliding_window_size if "sliding_attention" in types else None
    if float(local_scale) != 1.0:
        raise refuse("local_scale_factor", local_scale, "Hugging Face Gemma scales the global layers' rope only")
    softcaps = {"attn_logit_softcapping": attn_softcap, "final_logit_softcapping": final_softcap}
    if qk_norm:
        if not post_attn:
            raise refuse("use_qk_norm", True, "without the post norms (Hugging Face Gemma 3 has both)")
        full = {"rope_type": "default", "rope_theta": float(global_base)}
        scaling = None
        if float(global_scale) != 1.0:
            scaling = {"rope_type": "linear", "factor": float(global_scale)}
            full.update(scaling)
        return {
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **common,
            "max_position_embeddings": 131072, "query_pre_attn_scalar": query_scalar,
            "sliding_window": window, "layer_types": types, **softcaps,
            "rope_theta": float(global_base), "rope_local_base_freq": float(local_base), "rope_scaling": scaling,
            "rope_parameters": {"full_attention": full,
                                "sliding_attention": {"rope_type": "default", "rope_theta": float(local_base)}},
        }
    if float(global_scale) != 1.0:
        raise refuse("global_scale_factor", global_scale, "Hugging Face Gemma 1 / 2 have no rope scaling")
    if "sliding_attention" in types and "full_attention" in types and float(local_base) != float(global_base):
        raise refuse("local_base_frequency", local_base, f"differs from global_base_frequency={global_base}: Hugging "
                     "Face Gemma 1 / 2 rotate every layer with one rope_theta")
    theta = float(global_base if "full_attention" in types else local_base)
    if not post_attn:
        for field, value in (("final_logit_softcap", final_softcap), ("attn_logits_soft_cap", attn_softcap)):
            if value is not None:
                raise refuse(field, value, "Hugging Face Gemma 1 has no soft-capping")
        if window is not None:
            raise refuse("attention_types", "LOCAL_SLIDING", "Hugging Face Gemma 1 has no sliding-window layers")
        if query_scalar != c.head_dim:
            raise refuse("query_pre_attn_norm", query_scalar, "Hugging Face Gemma 1 scales queries by head_dim^-1/2")
        return {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", **common,
                "max_position_embeddings": 8192, **_rope(theta)}
    return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", **common,
            "max_position_embeddings": 8192, "query_pre_attn_scalar": query_scalar, "sliding_window": window,
            "layer_types": types, **softcaps, **_rope(theta)}


def _query_scalar(value: Any, c: Any) -> float | None:
    """``query_pre_attn_scalar`` of a ``QueryPreAttentionNormalisation`` (None: not expressible)."""
    name = getattr(value, "name", str(value))
    if name == "BY_ONE_OVER_SQRT_HEAD_DIM":
        return c.head_dim
    if name == "BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS":
        return c.embed_dim // c.num_heads
    return None


def tunix_hf_config(model_or_config: Any) -> dict:
    """The transformers ``config.json`` dict of a tunix model (or its ``ModelConfig``): the
    Hugging Face model that computes what the tunix forward computes.

    Llama 3 -> ``llama`` (``LlamaForCausalLM``), Qwen 2 -> ``qwen2``, Qwen 3 -> ``qwen3``, Gemma 3
    (text) -> ``gemma3_text`` (``Gemma3ForCausalLM``), tunix ``gemma`` -> ``gemma`` (Gemma 1) or
    ``gemma2`` (post-attention / post-FFW norms). Rope settings are written in transformers 5's
    ``rope_parameters`` and transformers 4's ``rope_theta`` (``rope_local_base_freq``,
    ``rope_scaling``) spellings alike. ``max_position_embeddings`` (not used by the computation)
    is the family's released value; token ids and the tokenizer come only with ``source``.

    Raises:
      ValueError: a config that no Hugging Face class of lrtt.models computes (Qwen 3 MoE, a
        multimodal Gemma 3, Gemma's local rope scaling, ...): the message names the field.
    """
    family, c, module = _tunix_config(model_or_config)

    def refuse(field, value, why):
        return ValueError(f"tunix {family} ModelConfig.{field}={value!r}: {why}. Not written; instead, "
                          + ALTERNATIVES + ".")

    if family in ("llama3", "qwen2", "qwen3"):
        if family == "qwen3" and getattr(c, "num_experts", None):
            raise refuse("num_experts", c.num_experts, "Qwen 3 mixture-of-experts has no lrtt.models decoder "
                         "(qwen3_moe)")
        theta = _forward_rope_theta(family, module, c)
        tie = bool(c.weight_tying if family == "llama3" else c.use_tied_embedding)
        model_type = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[family]
        arch = {"llama3": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
        out = {
            "architectures": [arch], "model_type": model_type, "vocab_size": c.vocab_size,
            "hidden_size": c.embed_dim, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "hidden_act": "silu", "rms_norm_eps": float(c.norm_eps), "tie_word_embeddings": tie,
            "max_position_embeddings": {"llama3": 131072, "qwen2": 32768, "qwen3": 40960}[family],
            "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True, **_rope(theta),
        }
        if family == "qwen2":
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers)
        else:
            out.update(attention_bias=False)
            if family == "llama3":
                out.update(mlp_bias=False, pretraining_tp=1)
            else:
                out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers)
        return out
    if family == "gemma3":
        if c.vision_config is not None:
            raise refuse("vision_config", type(c.vision_config).__name__, "multimodal Gemma 3 "
                         "(Gemma3ForConditionalGeneration) is not an lrtt.models family; build the text-only model "
                         "(text_only=True) for the language model's weights")
        pattern = module.GEMMA3_ATTENTION_PATTERN
        kinds = [pattern[i % len(pattern)] for i in range(c.num_layers)]
        return _gemma_like(
            refuse, c, types=_layer_types(kinds, module.AttentionType), qk_norm=True, post_attn=True, post_ffw=True,
            attn_softcap=None, final_softcap=None, query_scalar=_query_scalar(c.query_pre_attn_norm, c),
            local_base=c.local_base_frequency, global_base=c.global_base_frequency,
            local_scale=c.local_scale_factor, global_scale=c.global_scale_factor)
    # tunix.models.gemma: Gemma 1 (no post norms) or Gemma 2; rope 1e4 and queries by head_dim^-1/2 fixed
    types = _layer_types(list(c.attention_types)[: c.num_layers], module.AttentionType)
    if len(types) != c.num_layers:
        raise refuse("attention_types", c.attention_types, f"{len(types)} entries for {c.num_layers} layers")
    return _gemma_like(
        refuse, c, types=types, qk_norm=False, post_attn=c.use_post_attn_norm, post_ffw=c.use_post_ffw_norm,
        attn_softcap=c.attn_logits_soft_cap, final_softcap=c.final_logit_softcap, query_scalar=c.head_dim,
        local_base=10000.0, global_base=10000.0, local_scale=1.0, global_scale=1.0)


def gemma_hf_config(model_or_config: Any) -> dict:
    """The transformers ``config.json`` dict of the gemma package's ``gm.nn.Transformer`` (or its
    ``gm.nn.config.TransformerConfig``): ``gemma3_text`` (``Gemma3ForCausalLM``) with q/k norms,
    ``gemma2`` with post-attention / post-FFW norms, else ``gemma``; layer types, windows, rope
    bases and scaling, soft-capping and the query scale read off the config.

    Raises:
      ValueError: a vision encoder (multimodal Gemma 3), ``BY_EMBED_DIM_DIV_NUM_HEADS`` query
        scaling, local rope scaling, or another option no Hugging Face Gemma computes.
    """
    c = _gemma_config(model_or_config)

    def refuse(field, value, why):
        return ValueError(f"gemma TransformerConfig.{field}={value!r}: {why}. Not written; instead, "
                          + GEMMA_ALTERNATIVES + ".")

    if c.vision_encoder is not None:
        raise refuse("vision_encoder", type(c.vision_encoder).__name__, "multimodal Gemma 3 is not an lrtt.models "
                     "family; save the text model (vision_encoder=None) for the language model's weights")
    from gemma.gm.nn import _modules

    return _gemma_like(
        refuse, c, types=_layer_types(list(c.attention_types), _modules.AttentionType), qk_norm=c.use_qk_norm,
        post_attn=c.use_post_attn_norm, post_ffw=c.use_post_ffw_norm, attn_softcap=c.attn_logits_soft_cap,
        final_softcap=c.final_logit_softcap, query_scalar=_query_scalar(c.query_pre_attn_norm, c),
        local_base=c.local_base_frequency, global_base=c.global_base_frequency,
        local_scale=c.local_scale_factor, global_scale=c.global_scale_factor)


def _layer_types(kinds: list, attention_type: Any) -> list[str]:
    return ["sliding_attention" if k == attention_type.LOCAL_SLIDING else "full_attention" for k in kinds]

