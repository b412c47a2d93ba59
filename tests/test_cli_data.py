"""The CLI on the user's files (issue 21): `data.train` chat / prompt-completion JSONL with packing
-> `lrtt train`; `lrtt eval --data FILE` (the loss over the completion tokens only); `lrtt generate`
from the run's checkpoint (factored) and from its merged export, equal to lrtt.models.generate; bad
rows named by file and line. A tiny random Llama with a WordLevel tokenizer and a ChatML template."""

import json

import jax
import numpy as np
import pytest
import yaml

import lrtt
import lrtt.data
import lrtt.models
from lrtt.cli import _main as cli

CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=96, hidden_size=32,
              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              rms_norm_eps=1e-6, max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=False,
              bos_token_id=2, eos_token_id=4)
SPECIALS = ["[UNK]", "[PAD]", "<s>", "<|im_start|>", "<|im_end|>"]
WORDS = ("user assistant system what is the topic of article sport business tech politics film music game "
         "one two three four five six seven eight nine ten plus equals answer question hello who are you").split()
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TOPICS = ["sport", "business", "tech", "politics", "film"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    directory = tmp_path_factory.mktemp("tiny-chat-llama")
    model = lrtt.models.Model.from_config(CONFIG)
    params = jax.tree.map(lambda x: x * 4.0, model.init(jax.random.key(0)))  # decisive argmaxes
    lrtt.models.save(directory, model, params)
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML, "bos_token": "<s>",
        "eos_token": "<|im_end|>", "pad_token": "[PAD]", "unk_token": "[UNK]"}))
    assert len(vocab) <= CONFIG["vocab_size"]
    return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    with open(directory / "chat.jsonl", "w") as f:
        for i in range(40):
            topic = TOPICS[int(rng.integers(len(TOPICS)))]
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"what is the topic of {topic} article {['one', 'two'][i % 2]}"},
                {"role": "assistant", "content": topic}]}) + "\n")
    with open(directory / "qa.jsonl", "w") as f:
        for a, b in [("one", "two"), ("two", "three"), ("three", "four"), ("four", "five")]:
            f.write(json.dumps({"question": f"what is {a} plus one", "answer": f" {b}"}) + "\n")
    (directory / "prompts.txt").write_text("what is the topic of sport article one\nhello who are you\n")
    return directory


def _config(tmp_path, checkpoint, data, **method):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": str(checkpoint), "dtype": "float32"},
        "method": {"name": "lora", "rank": 4, "targets": "all-linear", **method},
        "data": {"max_len": 48, **data},
        "train": {"steps": 4, "batch_size": 4, "lr": 0.05, "warmup": 0, "eval_every": 4, "eval_batch_size": 4},
        "output": {"dir": str(tmp_path / "run"), "save_every": 4},
    }))
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory, checkpoint, files):
    tmp = tmp_path_factory.mktemp("cli-data")
    config = _config(tmp, checkpoint, {"train": str(files / "chat.jsonl"), "packing": True, "eval_fraction": 0.2})
    assert cli.main(["train", config, "--no-progress"]) == 0
    return tmp, config


def test_train_on_chat_files_with_packing(run, capsys):
    tmp, _ = run
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and np.isfinite(summary["test"]["loss"])
    assert (tmp / "run" / "merged" / "tokenizer_config.json").is_file()  # the chat template travels


def test_eval_data_counts_only_the_assistant_tokens(run, checkpoint, files, capsys):
    from transformers import AutoTokenizer

    _, config = run
    capsys.readouterr()
    assert cli.main(["eval", config, "--data", str(files / "chat.jsonl")]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out.strip().splitlines()[-1])
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    expected = sum(int(e["loss_mask"].sum()) for e in lrtt.data.tokenize(lrtt.data.read(files / "chat.jsonl"),
                                                                         tokenizer, max_len=48))
    assert result["tokens"] == expected == 40 * 2  # each answer: the topic word and <|im_end|>
    assert set(result) == {"loss", "perplexity", "tokens"} and "format 'chat'" in out.err


def _expected_completions(checkpoint, run_dir, prompts):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model, params = lrtt.models.load(checkpoint)
    method = lrtt.LoRA(rank=4, targets="all-linear")
    with lrtt.CheckpointManager(run_dir / "checkpoints", method, create=False) as manager:
        adapter = manager.restore(adapter_like=lrtt.adapter_shapes(method, params)).adapter
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
           for p in prompts]
    ids = [list(x["input_ids"] if hasattr(x, "keys") else x) for x in ids]
    out = lrtt.models.generate(model, lrtt.wrap(method, params, adapter), ids, max_new_tokens=6,
                               apply=lrtt.factored(model), pad_token_id=1)
    return [[t for t in o[:o.index(4)]] if 4 in o else o for o in out]  # up to the EOS, <|im_end|>


