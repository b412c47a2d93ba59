"""``lrtt train`` as a 2-process JAX job (2 simulated CPU devices each, Gloo collectives) on the
real MiniLM weights: the outputs are written once, by process 0; the run equals the same config
trained in one process on one device; it resumes across the job; the run directory's lock
refuses a second job but not the processes of its own.

Measured (jax 0.10.2, 6 steps of LoRA r=8 at lr 2e-2): the 2-process losses differ from the
1-process ones by at most 2.5e-6 (the data-parallel sums are taken in another order), the merged
kernels by at most 3.6e-5 (Adam amplifies those differences where gradients are tiny; training
moves the kernels by up to 5e-2, so the relative difference is 1e-4). The tolerances below are
8x and 5x those. Resuming within the job replays the steps bit for bit.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import _multiprocess as mp
from lrtt.cli import _cluster, _rundir
from lrtt.cli import _main as cli

CONFIG = "configs/minilm_bbc_lora.yaml"
SETTINGS = [
    "data.max_len=32", "data.train_limit=16", "data.eval_limit=16", "train.batch_size=8", "train.lr=2e-2",
    "train.warmup=0", "train.eval_every=2", "output.save_every=2", "train.eval_batch_size=16",
]
ENTRY = "import sys; from lrtt.cli import main; sys.exit(main(sys.argv[1:]))"
LOSS_ATOL = 2e-5
WEIGHT_ATOL = 2e-4
TIMEOUT = 240  # seconds per launch: a 2-process run takes ~30-60 s on 2 shared cores


def _train_args(out: Path, steps: int) -> list[str]:
    sets = [a for s in [*SETTINGS, f"train.steps={steps}", f"output.dir={out}"] for a in ("--set", s)]
    return ["train", CONFIG, "--no-progress", *sets]


def _job(out: Path, steps: int, **kwargs):
    """The command on 2 processes of 2 devices each; raises with both logs if one fails."""
    return mp.launch([sys.executable, "-c", ENTRY, *_train_args(out, steps)], 2, 2, timeout=TIMEOUT, cwd=mp.ROOT,
                     **kwargs)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _merged(out: Path) -> dict[str, np.ndarray]:
    """The merged export's tensors (``--format hf``, the default: PyTorch names and layouts)."""
    from lrtt.models._safetensors import tensor_index

    return {name: f[key] for name, (f, key) in tensor_index(out / "merged").items()}


def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != _rundir.LOCK}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: 6 steps in this (one) process, on one device."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert cli.main(_train_args(out, 6)) == 0
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """6 steps as a 2-process job (joined from the JAX_* variables); then a second job, joined
    with the flags instead and the process ids swapped (the launcher's child 1 is process 0),
    restores the job's step 4 (``--restore-step 4``: step 6 is set aside) and trains 5 and 6 again."""
    out = tmp_path_factory.mktemp("job") / "run"
    first = _job(out, 6)
    first_records, first_merged = _records(out), _merged(out)
    port = mp.free_port()
    flags = [["--restore-step", "4", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
              "--process-id", str(1 - i)] for i in range(2)]
    second = _job(out, 6, extra_args_per_process=flags)
    return out, first, second, first_records, first_merged


def test_process_0_alone_writes_the_outputs_once(job):
    out, first, second, first_records, _ = job
    for records in (first_records, _records(out)):
        assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # no line twice
        assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4", "6"]
    assert [p.name for p in (out / "discarded").glob("*/*")] == ["6"]  # the first job's step 6, moved once
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock", "checkpoints", "config.json", "curves.png", "discarded", "lrtt-run.json", "merged", "metrics.jsonl",
        "summary.json"]
    assert sorted(p.name for p in (out / "merged").iterdir()) == ["config.json", "lrtt-export.json", "model.safetensors"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    # the first job: child i is process i; the second: the flags win over the variables
    for primary, other in ((first[0], first[1]), (second[1], second[0])):
        assert "held-out test accuracy" in primary.stdout and "held-out test" not in other.stdout
        assert "lrtt: error" not in primary.stderr + other.stderr
    assert second[1].stdout.count("moved to") == 1 and "moved to" not in second[0].stdout
    assert f"resuming {out} from step 4 (3 metric records of later steps dropped)" in second[1].stdout


def test_the_job_trains_as_one_process_does_and_resumes_across_it(job, single):
    out, _, _, first_records, first_merged = job
    ref = _by_step(_records(single))
    merged, ref_merged = _merged(out), _merged(single)
    for got, got_merged in ((_by_step(first_records), first_merged), (_by_step(_records(out)), merged)):
        assert got.keys() == ref.keys()
        for key, record in ref.items():
            assert got[key]["loss"] == pytest.approx(record["loss"], abs=LOSS_ATOL), key
            if "accuracy" in record:
                assert got[key]["accuracy"] == record["accuracy"], key
        assert got_merged.keys() == ref_merged.keys()
        worst = max(float(np.max(np.abs(got_merged[k] - ref_merged[k]))) for k in ref_merged)
        assert worst < WEIGHT_ATOL, worst
    replayed, first = _by_step(_records(out)), _by_step(first_records)
    assert [replayed[k]["loss"] for k in sorted(first)] == [first[k]["loss"] for k in sorted(first)]
    assert all(np.array_equal(merged[k], first_merged[k]) for k in merged)  # the resume is exact
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (out, single))
    assert summary["test"]["loss"] == pytest.approx(ref_summary["test"]["loss"], abs=LOSS_ATOL)
    moved = np.abs(ref_merged["bert.encoder.layer.0.attention.self.query.weight"] - _base_query_kernel().T)
    assert moved.max() > 100 * WEIGHT_ATOL  # training moved the kernels far more than the tolerance


