"""The CLI on real weights: MiniLM + LorettaRep on BBC News, a few steps, resume, eval, export."""

import json

import numpy as np
import pytest

from lrtt.cli import _main as cli

SMALL = [
    "--set", "data.max_len=32", "--set", "data.train_limit=16", "--set", "data.eval_limit=16",
    "--set", "train.batch_size=8", "--set", "train.lr=2e-2", "--set", "train.warmup=0",
    "--set", "train.eval_every=4", "--set", "output.save_every=4", "--set", "train.eval_batch_size=16",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    args = ["train", "configs/minilm_bbc_loretta_rep.yaml", "--no-progress", *SMALL, "--set", f"output.dir={out}"]
    assert cli.main([*args, "--set", "train.steps=6"]) == 0
    assert cli.main([*args, "--set", "train.steps=10"]) == 0  # resumes from step 6
    return out


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_logs_decreasing_loss_and_resumes(run_dir, capsys):
    records = _records(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 11))  # 6 steps, then 4 more after resume
    first, last = np.mean([r["loss"] for r in train[:2]]), np.mean([r["loss"] for r in train[-2:]])
    assert last < first - 0.1, (first, last)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 6, 8, 10]
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 10
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["trainable_params"] < 20_000
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert (run_dir / "curves.png").stat().st_size > 1000


def test_eval_and_export_agree(run_dir, tmp_path, capsys):
    """`lrtt eval` equals the run's summary; `lrtt export --format flax` (the transformers Flax
    directory) computes the factored logits; train's `<run>/merged` is the default `--format hf`
    (PyTorch names and layouts, read back in tests/test_models_hf.py with transformers 5)."""
    from transformers import FlaxBertForSequenceClassification

    args = ["configs/minilm_bbc_loretta_rep.yaml", *SMALL, "--set", f"output.dir={run_dir}"]
    assert cli.main(["eval", *args]) == 0
    metrics = json.loads(capsys.readouterr().out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert metrics["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert (run_dir / "merged" / "model.safetensors").is_file()
    config_json = json.loads((run_dir / "merged" / "config.json").read_text())
    assert config_json["architectures"] == ["BertForSequenceClassification"] and config_json["dtype"] == "float32"
    assert cli.main(["export", *args, "--format", "flax", "--out", str(tmp_path / "flax")]) == 0
    merged = FlaxBertForSequenceClassification.from_pretrained(tmp_path / "flax")
    from lrtt.cli import _config, _methods, _restore, _tasks

    config = _config.load("configs/minilm_bbc_loretta_rep.yaml", [*SMALL[1::2], f"output.dir={run_dir}"])
    task = _tasks.build_task(config)
    batch = {k: v[:4] for k, v in task.splits["test"].items()}
    exported = merged(batch["input_ids"], batch["attention_mask"], params=merged.params).logits
    import lrtt

    method = _methods.build_method(config)
    adapter = _restore.restore_adapter(config, method, task)
    factored = lrtt.factored(task.apply)(lrtt.wrap(method, task.params, adapter), batch, None)
    np.testing.assert_allclose(exported, factored, rtol=1e-4, atol=1e-5)
    from lrtt.models._safetensors import tensor_index

    hf = {name: f[key] for name, (f, key) in tensor_index(run_dir / "merged").items()}
    flax_query = merged.params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
    np.testing.assert_array_equal(hf["bert.encoder.layer.0.attention.self.query.weight"], np.asarray(flax_query).T)
    np.testing.assert_array_equal(hf["classifier.weight"], np.asarray(merged.params["classifier"]["kernel"]).T)


def test_cli_errors_are_reported_not_raised(capsys):
    assert cli.main(["train", "configs/minilm_bbc_loretta_rep.yaml", "--set", "train.stepz=3"]) == 2
    assert "did you mean `steps`" in capsys.readouterr().err
    assert cli.main(["count", "configs/minilm_bbc_lora.yaml", "--set", "method.rnk=3"]) == 2
    assert "unknown key(s) ['method.rnk']" in capsys.readouterr().err


def test_count_prints_the_method_next_to_lora_and_full(capsys):
    assert cli.main(["count", "configs/minilm_bbc_loretta_rep.yaml"]) == 0
    out = capsys.readouterr().out
    assert "LorettaRep(rank=8, tt_rank=5)" in out and "LoRA(rank=8)" in out and "full fine-tune" in out


def test_count_of_full_fine_tuning_compares_with_plain_lora(capsys):
    assert cli.main(["count", "configs/minilm_bbc_full.yaml"]) == 0
    out = capsys.readouterr().out
    import re

    assert re.search(r"LoRA\(rank=8\)\s+73,728\s", out)  # 6 layers x (q, v) x 8·(384 + 384)
    assert re.search(r"full fine-tune\s+22,715,141\s", out)


def test_cli_reports_a_method_error_on_the_model_without_a_traceback(capsys):
    assert cli.main(["count", "configs/minilm_bbc_lora.yaml", "--set", "method.targets=nomatch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrtt: error:") and "Pass a regex that matches the kernels to adapt" in err
    assert "LRTT_DEBUG=1" in err and "Traceback" not in err


def test_progress_bar_in_a_log_is_not_redrawn_every_step(tmp_path, capsys):
    steps = 6
    args = ["train", "configs/minilm_bbc_loretta_rep.yaml", *SMALL, "--set", f"output.dir={tmp_path}",
            "--set", f"train.steps={steps}", "--set", "output.export=false"]
    assert cli.main(args) == 0  # progress on; stderr is captured, not a terminal
    draws = capsys.readouterr().err.count("loretta_rep:")
    assert 1 <= draws < steps, draws


def test_train_over_an_nf4_base_and_export_a_float_model(tmp_path, capsys):
    """`quantize: {qtype: nf4}`: the frozen base is quantized, training runs factored over it,
    the export is the dequantized base plus ΔW as a float transformers model."""
    args = ["configs/minilm_bbc_lora.yaml", *SMALL, "--set", f"output.dir={tmp_path}", "--set", "train.steps=4",
            "--set", "quantize.qtype=nf4"]
    assert cli.main(["train", *args, "--no-progress"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["quantize"] == {"qtype": "nf4", "block_size": 64}
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0
    from lrtt.models._safetensors import tensor_index

    files = tensor_index(tmp_path / "merged")  # the default --format hf
    file, key = files["bert.encoder.layer.0.attention.self.query.weight"]
    kernel = file[key]
    assert kernel.dtype == np.float32 and len(np.unique(np.asarray(kernel))) > 16  # float: dequantized + ΔW
    assert cli.main(["train", *args[:-2], "--set", "quantize.qtype=fp3", "--no-progress"]) == 2
    assert "`quantize.qtype` must be one of" in capsys.readouterr().err
