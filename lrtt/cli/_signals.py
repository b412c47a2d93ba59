"""Ctrl-C (SIGINT) and SIGTERM: stop within seconds, at any moment, startup included.

:func:`installed` wraps everything in ``lrtt``'s ``main``. The first signal raises
:class:`Interrupted` (a ``KeyboardInterrupt``) in the main thread and is remembered, so that a
signal that lands where Python cannot raise it (a finalizer, a callback) is still acted on at the
next :func:`check` — the training loop calls it every step. The command then exits 130
(SIGINT) or 143 (SIGTERM) after its ``finally`` blocks ran: an asynchronous checkpoint save in
flight is committed (the manager's ``wait``), never left half-written.

If the main thread is stuck in native code (an XLA compilation, a model load), Python cannot run
the handler's exception until it returns; a watchdog thread then ends the process after
``GRACE_SECONDS``: it first waits for the save in flight of the manager :func:`saving` names (so
the save is committed, or Orbax removes its temporary directory at the next run), prints the one
line, and exits with the signal's status. A second signal ends it the same way at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from lrtt_launcher import NAMES, STATUS  # the entry point's own tables (it runs before lrtt is imported)

GRACE_SECONDS = 5.0

_received: list[int] = []
_finished = threading.Event()  # the command reported its stop itself: the watchdog stands down
_deferring: list[bool] = []  # inside `deferred()`: a signal is recorded, raised at the next check()
_manager: list[Any] = []  # the CheckpointManager whose save may be in flight
_last_words: list[Callable[[int], str]] = []  # builds the one line printed on a forced exit
_cleanups: list[Callable[[], None]] = []  # run on a forced exit (e.g. remove a run directory never used)
_lock = threading.Lock()


class Interrupted(KeyboardInterrupt):
    """The command was asked to stop by ``signum`` (SIGINT or SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(NAMES.get(signum, f"signal {signum}"))
        self.signum = signum
        self.status = STATUS.get(signum, 128 + signum)


@contextlib.contextmanager
def installed(last_words: Callable[[int], str]) -> Iterator[None]:
    """Handle SIGINT and SIGTERM while inside (main thread only; the previous handlers come
    back on exit). ``last_words(signum)`` is the line printed if the watchdog has to end the
    process."""
    _received.clear()
    _finished.clear()
    _last_words[:] = [last_words]
    previous = {signum: signal.signal(signum, _handler) for signum in STATUS}
    default_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable(default_hook)
    try:
        yield
    finally:
        _finished.set()
        if getattr(sys.unraisablehook, "lrtt_signals", False):  # not wrapped since (the CLI's quiet hook is kept)
            sys.unraisablehook = default_hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _unraisable(default: Callable) -> Callable:
    """Python's hook for exceptions it cannot raise (in a finalizer, a gc callback), minus the
    interrupt: it is remembered, and :func:`check` or the watchdog act on it."""

    def hook(unraisable):
        if not isinstance(unraisable.exc_value, Interrupted):
            default(unraisable)

    hook.lrtt_signals = True
    return hook


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """While inside, a signal is recorded but not raised where it lands (inside Orbax's save or
    its wait, which must not be cut half-way): :func:`check` raises it at the caller's next safe
    point, e.g. the top of each training step. The watchdog still ends a process that does not
    reach one within ``GRACE_SECONDS``."""
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()


def _handler(signum: int, frame: Any) -> None:
    with _lock:
        first = not _received
        _received.append(signum)
    if not first:
        _force_exit(signum)  # a second signal: stop now
    threading.Thread(target=_watchdog, args=(signum, GRACE_SECONDS), daemon=True).start()
    if not _deferring:
        raise Interrupted(signum)


def _watchdog(signum: int, grace: float) -> None:
    if not _finished.wait(grace):
        _force_exit(signum)


def _force_exit(signum: int) -> None:
    """End the process from any thread: the save in flight committed first, then one line."""
    for manager in list(_manager):
        with contextlib.suppress(BaseException):
            manager.wait()
    for cleanup in list(_cleanups):
        with contextlib.suppress(BaseException):
            cleanup()
    with contextlib.suppress(BaseException):
        print(_last_words[0](signum) if _last_words else f"lrtt: stopped by {NAMES.get(signum)}", file=sys.stderr, flush=True)
    os._exit(STATUS.get(signum, 128 + signum))


def stand_down() -> None:
    """The command is reporting its stop itself: the watchdog must not end it as well."""
    _finished.set()


def requested() -> int | None:
    """The first signal received, if any."""
    return _received[0] if _received else None


def check() -> None:
    """Raise :class:`Interrupted` if a signal came in (even one whose exception was lost)."""
    if _received:
        raise Interrupted(_received[0])


@contextlib.contextmanager
def saving(manager: Any) -> Iterator[None]:
    """While inside, a forced exit first waits for ``manager``'s save in flight."""
    _manager.append(manager)
    try:
        yield
    finally:
        _manager.remove(manager)


@contextlib.contextmanager
def cleanup_on_forced_exit(fn: Callable[[], None]) -> Iterator[None]:
    """While inside, a forced exit runs ``fn`` (after the save in flight) before it ends the process."""
    _cleanups.append(fn)
    try:
        yield
    finally:
        _cleanups.remove(fn)


def committed_steps(checkpoints: Path) -> list[int]:
    """The committed steps of a checkpoint directory, read off its names (no Orbax call: used
    while stopping). Orbax renames a step's temporary directory to the bare number on commit."""
    try:
        return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and p.is_dir())
    except OSError:
        return []
