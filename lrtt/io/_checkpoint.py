"""Orbax checkpoints of the adapter alone: adapter, optimizer state, step, data position, config.

The frozen weights are never written: a LoRA r=8 checkpoint of a GPT-2-small-shaped model is a
few megabytes next to the ~500 MB of its base. Each step directory holds three Orbax items:

* ``adapter`` and ``opt_state``: the arrays, keyed by their ``/``-joined paths (``StandardSave``);
* ``meta``: JSON with the step, the data position, the method's ``to_config()``, the adapter's
  entries (kind, static fields, shapes, dtypes), a fingerprint of every array and the rng.

Semantics (what a resumed run can rely on):

* Saves are asynchronous (``async_save=True``): ``save`` returns once the arrays are copied off
  the devices; ``wait()`` blocks until the last save is committed. Orbax writes each step into a
  temporary directory and renames it on commit, so a process killed mid-save leaves no step
  behind (the temporary directory is ignored, and removed when the next writer opens).
* The last ``max_to_keep`` committed steps are kept; nothing is deleted on an error.
* A reader (``create=False``: evaluating or exporting, possibly while the run still saves) never
  modifies the directory: Orbax opens it read-only, and a writer's in-flight temporary
  directory is left alone. Only a writer (``create=True``) removes temporary directories.
* A save that cannot be written (disk full, read-only filesystem, no permission) raises
  :class:`CheckpointWriteError` (an ``OSError`` naming the step directory, the bytes needed and
  free): from ``save`` — which first refuses a step that does not fit in the free space — or,
  for an asynchronous save's background commit, from the next ``save``/``wait``/``close`` or
  from ``check_save()``, which never blocks. The failed step's temporary directory is removed,
  the committed steps are kept, and a later save works once space is freed.
* A directory whose path Orbax cannot save under (``[...]``: Orbax globs it; ``\\``: TensorStore
  splits on it) is refused when the manager is constructed (:class:`CheckpointPathError`).
* ``save`` refuses a step whose adapter or optimizer state holds NaN or inf
  (:class:`NonFiniteError`; nothing is written for it), so every checkpoint is finite and the
  rotation never deletes the last finite one. It also refuses a directory that holds Orbax steps
  lrtt did not write (:class:`ForeignCheckpointError`): the rotation would delete them.
* ``restore`` first compares the checkpoint's method config and adapter entries with the current
  method and ``adapter_like``; any difference (method, rank, TT shape, targets, a leaf's shape or
  dtype) raises :class:`CheckpointMismatchError` summarizing the differences (the first ones,
  then a count per kind).
* A step that Orbax wrote for another program (neither of lrtt's ``meta`` and ``adapter`` items,
  or a ``meta`` that reads back without lrtt's format) raises :class:`ForeignCheckpointError`,
  not a damage error.
* A committed but damaged step (truncated or deleted file, altered bytes: the fingerprints catch
  what the storage layer does not) raises :class:`CheckpointCorruptError` naming the step and the
  earlier steps; ``restore(step=<earlier>)`` restores one of them. With ``fallback=True`` and no
  ``step``, the newest step that restores is used instead, with a warning naming each damaged
  one.

Multi-process (one process per host, :func:`lrtt.train.initialize_distributed`): every process
constructs the manager on the one directory (storage all hosts mount) and calls ``save`` and
``restore`` with the same arguments, in the same order. Orbax writes each process's shards of the
global arrays and only process 0 writes ``meta`` and commits the step (renames it into place);
its barriers keep the processes in step. lrtt's checks read nothing a process does not hold: the
finiteness flags and fingerprints are reduced on the devices to replicated scalars, so every
process reaches the same decision (the same refusal, the same error) from the same inputs. (A
read error that only one process meets, e.g. in a shard file only it reads, surfaces in the
others as Orbax's barrier timeout.) A
checkpoint restores onto any topology — other processes, other device counts, other shardings —
since the arrays are stored whole, by index, and the fingerprints do not depend on the layout.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from lrtt.io._checkpoint_errors import CheckpointWriteError, ForeignCheckpointError
from lrtt.io._checkpoint_files import (
    _TMP_SUFFIX,
    _check_directory,
    _check_path,
    _is_os_error,
    _items,
    _with_path,
)
from lrtt.io._checkpoint_meta import LRTT_ITEMS
from lrtt.io._checkpoint_restore import RestorePath
from lrtt.io._checkpoint_save import SavePath, _Save

LISTING_RETRIES = 5  # Orbax listing the steps while a writer deletes one: tries again this often


class CheckpointManager(SavePath, RestorePath):
    """Saves and restores the adapter, optimizer state, step and data position with Orbax.

    A manager is a *writer* (``create=True``, the default: a training run) or a *reader*
    (``create=False``: ``lrtt eval``/``lrtt export``, or anything that reads a directory a run may
    still be writing). A reader never modifies the directory: Orbax opens it read-only, nothing
    is created, rotated or deleted, and the temporary directories of saves in flight
    (``<step>.orbax-checkpoint-tmp*``) are left alone; ``save`` on it raises ``ValueError``. Each
    ``all_steps``/``restore`` of a reader lists the directory again, and a step the writer's
    rotation deletes while it is read is skipped for the newer latest one. Only a writer removes
    temporary directories left by a killed save (when it opens). Do not open two writers on one
    directory.

    Args:
      directory: where the step directories go (created if missing). Its path must not hold
        ``\\`` or a ``[...]`` (see :class:`CheckpointPathError`); spaces, unicode, ``*``, ``?``,
        ``{}``, ``#``, ``%`` are fine.
      method: the lrtt method; its ``to_config()`` is saved and compared on restore.
      max_to_keep: number of most recent steps kept (older ones are deleted after a new save
        commits).
      async_save: save in a background thread (``wait()`` blocks until it is committed;
        ``check_save()`` reports a failed one without blocking).
      create: True: a writer; a missing ``directory`` is allowed and created by the first
        ``save`` (a writer that only restores creates nothing). False: a reader (above); a missing
        ``directory`` raises :class:`CheckpointNotFoundError`.

    Raises:
      CheckpointPathError: ``directory`` holds a character Orbax cannot save under; nothing is
        written.
      CheckpointDirectoryError: ``directory`` is a file (or lies under one).
      CheckpointNotFoundError: ``directory`` is missing and ``create`` is False.

    Write failures (disk full, read-only filesystem, no permission) raise
    :class:`CheckpointWriteError` from ``save`` — or, for a failure in an asynchronous save's
    background commit, from the next ``save``/``wait``/``close``/``check_save`` — with the step
    directory, the bytes needed and free; the failed step's temporary directory is removed, the
    committed steps are kept, and a later ``save`` (once space is freed) works.

    Example::

      mgr = lrtt.CheckpointManager("/tmp/run", method, max_to_keep=3)
      mgr.save(100, state.adapter, state.opt_state, data_position={"index": 6400}, rng=state.rng)
      r = mgr.restore(adapter_like=state.adapter, opt_state_like=state.opt_state)
      r.step, r.data_position   # (100, {'index': 6400})
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        method: Any,
        *,
        max_to_keep: int = 3,
        async_save: bool = True,
        create: bool = True,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        self.method = method
        self.max_to_keep = max_to_keep
        self._create = create
        _check_path(self.directory)
        _check_directory(self.directory, create)
        if create:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                create=False,  # created by the first save: reading a missing directory creates nothing
                cleanup_tmp_directories=True,  # a killed save's; only a writer may remove them
            )
        else:  # read_only implies these; passing them avoids Orbax's warnings
            options = ocp.CheckpointManagerOptions(
                read_only=True, max_to_keep=None, save_interval_steps=0, create=False,
                cleanup_tmp_directories=False, enable_async_checkpointing=async_save,
            )
        self._manager = self._listing(lambda: ocp.CheckpointManager(self.directory, options=options))
        self._own_steps_checked = False
        self._pending: _Save | None = None  # the save in flight
        self._failure: CheckpointWriteError | None = None  # raised by the next save/wait/close/check_save

    @property
    def read_only(self) -> bool:
        """True for a reader (``create=False``): it never writes to, or deletes from, the directory."""
        return not self._create

    # -- bookkeeping ---------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first; a killed or failed save is never listed.

        A writer waits for its save in flight (a write failure is kept for the next ``save``,
        ``wait``, ``close`` or ``check_save``); a reader lists the directory again.
        """
        if self.read_only:
            self._listing(self._manager.reload)
        else:
            self._finish()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def wait(self) -> None:
        """Block until the last asynchronous save is committed.

        Raises:
          CheckpointWriteError: that save (or an earlier one not yet reported) failed to write.
        """
        self._finish()
        self._raise_failure()

    def check_save(self) -> None:
        """Raise the failure of the last asynchronous save if it has failed; never blocks.

        Call it every step of a training loop to stop as soon as a background commit fails
        (disk full, ...) instead of at the next ``save``. A save still in flight is not waited
        for. In a multi-process job each process sees its own progress: call ``wait()`` there.

        Raises:
          CheckpointWriteError: the last save failed to write (raised once).
        """
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self._finish()
        self._raise_failure()

    def close(self) -> None:
        """Wait for the last save, then release Orbax's threads.

        Raises:
          CheckpointWriteError: the last save failed to write (the manager is closed anyway).
        """
        try:
            self._finish()
        finally:
            self._manager.close()
        self._raise_failure()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _listing(self, read: Any) -> Any:
        """``read()`` (Orbax listing the steps), again if a step it listed is deleted meanwhile.

        Raises:
          OSError: naming its path (steps vanished ``LISTING_RETRIES`` times in a row).
        """
        for attempt in range(LISTING_RETRIES + 1):
            try:
                return read()
            except (FileNotFoundError, NotADirectoryError) as err:  # a step deleted while listed
                if not os.path.isdir(self.directory) or attempt == LISTING_RETRIES:
                    raise _with_path(err, self.directory) from err
                time.sleep(0.01 * (attempt + 1))
            except OSError as err:
                raise _with_path(err, self.directory) from err
        raise AssertionError("unreachable")

    def _finish(self) -> None:
        """Wait for the save in flight; keep a write failure for :meth:`_raise_failure`."""
        pending, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - only OS errors are converted
            if pending is not None and _is_os_error(err):
                self._failure = self._write_failed(err, pending)
            elif isinstance(err, OSError):
                raise _with_path(err, self.directory) from err
            else:
                raise

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def discard_uncommitted(self) -> list[str]:
        """Remove the temporary directories of saves that never committed (a save interrupted as
        it started: Ctrl-C, SIGTERM), after waiting for the save in flight; returns their names.

        Only a writer (``create=True``) may do this — the one writer of the directory, since a
        temporary directory may be another writer's save in flight — and only process 0 removes.

        Raises:
          ValueError: the manager is a reader (``create=False``).
        """
        if self.read_only:
            raise ValueError(f"this CheckpointManager of {self.directory} was opened with create=False (a "
                             "reader): only the directory's writer may remove temporary directories.")
        self._finish()
        if jax.process_index() != 0:
            return []
        try:
            names = sorted(n for n in os.listdir(self.directory) if _TMP_SUFFIX in n)
        except OSError:
            return []
        for name in names:
            shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        return names

    def _foreign_steps(self, steps) -> dict[int, list[str]]:
        """``{step: its items}`` of the steps that lack lrtt's items (written by another program)."""
        # A step directory gone since it was listed was deleted (a writer's rotation), not foreign.
        items = {s: _items(os.path.join(self.directory, str(s))) for s in steps
                 if os.path.isdir(os.path.join(self.directory, str(s)))}
        return {s: i for s, i in items.items() if not set(LRTT_ITEMS) & set(i)}

    def _foreign(self, steps: dict[int, list[str]], doing: str) -> ForeignCheckpointError:
        shown = ", ".join(f"step {s} holds {items}" for s, items in list(steps.items())[:3])
        return ForeignCheckpointError(
            f"{doing}: {self.directory} holds Orbax checkpoints that lrtt.CheckpointManager did not "
            f"write ({shown}; an lrtt step holds {list(LRTT_ITEMS)} and optionally ['opt_state']). "
            "It is not an lrtt adapter checkpoint, and its files are left as they are. Point "
            "lrtt.CheckpointManager at the directory an lrtt run saved to (the CLI's "
            "<output.dir>/checkpoints) or at a new, empty directory; read this one with "
            "orbax.checkpoint directly."
        )
