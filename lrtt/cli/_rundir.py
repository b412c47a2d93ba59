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
from pathlib import Path
from typing import Iterator

LOCK = ".lock"


class RunLockedError(OSError):
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
