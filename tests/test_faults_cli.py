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
    assert "`train.lr` must be" in capsys.readouterr().err  # a finite number > 0 (`.inf`: a float, not a string)
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


# -- Nothing lost, round two ---------------------------------------------------------------------


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lrtt: error:"), err
    return lines[0]


def test_export_never_deletes_a_directory_lrtt_did_not_write(run, tmp_path, capsys):
    user = tmp_path / "u"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.tex").write_text("precious")
    before = _tree_hash(user)
    assert cli.main(_args("export", run, "--out", str(user))) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert str(user) in line and "thesis.tex" in line, line
    assert _tree_hash(user) == before and (user / "sub").is_dir()
    assert cli.main(_args("export", run, "--out", str(user), "--overwrite")) == 1  # never, even so
    assert _tree_hash(user) == before


@pytest.mark.parametrize("where", [".", "checkpoints", "sub/dir"])
def test_export_into_the_run_directory_is_refused_before_any_work(run, capsys, where):
    before = _tree_hash(run)
    assert cli.main(_args("export", run, "--out", str(run / where))) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "run directory" in line and "merged" in line, line
    assert _tree_hash(run) == before and cli.main(_args("eval", run)) == 0


def test_export_replaces_its_own_export_and_another_run_s_only_with_overwrite(run, trained, tmp_path, capsys):
    target = tmp_path / "export"
    assert cli.main(_args("export", run, "--out", str(target))) == 0
    assert cli.main(_args("export", run, "--out", str(target))) == 0  # this run's export: replaced
    other = tmp_path / "other"
    shutil.copytree(run, other)
    (other / _rundir.MARKER).write_text(json.dumps({"format": "lrtt-run", "version": 1, "id": "another"}))
    capsys.readouterr()
    assert cli.main(_args("export", other, "--out", str(target))) == 1
    assert "--overwrite" in _one_error_line(capsys.readouterr().err)
    assert cli.main(_args("export", other, "--out", str(target), "--overwrite")) == 0


def test_train_refuses_a_directory_of_unrelated_files(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    (foreign / "merged").mkdir(parents=True)
    (foreign / "config.json").write_text('{"model_type": "bert"}')
    (foreign / "merged" / "weights.bin").write_bytes(b"\0" * 64)
    before = _tree_hash(foreign)
    assert cli.main(_args("train", foreign, "--set", "train.steps=2")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "config.json" in line and "lrtt did not write" in line, line
    assert _tree_hash(foreign) == before and sorted(p.name for p in foreign.iterdir()) == ["config.json", "merged"]


def test_train_refuses_at_once_a_merged_export_holding_a_user_file(run, capsys):
    (run / "merged" / "notes.txt").write_text("mine")
    before = _tree_hash(run)
    assert cli.main(_args("train", run, "--set", "train.steps=6")) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "notes.txt" in line, line
    assert _tree_hash(run) == before


def test_resume_refuses_a_change_that_would_reinterpret_saved_state(run, capsys):
    before = _tree_hash(run)
    for change, old, new in (("train.batch_size=16", "8", "16"), ("data.seed=3", "0", "3"),
                             ("train.seed=1", "0", "1"), ("method.rank=4", "8", "4")):
        assert cli.main(_args("train", run, "--set", "train.steps=6", "--set", change)) == 2, change
        line = _one_error_line(capsys.readouterr().err)
        key = change.split("=")[0]
        assert key in line and old in line and new in line, line
    assert _tree_hash(run) == before


def test_resume_applies_and_records_a_change_that_can_apply_from_the_resumed_step(run, capsys):
    assert cli.main(_args("train", run, "--set", "train.steps=6", "--set", "train.lr=1e-2")) == 0
    assert "changed on resume: train.lr 0.02 → 0.01" in capsys.readouterr().out
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["train"]["lr"] == 0.01
    steps = [(v["step"], v["config"]["train"]["lr"]) for v in saved["history"]]
    assert steps[0] == (0, 0.02) and steps[-1] == (4, 0.01), steps


@pytest.mark.parametrize("change, says", [("train.batch_size=100000", "larger than the 16 training examples"),
                                          ("data.max_len=600", "512 positions")])
def test_a_rejected_setting_is_a_config_error_before_anything_is_written(run, tmp_path, capsys, change, says):
    before = _tree_hash(run)  # on a run with checkpoints, a change of either is refused as such
    assert cli.main(_args("train", run, "--set", "train.steps=6", "--set", change)) == 2
    assert change.split("=")[0] in _one_error_line(capsys.readouterr().err)
    assert _tree_hash(run) == before
    fresh = tmp_path / "fresh"
    assert cli.main(_args("train", fresh, "--set", change)) == 2
    assert says in _one_error_line(capsys.readouterr().err)
    assert not fresh.exists()  # the directory the refused run created is gone again


def test_a_second_writer_is_refused_before_the_model_loads(run, capsys):
    import time

    from lrtt.cli import _tasks

    with _rundir.locked(run):
        started = time.perf_counter()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_tasks, "build_task", lambda config: pytest.fail("the model was loaded"))
            assert cli.main(_args("train", run, "--set", "train.steps=6")) == 1
        assert time.perf_counter() - started < 2.0
    assert "in use by another" in _one_error_line(capsys.readouterr().err)


def test_a_mismatch_summary_is_one_line(run, capsys):
    assert cli.main(_args("eval", run, "--set", "method.rank=4")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "written for another adapter" in line and "more" in line, line


def _lrtt_command():
    """The installed ``lrtt`` console script beside this Python (the launcher that handles
    signals from the first instant)."""
    script = Path(sys.executable).with_name("lrtt")
    if not script.exists():
        pytest.skip(f"no `lrtt` console script beside {sys.executable}")
    return str(script)


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (signum - 1) & 1)


def _signal_run(run, signum, *, after_step: int | None, delay: float = 0.0):
    """Start ``lrtt train`` (many fast steps, a checkpoint every step), send ``signum`` once
    checkpoint ``after_step`` is committed (or ``delay`` seconds after the start), return
    (status, stderr, seconds from the signal to the exit)."""
    import time

    args = [_lrtt_command(), *_args("train", run, "--set", "train.steps=400", "--set", "output.save_every=1",
                                    "--set", "train.eval_every=1000", "--set", "output.export=false")]
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        started = time.perf_counter()
        # the launcher's handlers are in (SIGTERM, which Python itself never catches, is installed last)
        while not _catches(child.pid, signal.SIGTERM):
            assert child.poll() is None and time.perf_counter() - started < 60, child.stderr.read()
            time.sleep(0.01)
        while after_step is not None and (not _steps(run) or _steps(run)[-1] < after_step):
            assert child.poll() is None and time.perf_counter() - started < 180, child.stderr.read()
            time.sleep(0.05)
        time.sleep(delay)
        sent = time.perf_counter()
        child.send_signal(signum)
        _, err = child.communicate(timeout=60)
        return child.returncode, err, time.perf_counter() - sent
    finally:
        if child.poll() is None:
            child.kill()


@pytest.mark.parametrize("signum, after_step, delay", [
    (signal.SIGINT, None, 0.0),    # while Python imports JAX (as soon as the launcher's handler is in)
    (signal.SIGINT, None, 4.0),    # while the model loads or the step compiles
    (signal.SIGINT, 6, 0.0),       # while training, saving every step
    (signal.SIGTERM, 6, 0.0),
], ids=["sigint-import", "sigint-startup", "sigint-training", "sigterm-training"])
def test_a_signal_stops_the_run_within_seconds_with_one_line(run, signum, after_step, delay):
    status, err, seconds = _signal_run(run, signum, after_step=after_step, delay=delay)
    assert status == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum], err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lrtt: stopped by"), err
    assert seconds < 10, seconds
    if after_step is not None:
        steps = _steps(run)
        assert f"the last committed checkpoint is step {steps[-1]}" in lines[0] and steps[-1] >= after_step, (lines, steps)
        assert not [p for p in (run / "checkpoints").iterdir() if "tmp" in p.name]  # no temporary directory
    assert cli.main(_args("eval", run)) == 0  # every committed step still restores


