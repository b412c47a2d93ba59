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

import errno as errno_lib
import os
import shutil
import time
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from lrtt._adapter import entries, is_entry
from lrtt._paths import named_leaves, nest
from lrtt.io._array_checks import fingerprints, non_finite
from lrtt.io._checkpoint_errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    ForeignCheckpointError,
    NonFiniteError,
)
from lrtt.io._checkpoint_files import (
    _TMP_SUFFIX,
    _block_size,
    _check_directory,
    _check_path,
    _enough_space,
    _existing,
    _free_bytes,
    _is_os_error,
    _items,
    _needed_bytes,
    _os_errno,
    _step_dirs_below,
    _with_path,
    _write_message,
)
from lrtt.io._checkpoint_meta import (
    FORMAT,
    FORMAT_VERSION,
    LRTT_ITEMS,
    _Diff,
    _diff_lines,
    _entry_info,
    _flat,
    _jsonable,
    _leaf_info,
    _rng_from_meta,
    _rng_meta,
    _summary,
    _tree_diff,
)

_PROCESS_LOCAL = (
    "the {what} holds {n} array(s) that live on this process's devices only, e.g. {paths}, in a "
    "job of {procs} processes: every process would write its own copy to the one checkpoint. "
    "Save the global arrays the Mesh step works on: place the state with MeshStep.put_state "
    "(or save state.adapter / state.opt_state as MeshStep.step returns them)."
)
VANISHED_RETRIES = 3  # a reader's restore(): steps deleted under it by a writer, then it gives up
LISTING_RETRIES = 5  # Orbax listing the steps while a writer deletes one: tries again this often


class Restored(NamedTuple):
    """What :meth:`CheckpointManager.restore` returns."""

    adapter: Any
    opt_state: Any
    step: int
    data_position: dict
    rng: Any


def _default_sharding() -> jax.sharding.Sharding:
    """Where a leaf without a sharding is restored: the first local device; in a multi-process
    job, replicated on every device (the same value in every process, as a global array)."""
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("replica",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _check_global(flat: dict[str, Any], what: str) -> None:
    """Multi-process: refuse process-local ``jax.Array`` leaves (each process would write its own)."""
    if jax.process_count() == 1:
        return
    local = [p for p, x in flat.items() if isinstance(x, jax.Array) and x.is_fully_addressable]
    if local:
        raise ValueError(_PROCESS_LOCAL.format(what=what, n=len(local), paths=local[:4], procs=jax.process_count()))


def _abstract(flat_like: dict[str, Any], shardings: Any) -> dict[str, jax.ShapeDtypeStruct]:
    default = _default_sharding()
    out = {}
    for path, leaf in flat_like.items():
        sharding = shardings.get(path) if isinstance(shardings, dict) else shardings
        if sharding is None:
            sharding = getattr(leaf, "sharding", None) or default
        out[path] = jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding)
    return out


