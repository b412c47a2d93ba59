"""Model families: what lrtt knows of each stack's parameter names, in one table.

A :class:`Family` names the kernels of each *kind* of linear layer (``q``, ``k``, ``v``, ``o``
and the MLP's) by regexes over lrtt's ``/``-joined leaf paths, and gives the layouts of the
kernels that are not 2-D ``(in, out)``. The target presets are the same for every family:

==============  ===============================================================================
preset          kinds
==============  ===============================================================================
``"qv"``        ``q``, ``v`` (the LoRA paper's choice)
``"attention"`` ``q``, ``k``, ``v``, ``o``
``"all-linear"````q``, ``k``, ``v``, ``o`` and every MLP kind (PEFT's ``all-linear``: no head)
==============  ===============================================================================

Each family also carries what the rest of lrtt needs to know of it: transformers' base-model
prefix, whether its linear layers are ``Conv1D`` and which embedding a tied head reuses (the PEFT
name maps, :mod:`lrtt.io._hf_names`), and the reference LoRETTA_adp placements. The
tensor-parallel rule needs no entry of its own: the kinds of :data:`ROW_PARALLEL` split their in
axes over the ``"model"`` mesh axis, every other kind its out axes (Megatron's column/row split).

A fused kernel stands for every kind it holds: GPT-2's ``c_attn`` is q, k and v; Gemma's
``kv_einsum`` is k and v (``qkv_einsum`` all three when ``num_kv_heads == num_heads``) and its
``gating_einsum`` the gate and up projections. Adapting it adapts all its parts: ``"qv"`` on
GPT-2 or Gemma also adapts k. On a recognized family a preset must find every one of its kinds,
else it is an error naming the missing ones (never a silent subset).

Adding a family is one entry of :data:`FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

ATTENTION = ("q", "k", "v", "o")
PRESETS = ("qv", "attention", "all-linear")
ROW_PARALLEL = frozenset({"o", "down", "fc_out"})
"""Kinds whose kernel is row-parallel under tensor parallelism (input split); the rest are column-parallel."""

LayoutRule = "str | Callable[[str, tuple[int, ...], Mapping[str, tuple[int, ...]]], str | None]"


@dataclasses.dataclass(frozen=True)
class Family:
    """One naming convention of model parameters.

    Attributes:
      name: short name (``"llama"``, ``"gemma"``, ...).
      stack: where it comes from, for messages and docs.
      signature: a regex that some leaf path of this family's params matches.
      kinds: ``{kind: regex}`` of the linear kernels, attention kinds first (``q k v o``).
      layouts: ``(regex, layout)`` pairs for kernels that are not 2-D ``(in, out)``; a layout
        may be a function ``(path, shape, shapes) -> layout | None`` of the leaf and of all
        leaves' shapes (when the layout depends on the config, e.g. Gemma's gating einsum).
      hf_prefix: transformers' ``base_model_prefix`` (where a model with a head nests the base
        model, in Flax and PyTorch alike); None for stacks with no PyTorch twin.
      conv1d: the linear layers are transformers' ``Conv1D`` (PEFT's ``fan_in_fan_out=True``).
      tied_embedding: the embedding module a causal-LM head reuses when the params hold no
        ``lm_head``.
      adp_after, adp_before: regexes of the kernels LoRETTA_adp's reference placement puts an
        adapter after (``h + f(h)``) or before (``(x + f(x)) W0``).
      peft_modules: for params whose layers are stacked (``"layer in out"``), each kernel's PyTorch
        module per layer: ``(regex, replacement)`` pairs for ``re.sub``, ``{i}`` in the replacement
        standing for the layer (PEFT's files name one module per layer).
    """

    name: str
    stack: str
    signature: str
    kinds: Mapping[str, str]
    layouts: tuple = ()
    hf_prefix: str | None = None
    conv1d: bool = False
    tied_embedding: str | None = None
    adp_after: tuple[str, ...] = ()
    adp_before: tuple[str, ...] = ()
    peft_modules: tuple[tuple[str, str], ...] = ()

    def preset_kinds(self, preset: str) -> tuple[str, ...]:
        if preset == "qv":
            return ("q", "v")
        if preset == "attention":
            return ATTENTION
        return tuple(self.kinds)

    def parallel_patterns(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(column-parallel, row-parallel)`` kernel regexes, from the kinds."""
        column = tuple(dict.fromkeys(p for k, p in self.kinds.items() if k not in ROW_PARALLEL))
        row = tuple(dict.fromkeys(p for k, p in self.kinds.items() if k in ROW_PARALLEL))
        return column, row

    def layout_of(self, path: str, shape: tuple[int, ...], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
        for pattern, layout in self.layouts:
            if re.search(pattern, path):
                return layout(path, shape, shapes) if callable(layout) else layout
        return None


def _gemma_gating(path: str, shape: tuple[int, ...], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Gemma's ``gating_einsum``: ``(2, F, D)`` read ``'...D,NFD->...NF'`` when
    ``transpose_gating_einsum`` (Gemma 3, 4), else ``(2, D, F)``: told apart by ``mlp/linear (F, D)``."""
    linear = shapes.get(path.rpartition("/")[0] + "/linear")
    if len(shape) != 3 or linear is None or len(linear) != 2 or linear[0] == linear[1]:
        return None  # not decidable from shapes: lrtt.discover reads it off the model
    hidden, embed = linear
    if shape[1:] == (hidden, embed):
        return "out out in"
    if shape[1:] == (embed, hidden):
        return "out in out"
    return None


_BERT_LAYER = r"(^|/)encoder/layer/(\d+/)?"
_BERT_KINDS = {
    "q": _BERT_LAYER + r"attention/self/query/kernel$", "k": _BERT_LAYER + r"attention/self/key/kernel$",
    "v": _BERT_LAYER + r"attention/self/value/kernel$", "o": _BERT_LAYER + r"attention/output/dense/kernel$",
    "fc_in": _BERT_LAYER + r"intermediate/dense/kernel$", "fc_out": _BERT_LAYER + r"output/dense/kernel$",
}
_BERT_ADP_AFTER = (_BERT_LAYER + r"(attention/)?output/dense/kernel$",)  # attention and FFN output
_GEMMA_ATTENTION = {
    "q": r"(^|/)attn/(q_einsum|qkv_einsum)/w$",
    "k": r"(^|/)attn/(kv_einsum|qkv_einsum)/w$",
    "v": r"(^|/)attn/(kv_einsum|qkv_einsum)/w$",
    "o": r"(^|/)attn/attn_vec_einsum/w$",
}
_GEMMA_LAYOUTS = (
    (r"(^|/)attn/q_einsum/w$", "out in out"),  # (N, D, H): 'BTD,NDH->BTNH'
    (r"(^|/)attn/(kv|qkv)_einsum/w$", "out out in out"),  # (2|3, K, D, H): 'BSD,CKDH->CBSKH'
    (r"(^|/)attn/attn_vec_einsum/w$", "in in out"),  # (N, H, D): 'BTNH,NHD->BTD'
)
_MAXTEXT_SCANNED = r"(^|/)decoder/layers/"  # scan_layers: true, param_scan_axis: 1
_MAXTEXT = r"(^|/)decoder/layers(_\d+)?/"

_LRTT_MODELS_ATTENTION = {k: rf"^layers/attn/{k}_proj/kernel$" for k in ATTENTION}  # lrtt.models' decoder
_LRTT_MODELS_LAYOUTS = ((r"^layers/.*/kernel$", "layer in out"),)

FAMILIES: tuple[Family, ...] = (
    Family(
        "gpt2", "transformers Flax GPT-2 (Conv1D kernels, stored (out, in))",
        r"(^|/)h/\d+/attn/c_attn/kernel$",
        {"q": r"(^|/)attn/c_attn/kernel$", "k": r"(^|/)attn/c_attn/kernel$", "v": r"(^|/)attn/c_attn/kernel$",
         "o": r"(^|/)attn/c_proj/kernel$", "fc_in": r"(^|/)mlp/c_fc/kernel$", "fc_out": r"(^|/)mlp/c_proj/kernel$"},
        ((r"(^|/)(attn/(c_attn|c_proj)|mlp/(c_fc|c_proj))/kernel$", "out in"),),
        hf_prefix="transformer", conv1d=True, tied_embedding="transformer/wte",
        adp_after=(r"(^|/)(attn|mlp)/c_proj/kernel$",),
    ),
    Family(
        "gpt_neo", "transformers Flax GPT-Neo",
        r"(^|/)h/\d+/attn/attention/q_proj/kernel$",
        {"q": r"(^|/)attn/attention/q_proj/kernel$", "k": r"(^|/)attn/attention/k_proj/kernel$",
         "v": r"(^|/)attn/attention/v_proj/kernel$", "o": r"(^|/)attn/attention/out_proj/kernel$",
         "fc_in": r"(^|/)mlp/c_fc/kernel$", "fc_out": r"(^|/)mlp/c_proj/kernel$"},
        hf_prefix="transformer", tied_embedding="transformer/wte",
    ),
    Family(
        "opt", "transformers Flax OPT",
        r"(^|/)layers/\d+/self_attn/out_proj/kernel$",
        {"q": r"(^|/)self_attn/q_proj/kernel$", "k": r"(^|/)self_attn/k_proj/kernel$",
         "v": r"(^|/)self_attn/v_proj/kernel$", "o": r"(^|/)self_attn/out_proj/kernel$",
         "fc_in": r"(^|/)layers/\d+/fc1/kernel$", "fc_out": r"(^|/)layers/\d+/fc2/kernel$"},
        hf_prefix="model", tied_embedding="model/decoder/embed_tokens",
    ),
    Family(
        "llama", "transformers Flax Llama, Mistral, Qwen2 (and SmolLM2)",
        r"(^|/)layers/\d+/self_attn/q_proj/kernel$",
        {"q": r"(^|/)self_attn/q_proj/kernel$", "k": r"(^|/)self_attn/k_proj/kernel$",
         "v": r"(^|/)self_attn/v_proj/kernel$", "o": r"(^|/)self_attn/o_proj/kernel$",
         "gate": r"(^|/)mlp/gate_proj/kernel$", "up": r"(^|/)mlp/up_proj/kernel$",
         "down": r"(^|/)mlp/down_proj/kernel$"},
        hf_prefix="model", tied_embedding="model/embed_tokens",
        adp_after=(r"(^|/)mlp/down_proj/kernel$",), adp_before=(r"(^|/)mlp/(gate_proj|up_proj)/kernel$",),
    ),
    Family(
        "roberta", "transformers Flax RoBERTa (BERT's modules under roberta/)",
        r"(^|/)roberta/encoder/layer/\d+/attention/self/query/kernel$",
        _BERT_KINDS, hf_prefix="roberta", adp_after=_BERT_ADP_AFTER,
    ),
    Family(
        "bert", "transformers Flax BERT, RoBERTa",
        r"(^|/)encoder/layer/\d+/attention/self/query/kernel$",
        _BERT_KINDS, hf_prefix="bert", adp_after=_BERT_ADP_AFTER,
    ),
    Family(
        "gemma", "the gemma package (Flax linen: gm.nn.Gemma3_*, gm.nn.Transformer)",
        r"(^|/)layer_\d+/attn/(q_einsum|qkv_einsum)/w$",
        {**_GEMMA_ATTENTION, "gate": r"(^|/)mlp/gating_einsum$", "up": r"(^|/)mlp/gating_einsum$",
         "down": r"(^|/)mlp/linear$"},
        _GEMMA_LAYOUTS + ((r"(^|/)mlp/gating_einsum$", _gemma_gating),),
    ),
    Family(
        "tunix_gemma", "google-tunix NNX Gemma, Gemma 3",
        r"(^|/)layers/\d+/attn/(q_einsum|qkv_einsum)/w$",
        {**_GEMMA_ATTENTION, "gate": r"(^|/)mlp/gate_proj/kernel$", "up": r"(^|/)mlp/up_proj/kernel$",
         "down": r"(^|/)mlp/down_proj/kernel$"},
        _GEMMA_LAYOUTS,
    ),
    Family(
        "tunix_llama", "google-tunix NNX Llama 3, Qwen 2, Qwen 3 (MoE experts included)",
        r"(^|/)layers/\d+/attn/q_proj/w$",
        {"q": r"(^|/)attn/q_proj/w$", "k": r"(^|/)attn/k_proj/w$", "v": r"(^|/)attn/v_proj/w$",
         "o": r"(^|/)attn/o_proj/w$", "gate": r"(^|/)mlp/gate_proj(/kernel)?$",
         "up": r"(^|/)mlp/up_proj(/kernel)?$", "down": r"(^|/)mlp/down_proj(/kernel)?$"},
        ((r"(^|/)attn/(q|k|v)_proj/w$", "in out out"),  # (D, N, H): 'BTD,DNH->BTNH'
         (r"(^|/)attn/o_proj/w$", "in in out"),  # (N, H, D): 'BTNH,NHD->BTD'
         (r"(^|/)mlp/(gate|up|down)_proj$", "layer in out")),  # Qwen 3 MoE experts (E, in, out)
    ),
    Family(
        "maxtext", "MaxText (decoder/layers scanned with param_scan_axis 1, or decoder/layers_N)",
        _MAXTEXT + r"self_attention/(query|qkv_proj)/kernel$",
        {"q": r"(^|/)self_attention/(query|qkv_proj)/kernel$", "k": r"(^|/)self_attention/(key|qkv_proj)/kernel$",
         "v": r"(^|/)self_attention/(value|qkv_proj)/kernel$", "o": r"(^|/)self_attention/out/kernel$",
         "gate": r"(^|/)mlp/(wi_0|wi)/kernel$", "up": r"(^|/)mlp/(wi_1|wi)/kernel$", "down": r"(^|/)mlp/wo/kernel$"},
        ((_MAXTEXT_SCANNED + r"self_attention/(query|key|value)/kernel$", "in layer out out"),
         (_MAXTEXT_SCANNED + r"self_attention/qkv_proj/kernel$", "in layer out out out"),
         (_MAXTEXT_SCANNED + r"self_attention/out/kernel$", "in layer in out"),
         (_MAXTEXT_SCANNED + r"mlp/(wi_0|wi_1|wo)/kernel$", "in layer out"),
         (_MAXTEXT_SCANNED + r"mlp/wi/kernel$", "in layer out out"),
         (r"(^|/)self_attention/(query|key|value)/kernel$", "in out out"),
         (r"(^|/)self_attention/qkv_proj/kernel$", "in out out out"),
         (r"(^|/)self_attention/out/kernel$", "in in out"),
         (r"(^|/)mlp/wi/kernel$", "in out out")),
    ),
    Family(
        "lrtt_models", "lrtt.models (Hugging Face Llama, Mistral, Qwen2/3, Gemma 1/2/3; layers stacked)",
        r"^layers/mlp/gate_proj/kernel$",
        {**_LRTT_MODELS_ATTENTION, "gate": r"^layers/mlp/gate_proj/kernel$", "up": r"^layers/mlp/up_proj/kernel$",
         "down": r"^layers/mlp/down_proj/kernel$"},
        _LRTT_MODELS_LAYOUTS,
        peft_modules=((r"^layers/attn/(q|k|v|o)_proj/kernel$", r"model.layers.{i}.self_attn.\1_proj"),
                      (r"^layers/mlp/(gate|up|down)_proj/kernel$", r"model.layers.{i}.mlp.\1_proj")),
    ),
    Family(
        "lrtt_models_gpt2", "lrtt.models (Hugging Face GPT-2, q/k/v split; layers stacked)",
        r"^layers/attn/q_proj/kernel$",
        {**_LRTT_MODELS_ATTENTION, "fc_in": r"^layers/mlp/up_proj/kernel$", "fc_out": r"^layers/mlp/down_proj/kernel$"},
        _LRTT_MODELS_LAYOUTS,
    ),
)
"""The known families, tried in order (OPT before Llama: both name ``self_attn/q_proj``;
RoBERTa before BERT: the same modules under ``roberta/``)."""


def by_name(name: str) -> Family:
    """The family called ``name``.

    Raises:
      ValueError: no family has that name (the message lists them).
    """
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"no model family {name!r}; the families are {[f.name for f in FAMILIES]}.")


def tensor_parallel_patterns(paths: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(column-parallel, row-parallel)`` regexes for params with these paths: their family's,
    or every family's when none is recognized."""
    family = detect(paths)
    column: dict[str, None] = {}
    row: dict[str, None] = {}
    for f in (family,) if family else FAMILIES:
        c, r = f.parallel_patterns()
        column.update(dict.fromkeys(c))
        row.update(dict.fromkeys(r))
    return tuple(column), tuple(row)


def adp_placement(position: str) -> tuple[str, ...]:
    """LoRETTA_adp's reference placement over every family: ``position`` is ``"after"`` or ``"before"``."""
    out: dict[str, None] = {}
    for family in FAMILIES:
        out.update(dict.fromkeys(family.adp_after if position == "after" else family.adp_before))
    return tuple(out)


def detect(paths: Sequence[str]) -> Family | None:
    """The first family whose signature some path matches, or None."""
    for family in FAMILIES:
        signature = re.compile(family.signature)
        if any(signature.search(p) for p in paths):
            return family
    return None


def preset_patterns(preset: str) -> tuple[str, ...]:
    """A preset's regexes over every family (for params of no recognized family)."""
    out: dict[str, None] = {}
    for family in FAMILIES:
        for kind in family.preset_kinds(preset):
            out[family.kinds[kind]] = None
    return tuple(out)


def resolve_preset(preset: str, family: Family, paths: Sequence[str]) -> tuple[str, ...]:
    """The regexes of ``preset`` on ``family``'s params; every kind must match some path.

    Raises:
      ValueError: a kind of the preset matches no path (the message names the missing kinds).
    """
    kinds = family.preset_kinds(preset)
    missing = [k for k in kinds if not any(re.search(family.kinds[k], p) for p in paths)]
    if missing:
        found = [k for k in kinds if k not in missing]
        raise ValueError(
            f"`targets`={preset!r}: the params look like {family.stack} (family {family.name!r}), "
            f"where {preset!r} means the kinds {list(kinds)}, but no leaf matches "
            + ", ".join(f"{k} ({family.kinds[k]!r})" for k in missing)
            + f"; found {found or 'none'}. Adapting only some of them silently is not what the preset "
            "promises: pass explicit regexes for the leaves you want, or read the kernels off the "
            "model with lrtt.discover(apply_fn, params, *example_inputs) and pass "
            "targets='all-linear', layouts=<its result>."
        )
    out: dict[str, None] = {}
    for kind in kinds:
        out[family.kinds[kind]] = None
    return tuple(out)
