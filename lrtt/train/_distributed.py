"""Multi-process (multi-host) JAX: join the job before anything touches a device.

One process per host (per TPU VM worker, per GPU node), all running the same program. Each calls
:func:`initialize_distributed` first; after it ``jax.devices()`` lists the devices of every
process, ``jax.local_devices()`` this process's, and a ``Mesh`` over ``jax.devices()`` spans the
job (:func:`lrtt.train.mesh_step`). The settings come from the arguments or from the standard
variables ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``; with neither, the program stays a single process.
"""

from __future__ import annotations

import os
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrtt._errors import Error
from lrtt._paths import path_str
from lrtt._private import coordinator_address

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

_BACKEND_STARTED = (
    "lrtt.train.initialize_distributed must run before anything initializes a JAX backend "
    "(a computation, jax.devices(), jax.device_put, a jitted call, a model's init): {err}. "
    "Call it first thing in the program, right after the imports."
)


class Distributed(NamedTuple):
    """The job this process joined: ``process_id`` of ``num_processes``, coordinated at ``coordinator_address``."""

    coordinator_address: str | None
    num_processes: int
    process_id: int


ARGUMENTS = ("coordinator_address", "num_processes", "process_id")


class DistributedSettingError(Error, ValueError):
    """An incomplete or invalid multi-process setting (or a second join with other settings).

    The message names the settings as :func:`initialize_distributed`'s arguments; an application
    with its own names for them (command-line flags) renders it with those: ``err.render(names)``.

    Attributes:
      setting: the argument at fault (one of ``ARGUMENTS``), or None.
      template: the message with ``{coordinator_address}``, ``{num_processes}``, ``{process_id}``
        where it names a setting.
    """

    def __init__(self, template: str, *, setting: str | None = None):
        self.template = template
        self.setting = setting
        super().__init__(self.render())

    def render(self, names: "dict[str, str] | None" = None) -> str:
        """The message with each setting named as ``names`` says (default: ```num_processes```...)."""
        return self.template.format_map({**{a: f"`{a}`" for a in ARGUMENTS}, **(names or {})})

    def __reduce__(self):
        return (_rebuild, (self.template, self.setting))


def _rebuild(template: str, setting: str | None) -> DistributedSettingError:
    return DistributedSettingError(template, setting=setting)


def _lit(value) -> str:
    """``repr(value)`` safe inside a message template (braces doubled)."""
    return repr(value).replace("{", "{{").replace("}", "}}")


def _argument(env: str) -> str:
    """The argument an environment variable stands for: ``JAX_NUM_PROCESSES`` → ``num_processes``."""
    return env.removeprefix("JAX_").lower()


def _env_int(name: str, value) -> int | None:
    """``value`` (an argument) or the variable ``name`` as an int, None if neither is set."""
    if value is None:
        value = os.environ.get(name) or None
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise DistributedSettingError(f"the environment variable {name}={_lit(value)} must be an integer; set it to "
                                          "one (or unset it).", setting=_argument(name)) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DistributedSettingError(f"{{{_argument(name)}}} must be an int, got {_lit(value)} of type "
                                      f"{type(value).__name__}.", setting=_argument(name))
    return value


