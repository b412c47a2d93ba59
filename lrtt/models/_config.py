"""``config.json`` of a Hugging Face causal LM -> :class:`DecoderConfig`, by ``model_type``.

One frozen dataclass describes every supported family; the decoder (:mod:`lrtt.models._decoder`)
reads nothing else. Parsing goes by the config's ``model_type`` (checked against
``architectures``), never by a checkpoint's name. An option that would make the checkpoint a
different model than the one computed here (a rope scaling type, a bias, an attention variant
that is not implemented) is a ``ValueError`` naming the key, its value and what is supported.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2")
"""The supported ``model_type`` values."""

_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM",), "mistral": ("MistralForCausalLM",), "qwen2": ("Qwen2ForCausalLM",),
    "qwen3": ("Qwen3ForCausalLM",), "gemma": ("GemmaForCausalLM",), "gemma2": ("Gemma2ForCausalLM",),
    "gemma3_text": ("Gemma3ForCausalLM",), "gpt2": ("GPT2LMHeadModel",),
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embedding of one layer: ``theta`` and a scaling (``kind``: ``"default"``, ``"linear"``,
    ``"llama3"``)."""

    theta: float
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Everything the decoder computes, read off ``config.json``.

    ``layer_window[i]`` is layer i's sliding window (keys with ``query - key < window`` are seen)
    or None (global); ``layer_rope[i]`` its rotary embedding (None: GPT-2's learned positions).
    ``raw`` is the parsed ``config.json`` itself (written back by :func:`lrtt.models.save`).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm: str  # "rms", "rms_gemma" (x·(1 + w)), "layer" (LayerNorm with bias)
    norm_eps: float
    activation: str  # "silu", "gelu_tanh", "gelu", "relu"
    gated_mlp: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sandwich_norms: bool = False  # Gemma 2/3: post-attention and pre/post-feedforward norms
    embed_scale: bool = False  # Gemma: embeddings · sqrt(hidden)
    max_positions: int | None = None  # GPT-2's learned position table
    tie_word_embeddings: bool = True
    query_scale: float = 1.0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    layer_window: tuple = ()
    layer_rope: tuple = ()
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _unsupported(key: str, value: Any, supported: str, model_type: str) -> ValueError:
    return ValueError(f"config.json of a {model_type!r} model: {key}={value!r} is not supported by lrtt.models "
                      f"(supported: {supported}); computing without it would give a different model.")


def _get(raw: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = raw.get(key, default)
    return default if value is None else value


def _rope(spec: Mapping[str, Any] | None, theta: float, model_type: str, key: str) -> Rope:
    """A :class:`Rope` from a ``rope_scaling`` / ``rope_parameters`` dict (transformers 4 / 5 spelling)."""
    if not spec:
        return Rope(float(theta))
    theta = float(spec.get("rope_theta", theta))
    kind = spec.get("rope_type", spec.get("type", "default"))
    if spec.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise _unsupported(f"{key}.partial_rotary_factor", spec["partial_rotary_factor"], "1.0", model_type)
    if kind == "default":
        return Rope(theta)
    if kind == "linear":
        return Rope(theta, "linear", float(spec["factor"]))
    if kind == "llama3":
        return Rope(theta, "llama3", float(spec["factor"]), float(spec["low_freq_factor"]),
                    float(spec["high_freq_factor"]), int(spec["original_max_position_embeddings"]))
    raise _unsupported(f"{key}.rope_type", kind, "'default', 'linear', 'llama3'", model_type)


def _ropes(raw: Mapping[str, Any], model_type: str, layer_types: tuple[str, ...]) -> tuple[Rope, ...]:
    """Each layer's rope. Gemma 3: sliding layers use ``rope_local_base_freq`` unscaled, global
    layers ``rope_theta`` with ``rope_scaling`` (transformers 5: ``rope_parameters`` per layer type)."""
    if raw.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise _unsupported("partial_rotary_factor", raw["partial_rotary_factor"], "1.0", model_type)
    theta = float(_get(raw, "rope_theta", 10000.0))
    params = raw.get("rope_parameters")
    if params and any(isinstance(v, Mapping) for v in params.values()):  # transformers 5: per layer type
        missing = sorted(set(layer_types) - set(params))
        if missing:
            raise _unsupported("rope_parameters", params, f"an entry for each layer type, here {sorted(set(layer_types))}",
                               model_type)
        by_type = {t: _rope(params[t], theta, model_type, f"rope_parameters.{t}") for t in set(layer_types)}
        return tuple(by_type[t] for t in layer_types)
    if params and raw.get("rope_scaling") and params != raw.get("rope_scaling"):
        raise ValueError(f"config.json of a {model_type!r} model has both rope_parameters={params!r} and "
                         f"rope_scaling={raw['rope_scaling']!r}, and they differ: which one holds is ambiguous.")
    spec = params or raw.get("rope_scaling")
    global_rope = _rope(spec, theta, model_type, "rope_parameters" if params else "rope_scaling")
    if model_type == "gemma3_text":
        local = Rope(float(_get(raw, "rope_local_base_freq", 10000.0)))
        return tuple(local if t == "sliding_attention" else global_rope for t in layer_types)
    return (global_rope,) * len(layer_types)


def _layer_types(raw: Mapping[str, Any], model_type: str, n: int) -> tuple[str, ...]:
    given = raw.get("layer_types")
    if given is not None:
        given = tuple(given)
        if len(given) != n or any(t not in _LAYER_TYPES for t in given):
            raise _unsupported("layer_types", list(given), f"{n} entries of {list(_LAYER_TYPES)}", model_type)
        return given
    window = raw.get("sliding_window")
    if model_type == "gemma2":
        return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n))
    if model_type == "gemma3_text":
        pattern = int(_get(raw, "sliding_window_pattern", _get(raw, "_sliding_window_pattern", 6)))
        return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n))
    if model_type == "mistral" and window:
        return ("sliding_attention",) * n
    if model_type in ("qwen2", "qwen3") and raw.get("use_sliding_window") and window:
        first = int(_get(raw, "max_window_layers", n))
        return tuple("sliding_attention" if i >= first else "full_attention" for i in range(n))
    return ("full_attention",) * n


