"""A run directory's bookkeeping: one writer at a time, and metrics that match the checkpoints.

``lrtt train`` holds an advisory lock (``fcntl.flock``) on ``<run>/.lock`` for as long as it
runs. The operating system releases it when the process ends, however it ends (``kill -9``
included), so a dead run never blocks the next; a second ``lrtt train`` on a directory whose
lock is held stops at once and names the holder's PID (written into the lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

from lrtt import Error

LOCK = ".lock"


class RunLockedError(Error, OSError):
    """Another process is training in this run directory."""


@contextlib.contextmanager
def locked(run: Path) -> Iterator[None]:
    """Hold the run directory's writer lock (``run`` must exist).

    Raises:
      RunLockedError: another live process holds it.
    """
    path = run / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunLockedError(
                f"{run} is in use by another `lrtt train` (PID {holder}); one run directory has one "
                "writer. Wait for that run to finish (or stop it), or set output.dir to another "
                "directory."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def drop_metrics_after(path: Path, step: int) -> int:
    """Remove the records of steps after ``step`` from ``metrics.jsonl`` (they are replayed on
    resume); returns how many were removed. The file is replaced atomically."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    kept = [line for line in lines if not line.strip() or json.loads(line).get("step", 0) <= step]
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


def set_aside(checkpoints: Path, steps: list[int], run: Path) -> Path | None:
    """Move the step directories ``steps`` out of ``checkpoints`` into ``<run>/discarded/<time>/``
    (kept, never deleted) so that training from an earlier step can write them anew."""
    if not steps:
        return None
    target = run / "discarded" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for step in steps:
        shutil.move(str(checkpoints / str(step)), str(target / str(step)))
    return target


# -- what lrtt wrote: the run marker and the config history ---------------------------------------

MARKER = "lrtt-run.json"  # {"format": "lrtt-run", "version": 1, "id": ..., "created": ...}
CONFIG = "config.json"  # the run's settings: the current ones and every earlier version
MARKER_FORMAT = "lrtt-run"
CONFIG_FORMAT = "lrtt-run-config"


class RunDirectoryError(Error, ValueError):
    """``output.dir`` holds files that lrtt did not write (no run marker), or a damaged marker."""


def _shown(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def _legacy_run(run: Path) -> bool:
    """A run written before lrtt marked its runs: a ``config.json`` of lrtt's schema beside
    ``checkpoints/``."""
    try:
        config = json.loads((run / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and {"model", "method", "train", "output"} <= set(config)
            and (run / "checkpoints").is_dir())


def run_id(run: Path) -> str | None:
    """The id in ``run``'s marker, or None when it has none (a new or empty directory, or a run
    written before markers).

    Raises:
      RunDirectoryError: the marker does not read back as lrtt's.
    """
    path = run / MARKER
    if not path.exists():
        return None
    try:
        marker = json.loads(path.read_text())
        if marker.get("format") != MARKER_FORMAT or not isinstance(marker.get("id"), str):
            raise ValueError(f"format {marker.get('format')!r}")
    except (OSError, ValueError, AttributeError) as err:
        raise RunDirectoryError(
            f"{path} is not a readable lrtt run marker ({type(err).__name__}: {str(err)[:80]}); lrtt will not "
            f"write into {run}. Restore the file, or set output.dir to a new directory."
        ) from None
    return marker["id"]


def check_owned(run: Path) -> str:
    """The run's id, after checking that ``run`` is lrtt's to write in: missing, empty (a lock
    file aside), marked as an lrtt run, or an lrtt run from before markers. A new id for a new
    run (written into the marker by :func:`mark`).

    Raises:
      RunDirectoryError: ``run`` is a file, or holds files but no lrtt run marker.
    """
    if run.exists() and not run.is_dir():
        raise RunDirectoryError(f"`output.dir` {str(run)!r} is a file, not a directory; choose another output.dir.")
    existing = run_id(run) if run.is_dir() else None
    if existing is not None:
        return existing
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in run.iterdir() if p.name != LOCK) if run.is_dir() else []
    if names and not _legacy_run(run):
        raise RunDirectoryError(
            f"`output.dir` {str(run)!r} holds files lrtt did not write ({_shown(names)}) and no lrtt run marker "
            f"({MARKER}): training there could overwrite them. Set output.dir to a new or empty directory."
        )
    return uuid.uuid4().hex


def mark(run: Path, identity: str) -> None:
    """Write ``run``'s marker (once: an existing marker is kept)."""
    path = run / MARKER
    if path.exists():
        return
    marker = {"format": MARKER_FORMAT, "version": 1, "id": identity, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_json(path, marker)


def remove_if_untouched(run: Path) -> None:
    """Remove ``run`` if it holds nothing but the lock file (a run refused before it wrote)."""
    try:
        if {p.name for p in run.iterdir()} <= {LOCK}:
            (run / LOCK).unlink(missing_ok=True)
            run.rmdir()
    except OSError:
        pass


def config_history(run: Path) -> list[dict]:
    """The run's config versions, oldest first: ``[{"step": s, "config": {...}, "changes": [...]}]``
    (``step``: where the version took effect). A ``config.json`` of an lrtt from before the
    history is one version from step 0; no file, no versions."""
    path = run / CONFIG
    if not path.exists():
        return []
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunDirectoryError(f"{path} does not read back as JSON ({str(err)[:80]}); restore it, or set "
                                "output.dir to a new directory.") from None
    if isinstance(saved, dict) and saved.get("format") == CONFIG_FORMAT:
        return list(saved["history"])
    return [{"step": 0, "config": saved, "changes": []}]


def write_config(run: Path, history: list[dict]) -> None:
    """``config.json``: the current settings (``config``) and every version (``history``)."""
    _write_json(run / CONFIG, {"format": CONFIG_FORMAT, "version": 2, "config": history[-1]["config"],
                               "history": history})


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)
