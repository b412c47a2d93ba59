"""GGUF → FlaxLlama conversion on a tiny synthetic llama GGUF written with ``gguf.GGUFWriter``."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import gguf  # lrtt[models]: CI installs it, so a missing reader fails rather than skips
import pytest

from lrtt.cli._gguf import permute_rotary, read_gguf_llama, unpermute_rotary
from lrtt.cli.zoo import build_llama, convert_gguf_cached, load_llama_gguf

N_LAYERS, HIDDEN, N_HEADS, N_KV, FFN = 2, 16, 4, 2, 32
HEAD_DIM = HIDDEN // N_HEADS
ROPE_THETA = 1e5  # not FlaxLlama's hard-coded 1e4: exercises the rope_theta fix
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
    return read_gguf_llama(gguf_path)


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
    shapes = {
        "model/embed_tokens/embedding": (VOCAB, HIDDEN), "model/norm/weight": (HIDDEN,),
        "lm_head/kernel": (HIDDEN, VOCAB),
    }
    for i in range(N_LAYERS):
        layer = f"model/layers/{i}/"
        shapes.update({
            layer + "self_attn/q_proj/kernel": (HIDDEN, N_HEADS * HEAD_DIM),
            layer + "self_attn/k_proj/kernel": (HIDDEN, N_KV * HEAD_DIM),
            layer + "self_attn/v_proj/kernel": (HIDDEN, N_KV * HEAD_DIM),
            layer + "self_attn/o_proj/kernel": (HIDDEN, HIDDEN),
            layer + "mlp/gate_proj/kernel": (HIDDEN, FFN), layer + "mlp/up_proj/kernel": (HIDDEN, FFN),
            layer + "mlp/down_proj/kernel": (FFN, HIDDEN),
            layer + "input_layernorm/weight": (HIDDEN,), layer + "post_attention_layernorm/weight": (HIDDEN,),
        })
    return shapes


def test_names_shapes_dtypes(converted):
    _, params, _ = converted
    assert {k: v.shape for k, v in params.items()} == _expected_shapes()
    assert all(v.dtype == np.float32 for v in params.values())


def test_kernels_are_in_out_and_qk_unpermuted(converted, weights):
    _, params, _ = converted
    for i in range(N_LAYERS):
        attn, mlp = f"model/layers/{i}/self_attn/", f"model/layers/{i}/mlp/"
        np.testing.assert_array_equal(params[attn + "q_proj/kernel"], weights[f"{i}.q"].T)
        np.testing.assert_array_equal(params[attn + "k_proj/kernel"], weights[f"{i}.k"].T)
        for name, key in [("v_proj", "v"), ("o_proj", "o")]:
            np.testing.assert_array_equal(params[attn + name + "/kernel"], weights[f"{i}.{key}"].T)
        for name in ("gate", "up", "down"):
            np.testing.assert_array_equal(params[mlp + name + "_proj/kernel"], weights[f"{i}.{name}"].T)
        np.testing.assert_array_equal(params[f"model/layers/{i}/input_layernorm/weight"], weights[f"{i}.attn_norm"])
    # The test discriminates: un-permuting k with the query head count is wrong under GQA.
    wrong = unpermute_rotary(permute_rotary(weights["0.k"], N_KV), N_HEADS)
    assert not np.array_equal(wrong, weights["0.k"])


def test_lm_head_is_tied_embedding(converted, weights):
    _, params, _ = converted
    np.testing.assert_array_equal(params["model/embed_tokens/embedding"], weights["embed"])
    np.testing.assert_array_equal(params["lm_head/kernel"], params["model/embed_tokens/embedding"].T)


def test_config(converted):
    config, _, _ = converted
    expected = {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": N_LAYERS,
        "num_attention_heads": N_HEADS, "num_key_value_heads": N_KV, "head_dim": HEAD_DIM,
        "rope_theta": ROPE_THETA, "max_position_embeddings": 64, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    assert {k: config[k] for k in expected} == expected
    assert config["rms_norm_eps"] == pytest.approx(1e-5)
    json.dumps(config)  # serializable as written to the cache


def test_tokenizer(converted):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(converted[2])
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
        read_gguf_llama(path)


# --- the Flax model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(converted):
    config, params, _ = converted
    return build_llama(config, params)


def _logits(model, ids, params=None):
    params = model.params if params is None else params
    return jax.jit(lambda p, x: model(x, params=p).logits)(params, jnp.asarray(ids, jnp.int32))


IDS = np.random.default_rng(1).integers(0, VOCAB, (2, 9))


def test_flax_model_runs_under_jit(model):
    logits = _logits(model, IDS)
    assert logits.shape == (2, 9, VOCAB)
    assert bool(jnp.isfinite(logits).all())


def test_build_llama_checks_shapes(converted):
    config, params, _ = converted
    bad = dict(params, **{"model/norm/weight": np.ones(HIDDEN + 1, np.float32)})
    with pytest.raises(ValueError, match="model/norm/weight"):
        build_llama(config, bad)


def test_rope_theta_is_honoured(converted, model):
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config, _, _ = converted
    upstream = FlaxLlamaForCausalLM(LlamaConfig(**config), _do_init=False)  # rotary base fixed at 1e4
    expected_1e4 = _logits(upstream, IDS, model.params)
    assert not np.allclose(_logits(model, IDS), expected_1e4, atol=1e-4)
    # With theta = 1e4 the fix is the identity.
    ours_1e4 = build_llama(dict(config, rope_theta=10000.0), converted[1])
    np.testing.assert_allclose(_logits(ours_1e4, IDS), expected_1e4, rtol=1e-5, atol=1e-5)


def test_save_pretrained_export_reloads_with_rope_theta(converted, model, tmp_path):
    """A merged SmolLM2-style export (rope theta 1e5) reloads with lrtt.cli.zoo.llama_class()."""
    import lrtt

    model.save_pretrained(tmp_path / "merged", params=model.params)
    reloaded = lrtt.cli.zoo.llama_class().from_pretrained(tmp_path / "merged")
    assert reloaded.config.rope_theta == ROPE_THETA
    np.testing.assert_allclose(_logits(reloaded, IDS), _logits(model, IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.torch
def test_matches_pytorch_llama(converted, weights, model):
    # The reference: transformers' PyTorch Llama on the original (un-permuted, (out, in)) weights.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config, _, _ = converted
    ref = LlamaForCausalLM(LlamaConfig(**dict(config, tie_word_embeddings=True))).eval()
    sd = {"model.embed_tokens.weight": weights["embed"], "model.norm.weight": weights["norm"]}
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(N_LAYERS):
        sd.update({f"model.layers.{i}.{hf}.weight": weights[f"{i}.{key}"] for key, hf in names.items()})
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    with torch.no_grad():
        expected = ref(torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(np.asarray(_logits(model, IDS)), expected, rtol=1e-4, atol=1e-4)


# --- the conversion cache --------------------------------------------------------------------


def test_cache_roundtrip_and_rebuild(gguf_path, converted, tmp_path):
    from tokenizers import Tokenizer

    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a first conversion is silent
        model, tok = load_llama_gguf(gguf_path, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == [
        "checksums.json", "config.json", "params.safetensors", "tokenizer.json"]
    sums = json.loads((cache / "checksums.json").read_text())
    assert len(sums["source_sha256"]) == 64 and set(sums["files"]) == {"params.safetensors", "config.json", "tokenizer.json"}
    flat = jax.tree_util.tree_leaves_with_path(model.params)
    assert len(flat) == len(converted[1])
    text = "<|im_start|>the cat in a hat<|im_end|>"
    assert tok.encode(text).ids == Tokenizer.from_str(converted[2]).encode(text).ids

    stamp = (cache / "params.safetensors").stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid cache is reused as is
        convert_gguf_cached(gguf_path, cache)
    assert (cache / "params.safetensors").stat().st_mtime_ns == stamp

    data = bytearray((cache / "params.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (cache / "params.safetensors").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="does not match its checksum"):
        model2, _ = load_llama_gguf(gguf_path, cache_dir=cache)
    np.testing.assert_array_equal(model2.params["lm_head"]["kernel"], converted[1]["lm_head/kernel"])

    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, _hf_weights(seed=1))
    with pytest.warns(UserWarning, match="source GGUF changed"):
        convert_gguf_cached(other, cache)