def _check_address(address: str) -> str:
    """``host:port`` with a non-empty host and a port in 1..65535 (``[::1]:1234`` for IPv6)."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedSettingError(
            f"{{coordinator_address}} (or {ENV_ADDRESS}) must be 'host:port' — the address of process 0 "
            f"and a free TCP port on it, e.g. '10.0.0.2:8476' or '127.0.0.1:8476' — got {_lit(address)}.",
            setting="coordinator_address")
    return str(address)


def _check_settings(address: str | None, num_processes: int | None, process_id: int | None) -> Distributed:
    if num_processes is None:
        raise DistributedSettingError(
            f"{{coordinator_address}}={_lit(address)} is set but not the number of processes: pass "
            f"{{num_processes}} or set {ENV_NUM_PROCESSES} (and {ENV_PROCESS_ID} in each process).",
            setting="num_processes")
    if num_processes < 1:
        raise DistributedSettingError(f"{{num_processes}} (or {ENV_NUM_PROCESSES}) must be >= 1, got {num_processes}.",
                                      setting="num_processes")
    if address is None:
        raise DistributedSettingError(
            f"{{num_processes}}={num_processes} needs the coordinator: pass {{coordinator_address}}='host:port' "
            f"(process 0's address and a free port) or set {ENV_ADDRESS}.", setting="coordinator_address")
    if process_id is None:
        if num_processes > 1:
            raise DistributedSettingError(
                f"{{process_id}} is not set for a job of {num_processes} processes: pass {{process_id}} "
                f"(0..{num_processes - 1}, a different one in each process) or set {ENV_PROCESS_ID}.",
                setting="process_id")
        process_id = 0
    if not 0 <= process_id < num_processes:
        raise DistributedSettingError(
            f"{{process_id}} (or {ENV_PROCESS_ID}) must be in 0..{num_processes - 1} for {num_processes} "
            f"processes, got {process_id}; number the processes 0, 1, ..., {num_processes - 1}.", setting="process_id")
    return Distributed(_check_address(address), num_processes, process_id)


def _already(wanted: Distributed) -> Distributed:
    """The job this process joined earlier, if it is ``wanted``; ValueError otherwise."""
    joined = Distributed(coordinator_address(), jax.process_count(), jax.process_index())
    same = (joined.num_processes, joined.process_id) == (wanted.num_processes, wanted.process_id)
    if not same or (joined.coordinator_address not in (None, wanted.coordinator_address)):
        raise DistributedSettingError(
            f"JAX's distributed system is already initialized as {_lit(joined)}, not as {_lit(wanted)}; a "
            "process joins one job once. Pass the same settings again, or restart the process.")
    return joined


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto_detect: bool = False,
    initialization_timeout: int = 300,
) -> Distributed | None:
    """Join a multi-process JAX job (``jax.distributed.initialize``), or stay a single process.

    Each argument left None is read from its environment variable: ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``. With none of them set (and ``auto_detect`` off)
    this does nothing and returns None: the same program runs unchanged on one machine. On CPU the
    processes exchange data with Gloo (``jax_cpu_collectives_implementation="gloo"`` unless it
    was set otherwise). Calling it again with the same settings returns the same job.

    Args:
      coordinator_address: ``"host:port"`` of process 0 (every process passes the same one).
      num_processes: the number of processes in the job.
      process_id: this process's index, ``0 <= process_id < num_processes``.
      auto_detect: with nothing set, let JAX detect the cluster (Cloud TPU VMs, SLURM, Open
        MPI) instead of staying single-process: ``jax.distributed.initialize()`` with no
        arguments. This queries the environment (on TPU VMs, the metadata server).
      initialization_timeout: seconds to wait for every process to join.

    Returns:
      :class:`Distributed` ``(coordinator_address, num_processes, process_id)``, or None when
      nothing is set (single process).

    Raises:
      DistributedSettingError: an incomplete or invalid setting (the message names it and the
        fix; ``.setting`` is the argument), or a second call with other settings. A ``ValueError``.
      RuntimeError: a JAX backend was already initialized in this process.

    Examples:
      With none of the variables set, one process, nothing to do:

      >>> import lrtt
      >>> print(lrtt.train.initialize_distributed())
      None

      On each of 2 hosts, with ``JAX_COORDINATOR_ADDRESS=10.0.0.2:8476 JAX_NUM_PROCESSES=2
      JAX_PROCESS_ID=<0 or 1>`` set::

        job = lrtt.train.initialize_distributed()   # Distributed('10.0.0.2:8476', 2, <0 or 1>)
        jax.process_count(), jax.device_count()     # (2, 2 * devices per host)
    """
    address = coordinator_address if coordinator_address is not None else (os.environ.get(ENV_ADDRESS) or None)
    num = _env_int(ENV_NUM_PROCESSES, num_processes)
    pid = _env_int(ENV_PROCESS_ID, process_id)
    if address is None and num is None and pid is None:
        if not auto_detect:
            return None
        if not jax.distributed.is_initialized():
            _initialize(initialization_timeout=initialization_timeout)
        return Distributed(None, jax.process_count(), jax.process_index())
    if address is None and num == 1 and pid in (None, 0):
        return None  # a launcher that always sets JAX_NUM_PROCESSES: one process needs no coordinator
    if num is None and pid is not None:
        raise DistributedSettingError(
            f"{{process_id}}={pid} is set but not the number of processes: pass {{num_processes}} or set "
            f"{ENV_NUM_PROCESSES} (and {ENV_ADDRESS}).", setting="num_processes")
    wanted = _check_settings(address, num, pid)
    if jax.distributed.is_initialized():
        return _already(wanted)
    _initialize(wanted.coordinator_address, wanted.num_processes, wanted.process_id, initialization_timeout=initialization_timeout)
    return wanted


def _initialize(*args, **kwargs) -> None:
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(*args, **kwargs)
    except RuntimeError as err:
        if "before" in str(err) and "backend" in str(err).lower():
            raise RuntimeError(_BACKEND_STARTED.format(err=str(err).splitlines()[0])) from err
        raise


# --- placing host values on a Mesh that spans processes ------------------------------------

_DIFFERENT_VALUES = (
    "`{what}` differs between the processes: {n} leaves hold other values in process(es) {procs} "
    "than in process 0, e.g. {paths}. Every process must pass the same host values to put_{what} "
    "(the same seed, the same checkpoint, the same weights file); only the batch differs, fed with "
    "MeshStep.put_local_batch."
)


def is_multiprocess() -> bool:
    """Whether this program is one of several JAX processes (``jax.process_count() > 1``)."""
    return jax.process_count() > 1


def _is_sharding(x) -> bool:
    return isinstance(x, jax.sharding.Sharding)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host(x) -> np.ndarray:
    """A process-local value as numpy (Python scalars get JAX's default dtypes, as ``jnp.asarray``)."""
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x)
    if isinstance(x, jax.Array):
        return np.asarray(jax.device_get(x))
    return np.asarray(jax.device_get(jnp.asarray(x)))