def test_generate_from_the_checkpoint_and_from_the_merged_export(run, checkpoint, files, capsys):
    tmp, config = run
    prompts = (files / "prompts.txt").read_text().split("\n")[:2]
    expected = _expected_completions(checkpoint, tmp / "run", prompts)
    capsys.readouterr()
    assert cli.main(["generate", config, "--prompts", str(files / "prompts.txt"), "--max-new-tokens", "6",
                     "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["prompt"] for x in lines] == prompts  # the chat template applied: the run trained on chats
    assert [x["tokens"] for x in lines] == expected
    assert cli.main(["generate", config, "--merged", str(tmp / "run" / "merged"), "--max-new-tokens", "6",
                     "--json", *sum((["--prompt", p] for p in prompts), [])]) == 0
    merged = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["tokens"] for x in merged] == expected
    assert cli.main(["generate", config, "--prompt", "hello", "--top-k", "0"]) == 2
    assert "top_k" in capsys.readouterr().err


def test_the_cli_keeps_tokenized_rows_memory_mapped_and_leaves_no_file(tmp_path, checkpoint, files, monkeypatch):
    """The command's rows are read-only memory maps (a data set larger than memory trains),
    equal to the rows lrtt.data makes; their files are unlinked at once, and a dead writer's
    leftover folder is removed by the next run."""
    from transformers import AutoTokenizer

    from lrtt.cli import _config as config_module, _tasks

    monkeypatch.setenv("LRTT_CACHE", str(tmp_path / "cache"))
    stale = tmp_path / "cache" / "rows" / "rows-999999999-x"  # no such pid
    stale.mkdir(parents=True)
    (stale / "input_ids.int32").write_bytes(b"\0" * 8)
    config = config_module.load(_config(tmp_path, checkpoint, {"train": str(files / "chat.jsonl"), "packing": True,
                                                          "eval_fraction": 0.2}))
    splits, fmt, _ = _tasks.file_splits(config, str(checkpoint))
    train = splits["train"]
    assert fmt == "chat" and all(isinstance(a, np.memmap) and not a.flags.writeable for a in train.values())
    assert list((tmp_path / "cache" / "rows").iterdir()) == []  # the stale folder and its own files gone
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    parts = lrtt.data.load(files / "chat.jsonl", tokenizer, max_len=48, eval_fraction=0.2, seed=0)
    expected = list(lrtt.data.packed_rows(parts["train"], 48, parts["train"].pad_id))
    for key in lrtt.data.ROW_KEYS:
        np.testing.assert_array_equal(train[key], np.stack([r[key] for r in expected]))


def test_generate_with_an_adapter_per_prompt(run, checkpoint, files, capsys):
    """`lrtt generate --adapters a=DIR b=DIR --prompts FILE`: one batch, each prompt with the adapter
    its row names (none: the base); equal to generating each prompt alone with its adapter merged."""
    from transformers import AutoTokenizer

    tmp, config = run
    assert cli.main(["export", config, "--format", "peft", "--out", str(tmp / "peft-a")]) == 0
    model, params = lrtt.models.load(checkpoint)
    other = lrtt.LoRA(rank=2, alpha=8, targets="all-linear")  # another rank and scale: padded, folded
    adapter_b = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(7), x.shape),
                             other.init(jax.random.key(1), params))
    lrtt.save_peft(tmp / "peft-b", other, adapter_b, params)
    rows = [("what is the topic of sport article one", "a"), ("hello who are you", "b"),
            ("what is the topic of tech article two", None), ("who are you", "b")]
    prompts = tmp / "per-adapter.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, **({"adapter": n} if n else {})}) + "\n" for p, n in rows))
    capsys.readouterr()
    assert cli.main(["generate", config, "--adapters", f"a={tmp / 'peft-a'}", "--adapters", f"b={tmp / 'peft-b'}",
                     "--prompts", str(prompts), "--max-new-tokens", "6", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [(x["prompt"], x["adapter"]) for x in lines] == rows
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    method_a, adapter_a = lrtt.load_peft(tmp / "peft-a", params)
    merged = {"a": lrtt.merge(method_a, params, adapter_a), "b": lrtt.merge(other, params, adapter_b), None: params}
    for (prompt, name), line in zip(rows, lines):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        alone = lrtt.models.generate(model, merged[name], [ids], max_new_tokens=6, pad_token_id=1)[0]
        assert line["tokens"] == (alone[:alone.index(4)] if 4 in alone else alone), name
    assert len({tuple(x["tokens"]) for x in lines[:3]}) > 1
    bad = tmp / "bad-adapter.jsonl"
    bad.write_text(json.dumps({"prompt": "hello", "adapter": "c"}) + "\n")
    assert cli.main(["generate", config, "--adapters", f"a={tmp / 'peft-a'}", "--prompts", str(bad)]) == 2
    assert "adapter 'c' is not one of --adapters ['a']" in capsys.readouterr().err
    assert cli.main(["generate", config, "--adapters", f"a={tmp}", "--prompts", str(prompts)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_a_bad_row_is_named_by_file_and_line_or_skipped(tmp_path, checkpoint, files, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = (files / "chat.jsonl").read_text().splitlines()
    lines[6] = json.dumps({"messages": [{"role": "robot", "content": "beep"}]})
    bad.write_text("\n".join(lines) + "\n")
    config = _config(tmp_path, checkpoint, {"train": str(bad), "eval_fraction": 0.2})
    assert cli.main(["train", config, "--no-progress", "--set", "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:7" in err and "robot" in err and "on_bad_row" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert cli.main(["train", config, "--no-progress", "--set", "train.steps=1", "--set", "output.save_every=1",
                     "--set", "data.on_bad_row=skip"]) == 0
    assert "1 bad rows skipped" in capsys.readouterr().err


@pytest.mark.parametrize("data, message", [
    ({"packing": True}, "`data.packing` applies to the user's files; set `data.train`"),
    ({"train": "x.jsonl", "format": "sharegpt"}, "`data.format` must be one of"),
    ({"train": "x.jsonl", "eval": "y.jsonl", "eval_fraction": 0.1}, "not both"),
])
def test_data_section_errors(tmp_path, checkpoint, data, message, capsys):
    assert cli.main(["count", _config(tmp_path, checkpoint, data)]) == 2
    assert message in capsys.readouterr().err


def test_minilm_refuses_user_files(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"model": "minilm", "method": {"name": "lora"}, "data": {"train": "x.jsonl"}}))
    assert cli.main(["count", str(path)]) == 2
    assert "MiniLM classifies BBC News only" in capsys.readouterr().err