def test_readers_never_touch_a_run_being_trained(run):
    """`lrtt eval` and `lrtt export` in a loop while `lrtt train` saves every step: the trainer
    ends with every step committed (readers used to delete its in-flight save)."""
    args = [_lrtt_command(), *_args("train", run, "--set", "train.steps=40", "--set", "output.save_every=1",
                                    "--set", "train.eval_every=1000", "--set", "output.keep=50",
                                    "--set", "output.export=false")]
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reads = 0
    try:
        while child.poll() is None:
            export = run.parent / f"export-{reads % 2}"
            assert cli.main(_args("eval" if reads % 2 else "export", run, *(["--out", str(export)] * (reads % 2 == 0)))) == 0
            reads += 1
        err = child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err
    assert reads >= 2
    assert _steps(run) == [2, *range(4, 41)], _steps(run)  # the fixture's 2 and 4, then every step


def test_a_checkpoint_path_orbax_cannot_use_is_refused_at_once_and_others_round_trip(tmp_path, capsys):
    odd = tmp_path / "run[x]"
    assert cli.main(_args("train", odd, "--set", "train.steps=2")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "'['" in line or "`[`" in line or "[" in line.split("run[x]")[-1], line
    assert not odd.exists()
    fine = tmp_path / "my run #1 ü"
    assert cli.main(_args("train", fine, "--set", "train.steps=2", "--set", "output.export=false")) == 0
    assert cli.main(_args("eval", fine)) == 0 and _steps(fine) == [2]


def test_a_full_disk_stops_the_run_at_the_save_that_fails_and_resume_works_after(tmpfs, capsys):
    disk = tmpfs("1200k")  # room for one MiniLM LoRA checkpoint (about 0.7 MB), not two
    run = disk / "run"
    args = _args("train", run, "--set", "train.steps=6", "--set", "output.export=false", "--set", "train.eval_every=100")
    assert cli.main(args) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert str(run / "checkpoints") in line and "free" in line, line
    assert _steps(run) == [2]
    assert not [p for p in (run / "checkpoints").iterdir() if "tmp" in p.name]
    logged = [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == 4, logged  # the step whose save failed; no step after it
    tmpfs.remount(disk, "8m")  # space freed
    assert cli.main(args) == 0
    assert _steps(run) == [2, 4, 6]