def _from_host(host: np.ndarray, sharding) -> jax.Array:
    """One global array from a host value every process holds whole: each takes its own shards."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _place_leaf(x, sharding) -> tuple[jax.Array, int]:
    """``x`` on ``sharding`` and the digest of its host value (0 for an array that is already global)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global: reshard
        return jax.device_put(x, sharding), 0
    if _is_key(x):
        data = _host(jax.random.key_data(x))
        return jax.random.wrap_key_data(_from_host(data, sharding), impl=jax.random.key_impl(x)), _digest(data)
    host = _host(x)
    return _from_host(host, sharding), _digest(host)


def _digest(host: np.ndarray) -> int:
    """CRC32 of a host value's dtype, shape and bytes."""
    header = zlib.crc32(f"{host.dtype}{host.shape}".encode())
    return zlib.crc32(np.ascontiguousarray(host).view(np.uint8), header)


def put_global(tree: Any, shardings: Any, *, what: str = "params", verify: bool = True) -> Any:
    """``tree`` placed on ``shardings`` (a prefix of it) when every process holds the same values.

    Each process builds only its own shards (``jax.make_array_from_callback``), so nothing is
    sent between processes; leaves that are already global arrays are resharded. With
    ``verify``, a CRC32 of every host leaf is gathered from all processes (one small collective)
    and a difference raises ValueError naming the leaves.

    Args:
      tree: host values (numpy, process-local ``jax.Array``, PRNG keys, Python scalars).
      shardings: a tree of ``Sharding`` that is a prefix of ``tree`` (as ``jax.device_put``'s).
      what: the name used in errors (``"params"``, ``"state"``).
      verify: check that every process passed the same values.
    """
    digests: list[int] = []  # one per leaf, in tree order, so every process gathers as many
    names: list[str] = []

    def place(prefix, sharding, subtree):
        def leaf(path, x):
            out, digest = _place_leaf(x, sharding)
            digests.append(digest)
            names.append(path_str(prefix + path))
            return out

        return jax.tree_util.tree_map_with_path(leaf, subtree)

    placed = jax.tree_util.tree_map_with_path(place, shardings, tree, is_leaf=_is_sharding)
    if verify and is_multiprocess() and digests:
        _check_same(np.asarray(digests, np.uint32), names, what)
    return placed


