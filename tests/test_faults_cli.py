"""Fault injection on the ``lrtt`` command, as a careful new user would try it (tiny MiniLM
runs). Each test checks the message, the exit status, and that nothing already saved changed:
the run directory is hashed before and after (the lock file aside, which only holds a PID)."""

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lrtt.cli import _main as cli
from lrtt.cli import _rundir

CONFIG = "configs/minilm_bbc_lora.yaml"
SMALL = [
    "--set", "data.max_len=32", "--set", "data.train_limit=16", "--set", "data.eval_limit=16",
    "--set", "train.batch_size=8", "--set", "train.lr=2e-2", "--set", "train.warmup=0",
    "--set", "train.eval_every=2", "--set", "output.save_every=2", "--set", "train.eval_batch_size=16",
    "--set", "output.keep=3", "--no-progress",
]


def _args(command, run, *more):
    args = [command, CONFIG, *[a for a in SMALL if command == "train" or a != "--no-progress"]]
    return [*args, "--set", f"output.dir={run}", *more]


def _tree_hash(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` except the lock file."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != _rundir.LOCK:
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step LoRA run: checkpoints 2 and 4, metrics, summary, merged export."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(_args("train", run, "--set", "train.steps=4")) == 0
    return run


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _steps(run):
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def test_a_diverging_run_stops_and_keeps_every_good_checkpoint_and_the_export(run, capsys):
    before = _tree_hash(run)
    code = cli.main(_args("train", run, "--set", "train.steps=10", "--set", "train.lr=1e30"))
    err = capsys.readouterr().err
    assert code == 3, err
    assert "lrtt: error: training diverged at step" in err and "Lower train.lr" in err and "Traceback" not in err
    after = _tree_hash(run)
    kept = {p: h for p, h in before.items() if p.startswith(("checkpoints/2/", "checkpoints/4/", "merged/"))}
    assert kept and all(after.get(p) == h for p, h in kept.items())  # steps 2, 4 and the export as they were
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "skipped" for r in records)
    assert all(r["kind"] != "train" or r["step"] <= 10 for r in records)


def test_skip_mode_counts_and_stops_after_max_skips(run, capsys):
    code = cli.main(_args("train", run, "--set", "train.steps=12", "--set", "train.lr=1e30",
                          "--set", "train.on_nonfinite=skip", "--set", "train.max_skips=2"))
    err = capsys.readouterr().err
    assert code == 3 and "3 steps in a row were non-finite (train.max_skips=2)" in err, err
    assert err.count("step skipped, not applied") == 2


@pytest.mark.parametrize("lr", ["inf", ".inf", ".nan", "-1"])
def test_a_learning_rate_that_is_not_finite_and_positive_is_refused(run, capsys, lr):
    before = _tree_hash(run)
    assert cli.main(_args("train", run, "--set", f"train.lr={lr}")) == 2
    assert "`train.lr` must be a finite number > 0" in capsys.readouterr().err
    assert _tree_hash(run) == before


def test_a_second_writer_is_refused_at_once_naming_the_holder(run, capsys):
    before = _tree_hash(run)
    with _rundir.locked(run):
        assert cli.main(_args("train", run, "--set", "train.steps=6")) == 1
    err = capsys.readouterr().err
    assert f"is in use by another `lrtt train` (PID {os.getpid()})" in err, err
    assert _tree_hash(run) == before


def test_a_killed_writer_never_blocks_the_next(tmp_path):
    code = f"import pathlib, time\nfrom lrtt.cli import _rundir\nwith _rundir.locked(pathlib.Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    with pytest.raises(_rundir.RunLockedError, match=f"PID {child.pid}"):
        with _rundir.locked(tmp_path):
            pass
    child.send_signal(signal.SIGKILL)
    child.wait()
    with _rundir.locked(tmp_path):  # the OS released the dead holder's lock
        pass


def test_export_to_an_existing_file_is_an_error_and_the_file_is_kept(run, tmp_path, capsys):
    target = tmp_path / "not_a_dir"
    target.write_text("keep me")
    assert cli.main(_args("export", run, "--out", str(target))) == 1
    captured = capsys.readouterr()
    assert "it is a file" in captured.err and str(target) in captured.err
    assert "written" not in captured.out and target.read_text() == "keep me"


def test_train_refuses_at_once_when_the_export_target_is_a_file(run, capsys):
    shutil.rmtree(run / "merged")
    (run / "merged").write_text("a file where the export goes")
    before = _tree_hash(run)
    assert cli.main(_args("train", run, "--set", "train.steps=6")) == 2
    assert "merged" in capsys.readouterr().err
    assert _tree_hash(run) == before


def test_export_to_an_unwritable_place_is_one_sentence(run, capsys):
    assert cli.main(_args("export", run, "--out", "/proc/lrtt-export")) != 0
    err = capsys.readouterr().err
    assert err.startswith("lrtt: error:") and "/proc" in err and "Traceback" not in err


@pytest.mark.parametrize("change", [["--set", "method.rankk=4"], ["--set", "method.rank=4"],
                                    ["--set", "method.trainable=nomatch_head"], ["--set", "train.steps=2"]])
def test_a_rejected_train_changes_nothing_in_the_run(run, capsys, change):
    before = _tree_hash(run)
    assert cli.main(_args("train", run, *change)) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrtt: error:") and "Traceback" not in err
    assert len(err.splitlines()) < 25, err  # a summary, not one line per leaf
    if change[1] == "train.steps=2":
        assert "is at step 4, past `train.steps`=2" in err
    assert _tree_hash(run) == before


def _damage_newest(run):
    newest = run / "checkpoints" / str(_steps(run)[-1])
    for f in glob.glob(f"{newest}/adapter/d/*"):
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def test_a_damaged_newest_checkpoint_is_reported_once_and_recovered_from_the_cli(run, capsys):
    _damage_newest(run)
    before = _tree_hash(run)
    assert cli.main(_args("eval", run)) == 2
    err = capsys.readouterr().err
    assert "checkpoint step 4" in err and "--fallback" in err and "--restore-step 2" in err, err
    assert "Event loop is closed" not in err and len(err.splitlines()) < 12
    # orbax's leftovers print when the process exits: only a real process shows them
    code = f"from lrtt.cli._main import main; raise SystemExit(main({_args('train', run, '--set', 'train.steps=6')!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "--fallback" in proc.stderr, proc.stderr
    assert "Exception ignored" not in proc.stderr and len(proc.stderr.splitlines()) < 12, proc.stderr
    assert _tree_hash(run) == before
    assert cli.main(_args("eval", run, "--fallback")) == 0
    assert cli.main(_args("eval", run, "--restore-step", "2")) == 0
    capsys.readouterr()
    assert cli.main(_args("train", run, "--fallback", "--set", "train.steps=6")) == 0
    out = capsys.readouterr().out
    assert "moved to" in out and _steps(run)[-1] == 6
    assert list((run / "discarded").glob("*/4"))  # the damaged step is kept aside, not deleted


def test_eval_and_export_of_a_missing_run_create_nothing(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert cli.main(_args("eval", missing)) == 2
    assert cli.main(_args("export", missing)) == 2
    assert "no checkpoints" in capsys.readouterr().err
    assert not missing.exists()


def test_a_resume_replays_steps_once_in_the_metrics(run):
    with (run / "metrics.jsonl").open("a") as f:  # a run killed after logging 5 and 6, before saving 6
        for step in (5, 6):
            f.write(json.dumps({"kind": "train", "step": step, "loss": 1.0, "time": 0.0}) + "\n")
    assert cli.main(_args("train", run, "--set", "train.steps=6")) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
