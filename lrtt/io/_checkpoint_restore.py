"""The restore path of :class:`lrtt.CheckpointManager`: ``check`` (the step's metadata against the
current method and adapter), ``restore`` (with the fallback to an earlier step and a reader's retry
when a writer deletes the step it reads), the damage and fingerprint checks, and where the
restored arrays are placed (their shardings).

:class:`RestorePath` holds these methods; ``CheckpointManager`` (``lrtt/io/_checkpoint.py``)
derives from it and provides the state they use (``directory``, ``method``, ``_manager``) and its
bookkeeping (``all_steps``, ``read_only``, ``_foreign_steps``, ``_foreign``).
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from lrtt._groups import as_tree, regroup_all, ungroup_all
from lrtt._paths import named_leaves, nest
from lrtt.io._array_checks import fingerprints
from lrtt.io._checkpoint_errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ForeignCheckpointError,
)
from lrtt.io._checkpoint_files import _items, _step_dirs_below
from lrtt.io._checkpoint_meta import (
    FORMAT,
    _Diff,
    _diff_lines,
    _entry_info,
    _flat,
    _jsonable,
    _leaf_info,
    _rng_from_meta,
    _summary,
    _tree_diff,
)

VANISHED_RETRIES = 3  # a reader's restore(): steps deleted under it by a writer, then it gives up


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


class RestorePath:
    """``check`` and ``restore``: the restore half of :class:`lrtt.CheckpointManager`."""

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
                "meta/metadata), or start a new checkpoint directory.",
                step=step, differences=tuple((d.kind, d.line) for d in diffs),
            )
        return meta

    def _restore_step(self, step, adapter_like, opt_state_like, shardings) -> Restored:
        grouped_like = (adapter_like, opt_state_like)  # lrtt.LayerGroups are saved as their trees
        adapter_like, opt_state_like, shardings = as_tree(adapter_like), ungroup_all(opt_state_like), ungroup_all(shardings)
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
        adapter = regroup_all(_unflatten_like(adapter_like, flat_adapter), grouped_like[0])
        opt_state = regroup_all(_unflatten_like(opt_state_like, flat_opt), grouped_like[1]) if opt_state_like is not None else None
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
            (e.g. ``lrtt.adapter_shapes(method, params)``); a :class:`lrtt.LayerGroups` restores
            groups (the checkpoint holds the tree either way; so do grouped parts of
            ``opt_state_like``). Each array lands on the leaf's own
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
