"""``lrtt train`` as one process of a multi-process JAX job (one process per host).

Every process runs the same command on the same config and joins the job from
``--coordinator-address/--num-processes/--process-id`` or ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (:func:`join`). Then:

* the global batch is ``train.batch_size`` rows; each process feeds only the rows its devices
  hold (``MeshStep.local_rows``), and the step runs on a Mesh over every process's devices;
* process 0, the *primary*, alone holds the run directory's lock and writes the metrics, the
  plot, the summary and the export; every process saves and restores the checkpoints (Orbax
  coordinates them);
* what only the primary does (taking the lock, setting checkpoints aside, writing the
  outputs) is followed by a broadcast of its outcome (:func:`on_primary`), so that every
  process goes on, or stops with the primary's error, together.

With none of those settings the command is one process and all of this reduces to plain calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import jax
import numpy as np

from lrtt import Error
from lrtt.cli import _signals
from lrtt.cli._schema import ConfigError
from lrtt.cli._rundir import RunDirectoryError, RunLockedError, locked, remove_if_untouched

T = TypeVar("T")
MESSAGE_BYTES = 4096  # the longest error message process 0 shares with the others

# The library's argument names in its messages, and the command's flags for them.
_FLAGS = {"coordinator_address": "`--coordinator-address`", "num_processes": "`--num-processes`",
          "process_id": "`--process-id`"}


@dataclasses.dataclass(frozen=True)
class Cluster:
    """This process's place in the job: ``index`` of ``count`` processes (0 of 1 alone)."""

    index: int = 0
    count: int = 1

    @property
    def primary(self) -> bool:
        """Whether this process writes the run's outputs (process 0)."""
        return self.index == 0


class PrimaryError(Error, RuntimeError):
    """Process 0 failed at a step only it performs; the other processes stop with its message."""


def join(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None) -> Cluster:
    """Join the multi-process job the flags or the ``JAX_*`` variables describe (a flag wins).

    Must run before anything touches a JAX device. With no setting at all this is one process.

    Raises:
      ConfigError: an incomplete or invalid setting (the message names the flag and the fix).
    """
    import lrtt

    try:
        lrtt.train.initialize_distributed(coordinator_address, num_processes, process_id)
    except lrtt.train.DistributedSettingError as err:  # named by the flags, not the arguments
        raise ConfigError(err.render(_FLAGS)) from None
    return current()


def current() -> Cluster:
    """The job this process is in (after :func:`join`, or a single process)."""
    return Cluster(jax.process_index(), jax.process_count())


def check_batch(batch_size: int, accumulate: int, cluster: Cluster, n_devices: int) -> None:
    """Refuse a global batch that does not split evenly over the processes and their devices.

    ``train.batch_size`` rows are split over the ``n_devices`` devices of every process (each
    process feeds its devices' share); with ``train.accumulate=k`` each of the ``k`` micro-batches
    is split too, so the batch must be a multiple of ``k · n_devices``.

    Raises:
      ConfigError: naming the setting, the counts and the nearest multiples to use instead.
    """
    def multiples(m: int) -> str:
        below = (batch_size // m) * m
        return f"{below} or {below + m}" if below else f"{m}"

    if batch_size % cluster.count:
        raise ConfigError(
            f"`train.batch_size`={batch_size} is the global batch of all {cluster.count} processes, each "
            f"feeding an equal share, so it must be a multiple of {cluster.count}; set train.batch_size to "
            f"{multiples(cluster.count)}."
        )
    unit = accumulate * n_devices
    if batch_size % unit:
        where = f"the {n_devices} devices" + (f" of the {cluster.count} processes" if cluster.count > 1 else "")
        micro = f" in each of train.accumulate={accumulate} micro-batches" if accumulate > 1 else ""
        raise ConfigError(
            f"`train.batch_size`={batch_size} is split evenly over {where}{micro}, so it must be a "
            f"multiple of {unit}; set train.batch_size to {multiples(unit)}"
            + (" (or change train.accumulate)." if accumulate > 1 else ".")
        )


def local_copy(tree: Any) -> Any:
    """Each array replicated over several devices as one copy of it, on this process's first
    device that holds it (arrays on one device are returned as they are).

    Evaluation and export run inside one process on one device; a data-parallel adapter is
    replicated, so every process holds all of it. The copies share the arrays' buffers: use
    them before the next (donating) step.
    """
    def local(x):
        if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
            return x
        if not x.is_fully_replicated:
            raise ValueError(f"an adapter array of shape {x.shape} is sharded ({x.sharding}), not replicated: "
                             "evaluation and export need the whole adapter in every process.")
        return x.addressable_data(0)

    return jax.tree.map(local, tree)


def _encode(ok: bool, kind: str, text: str) -> np.ndarray:
    payload = f"{kind}\n{text}".encode()[:MESSAGE_BYTES]
    buffer = np.zeros(MESSAGE_BYTES + 2, np.int32)
    buffer[0], buffer[1] = int(ok), len(payload)
    buffer[2 : 2 + len(payload)] = np.frombuffer(payload, np.uint8)
    return buffer


def _decode(buffer: np.ndarray) -> tuple[bool, str, str]:
    payload = np.asarray(buffer[2 : 2 + int(buffer[1])], np.uint8).tobytes().decode(errors="ignore")  # a cut character dropped
    kind, _, text = payload.partition("\n")
    return bool(buffer[0]), kind, text


_SHARED_ERRORS = {"RunLockedError": RunLockedError, "ConfigError": ConfigError, "RunDirectoryError": RunDirectoryError}


def on_primary(cluster: Cluster, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on process 0 and share how it ended: every process returns (``fn``'s value on
    process 0, None elsewhere) or every process raises.

    Process 0 re-raises its own exception; the others raise one with its message (a
    :class:`RunLockedError` or :class:`ConfigError` as itself, anything else as
    :class:`PrimaryError`). Every process must call this at the same point: it is a collective.
    """
    if cluster.count == 1:
        return fn()
    from jax.experimental import multihost_utils

    result, error, buffer = None, None, _encode(True, "", "")
    if cluster.primary:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - shared, then re-raised below
            error, buffer = err, _encode(False, type(err).__name__, str(err))
    ok, kind, text = _decode(np.asarray(multihost_utils.broadcast_one_to_all(buffer)))
    if error is not None:
        raise error
    if not ok:
        cls = _SHARED_ERRORS.get(kind)
        raise cls(text) if cls else PrimaryError(f"process 0 failed ({kind}): {text}")
    return result


def barrier(cluster: Cluster) -> None:
    """Wait until every process of the job reaches this point (a collective; a no-op alone)."""
    on_primary(cluster, lambda: None)


@contextlib.contextmanager
def run_lock(run: Path, cluster: Cluster) -> Iterator[None]:
    """The run directory's writer lock for the whole job: process 0 creates ``run`` if needed
    and holds the lock (``flock`` on ``<run>/.lock``); every process learns whether it got it.

    One job's processes never refuse each other; a second job on the same directory is refused
    in every one of its processes, with the holder's PID. If the body fails and ``run`` was
    created here and holds nothing but the lock file, it is removed again.

    Raises:
      RunLockedError: another run holds the directory.
    """
    created = not run.exists()
    with contextlib.ExitStack() as stack:
        def take() -> None:
            run.mkdir(parents=True, exist_ok=True)
            stack.enter_context(locked(run))

        on_primary(cluster, take)
        if created and cluster.primary:
            stack.enter_context(_signals.cleanup_on_forced_exit(lambda: remove_if_untouched(run)))
        try:
            yield
        except BaseException:
            if created and cluster.primary:
                remove_if_untouched(run)
            raise
