"""`lrtt.CheckpointManager` never loses a checkpoint ("Nothing lost, round two").

* Readers (``create=False``) never modify the directory: a writer in another process saves while
  this one lists and restores in a loop; a fake in-flight temporary directory survives a reader.
* Paths: characters that round-trip through Orbax, and those refused at construction
  (:class:`lrtt.CheckpointPathError`) because Orbax globs its folders or TensorStore splits on them.
* Write failures (disk full, read-only filesystem) surface as one :class:`lrtt.CheckpointWriteError`
  (from ``save``, or from ``check_save``/``wait``/``save``/``close`` after an asynchronous save),
  keep the committed steps, remove the failed step's temporary directory, and a later save
  works: on a real 256 KiB tmpfs (as root), and with a patched write that fails (always).
"""

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrtt
from lrtt.io import _checkpoint_files, _checkpoint_save

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TMP = ".orbax-checkpoint-tmp"  # Orbax's name of a step in flight: "<step>.orbax-checkpoint-tmp[-<time>]"
# A failed tensorstore read leaves an asyncio callback that fires after its loop closed.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _tiny(dim=8, rank=2, seed=0):
    """A LoRA method and a non-trivial adapter over one ``dim x dim`` kernel."""
    method = lrtt.LoRA(rank=rank, targets="q_proj")
    params = {"q_proj": {"kernel": jnp.ones((dim, dim))}}
    adapter = method.init(jax.random.key(0), params)
    noise = jax.random.normal(jax.random.key(seed), (dim, dim))
    return method, jax.tree.map(lambda x: x + noise[: x.shape[0], : x.shape[1]], adapter)


def _at(adapter, step):
    return jax.tree.map(lambda x: x + step, adapter)