def _by_step(records: list[dict]) -> dict:
    return {(r["kind"], r["step"]): r for r in records}


def test_a_checkpoint_of_the_job_restores_in_one_process(job, capsys):
    out = job[0]
    sets = [a for s in [*SETTINGS, f"output.dir={out}"] for a in ("--set", s)]
    capsys.readouterr()
    assert cli.main(["eval", CONFIG, *sets]) == 0
    metrics = json.loads(capsys.readouterr().out)
    test = json.loads((out / "summary.json").read_text())["test"]
    assert metrics["accuracy"] == test["accuracy"] and metrics["loss"] == pytest.approx(test["loss"], abs=1e-6)


def _base_query_kernel() -> np.ndarray:
    from lrtt.cli.zoo import load_minilm

    model, _ = load_minilm(num_labels=5, seed=0)
    return np.asarray(model.params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"])


def test_a_second_job_on_a_held_run_is_refused_in_every_process(job):
    out = job[0]
    before = _tree_hash(out)
    with _rundir.locked(out):  # another `lrtt train` holds the run
        with mp.start([sys.executable, "-c", ENTRY, *_train_args(out, 8)], 2, 2, cwd=mp.ROOT) as group:
            procs = group.wait(TIMEOUT, check=False)
    for proc in procs:
        assert proc.returncode == 1, proc.stderr
        assert f"is in use by another `lrtt train` (PID {os.getpid()})" in proc.stderr, proc.stderr
    assert _tree_hash(out) == before


def test_a_global_batch_that_does_not_split_is_refused_before_anything_runs():
    two = _cluster.Cluster(index=1, count=2)
    with pytest.raises(_cluster.ConfigError, match=r"`train.batch_size`=5 is the global batch of all 2 processes.*"
                                                   r"set train.batch_size to 4 or 6"):
        _cluster.check_batch(5, 1, two, n_devices=4)
    with pytest.raises(_cluster.ConfigError, match=r"split evenly over the 4 devices of the 2 processes in each of "
                                                   r"train.accumulate=2 micro-batches.*multiple of 8; set train.batch_size to 8 or 16"):
        _cluster.check_batch(12, 2, two, n_devices=4)
    _cluster.check_batch(16, 2, two, n_devices=4)
    _cluster.check_batch(3, 1, _cluster.Cluster(), n_devices=1)


def test_incomplete_job_settings_are_one_error_line_naming_the_flag(capsys, tmp_path):
    out = tmp_path / "run"
    assert cli.main([*_train_args(out, 2), "--num-processes", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrtt: error:") and "`--coordinator-address`" in err and "JAX_COORDINATOR_ADDRESS" in err, err
    assert cli.main([*_train_args(out, 2), "--coordinator-address", "127.0.0.1:1", "--num-processes", "2",
                     "--process-id", "2"]) == 2
    err = capsys.readouterr().err
    assert "`--process-id` (or JAX_PROCESS_ID) must be in 0..1" in err, err
    assert not out.exists()


def test_the_outcome_process_0_shares_reads_back_whole_or_cut_at_the_limit():
    for ok, kind, text in [(True, "", ""), (False, "RunLockedError", "run is in use (PID 12) — ünïcode"),
                           (False, "OSError", "x" * (2 * _cluster.MESSAGE_BYTES))]:
        got = _cluster._decode(_cluster._encode(ok, kind, text))
        assert got[:2] == (ok, kind) and text.startswith(got[2]) and len(got[2]) >= min(len(text), 4000)
