"""The errors of lrtt's adapter checkpoints (:class:`lrtt.CheckpointManager`), and
:class:`NonFiniteError`, which the checkpoints and PEFT's adapter files both raise.

Each derives from :class:`lrtt.Error` and keeps the builtin base callers already catch
(``ValueError``, ``OSError`` and its subclasses).
"""

from __future__ import annotations

import os

from lrtt._errors import Error


class CheckpointMismatchError(Error, ValueError):
    """The checkpoint was written for another method, rank, TT shape, target set or model.

    Attributes:
      step: the checked step (None when the error does not name one).
      differences: ``(kind, line)`` pairs, checkpoint vs now, e.g. ``("method field",
        "rank: 8 vs 4")`` (all of them; the message shows the first few and a count per kind).
    """

    def __init__(self, message: str, *, step: int | None = None, differences: tuple = ()):
        super().__init__(message)
        self.step = step
        self.differences = tuple(differences)


class CheckpointCorruptError(Error, ValueError):
    """A committed checkpoint step cannot be read back intact.

    Attributes:
      step: the damaged step (None when the error does not name one).
      earlier: the committed steps before it, oldest first (the candidates to restore instead).
    """

    def __init__(self, message: str, *, step: int | None = None, earlier: tuple[int, ...] = ()):
        super().__init__(message)
        self.step = step
        self.earlier = tuple(earlier)


class ForeignCheckpointError(Error, ValueError):
    """The directory holds Orbax checkpoint steps that lrtt.CheckpointManager did not write."""


class NonFiniteError(Error, ValueError):
    """Arrays that must be finite (an adapter, its optimizer state, PEFT factors) hold NaN or inf.

    Attributes:
      names: the arrays that hold NaN or inf (paths or tensor names, all of them).
    """

    def __init__(self, message: str, *, names: tuple = ()):
        super().__init__(message)
        self.names = tuple(names)


class CheckpointDirectoryError(Error, NotADirectoryError):
    """The checkpoint directory's path is a file (or lies under one)."""


class CheckpointNotFoundError(Error, FileNotFoundError):
    """No checkpoint directory (``create=False``), or no committed step in it."""


class CheckpointPathError(Error, ValueError):
    """The checkpoint directory's path holds a character Orbax cannot save under (refused up front)."""


class CheckpointWriteError(Error, OSError):
    """A checkpoint step could not be written: disk full, read-only filesystem, no permission, ...

    Raised by ``save`` (a synchronous failure, or the pre-check: not enough free space), or by
    the next ``save``/``wait``/``close``/``check_save`` for a failure of an asynchronous save's
    background commit. The failed step's temporary directory is removed and the committed steps
    are kept.

    Attributes:
      path: the step directory that was being written (``<directory>/<step>``).
      step: the step.
      needed: the bytes the step needs (an estimate: its arrays, metadata and Orbax's files).
      free: the bytes free on that filesystem when the save failed, or None if unknown.
      errno: the OS error number (``errno.ENOSPC`` for the pre-check), or None.
      filename: ``path``.
    """

    def __init__(self, message: str, path: str | None = None, step: int | None = None,
                 needed: int | None = None, free: int | None = None, errno: int | None = None):
        super().__init__(message)
        self.message, self.path, self.step, self.needed, self.free = message, path, step, needed, free
        self.errno, self.filename = errno, path
        self.strerror = os.strerror(errno) if errno else None

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return type(self), (self.message, self.path, self.step, self.needed, self.free, self.errno)