def _check_same(digests: np.ndarray, names: list[str], what: str) -> None:
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(digests))  # (processes, leaves)
    differ = every != every[0]
    if differ.any():
        bad = [n for n, d in zip(names, differ.any(axis=0)) if d]
        procs = [int(p) for p in np.nonzero(differ.any(axis=1))[0]]
        raise ValueError(_DIFFERENT_VALUES.format(what=what, n=len(bad), procs=procs, paths=bad[:4]))


def _row_blocks(sharding, n_rows: int) -> list[tuple[int, int]]:
    """The distinct ``[start, stop)`` row ranges of a ``(n_rows, ...)`` array this process holds."""
    index_map = sharding.addressable_devices_indices_map((n_rows,))
    blocks = set()
    for index in index_map.values():
        start, stop, _ = index[0].indices(n_rows)
        blocks.add((start, stop))
    return sorted(blocks)


def local_rows(sharding, global_rows: int) -> slice:
    """The rows ``[start, stop)`` of a global batch of ``global_rows`` this process must feed.

    Raises:
      ValueError: ``global_rows`` does not split evenly over the batch sharding's devices, or
        this process's rows are not one contiguous range (a Mesh whose ``data`` axis interleaves
        processes; build it from ``jax.devices()`` in order).
    """
    total, _ = _shard_counts(sharding)
    if global_rows < 1 or global_rows % total:
        raise ValueError(
            f"a global batch of {global_rows} rows does not split into the {total} row blocks of the "
            f"batch sharding {sharding}; use a "
            f"global batch size that is a multiple of {total}."
        )
    blocks = _row_blocks(sharding, global_rows)
    for (_, stop), (start, _) in zip(blocks, blocks[1:]):
        if stop != start:
            raise ValueError(
                f"process {jax.process_index()} holds the rows {blocks} of the global batch, not one "
                "contiguous range: build the Mesh from jax.devices() in order, so that each "
                "process's devices are neighbours along the data axis (or feed put_local_batch "
                "those blocks, concatenated in this order)."
            )
    return slice(blocks[0][0], blocks[-1][1])


def _shard_counts(sharding) -> tuple[int, int]:
    """(distinct row blocks of the batch in the whole job, those this process holds)."""
    probe = len(sharding.device_set)  # any multiple of the number of blocks
    every = {index[0].indices(probe) for index in sharding.devices_indices_map((probe,)).values()}
    return len(every), len(_row_blocks(sharding, probe))


def put_local(batch: Any, sharding) -> Any:
    """Each process's slice of a global batch → global arrays ``(B_global, ...)`` on ``sharding``.

    ``B_global = B_local · (row blocks in the job) / (row blocks this process holds)``; with the
    batch split over every device, ``B_global = B_local · jax.process_count()``. Process ``p``
    passes the rows :func:`local_rows` names (the ``p``-th contiguous slice in a Mesh built from
    ``jax.devices()``). Single-process, this is ``jax.device_put(batch, sharding)``.

    Raises:
      ValueError: a leaf without a batch axis, or one whose rows do not split over this
        process's devices.
    """
    total, mine = _shard_counts(sharding)

    def put(path, x):
        host = np.asarray(x)
        if host.ndim == 0 or host.shape[0] % mine:
            raise ValueError(
                f"batch leaf {path_str(path)!r} of shape {host.shape}: this process feeds {mine} "
                f"slice(s) of the batch axis (one per row block of its devices), so its leading "
                f"axis must be a multiple of {mine}; pass this process's rows of the global batch "
                "(MeshStep.local_rows(global_batch_size))."
            )
        global_shape = (host.shape[0] // mine * total, *host.shape[1:])
        return jax.make_array_from_process_local_data(sharding, host, global_shape)

    return jax.tree_util.tree_map_with_path(put, batch)