def _check_false(raw: Mapping[str, Any], model_type: str, *keys: str) -> None:
    for key in keys:
        if raw.get(key):
            raise _unsupported(key, raw[key], "false / absent", model_type)


def _activation(raw: Mapping[str, Any], model_type: str, *keys: str) -> str:
    for key in keys:
        if raw.get(key) is not None:
            value = raw[key]
            if value not in _ACTIVATIONS:
                raise _unsupported(key, value, str(sorted(_ACTIVATIONS)), model_type)
            return _ACTIVATIONS[value]
    return "gelu_tanh" if model_type.startswith("gemma") else "silu"


def _gpt2(raw: Mapping[str, Any]) -> DecoderConfig:
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        if key in raw and bool(raw[key]) != ok:
            raise _unsupported(key, raw[key], repr(ok), "gpt2")
    if raw.get("tie_word_embeddings", True) is False:
        raise _unsupported("tie_word_embeddings", False, "true (GPT2LMHeadModel's head is the token embedding)", "gpt2")
    hidden, heads = int(raw["n_embd"]), int(raw["n_head"])
    n = int(raw["n_layer"])
    return DecoderConfig(
        "gpt2", int(raw["vocab_size"]), hidden, n, heads, heads, hidden // heads,
        int(_get(raw, "n_inner", 4 * hidden)), "layer", float(_get(raw, "layer_norm_epsilon", 1e-5)),
        _activation(raw, "gpt2", "activation_function"), gated_mlp=False, qkv_bias=True, o_bias=True, mlp_bias=True,
        max_positions=int(raw["n_positions"]), tie_word_embeddings=True, query_scale=1 / math.sqrt(hidden // heads),
        layer_window=(None,) * n, layer_rope=(None,) * n, raw=dict(raw))


def parse_config(raw: Mapping[str, Any]) -> DecoderConfig:
    """The :class:`DecoderConfig` of a transformers ``config.json`` dict.

    Raises:
      ValueError: an unsupported ``model_type`` / ``architectures`` or option (named with its value).
    """
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"config.json: model_type={model_type!r} is not supported by lrtt.models; supported: "
                         f"{list(FAMILIES)} (Gemma 3 as the text-only Gemma3ForCausalLM, model_type 'gemma3_text').")
    archs = raw.get("architectures") or []
    bad = [a for a in archs if a not in _ARCHITECTURES[model_type]]
    if bad:
        raise _unsupported("architectures", archs, f"{list(_ARCHITECTURES[model_type])} for model_type {model_type!r}", model_type)
    if model_type == "gpt2":
        return _gpt2(raw)
    hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    n = int(raw["num_hidden_layers"])
    kv_heads = int(_get(raw, "num_key_value_heads", heads))
    head_dim = int(_get(raw, "head_dim", hidden // heads))
    gemma = model_type.startswith("gemma")
    _check_false(raw, model_type, "mlp_bias", "use_bidirectional_attention")
    if model_type in ("llama", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text"):
        _check_false(raw, model_type, "attention_bias")
    if model_type == "qwen2" and raw.get("attention_bias") is False:
        raise _unsupported("attention_bias", False, "absent (Qwen2 always has q/k/v biases)", model_type)
    if model_type not in ("gemma2", "gemma3_text"):
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            _check_false(raw, model_type, key)
    layer_types = _layer_types(raw, model_type, n)
    window = raw.get("sliding_window")
    if "sliding_attention" in layer_types and not window:
        raise _unsupported("sliding_window", window, "a positive integer when layer_types has 'sliding_attention'", model_type)
    windows = tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    # Gemma 2 / 3 scale queries by query_pre_attn_scalar^-1/2, the others by head_dim^-1/2
    scalar = _get(raw, "query_pre_attn_scalar", head_dim) if model_type in ("gemma2", "gemma3_text") else head_dim
    tie = bool(raw.get("tie_word_embeddings", True))  # absent: PretrainedConfig's default (a diff-only save)
    if model_type in ("gemma2", "gemma3_text"):  # transformers 5: Gemma 2 / 3 read hidden_activation
        activation = _activation(raw, model_type, "hidden_activation", "hidden_act")
    elif model_type == "gemma" and raw.get("hidden_act") == "gelu":
        activation = "gelu_tanh"  # GemmaConfig maps the legacy "gelu" of the official releases to tanh GELU
    else:
        activation = _activation(raw, model_type, "hidden_act")
    return DecoderConfig(
        model_type, int(raw["vocab_size"]), hidden, n, heads, kv_heads, head_dim, int(raw["intermediate_size"]),
        "rms_gemma" if gemma else "rms", float(_get(raw, "rms_norm_eps", 1e-6)), activation,
        qkv_bias=model_type == "qwen2", qk_norm=model_type in ("qwen3", "gemma3_text"),
        sandwich_norms=model_type in ("gemma2", "gemma3_text"), embed_scale=gemma, tie_word_embeddings=tie,
        query_scale=float(scalar) ** -0.5,
        attn_softcap=float(raw["attn_logit_softcapping"]) if raw.get("attn_logit_softcapping") else None,
        final_softcap=float(raw["final_logit_softcapping"]) if raw.get("final_logit_softcapping") else None,
        layer_window=windows, layer_rope=_ropes(raw, model_type, layer_types), raw=dict(raw))
