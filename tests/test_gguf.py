"""GGUF → FlaxLlama conversion on a tiny synthetic llama GGUF written with ``gguf.GGUFWriter``."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import gguf  # lrtt[models]: CI installs it, so a missing reader fails rather than skips
import pytest

import lrtt
import lrtt.models
from lrtt.cli.zoo import convert_gguf_cached
from lrtt.models._gguf import GGUFFile, permute_rotary, tokenizer_from_gguf, unpermute_rotary

N_LAYERS, HIDDEN, N_HEADS, N_KV, FFN = 2, 16, 4, 2, 32
HEAD_DIM = HIDDEN // N_HEADS
ROPE_THETA = 1e5  # not Llama's default 1e4
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]


def _byte_chars() -> list[str]:
    """GPT-2's byte → printable-char table (byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


TOKENS = SPECIALS + _byte_chars() + [m.replace(" ", "") for m in MERGES]
VOCAB = len(TOKENS)


def _hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in HF/PyTorch naming and (out, in) orientation."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)  # noqa: E731
    w = {"embed": normal(VOCAB, HIDDEN), "norm": 1 + normal(HIDDEN)}
    for i in range(N_LAYERS):
        w.update({
            f"{i}.q": normal(N_HEADS * HEAD_DIM, HIDDEN), f"{i}.k": normal(N_KV * HEAD_DIM, HIDDEN),
            f"{i}.v": normal(N_KV * HEAD_DIM, HIDDEN), f"{i}.o": normal(HIDDEN, HIDDEN),
            f"{i}.gate": normal(FFN, HIDDEN), f"{i}.up": normal(FFN, HIDDEN), f"{i}.down": normal(HIDDEN, FFN),
            f"{i}.attn_norm": 1 + normal(HIDDEN), f"{i}.ffn_norm": 1 + normal(HIDDEN),
        })
    return w


