"""The CLI on a checkpoint directory (`model: {path: DIR, dtype: ...}`): a tiny random Llama written
by `lrtt.models.save` with a WordLevel `tokenizer.json` (no torch, no download) -> `lrtt train`
3 steps -> `lrtt eval` (one JSON line) -> `lrtt export --format hf | peft [--for vllm]`."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import lrtt
import lrtt.models
from lrtt.cli import _main as cli

CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=32,
              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              rms_norm_eps=1e-6, max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=False,
              bos_token_id=2, eos_token_id=1)
WORDS = ("the a of to and in is that for it on was with he said as at by be has from have his are but an not "
         "will they this had been its were who which their more also would after first up year two new one "
         "people said. government market company last years mr there time over into could than about can "
         "best film music game world uk us england labour election party minister technology mobile "
         "players win sales growth economy bank firm chief told").split()
MAX_LEN, EVAL_BLOCKS = 16, 4


def _tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, "<s>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    assert len(vocab) <= CONFIG["vocab_size"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = lrtt.models.Model.from_config(CONFIG)
    params = jax.tree.map(lambda x: x * 4.0, model.init(jax.random.key(0)))  # livelier logits than the init's
    lrtt.models.save(directory, model, params)
    _tokenizer(directory / "tokenizer.json")
    return directory


def _config(tmp_path, checkpoint, **model):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": str(checkpoint), "dtype": "float32", **model},
        "method": {"name": "lora", "rank": 4, "targets": "all-linear"},
        "data": {"max_len": MAX_LEN, "train_limit": 8, "eval_limit": EVAL_BLOCKS},
        "train": {"steps": 3, "batch_size": 4, "lr": 0.05, "warmup": 0, "eval_every": 3, "eval_batch_size": 4},
        "output": {"dir": str(tmp_path / "run"), "save_every": 3},
    }))
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory, checkpoint):
    tmp = tmp_path_factory.mktemp("cli-checkpoint")
    config = _config(tmp, checkpoint)
    assert cli.main(["train", config, "--no-progress"]) == 0
    return tmp, config


def _expected_logits(checkpoint, run_dir, tokens):
    """The adapted model's logits, computed by lrtt from the base checkpoint and the run's adapter."""
    model, params = lrtt.models.load(checkpoint)
    method = lrtt.LoRA(rank=4, targets="all-linear")
    with lrtt.CheckpointManager(run_dir / "checkpoints", method, create=False) as manager:
        adapter = manager.restore(adapter_like=lrtt.adapter_shapes(method, params)).adapter
    base = model(params, tokens)
    return model, params, lrtt.factored(model)(lrtt.wrap(method, params, adapter), tokens), base


def _tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (2, 12)), jnp.int32)


def _close(a, b, rtol=1e-4):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) <= rtol


def test_train_writes_an_hf_merged_export_and_eval_prints_one_json_line(run, checkpoint, capsys):
    tmp, config = run
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["test"]["perplexity"] > 1
    merged = tmp / "run" / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    assert lrtt.inspect_export(merged).kind == "lrtt"
    capsys.readouterr()
    assert cli.main(["eval", config]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert list(result) == ["loss", "perplexity", "tokens"]
    assert result["tokens"] == EVAL_BLOCKS * (MAX_LEN - 1)
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]))
    assert result["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-5)


def test_export_hf_reloads_as_the_merged_model(run, checkpoint, capsys):
    tmp, config = run
    out = tmp / "hf"
    assert cli.main(["export", config, "--format", "hf", "--out", str(out)]) == 0
    assert f"written to {out}" in capsys.readouterr().out
    tokens = _tokens()
    _, _, expected, base = _expected_logits(checkpoint, tmp / "run", tokens)
    model, params = lrtt.models.load(out)
    got = model(params, tokens)
    assert _close(got, expected) and not _close(got, base, rtol=1e-3)  # the adapter is in it
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    # the same run exports there again; a directory lrtt did not write is refused, untouched
    assert cli.main(["export", config, "--out", str(out)]) == 0
    foreign = tmp / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli.main(["export", config, "--format", "hf", "--out", str(foreign)]) == 1
    assert "lrtt did not write" in capsys.readouterr().err
    assert sorted(os.listdir(foreign)) == ["notes.txt"]


def test_export_peft_round_trips_through_load_peft(run, checkpoint, capsys):
    tmp, config = run
    out = tmp / "peft"
    assert cli.main(["export", config, "--format", "peft", "--out", str(out)]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["task_type"] == "CAUSAL_LM" and lrtt.inspect_export(out).kind == "lrtt"
    tokens = _tokens()
    model, params, expected, _ = _expected_logits(checkpoint, tmp / "run", tokens)
    method, adapter = lrtt.load_peft(out, params)
    assert _close(lrtt.factored(model)(lrtt.wrap(method, params, adapter), tokens), expected, rtol=1e-5)


def test_export_for_vllm_refuses_a_rank_vllm_does_not_serve(run, capsys):
    tmp, config = run
    out = tmp / "vllm"
    assert cli.main(["export", config, "--format", "peft", "--for", "vllm", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "rank 4 is not one vLLM serves: use rank=8 (max_lora_rank ∈ {1, 8, 16, 32, 64, 128, 256, 320, 512})" in err
    assert not out.exists()
    assert cli.main(["export", config, "--format", "hf", "--for", "vllm", "--out", str(out)]) == 2
    assert "--format peft" in capsys.readouterr().err
    assert cli.main(["export", config, "--format", "flax", "--out", str(out)]) == 2
    assert "--format hf" in capsys.readouterr().err and not out.exists()


def test_model_path_errors_are_config_errors(tmp_path, checkpoint, capsys):
    cases = [
        (dict(path=str(tmp_path / "missing")), "does not exist"),
        (dict(path=str(tmp_path)), "holds no config.json"),
        (dict(dtype="float8"), "`model.dtype` must be one of"),
        (dict(pth="x"), "unknown key `model.pth`"),
    ]
    for model, message in cases:
        config = _config(tmp_path, checkpoint, **model)
        assert cli.main(["count", config]) == 2, model
        err = capsys.readouterr().err
        assert err.startswith("lrtt: error: ") and message in err and len(err.strip().splitlines()) == 1, err
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((checkpoint / "config.json").read_text())
    assert cli.main(["count", _config(tmp_path, no_tokenizer, path=str(no_tokenizer))]) == 2
    assert "holds no tokenizer.json" in capsys.readouterr().err


def test_resume_refuses_another_model_and_count_reads_the_checkpoint(run, capsys):
    tmp, config = run
    assert cli.main(["train", config, "--set", "model.dtype=bfloat16", "--set", "train.steps=4"]) == 2
    err = capsys.readouterr().err
    assert "model.dtype 'float32' → 'bfloat16'" in err and "model.path" not in err
    assert cli.main(["count", config]) == 0
    assert "LoRA(rank=4" in capsys.readouterr().out