def _identical(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


def _tmp_dirs(directory):
    return sorted(n for n in os.listdir(directory) if TMP in n)


def _tree(directory):
    """Every path under ``directory`` with its size and mtime (to show nothing changed)."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            out[os.path.relpath(path, directory)] = (st.st_size if name in files else None, st.st_mtime_ns)
    return out


# --- 1. readers never modify a checkpoint directory -------------------------------------------


def test_a_reader_leaves_an_in_flight_temporary_directory_alone(tmp_path):
    method, adapter = _tiny()
    directory = tmp_path / "run"
    with lrtt.CheckpointManager(directory, method, async_save=False) as writer:
        writer.save(1, _at(adapter, 1))
        writer.save(2, _at(adapter, 2))
    # What a writer in the middle of saving step 3 has on disk (this Orbax's name), and the
    # older, time-stamped form.
    for name in (f"3{TMP}", f"4{TMP}-1733462400000000"):
        os.makedirs(directory / name / "adapter")
        (directory / name / "adapter" / "part").write_bytes(b"x" * 100)
    before = _tree(directory)
    reader = lrtt.CheckpointManager(directory, method, create=False)
    assert reader.read_only and reader.all_steps() == [1, 2] and reader.latest_step() == 2
    r = reader.restore(adapter_like=adapter)
    assert r.step == 2 and _identical(r.adapter, _at(adapter, 2))
    assert _identical(reader.restore(1, adapter_like=adapter).adapter, _at(adapter, 1))
    with pytest.raises(ValueError, match=r"cannot save step 5: .* opened with create=False.* create=True"):
        reader.save(5, adapter)
    reader.wait()
    reader.check_save()
    reader.close()
    assert _tree(directory) == before  # nothing created, deleted or rewritten
    assert _tmp_dirs(directory) == [f"3{TMP}", f"4{TMP}-1733462400000000"]
    # Only a writer removes a killed save's temporary directory (when it opens).
    with lrtt.CheckpointManager(directory, method) as writer:
        deadline = time.time() + 10
        while _tmp_dirs(directory) and time.time() < deadline:
            time.sleep(0.02)
        assert writer.all_steps() == [1, 2]
    assert not _tmp_dirs(directory)


WRITER = textwrap.dedent(
    """
    import sys, warnings
    warnings.filterwarnings("ignore")
    import jax, jax.numpy as jnp
    import lrtt
    directory, steps = sys.argv[1], int(sys.argv[2])
    method = lrtt.LoRA(rank=2, targets="q_proj")
    adapter = method.init(jax.random.key(0), {"q_proj": {"kernel": jnp.ones((8, 8))}})
    adapter = jax.tree.map(lambda x: jnp.zeros_like(x), adapter)
    mgr = lrtt.CheckpointManager(directory, method, max_to_keep=3)  # async saves
    for s in range(1, steps + 1):
        mgr.save(s, jax.tree.map(lambda x: x + s, adapter), data_position={"next": s})
        print("SAVED", s, flush=True)
    mgr.close()
    print("KEPT", *lrtt.CheckpointManager(directory, method).all_steps(), flush=True)
    """
)


def test_readers_in_a_loop_never_disturb_a_writer_in_another_process(tmp_path):
    method, adapter = _tiny()
    like = jax.tree.map(jnp.zeros_like, adapter)
    directory = tmp_path / "run"
    directory.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    steps = 20  # async saves of a tiny adapter, back to back (about 0.1-0.2 s each)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(directory), str(steps)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    restored, saw_in_flight, deadline = set(), False, time.time() + 120
    try:
        while proc.poll() is None and time.time() < deadline:
            saw_in_flight |= bool(_tmp_dirs(directory))
            with lrtt.CheckpointManager(directory, method, create=False) as reader:
                listed = reader.all_steps()
                if listed:
                    r = reader.restore(adapter_like=like)
                    assert r.step >= listed[-1] and r.data_position == {"next": r.step}
                    assert all(bool(jnp.all(x == r.step)) for x in jax.tree.leaves(r.adapter))
                    restored.add(r.step)
            time.sleep(0.01)  # leave the writer some of the CPU
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    kept = [int(s) for s in out.split("KEPT")[1].split()]
    assert kept == [steps - 2, steps - 1, steps]
    assert restored and saw_in_flight, (restored, saw_in_flight)  # the readers did overlap saves
    assert not _tmp_dirs(directory)
    with lrtt.CheckpointManager(directory, method, create=False) as reader:
        assert reader.all_steps() == kept
        for s in kept:  # every step the writer kept is committed and intact
            r = reader.restore(s, adapter_like=like)
            assert r.step == s and all(bool(jnp.all(x == s)) for x in jax.tree.leaves(r.adapter))


# --- 2. paths are paths -------------------------------------------------------------------------

ROUND_TRIP = ["a b", "é-ü-日本", "a*b", "a?b", "{a,b}", "a#b", "a%b", "a%20b", "a[b", "a]b", "x'y\"z", "a&b;c"]
REFUSED = {"[x]": "'[' and ']'", "run[1]": "'[' and ']'", "a[!b]c": "'[' and ']'", "a\\b": "'\\'"}


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_a_directory_name_round_trips(tmp_path, name):
    method, adapter = _tiny()
    directory = tmp_path / name / "checkpoints"
    with lrtt.CheckpointManager(directory, method) as writer:
        writer.save(1, _at(adapter, 1))
        writer.save(2, _at(adapter, 2))
    with lrtt.CheckpointManager(directory, method, create=False) as reader:
        assert reader.all_steps() == [1, 2]
        assert _identical(reader.restore(adapter_like=adapter).adapter, _at(adapter, 2))
        assert _identical(reader.restore(1, adapter_like=adapter).adapter, _at(adapter, 1))


@pytest.mark.parametrize("name", sorted(REFUSED))
@pytest.mark.parametrize("create", [True, False], ids=["writer", "reader"])
def test_a_directory_name_orbax_cannot_save_under_is_refused_before_writing(tmp_path, name, create):
    method, _ = _tiny()
    directory = tmp_path / name / "checkpoints"
    with pytest.raises(lrtt.CheckpointPathError) as info:
        lrtt.CheckpointManager(directory, method, create=create)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    for fragment in (str(directory), REFUSED[name], "Choose a directory name without", "nothing was written"):
        assert fragment in message, message
    assert os.listdir(tmp_path) == []
    assert lrtt.io.CheckpointPathError is lrtt.CheckpointPathError


# --- 3. disk full / OS errors during a save -------------------------------------------------------


def _check_write_error(e, directory, step, code=errno.ENOSPC):
    assert isinstance(e, lrtt.CheckpointWriteError) and isinstance(e, OSError)
    path = os.path.join(directory, str(step))
    assert (e.path, e.step, e.errno, e.filename) == (path, step, code, path)
    assert e.needed > 0 and (e.free is None or e.free >= 0)
    message = str(e)
    assert "\n" not in message and path in message and "the earlier checkpoints are kept" in message, message
    if code == errno.ENOSPC:
        assert "free space and resume" in message and "needs about" in message and "free there" in message
    assert not _tmp_dirs(directory)


class _FailingCommit:
    """Make Orbax's commit of a step (its ``commit_success.txt``) fail with an OSError."""

    def __init__(self, monkeypatch, code=errno.ENOSPC):
        from orbax.checkpoint._src.path import async_path

        self.on, self.code, original = False, code, async_path.write_text

        async def write_text(path, text, *args, **kwargs):
            if self.on and os.path.basename(str(path)) == "commit_success.txt":
                raise OSError(self.code, os.strerror(self.code), str(path))
            return await original(path, text, *args, **kwargs)

        monkeypatch.setattr(async_path, "write_text", write_text)


def _raised_by(mgr, where, next_step, adapter):
    """The CheckpointWriteError of the save in flight, raised by ``where``."""
    with pytest.raises(lrtt.CheckpointWriteError) as info:
        if where == "check_save":
            deadline = time.time() + 30
            while time.time() < deadline:
                mgr.check_save()  # non-blocking: returns while the save is in flight
                time.sleep(0.01)
        elif where == "save":
            mgr.save(next_step, _at(adapter, next_step))
        else:
            getattr(mgr, where)()
    return info.value


@pytest.mark.parametrize("where", ["sync", "check_save", "save", "wait", "close", "read-only fs"])
def test_a_failed_write_is_one_checkpoint_write_error_and_keeps_the_committed_steps(tmp_path, monkeypatch, where):
    method, adapter = _tiny()
    directory = str(tmp_path / "run")
    code = errno.EROFS if where == "read-only fs" else errno.ENOSPC
    failing = _FailingCommit(monkeypatch, code)
    sync = where in ("sync", "read-only fs")
    mgr = lrtt.CheckpointManager(directory, method, async_save=not sync, max_to_keep=5)
    mgr.save(1, _at(adapter, 1))
    mgr.wait()
    failing.on = True
    if sync:
        with pytest.raises(lrtt.CheckpointWriteError) as info:
            mgr.save(2, _at(adapter, 2))
        error = info.value
    else:
        mgr.save(2, _at(adapter, 2))  # returns; the commit fails in the background
        error = _raised_by(mgr, where, 3, adapter)
    _check_write_error(error, directory, 2, code)
    if code == errno.EROFS:
        assert f"make {directory} writable" in str(error)
    assert isinstance(error.__cause__, OSError)
    failing.on = False
    if where == "close":
        mgr = lrtt.CheckpointManager(directory, method)
    mgr.check_save()  # raised once
    assert mgr.all_steps() == [1] and os.listdir(directory) == ["1"]
    mgr.save(4, _at(adapter, 4))  # space freed: a later save works
    mgr.wait()
    assert mgr.all_steps() == [1, 4]
    for s in (1, 4):
        assert _identical(mgr.restore(s, adapter_like=adapter).adapter, _at(adapter, s))
    mgr.close()


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    method, adapter = _tiny()
    directory = str(tmp_path / "run")
    mgr = lrtt.CheckpointManager(directory, method)
    mgr.save(1, _at(adapter, 1))
    mgr.wait()
    real = shutil.disk_usage
    monkeypatch.setattr(_checkpoint_files.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(lrtt.CheckpointWriteError, match="not enough free space, nothing was written") as info:
        mgr.save(2, _at(adapter, 2))
    _check_write_error(info.value, directory, 2)
    assert info.value.free == 1000 and info.value.needed > 8 * 2 * 2 * 4
    assert os.listdir(directory) == ["1"]
    monkeypatch.undo()
    mgr.save(2, _at(adapter, 2))
    mgr.close()
    assert lrtt.CheckpointManager(directory, method, create=False).all_steps() == [1, 2]


def test_tensorstore_errors_carry_their_os_error_number():
    ts = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/x/y\": No space left on device [os_error_code='28']")
    assert _checkpoint_files._os_errno(ts) == errno.ENOSPC
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system")
        except OSError as inner:
            raise RuntimeError("commit failed") from inner
    except RuntimeError as outer:
        assert _checkpoint_files._os_errno(outer) == errno.EROFS
    assert _checkpoint_files._os_errno(ValueError("shape mismatch")) is None


@pytest.fixture
def small_tmpfs(tmpfs):
    """A 256 KiB tmpfs (root only): the test is skipped where it cannot be mounted."""
    return tmpfs("256k")


def test_a_full_disk_keeps_the_committed_steps_and_a_later_save_works(small_tmpfs, monkeypatch):
    method, adapter = _tiny(dim=256, rank=16)  # 32 KiB of float32 per step: ~3 steps fit
    directory = str(small_tmpfs / "run")
    mgr = lrtt.CheckpointManager(directory, method, max_to_keep=20)
    # The pre-check: a step that does not fit is refused before anything is written.
    step, error = 0, None
    while error is None and step < 10:
        step += 1
        try:
            mgr.save(step, _at(adapter, step))
            mgr.wait()
        except lrtt.CheckpointWriteError as e:
            error = e
    assert error is not None and "not enough free space" in str(error) and error.free < error.needed
    _check_write_error(error, directory, step)
    committed = list(range(1, step))
    assert committed and mgr.all_steps() == committed
    # Without the pre-check, the write itself fails on the full disk (in save or in the background).
    monkeypatch.setattr(_checkpoint_save, "_enough_space", lambda free, needed: True)
    error = None
    while error is None and step < 12:
        step += 1
        try:
            mgr.save(step, _at(adapter, step))
            mgr.wait()
            committed.append(step)
        except lrtt.CheckpointWriteError as e:
            error = e
    assert error is not None and "the write failed (No space left on device)" in str(error), error
    _check_write_error(error, directory, step)
    assert mgr.all_steps() == committed and sorted(os.listdir(directory), key=int) == [str(s) for s in committed]
    for s in committed:  # the earlier steps restore bit for bit
        assert _identical(mgr.restore(s, adapter_like=adapter).adapter, _at(adapter, s))
    # Space freed: the next save works.
    subprocess.run(["mount", "-o", "remount,size=2m", str(small_tmpfs)], check=True)  # space freed
    mgr.save(step + 1, _at(adapter, step + 1))
    mgr.close()
    with lrtt.CheckpointManager(directory, method, create=False) as reader:
        assert reader.all_steps() == committed + [step + 1]
        assert _identical(reader.restore(adapter_like=adapter).adapter, _at(adapter, step + 1))