def write_tiny_gguf(path, weights, *, rope_theta=ROPE_THETA) -> None:
    """A llama GGUF as llama.cpp's converter writes it: q/k rows permuted, tied output omitted."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_KV)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (VOCAB - len(SPECIALS))
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    writer.add_tensor("token_embd.weight", weights["embed"])
    for i in range(N_LAYERS):
        blk = f"blk.{i}."
        writer.add_tensor(blk + "attn_q.weight", permute_rotary(weights[f"{i}.q"], N_HEADS))
        writer.add_tensor(blk + "attn_k.weight", permute_rotary(weights[f"{i}.k"], N_KV))
        for gguf_name, key in [("attn_v", "v"), ("attn_output", "o"), ("ffn_gate", "gate"), ("ffn_up", "up"),
                               ("ffn_down", "down"), ("attn_norm", "attn_norm"), ("ffn_norm", "ffn_norm")]:
            writer.add_tensor(blk + gguf_name + ".weight", weights[f"{i}.{key}"])
    writer.add_tensor("output_norm.weight", weights["norm"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def weights():
    return _hf_weights()


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory, weights):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_gguf(path, weights)
    return path


@pytest.fixture(scope="module")
def converted(gguf_path):
    return GGUFFile(gguf_path)


# --- the rotary permutation ------------------------------------------------------------------


@pytest.mark.parametrize("n_heads,head_dim,cols", [(1, 2, 1), (4, 4, 16), (3, 64, 5), (9, 64, 0)])
def test_unpermute_is_exact_inverse(n_heads, head_dim, cols):
    shape = (n_heads * head_dim, cols) if cols else (n_heads * head_dim,)
    w = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    np.testing.assert_array_equal(unpermute_rotary(permute_rotary(w, n_heads), n_heads), w)
    np.testing.assert_array_equal(permute_rotary(unpermute_rotary(w, n_heads), n_heads), w)


def test_permute_pairs_half_rotation_rows():
    # llama.cpp rotates adjacent rows (2i, 2i+1); HF rotates (i, i + d/2) within each head.
    n_heads, d = 3, 8
    rows = np.arange(n_heads * d)
    p = permute_rotary(rows, n_heads).reshape(n_heads, d)
    for h in range(n_heads):
        np.testing.assert_array_equal(p[h, 0::2], h * d + np.arange(d // 2))
        np.testing.assert_array_equal(p[h, 1::2], h * d + d // 2 + np.arange(d // 2))


def test_permute_rejects_indivisible_rows():
    with pytest.raises(ValueError, match="multiple of 2"):
        unpermute_rotary(np.zeros((6, 2)), 2)


# --- the conversion --------------------------------------------------------------------------


def _expected_shapes():
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}  # tied: no lm_head
    for i in range(N_LAYERS):
        layer = f"model.layers.{i}."
        shapes.update({
            layer + "self_attn.q_proj.weight": (N_HEADS * HEAD_DIM, HIDDEN),
            layer + "self_attn.k_proj.weight": (N_KV * HEAD_DIM, HIDDEN),
            layer + "self_attn.v_proj.weight": (N_KV * HEAD_DIM, HIDDEN),
            layer + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            layer + "mlp.gate_proj.weight": (FFN, HIDDEN), layer + "mlp.up_proj.weight": (FFN, HIDDEN),
            layer + "mlp.down_proj.weight": (HIDDEN, FFN),
            layer + "input_layernorm.weight": (HIDDEN,), layer + "post_attention_layernorm.weight": (HIDDEN,),
        })
    return shapes


def test_names_shapes_dtypes(converted):
    assert {k: converted.shape(k) for k in converted.keys()} == _expected_shapes()
    assert {k: converted[k].shape for k in converted.keys()} == _expected_shapes()
    assert all(converted[k].dtype == np.float32 for k in converted.keys())


def test_weights_are_pytorch_out_in_and_qk_unpermuted(converted, weights):
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(N_LAYERS):
        for key, hf in names.items():
            np.testing.assert_array_equal(converted[f"model.layers.{i}.{hf}.weight"], weights[f"{i}.{key}"])
    np.testing.assert_array_equal(converted["model.embed_tokens.weight"], weights["embed"])
    # The test discriminates: un-permuting k with the query head count is wrong under GQA.
    wrong = unpermute_rotary(permute_rotary(weights["0.k"], N_KV), N_HEADS)
    assert not np.array_equal(wrong, weights["0.k"])


def test_config(converted):
    config = converted.config
    expected = {
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS, "num_key_value_heads": N_KV,
        "head_dim": HEAD_DIM, "rope_theta": ROPE_THETA, "max_position_embeddings": 64,
        "tie_word_embeddings": True,  # no output.weight in the file
        "bos_token_id": 1, "eos_token_id": 2,
    }
    assert {k: config[k] for k in expected} == expected
    assert config["rms_norm_eps"] == pytest.approx(1e-5)
    json.dumps(config)  # serializable as written to the cache


def test_tokenizer(converted):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_from_gguf(converted.reader))
    text = "<|im_start|>the cat in a hat, 2024 times!\n<|im_end|>"
    enc = tok.encode(text)
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert enc.ids[0] == 1 and enc.ids[-1] == 2  # specials keep their GGUF ids, matched whole
    assert TOKENS.index("Ġthe") not in enc.ids  # "the" at the start has no space before it
    assert TOKENS.index("Ġa") in enc.ids and TOKENS.index("in") in enc.ids  # merges apply
    assert [TOKENS[i] for i in tok.encode(" 2024").ids] == ["Ġ", "2", "0", "2", "4"]  # smollm digits
    assert [TOKENS[i] for i in tok.encode(" the").ids] == ["Ġthe"]
    assert tok.get_vocab_size() == VOCAB


def test_rejects_unknown_tensor(tmp_path, weights):
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_merges(MERGES)
    for key, value in [("block_count", 1), ("context_length", 8), ("embedding_length", HIDDEN),
                       ("feed_forward_length", FFN), ("attention.head_count", N_HEADS)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tensor("token_embd.weight", weights["embed"])
    writer.add_tensor("blk.0.attn_q.bias", np.zeros(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="attn_q.bias"):
        GGUFFile(path)
    with pytest.raises(ValueError, match="attn_q.bias"):
        lrtt.models.load(path)


# --- lrtt.models.load of a .gguf ---------------------------------------------------------------


IDS = np.random.default_rng(1).integers(0, VOCAB, (2, 9))


@pytest.fixture(scope="module")
def loaded(gguf_path):
    return lrtt.models.load(gguf_path)


def test_load_reads_the_gguf_as_its_llama(loaded, weights):
    model, params = loaded
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings and model.source is None
    np.testing.assert_array_equal(params["layers"]["attn"]["k_proj"]["kernel"][1], weights["1.k"].T)
    logits = model(params, IDS)
    assert logits.shape == (2, 9, VOCAB) and bool(jnp.isfinite(logits).all())


def test_quantized_load_equals_quantizing_the_float_load(gguf_path, loaded):
    _, params = loaded
    _, quantized = lrtt.models.load(gguf_path, quantize={"qtype": "nf4", "block_size": 8})
    expected = lrtt.quantize(params, "all-linear", qtype="nf4", block_size=8)
    assert jax.tree.structure(quantized) == jax.tree.structure(expected)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(quantized), jax.tree.leaves(expected)))


def test_merged_save_reloads_with_rope_theta(loaded, tmp_path):
    model, params = loaded
    lrtt.models.save(tmp_path / "merged", model, params)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["rope_theta"] == ROPE_THETA
    model2, params2 = lrtt.models.load(tmp_path / "merged")
    np.testing.assert_array_equal(model2(params2, IDS), model(params, IDS))


@pytest.mark.torch
def test_matches_pytorch_llama(converted, weights, loaded):
    # The reference: transformers' PyTorch Llama on the original (un-permuted, (out, in)) weights.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = LlamaForCausalLM(LlamaConfig(**converted.config)).eval()
    sd = {"model.embed_tokens.weight": weights["embed"], "model.norm.weight": weights["norm"]}
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(N_LAYERS):
        sd.update({f"model.layers.{i}.{hf}.weight": weights[f"{i}.{key}"] for key, hf in names.items()})
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    with torch.no_grad():
        expected = ref(torch.from_numpy(IDS)).logits.numpy()
    model, params = loaded
    np.testing.assert_allclose(np.asarray(model(params, IDS)), expected, rtol=1e-4, atol=1e-4)


# --- the conversion cache (the CLI's SmolLM2) ------------------------------------------------


_CACHE_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_cache_is_a_checkpoint_directory_and_is_rebuilt_when_wrong(gguf_path, loaded, tmp_path):
    from transformers import AutoTokenizer

    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a first conversion is silent
        convert_gguf_cached(gguf_path, cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted(["checksums.json", *_CACHE_FILES])
    sums = json.loads((cache / "checksums.json").read_text())
    assert len(sums["source_sha256"]) == 64 and sorted(sums["files"]) == _CACHE_FILES
    model, params = lrtt.models.load(cache)
    np.testing.assert_array_equal(model(params, IDS), loaded[0](loaded[1], IDS))
    tok = AutoTokenizer.from_pretrained(cache)
    chat = tok.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok("<|im_start|>the cat").input_ids == tok.backend_tokenizer.encode("<|im_start|>the cat").ids

    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid cache is reused as is
        convert_gguf_cached(gguf_path, cache)
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp

    data = bytearray((cache / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (cache / "model.safetensors").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="does not match its checksum"):
        convert_gguf_cached(gguf_path, cache)
    model, params = lrtt.models.load(cache)
    np.testing.assert_array_equal(model(params, IDS), loaded[0](loaded[1], IDS))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the staging directory is gone

    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, _hf_weights(seed=1))
    with pytest.warns(UserWarning, match="source GGUF changed"):
        convert_gguf_cached(other, cache)