def _sharding_maps(shardings: Any, adapter_like: Any, opt_state_like: Any):
    """``shardings`` → (adapter {path: sharding} or one sharding, opt_state likewise)."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return shardings, shardings
    if hasattr(shardings, "adapter") and hasattr(shardings, "opt_state"):  # a TrainState of shardings
        shardings = (shardings.adapter, shardings.opt_state)
    if isinstance(shardings, tuple) and len(shardings) == 2:
        is_sh = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
        return tuple(
            None if tree is None else dict(named_leaves(tree, is_leaf=is_sh)) for tree in shardings
        )
    raise ValueError(
        "`shardings` must be None, one jax.sharding.Sharding for every array, a pair "
        "(adapter_shardings, opt_state_shardings) of trees like the adapter and the optimizer "
        f"state, or a TrainState of shardings (MeshStep.state_sharding); got {type(shardings).__name__}."
    )


class _Save(NamedTuple):
    """The save in flight: its step and the bytes it needs (for :class:`CheckpointWriteError`)."""

    step: int
    needed: int


class CheckpointManager:
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

    def _write_failed(self, err: BaseException, save: _Save) -> CheckpointWriteError:
        """The :class:`CheckpointWriteError` of a failed save, after removing its temporary directory."""
        code = _os_errno(err)
        path = os.path.join(self.directory, str(save.step))
        free = _free_bytes(self.directory)  # before the cleanup: what the write met
        self._drain()
        self._remove_tmp(save.step)
        try:
            self._manager.reload()  # the failed step is not listed
        except Exception:  # noqa: BLE001 - the error being reported matters more
            pass
        reason = os.strerror(code) if code else type(err).__name__
        failure = CheckpointWriteError(
            _write_message(save.step, path, f"the write failed ({reason})", save.needed, free,
                           self.directory, code),
            path, save.step, save.needed, free, code,
        )
        failure.__cause__ = err
        return failure

    def _drain(self) -> None:
        """After a failed save: wait for Orbax's background writes of it and drop their errors.

        A save can fail in its synchronous part after Orbax started writing arrays in the
        background; their failure (the same one) would otherwise surface from a later call,
        even a restore, and they must not write into a temporary directory being removed.
        """
        checkpointer = getattr(self._manager, "_checkpointer", None)  # Orbax's AsyncCheckpointer
        for wait in (self._manager.wait_until_finished, getattr(checkpointer, "wait_until_finished", None)):
            try:
                if wait is not None:
                    wait()
            except Exception:  # noqa: BLE001 - the failure being reported
                pass

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

    def _remove_tmp(self, step: int) -> None:
        """Remove the temporary directories of ``step``'s failed save (process 0 only)."""
        if jax.process_index() != 0:
            return
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if name.startswith(f"{step}{_TMP_SUFFIX}"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    # -- save ----------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        adapter: Any,
        opt_state: Any = None,
        *,
        data_position: dict | None = None,
        rng: Any = None,
    ) -> None:
        """Save one step (asynchronously by default). Never writes a frozen weight.

        Args:
          step: the number of optimizer steps taken (the directory name).
          adapter: the adapter tree (any sharding).
          opt_state: the optimizer state over the adapter, or None.
          data_position: JSON-able position in the data (e.g. ``{"epoch": 1, "index": 6400}``)
            so a resumed run sees the same data order.
          rng: the run's base key (``TrainState.rng``), restored as ``Restored.rng``.

        Raises:
          CheckpointWriteError: not enough free space for the step (checked first: nothing is
            written), or the write failed (disk full, read-only filesystem, no permission); or
            the previous asynchronous save failed (this step is not saved). The committed steps
            are kept; free space and save again.
          NonFiniteError: a floating-point array of ``adapter`` or ``opt_state`` holds NaN or
            inf; nothing is written for ``step`` and the earlier steps are kept.
          ForeignCheckpointError: the directory holds Orbax steps lrtt did not write.
          ValueError: the manager is a reader (``create=False``).
          ValueError: ``adapter`` holds no adapter entry (e.g. the params were passed); in a
            multi-process job, an array that lives on one process's devices only (place the
            state with ``MeshStep.put_state`` first).
        """
        step = int(step)
        if self.read_only:
            raise ValueError(
                f"cannot save step {step}: this lrtt.CheckpointManager on {self.directory} was "
                "opened with create=False, a reader that never modifies the directory (a training "
                "run may be writing it). Open it with create=True (the default) to save."
            )
        if not any(is_entry(e) for e in entries(adapter).values()):
            raise ValueError(
                "`adapter` holds no lrtt adapter entry (LoraFactors, TTFactors, ...): pass the tree "
                "that method.init returned (state.adapter), not the params; checkpoints never hold "
                "the frozen weights."
            )
        flat_adapter = _flat(adapter, "adapter")
        flat_opt = _flat(opt_state, "optimizer state") if opt_state is not None else {}
        _check_global(flat_adapter, "adapter")
        _check_global(flat_opt, "optimizer state")
        self._check_finite(step, flat_adapter, flat_opt)
        self._check_own_steps()
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "data_position": _jsonable(data_position or {}),
            "method": _jsonable(self.method.to_config()),
            "entries": _jsonable(_entry_info(adapter)),
            "adapter_leaves": _leaf_info(flat_adapter),
            "opt_state_leaves": _leaf_info(flat_opt) if opt_state is not None else None,
            "fingerprints": {
                "adapter": fingerprints(flat_adapter),
                "opt_state": fingerprints(flat_opt) if flat_opt else {},
            },
            "rng": _rng_meta(rng),
        }
        items = {"adapter": ocp.args.StandardSave(nest(flat_adapter)), "meta": ocp.args.JsonSave(meta)}
        if flat_opt:
            items["opt_state"] = ocp.args.StandardSave(nest(flat_opt))
        self._finish()  # Orbax waits for the previous save anyway; report its failure first
        self._raise_failure()
        save = self._check_space(step, flat_adapter, flat_opt, meta)
        self._pending = save
        try:
            self._manager.save(step, args=ocp.args.Composite(**items))
        except Exception as err:  # noqa: BLE001 - only OS errors are converted
            self._pending = None
            if not _is_os_error(err):
                raise
            raise self._write_failed(err, save) from err

    def _check_space(self, step: int, flat_adapter: dict, flat_opt: dict, meta: dict) -> _Save:
        """Create the directory and check its filesystem has the bytes the step needs free.

        Raises:
          CheckpointWriteError: the directory cannot be created, or less than the bytes the
            step needs (an upper estimate: see ``_needed_bytes``) are free; nothing is written.
        """
        path = os.path.join(self.directory, str(step))
        needed = _needed_bytes(flat_adapter, flat_opt, meta, _block_size(_existing(self.directory)))
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as err:
            what = f"cannot create {self.directory} ({err.strerror or err})"
            free = _free_bytes(self.directory)
            raise CheckpointWriteError(_write_message(step, path, what, needed, free, self.directory, err.errno),
                                       path, step, needed, free, err.errno) from err
        free = _free_bytes(self.directory)
        # One process decides alone (processes could see different free space and part ways).
        if jax.process_count() == 1 and not _enough_space(free, needed):
            what = "not enough free space, nothing was written for it"
            raise CheckpointWriteError(_write_message(step, path, what, needed, free, self.directory, errno_lib.ENOSPC),
                                       path, step, needed, free, errno_lib.ENOSPC)
        return _Save(step, needed)

    def _check_finite(self, step: int, flat_adapter: dict, flat_opt: dict) -> None:
        bad = [f"adapter {p}" for p in non_finite(flat_adapter)]
        bad += [f"opt_state {p}" for p in non_finite(flat_opt)]
        if not bad:
            return
        kept = self.all_steps()
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteError(
            f"refusing to save checkpoint step {step} in {self.directory}: {len(bad)} array(s) hold "
            f"NaN or inf: {bad[:5]}{more}. Nothing was written for step {step}, and the earlier "
            f"checkpoints are kept ({f'steps {kept}' if kept else 'there are none'}). The run has "
            "diverged: restore the last step and resume with a lower learning rate or gradient "
            "clipping (optax.clip_by_global_norm)."
        )

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

    def _check_own_steps(self) -> None:
        """Before the first save: refuse a directory with foreign steps (rotation would delete them)."""
        if self._own_steps_checked:
            return
        foreign = self._foreign_steps(self._manager.all_steps())
        if foreign:
            doing = f"refusing to save here (keeping the last {self.max_to_keep} steps would delete them)"
            raise self._foreign(foreign, doing)
        self._own_steps_checked = True

    # -- restore -------------------------------------------------------------------------------

    def _corrupt(self, step: int, reason: str) -> CheckpointCorruptError:
        earlier = [s for s in self.all_steps() if s < step]
        hint = (
            f"restore an earlier step with restore(step={earlier[-1]}, ...) (committed steps: {earlier}), "
            "or restore(fallback=True) to take the newest step that reads back"
            if earlier
            else "there is no earlier step in this directory"
        )
        return CheckpointCorruptError(
            f"checkpoint step {step} in {self.directory} is damaged and cannot be restored: {reason}\n"
            f"Its files are left as they are; {hint}.",
            step=step, earlier=tuple(earlier),
        )

    def _meta(self, step: int) -> dict:
        foreign = self._foreign_steps([step])
        if foreign:
            raise self._foreign(foreign, f"cannot restore step {step}")
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as err:  # noqa: BLE001 - any read failure of an lrtt step is damage
            raise self._corrupt(step, f"its metadata does not read back ({type(err).__name__}: {str(err)[:300]})") from err
        if not isinstance(meta, dict):
            raise self._corrupt(step, "its metadata is not an lrtt adapter checkpoint's")
        if meta.get("format") != FORMAT:  # JSON that reads back, of another program
            raise self._foreign({step: _items(os.path.join(self.directory, str(step)))},
                                f"cannot restore step {step} (its 'meta' has format {meta.get('format')!r}, "
                                f"not {FORMAT!r})")
        return meta

    def check(self, step: int, adapter_like: Any, opt_state_like: Any = None) -> dict:
        """The step's metadata, after checking it matches ``self.method`` and ``adapter_like``.

        Raises:
          CheckpointMismatchError: the first differences and a count per kind.
          CheckpointCorruptError: the metadata does not read back.
          ForeignCheckpointError: the step was not written by lrtt.CheckpointManager.
        """
        meta = self._meta(step)
        diffs = _diff_lines(meta["method"], _jsonable(self.method.to_config()))
        diffs += _tree_diff(meta["entries"], _jsonable(_entry_info(adapter_like)), "entry")
        diffs += _tree_diff(meta["adapter_leaves"], _leaf_info(_flat(adapter_like, "adapter")), "leaf")
        if opt_state_like is not None:
            if meta["opt_state_leaves"] is None:
                none = "optimizer state: the checkpoint has none (it was saved with opt_state=None)"
                diffs.append(_Diff("optimizer state", none))
            else:
                now = _leaf_info(_flat(opt_state_like, "optimizer state"))
                diffs += _tree_diff(meta["opt_state_leaves"], now, "optimizer state leaf")
        if diffs:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} was written for another adapter; "
                f"differences (checkpoint vs now), {_summary(diffs)}\nRestore with the method, params "
                "and optimizer the checkpoint was written with (its config is in the step's "
                "meta/metadata), or start a new checkpoint directory."
            )
        return meta

    def _restore_step(self, step, adapter_like, opt_state_like, shardings) -> Restored:
        meta = self.check(step, adapter_like, opt_state_like)
        adapter_sh, opt_sh = _sharding_maps(shardings, adapter_like, opt_state_like)
        flat_like = _flat(adapter_like, "adapter")
        items = {"adapter": ocp.args.StandardRestore(nest(_abstract(flat_like, adapter_sh)))}
        flat_opt_like = _flat(opt_state_like, "optimizer state") if opt_state_like is not None else {}
        if flat_opt_like:
            items["opt_state"] = ocp.args.StandardRestore(nest(_abstract(flat_opt_like, opt_sh)))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # noqa: BLE001
            raise self._corrupt(step, f"its arrays do not read back ({type(err).__name__}: {str(err)[:300]})") from err
        flat_adapter = dict(named_leaves(restored["adapter"]))
        flat_opt = dict(named_leaves(restored["opt_state"])) if flat_opt_like else {}
        for what, flat, saved in (("adapter", flat_adapter, meta["fingerprints"]["adapter"]), ("opt_state", flat_opt, meta["fingerprints"]["opt_state"])):
            if not flat:
                continue
            bad = [p for p, fp in fingerprints(flat).items() if saved.get(p) != fp]
            if bad:
                raise self._corrupt(step, f"the bytes of {len(bad)} {what} array(s) changed since the save: {bad[:4]}")
        adapter = _unflatten_like(adapter_like, flat_adapter)
        opt_state = _unflatten_like(opt_state_like, flat_opt) if opt_state_like is not None else None
        return Restored(adapter, opt_state, int(meta["step"]), meta["data_position"], _rng_from_meta(meta["rng"]))

    def restore(
        self,
        step: int | None = None,
        *,
        adapter_like: Any,
        opt_state_like: Any = None,
        shardings: Any = None,
        fallback: bool = False,
    ) -> Restored:
        """Restore a step onto the structure (and sharding) of ``adapter_like``/``opt_state_like``.

        Args:
          step: the step to restore; None: the latest committed one.
          adapter_like: an adapter of the expected structure: arrays, or ``ShapeDtypeStruct``
            (e.g. ``lrtt.adapter_shapes(method, params)``). Each array lands on the leaf's own
            sharding when it has one, else on the first local device (in a multi-process job:
            replicated on every device).
          opt_state_like: the optimizer state's structure (``jax.eval_shape(tx.init, adapter)``),
            or None to skip it.
          shardings: overrides the placement: one ``Sharding`` for every array, a pair of trees
            ``(adapter_shardings, opt_state_shardings)``, or a TrainState of shardings
            (``MeshStep.state_sharding``): a checkpoint written on one sharding restores onto any.
          fallback: with ``step=None``, walk back to the newest step that restores if the latest
            is damaged (a warning names each damaged step). Mismatches are never skipped.

        Returns:
          :class:`Restored` ``(adapter, opt_state, step, data_position, rng)``; ``rng`` is a
          process-local key, the same in every process (``MeshStep.put_state`` places it).

        Raises:
          CheckpointMismatchError, CheckpointCorruptError, ForeignCheckpointError (steps another
          program wrote), CheckpointNotFoundError (a FileNotFoundError: no such step).
        """
        steps = self.all_steps()
        if not steps:
            raise CheckpointNotFoundError(f"no committed checkpoint in {self.directory}.{_step_dirs_below(self.directory)}")
        if step is not None:
            if int(step) not in steps:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint step {step} in {self.directory}; committed steps: {steps}."
                )
            return self._restore_step(int(step), adapter_like, opt_state_like, shardings)
        if not fallback and self.read_only:
            return self._restore_latest(steps, adapter_like, opt_state_like, shardings)
        candidates = list(reversed(steps)) if fallback else [steps[-1]]
        for i, candidate in enumerate(candidates):
            try:
                return self._restore_step(candidate, adapter_like, opt_state_like, shardings)
            except CheckpointCorruptError as err:
                if i == len(candidates) - 1:
                    raise
                warnings.warn(f"skipping damaged checkpoint step {candidate}: {str(err).splitlines()[0]}", stacklevel=2)
        raise AssertionError("unreachable")

    def _restore_latest(self, steps, adapter_like, opt_state_like, shardings) -> Restored:
        """A reader's ``restore()``: the latest step, or the newer latest one if a writer's rotation
        deletes it while it is read (a few times at most)."""
        for _ in range(VANISHED_RETRIES):
            try:
                return self._restore_step(steps[-1], adapter_like, opt_state_like, shardings)
            except (CheckpointCorruptError, ForeignCheckpointError):
                if not self._vanished(steps[-1]):
                    raise
            steps = self.all_steps()
            if not steps:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint in {self.directory} (the last ones were deleted while being read)."
                )
        return self._restore_step(steps[-1], adapter_like, opt_state_like, shardings)

    def _vanished(self, step: int, wait_s: float = 1.0) -> bool:
        """Whether ``step``'s directory is gone (within ``wait_s``: a deletion takes a moment)."""
        path = os.path.join(self.directory, str(step))
        deadline = time.monotonic() + wait_s
        while os.path.isdir(path):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


def _unflatten_like(like: Any, flat: dict[str, Any]) -> Any:
    paths = [p for p, _ in named_leaves(like)]
    treedef = jax.tree.structure(like)
    return jax.tree.unflatten(treedef, [flat[p] for p in paths])
