"""llama.cpp's GGUF files as transformers checkpoints: config, PyTorch tensor names, tokenizer.

GGUF stores each weight as ``(out, in)`` — PyTorch's orientation — possibly quantized, with q/k
rows permuted for llama.cpp's rotary layout, the config as ``llama.*`` metadata and the tokenizer
as vocab + merges lists. :class:`GGUFFile` undoes all of that one tensor at a time: it dequantizes
to float32, un-permutes q/k (:func:`unpermute_rotary`) and names each tensor as transformers'
``LlamaForCausalLM`` does (``model.layers.0.self_attn.q_proj.weight``), so
:func:`lrtt.models.load` reads a ``.gguf`` as it reads a ``save_pretrained`` directory.
:func:`config_from_gguf` gives the ``config.json``, :func:`tokenizer_from_gguf` rebuilds the
byte-level BPE ``tokenizers`` JSON, :func:`tokenizer_config_from_gguf` the chat template and
special tokens, and :func:`convert` writes all of it as a checkpoint directory.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import numpy as np

from lrtt._extras import needs_extra

# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) whose regex is GPT-2's with every digit
# split off first (`\p{N}` before the GPT-2 pattern in llama-vocab.cpp).
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
# ... and those that use GPT-2's regex alone.
_GPT2_PRE = frozenset({"gpt2", "default", "mpt", "olmo", "jais"})

_UNSUPPORTED_PRE = (
    "`tokenizer.ggml.pre` is {pre!r}; the byte-level BPE rebuild supports GPT-2's split {gpt2} "
    "and GPT-2's split after single digits {digits}. A pre-tokenizer with another regex would "
    "tokenize differently from llama.cpp; add its split here before converting this model."
)

# GGUF tensor name (after `blk.N.`) -> (transformers name after `model.layers.N.`, rotary heads key).
_LAYER_TENSORS = {
    "attn_q.weight": ("self_attn.q_proj.weight", "num_attention_heads"),
    "attn_k.weight": ("self_attn.k_proj.weight", "num_key_value_heads"),
    "attn_v.weight": ("self_attn.v_proj.weight", None),
    "attn_output.weight": ("self_attn.o_proj.weight", None),
    "ffn_gate.weight": ("mlp.gate_proj.weight", None),
    "ffn_up.weight": ("mlp.up_proj.weight", None),
    "ffn_down.weight": ("mlp.down_proj.weight", None),
    "attn_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_TOP_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``).

    HF Llama rotates the pair ``(x[i], x[i + d/2])`` of each head of size ``d``; llama.cpp rotates
    adjacent rows ``(x[2i], x[2i + 1])``. Its converter therefore reorders the rows of q (and k,
    with the KV head count) within each head so that row ``i`` and row ``i + d/2`` become
    neighbours::

        w.reshape(n_heads, 2, d // 2, in).swapaxes(1, 2).reshape(n_heads * d, in)

    Args:
      w: ``(n_heads * d, ...)`` weight in PyTorch ``(out, in)`` orientation (or a bias).
      n_heads: heads that ``w``'s rows split into (``n_kv_heads`` for k).

    Returns:
      The permuted array, same shape and dtype. :func:`unpermute_rotary` is its inverse.
    """
    out = w.shape[0]
    if out % (2 * n_heads):
        raise ValueError(f"`w` has {out} rows, not a multiple of 2 * n_heads = {2 * n_heads}.")
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`permute_rotary`: llama.cpp's q/k row order back to HF's.

    Within each head the rows come as pairs ``(r0, r_{d/2}), (r1, r_{d/2+1}), …``; reading them
    as ``(d/2, 2)`` and transposing to ``(2, d/2)`` restores ``r0 … r_{d-1}``::

        w.reshape(n_heads, d // 2, 2, in).swapaxes(1, 2).reshape(n_heads * d, in)

    Skipping it for both q and k leaves q·k intact but rotates the wrong pairs (SmolLM2:
    perplexity 57 instead of 8.4); skipping it for k only gives thousands.

    Args:
      w: ``(n_heads * d, ...)`` permuted weight in ``(out, in)`` orientation.
      n_heads: heads that ``w``'s rows split into (``n_kv_heads`` for k).

    Returns:
      The un-permuted array, same shape and dtype.

    Examples:
      >>> import numpy as np
      >>> w = np.arange(8 * 3).reshape(8, 3)
      >>> bool((unpermute_rotary(permute_rotary(w, 2), 2) == w).all())
      True
    """
    out = w.shape[0]
    if out % (2 * n_heads):
        raise ValueError(f"`w` has {out} rows, not a multiple of 2 * n_heads = {2 * n_heads}.")
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value.item() if isinstance(value, np.generic) else value


def tokenizer_from_gguf(reader) -> str:
    """Rebuild the ``tokenizers`` JSON of a GGUF's byte-level BPE (``tokenizer.ggml.model == 'gpt2'``).

    Vocab ids are the positions in ``tokenizer.ggml.tokens``; merges come from
    ``tokenizer.ggml.merges`` (``"a b"`` strings, ranked by position); tokens typed CONTROL become
    special added tokens and USER_DEFINED ones plain added tokens (both keep their ids, and are
    matched whole before BPE, e.g. ``<|im_start|>`` → one id). The pre-tokenizer follows
    ``tokenizer.ggml.pre`` (GPT-2's regex, after splitting single digits for SmolLM/StarCoder);
    ``add_bos_token`` / ``add_eos_token`` become a template post-processor.

    Args:
      reader: a ``gguf.GGUFReader``.

    Returns:
      The tokenizer as a JSON string (``tokenizers.Tokenizer.from_str`` reads it).

    Raises:
      ValueError: the GGUF's tokenizer is not byte-level BPE, or has an unknown pre-tokenizer.
    """
    with needs_extra():
        import gguf
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"`tokenizer.ggml.model` is {kind!r}; only byte-level BPE ('gpt2', as GPT-2, Llama 3 "
            "and SmolLM use) is rebuilt. A SentencePiece ('llama') vocab needs another converter."
        )
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _DIGIT_SPLIT_PRE | _GPT2_PRE:
        raise ValueError(_UNSUPPORTED_PRE.format(pre=pre, gpt2=sorted(_GPT2_PRE), digits=sorted(_DIGIT_SPLIT_PRE)))

    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [int(gguf.TokenType.NORMAL)] * len(tokens)))
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges", [])]
    if len(set(tokens)) != len(tokens):
        raise ValueError("`tokenizer.ggml.tokens` holds duplicate tokens; ids would be ambiguous.")
    if any(len(m) != 2 for m in merges):
        raise ValueError("`tokenizer.ggml.merges` holds an entry that is not two space-separated tokens.")

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)), use_regex=True
    )
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()

    control, user = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == control])
    tok.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == user])

    post = [processors.ByteLevel(trim_offsets=False)]
    bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        head = [tokens[bos]] if add_bos else []
        tail = [tokens[eos]] if add_eos else []
        specials = sorted({(tokens[i], i) for i in ([bos] if add_bos else []) + ([eos] if add_eos else [])})
        post.append(
            processors.TemplateProcessing(
                single=head + ["$A"] + tail, pair=head + ["$A"] + tail + head + ["$B"] + tail, special_tokens=specials
            )
        )
    tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
    return tok.to_str()


def config_from_gguf(reader) -> dict[str, Any]:
    """The ``config.json`` of a llama GGUF (``gguf.GGUFReader``): a transformers ``LlamaConfig``.

    The head is tied (``tie_word_embeddings``) when the file has no ``output.weight``, as
    llama.cpp's converter omits it then.

    Raises:
      ValueError: not a llama GGUF, or a feature the Llama config cannot express (named).
    """
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"`general.architecture` is {arch!r}; only 'llama' GGUF files are converted.")

    def get(key, default=None):
        value = _field(reader, f"llama.{key}", default)
        if value is None:
            raise ValueError(f"the GGUF lacks `llama.{key}`, needed for the Llama config.")
        return value

    hidden, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = hidden // n_heads
    rope_dim = int(get("rope.dimension_count", head_dim))
    key_len = int(get("attention.key_length", head_dim))
    if rope_dim != head_dim or key_len != head_dim:
        raise ValueError(
            f"head size {key_len} / rotary dims {rope_dim} differ from hidden / heads = {head_dim}; "
            "lrtt.models reads only full rotary on heads of size hidden / heads from GGUF."
        )
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"`llama.rope.scaling.type` is {scaling!r}; GGUF rope scaling is not read; convert the original transformers checkpoint instead.")
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(get("vocab_size", n_vocab)),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }


def _tensor_f32(tensor) -> np.ndarray:
    with needs_extra():
        import gguf

    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # GGUF lists dims fastest-first (ne0 = in); numpy's row-major shape is the reverse: (out, in).
    return np.asarray(data, dtype=np.float32).reshape(tuple(int(n) for n in reversed(tensor.shape)))


def _reader(path: str | os.PathLike):
    with needs_extra():
        import gguf

    return gguf.GGUFReader(os.fspath(path))


class GGUFFile:
    """A llama GGUF as transformers tensors: ``file[name]`` dequantizes one to float32.

    ``name`` is the PyTorch name (``model.layers.3.mlp.up_proj.weight``, ``(out, in)``); q and k
    come un-permuted (:func:`unpermute_rotary`, with the query and the KV head counts). The file
    is memory-mapped: nothing is dequantized until a tensor is read.

    Raises:
      ValueError: a tensor with no place in a transformers Llama (biases, ``rope_freqs``,
        another architecture's), or a vocab size that disagrees with the embedding.
    """

    def __init__(self, path: str | os.PathLike, reader: Any = None):
        self.path = os.fspath(path)
        self.reader = reader if reader is not None else _reader(path)
        self.config = config_from_gguf(self.reader)
        self._tensors: dict[str, tuple[Any, str | None]] = {}
        unknown = []
        for tensor in self.reader.tensors:
            block = re.fullmatch(r"blk\.(\d+)\.(.+)", tensor.name)
            if tensor.name in _TOP_TENSORS:
                self._tensors[_TOP_TENSORS[tensor.name]] = (tensor, None)
            elif block and block.group(2) in _LAYER_TENSORS:
                name, rotary = _LAYER_TENSORS[block.group(2)]
                self._tensors[f"model.layers.{int(block.group(1))}.{name}"] = (tensor, rotary)
            else:
                unknown.append(tensor.name)
        if unknown:
            raise ValueError(
                f"{self.path!r} holds tensors a transformers Llama has no place for: {unknown[:5]}"
                f"{' …' if len(unknown) > 5 else ''} (biases, rope_freqs or another architecture).")
        embed = self._tensors.get("model.embed_tokens.weight")
        if embed is None:
            raise ValueError(f"{self.path!r} has no token_embd.weight: not a complete llama model.")
        if int(embed[0].shape[-1]) != self.config["vocab_size"]:
            raise ValueError(f"{self.path!r}: `llama.vocab_size` is {self.config['vocab_size']} but token_embd has "
                             f"{int(embed[0].shape[-1])} rows.")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[name][0].shape))

    def __getitem__(self, name: str) -> np.ndarray:
        tensor, rotary = self._tensors[name]
        w = _tensor_f32(tensor)
        return unpermute_rotary(w, self.config[rotary]) if rotary else w


def tensor_index(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, tuple[GGUFFile, str]]]:
    """``(config, {tensor name: (file, name)})`` of a ``.gguf``: what :func:`lrtt.models.load`
    takes from a checkpoint directory's ``config.json`` and safetensors."""
    file = GGUFFile(path)
    return file.config, {name: (file, name) for name in file.keys()}


def tokenizer_config_from_gguf(reader) -> dict[str, Any]:
    """``tokenizer_config.json`` of a GGUF: its chat template and special tokens, so that
    ``transformers.AutoTokenizer.from_pretrained`` of the converted directory gives a fast
    tokenizer with ``apply_chat_template``."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for key, field in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                       ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        index = _field(reader, f"tokenizer.ggml.{field}")
        if index is not None:
            out[key] = str(tokens[int(index)])
    template = _field(reader, "tokenizer.chat_template")
    if template:
        out["chat_template"] = str(template)
    context = _field(reader, "llama.context_length")
    if context is not None:
        out["model_max_length"] = int(context)
    return out


def convert(path: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Write a llama GGUF as a transformers checkpoint directory (float32 ``model.safetensors``,
    ``config.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json``);
    the files are written in place (write to a fresh directory). Returns the names written."""
    import json
    import pathlib

    from lrtt.models._safetensors import write_sharded

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    file = GGUFFile(path)
    tensors = [(name, file.shape(name), np.dtype(np.float32), functools.partial(file.__getitem__, name))
               for name in sorted(file.keys())]
    written = write_sharded(out, tensors, max_shard_size=1 << 62)
    config = dict(file.config, dtype="float32")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    files = {"config.json": json.dumps(config, indent=2, sort_keys=True),
             "tokenizer.json": tokenizer_from_gguf(file.reader),
             "tokenizer_config.json": json.dumps(tokenizer_config_from_gguf(file.reader), indent=2, sort_keys=True),
             "generation_config.json": json.dumps(generation, indent=2, sort_keys=True)}
    for name, text in files.items():
        (out / name).write_text(text + "\n")
    return written + list(files)
