"""The ``lrtt`` command's entry point, outside the ``lrtt`` package on purpose.

Importing ``lrtt`` imports JAX (about two seconds). A Ctrl-C or SIGTERM in that time must stop
the command with one line and the signal's exit status (130 / 143), like one that comes later,
not with a traceback or silently; so the handlers are installed here, before anything is
imported, and :func:`lrtt.cli.main` takes over from them.
"""

from __future__ import annotations

import signal
import sys

# The exit status and the name of each signal the command stops on (lrtt.cli._signals uses these too).
STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class _EarlyStop(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(NAMES[signum])
        self.signum = signum


_received: list[int] = []


def _early(signum, frame):
    _received.append(signum)
    raise _EarlyStop(signum)


def _unraisable(default):
    """Python's hook for exceptions it cannot raise (in a finalizer, a gc callback), minus the
    interrupt: a signal that lands there is remembered and acted on after the import."""

    def hook(unraisable):
        if not isinstance(unraisable.exc_value, _EarlyStop):
            default(unraisable)

    return hook


def main() -> int:
    for signum in STATUS:
        signal.signal(signum, _early)
    default_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable(default_hook)
    try:
        from lrtt.cli import main as run
    except BaseException:  # noqa: BLE001 - a library may turn the interrupt into its own error (numpy: ImportError)
        if not _received:
            raise
        return _stopped(_received[0])
    finally:
        sys.unraisablehook = default_hook
    if _received:  # raised where Python could not raise it (a gc callback during the import)
        return _stopped(_received[0])
    try:
        return run()
    except _EarlyStop as stop:  # before lrtt.cli.main installed its own handlers: nothing written yet
        return _stopped(stop.signum)


def _stopped(signum: int) -> int:
    print(f"lrtt: stopped by {NAMES[signum]} while starting; nothing was written", file=sys.stderr)
    return STATUS[signum]


if __name__ == "__main__":
    sys.exit(main())
