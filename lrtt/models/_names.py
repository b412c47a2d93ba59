"""transformers' PyTorch tensor names <-> the decoder's params paths, for each family.

A :class:`Rule` maps one params leaf to its PyTorch tensors: per layer (``{i}`` in the name)
for stacked leaves, transposed for ``nn.Linear`` weights (``(out, in)`` -> ``(in, out)``), or a
column block of GPT-2's fused ``c_attn`` (``Conv1D``, already ``(in, out)``).
"""

from __future__ import annotations

import dataclasses

from lrtt.models._config import DecoderConfig

IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
"""Buffers some checkpoints carry that are not parameters (recomputed by every implementation)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    path: str  # the params leaf, '/'-joined
    name: str  # the PyTorch tensor name; '{i}' for the layer index of a stacked leaf
    transpose: bool = False  # nn.Linear weight (out, in)
    part: int | None = None  # GPT-2 c_attn: which of q, k, v (column block) this leaf is
    parts: int = 1

    @property
    def stacked(self) -> bool:
        return "{i}" in self.name


def rules(c: DecoderConfig, prefix: str | None = None) -> list[Rule]:
    """The rules of every params leaf of ``c`` (``prefix``: the base model's, ``"model."`` /
    ``"transformer."`` by default; ``""`` for checkpoints saved without it)."""
    if c.model_type == "gpt2":
        return _gpt2(c, "transformer." if prefix is None else prefix)
    p = "model." if prefix is None else prefix
    layer = p + "layers.{i}."
    out = [Rule("embed/embedding", p + "embed_tokens.weight"),
           Rule("layers/attn_norm/scale", layer + "input_layernorm.weight")]
    for k in ("q", "k", "v", "o"):
        out.append(Rule(f"layers/attn/{k}_proj/kernel", layer + f"self_attn.{k}_proj.weight", transpose=True))
        if (c.qkv_bias and k != "o") or (c.o_bias and k == "o"):
            out.append(Rule(f"layers/attn/{k}_proj/bias", layer + f"self_attn.{k}_proj.bias"))
    if c.qk_norm:
        out += [Rule("layers/attn/q_norm/scale", layer + "self_attn.q_norm.weight"),
                Rule("layers/attn/k_norm/scale", layer + "self_attn.k_norm.weight")]
    if c.sandwich_norms:
        out += [Rule("layers/post_attn_norm/scale", layer + "post_attention_layernorm.weight"),
                Rule("layers/mlp_norm/scale", layer + "pre_feedforward_layernorm.weight"),
                Rule("layers/post_mlp_norm/scale", layer + "post_feedforward_layernorm.weight")]
    else:
        out.append(Rule("layers/mlp_norm/scale", layer + "post_attention_layernorm.weight"))
    for k in ("gate", "up", "down"):
        out.append(Rule(f"layers/mlp/{k}_proj/kernel", layer + f"mlp.{k}_proj.weight", transpose=True))
    out.append(Rule("final_norm/scale", p + "norm.weight"))
    if not c.tie_word_embeddings:
        out.append(Rule("lm_head/kernel", "lm_head.weight", transpose=True))
    return out


def _gpt2(c: DecoderConfig, p: str) -> list[Rule]:
    h = p + "h.{i}."
    out = [Rule("embed/embedding", p + "wte.weight"), Rule("pos_embed/embedding", p + "wpe.weight")]
    for leaf, module in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        out += [Rule(f"layers/{leaf}/scale", h + f"{module}.weight"), Rule(f"layers/{leaf}/bias", h + f"{module}.bias")]
    for j, k in enumerate("qkv"):
        out += [Rule(f"layers/attn/{k}_proj/kernel", h + "attn.c_attn.weight", part=j, parts=3),
                Rule(f"layers/attn/{k}_proj/bias", h + "attn.c_attn.bias", part=j, parts=3)]
    for leaf, module in (("attn/o_proj", "attn.c_proj"), ("mlp/up_proj", "mlp.c_fc"), ("mlp/down_proj", "mlp.c_proj")):
        out += [Rule(f"layers/{leaf}/kernel", h + f"{module}.weight"), Rule(f"layers/{leaf}/bias", h + f"{module}.bias")]
    out += [Rule("final_norm/scale", p + "ln_f.weight"), Rule("final_norm/bias", p + "ln_f.bias")]
    return out


def tensor_names(rule: Rule, num_layers: int) -> list[str]:
    return [rule.name.format(i=i) for i in range(num_layers)] if rule.stacked else [rule.name]
