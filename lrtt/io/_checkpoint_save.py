"""The save path of :class:`lrtt.CheckpointManager`: ``save`` and its checks (a global, finite
adapter; a directory of lrtt's own steps; the free space), and the handling of a failed write
(its :class:`CheckpointWriteError`, its temporary directory removed).

:class:`SavePath` holds these methods; ``CheckpointManager`` (``lrtt/io/_checkpoint.py``) derives
from it and provides the state they use (``directory``, ``method``, ``_manager``, ``_pending``, ...)
and its bookkeeping (``all_steps``, ``_finish``, ``_raise_failure``, ``_foreign_steps``, ``_foreign``).
"""

from __future__ import annotations

import errno as errno_lib
import os
import shutil
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from lrtt._adapter import entries, is_entry
from lrtt._groups import as_tree, ungroup_all
from lrtt._paths import nest
from lrtt._private import orbax_inner_checkpointer
from lrtt.io._array_checks import fingerprints, non_finite
from lrtt.io._checkpoint_errors import CheckpointWriteError, NonFiniteError
from lrtt.io._checkpoint_files import (
    _TMP_SUFFIX,
    _block_size,
    _enough_space,
    _existing,
    _free_bytes,
    _is_os_error,
    _needed_bytes,
    _os_errno,
    _write_message,
)
from lrtt.io._checkpoint_meta import (
    FORMAT,
    FORMAT_VERSION,
    _entry_info,
    _flat,
    _jsonable,
    _leaf_info,
    _rng_meta,
)

_PROCESS_LOCAL = (
    "the {what} holds {n} array(s) that live on this process's devices only, e.g. {paths}, in a "
    "job of {procs} processes: every process would write its own copy to the one checkpoint. "
    "Save the global arrays the Mesh step works on: place the state with MeshStep.put_state "
    "(or save state.adapter / state.opt_state as MeshStep.step returns them)."
)


def _check_global(flat: dict[str, Any], what: str) -> None:
    """Multi-process: refuse process-local ``jax.Array`` leaves (each process would write its own)."""
    if jax.process_count() == 1:
        return
    local = [p for p, x in flat.items() if isinstance(x, jax.Array) and x.is_fully_addressable]
    if local:
        raise ValueError(_PROCESS_LOCAL.format(what=what, n=len(local), paths=local[:4], procs=jax.process_count()))


class _Save(NamedTuple):
    """The save in flight: its step and the bytes it needs (for :class:`CheckpointWriteError`)."""

    step: int
    needed: int


class SavePath:
    """``save`` and the handling of a failed write: the save half of :class:`lrtt.CheckpointManager`."""

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
        checkpointer = orbax_inner_checkpointer(self._manager)
        for wait in (self._manager.wait_until_finished, getattr(checkpointer, "wait_until_finished", None)):
            try:
                if wait is not None:
                    wait()
            except Exception:  # noqa: BLE001 - the failure being reported
                pass

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
          adapter: the adapter tree (any sharding); a :class:`lrtt.LayerGroups` (in the adapter or
            the optimizer state) is saved as the tree it groups, and restored as groups when the
            ``restore`` likes are groups.
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
        adapter = as_tree(adapter)  # a LayerGroups is saved per entry, as an ungrouped run saves it
        opt_state = ungroup_all(opt_state)
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
            "clipping (optax.clip_by_global_norm).", names=tuple(bad)
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
