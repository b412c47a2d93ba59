"""Launch a command as N cooperating JAX processes on 127.0.0.1 (the multi-host code path, on CPU).

Each child gets the standard variables :func:`lrtt.train.initialize_distributed` reads::

    JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>   JAX_NUM_PROCESSES=<n>   JAX_PROCESS_ID=<i>
    XLA_FLAGS=--xla_force_host_platform_device_count=<devices_per_process>   JAX_PLATFORMS=cpu

and ``PYTHONPATH`` with the repository root and ``tests/`` in front. Every child runs in its own
process group (so killing it kills what it started); its stdout and stderr go to temporary files
(never a pipe that could fill and block it).

* :func:`launch` runs the group to completion and returns the ``CompletedProcess`` of each child,
  or raises ``AssertionError`` with every child's exit code and the tail of its output as soon as
  one child fails or the timeout passes (the others are killed then: a collective never completes
  once one member is gone).
* :func:`start` returns a running :class:`Group` (``kill(i)``, ``wait(timeout)``, ``logs()``,
  ``stop()``), e.g. to SIGKILL one worker mid-run.
* :func:`run_once` runs an expensive set of launches once per pytest session, even when several
  pytest-xdist workers ask for its result.

Example::

    procs = launch([sys.executable, "tests/multiprocess_worker.py", "train"], 2, 4, timeout=120)
    report = json.loads(procs[0].stdout.strip().splitlines()[-1])
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
TAIL = 3000  # characters of each child's stdout and stderr shown on a failure
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_JOB_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def child_env(
    process_id: int,
    n_processes: int,
    devices_per_process: int,
    port: int | None,
    env: dict | None = None,
) -> dict:
    """The environment of child ``process_id``: ``os.environ`` updated by ``env``, then the JAX
    variables (an existing device-count flag in ``XLA_FLAGS`` is replaced, other flags kept).
    With ``port=None`` the job variables are removed instead: a plain single-process program."""
    base = dict(os.environ)
    base.update(env or {})
    flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    flags.append(f"{_DEVICE_FLAG}={devices_per_process}")
    path = [ROOT, TESTS] + [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p]
    base.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(path))
    if port is None:
        for name in _JOB_VARS:
            base.pop(name, None)
    else:
        base.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(n_processes),
            JAX_PROCESS_ID=str(process_id),
        )
    return base


class Group:
    """N running children of one launch (see :func:`start`)."""

    def __init__(self, argvs: list[list[str]], envs: list[dict], cwd: str | None):
        self.argvs = argvs
        self._files = [
            (tempfile.TemporaryFile(mode="w+", prefix=f"mp{i}-out-"), tempfile.TemporaryFile(mode="w+", prefix=f"mp{i}-err-"))
            for i in range(len(argvs))
        ]
        self.procs: list[subprocess.Popen] = []
        try:
            for argv, env, (out, err) in zip(argvs, envs, self._files):
                self.procs.append(
                    subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err, text=True, start_new_session=True)
                )
        except BaseException:
            self.stop()
            raise

    def __len__(self) -> int:
        return len(self.procs)

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL by default) to child ``i``'s process group and reap it."""
        _signal_group(self.procs[i], sig)
        self.procs[i].wait()

    def stop(self) -> None:
        """SIGKILL every child still running (each one's whole process group) and reap them."""
        for proc in self.procs:
            _signal_group(proc, signal.SIGKILL)
        for proc in self.procs:
            proc.wait()

    def poll(self) -> list[int | None]:
        """Each child's exit code, None while it runs."""
        return [p.poll() for p in self.procs]

    def wait(self, timeout: float = 300, *, check: bool = True, expect: Sequence[int | None] | None = None) -> list[subprocess.CompletedProcess]:
        """Wait until every child exits, ``timeout`` seconds at most; return their ``CompletedProcess``.

        Args:
          timeout: seconds from now; past it every child is killed and ``AssertionError`` raised.
          check: raise ``AssertionError`` (after killing the others) as soon as a child exits with
            a non-zero code; with ``check=False`` failures are returned, not raised.
          expect: with ``check``, the exit code each child may have instead of 0 (``None``: 0),
            e.g. ``-9`` for a child this test killed itself.
        """
        allowed = [0 if e is None else e for e in (expect or [None] * len(self))]
        deadline = time.monotonic() + timeout
        while True:
            codes = self.poll()
            failed = [i for i, c in enumerate(codes) if c is not None and c != allowed[i]]
            if check and failed:
                self.stop()
                raise AssertionError(f"child {failed[0]} of {len(self)} failed; the others were killed.\n{self.logs()}")
            if all(c is not None for c in codes):
                return self.completed()
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"timed out after {timeout:.0f} s; every child was killed.\n{self.logs()}")
            time.sleep(0.05)

    def output(self, i: int) -> tuple[str, str]:
        """Child ``i``'s stdout and stderr so far."""
        texts = []
        for f in self._files[i]:
            f.flush()
            f.seek(0)
            texts.append(f.read())
        return texts[0], texts[1]

    def completed(self) -> list[subprocess.CompletedProcess]:
        return [
            subprocess.CompletedProcess(argv, proc.returncode, *self.output(i))
            for i, (argv, proc) in enumerate(zip(self.argvs, self.procs))
        ]

    def logs(self) -> str:
        """Every child's command, exit code (None: still running) and the tails of its output."""
        parts = []
        for i, (argv, proc) in enumerate(zip(self.argvs, self.procs)):
            out, err = self.output(i)
            parts.append(
                f"--- child {i}: exit code {proc.poll()}: {shlex.join(argv)}\n"
                f"[stdout tail]\n{out[-TAIL:]}\n[stderr tail]\n{err[-TAIL:]}"
            )
        return "\n".join(parts)

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        for out, err in self._files:
            out.close()
            err.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # exited between poll and kill
            pass


def start(
    argv: list[str],
    n_processes: int,
    devices_per_process: int,
    *,
    env: dict | None = None,
    cwd: str | None = None,
    extra_args_per_process: list[list[str]] | None = None,
    port: int | None = None,
    distributed: bool = True,
) -> Group:
    """Start ``n_processes`` copies of ``argv`` as one JAX job, without waiting.

    Args:
      argv: the command, e.g. ``[sys.executable, "tests/multiprocess_worker.py", "train"]``.
      n_processes: the number of processes (``JAX_NUM_PROCESSES``); child ``i`` has
        ``JAX_PROCESS_ID=i``.
      devices_per_process: CPU devices each child simulates (``XLA_FLAGS``).
      env: extra environment variables for every child (the JAX ones above take precedence).
      cwd: the children's working directory (default: this one).
      extra_args_per_process: ``n_processes`` lists appended to ``argv`` for each child.
      port: the coordinator's port on 127.0.0.1 (default: :func:`free_port`).
      distributed: False starts plain single-process programs (no ``JAX_COORDINATOR_ADDRESS``,
        ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), e.g. the reference run of a comparison.

    Returns:
      A running :class:`Group`; use it as a context manager so that no child outlives the test.
    """
    if n_processes < 1 or devices_per_process < 1:
        raise ValueError(f"`n_processes`={n_processes} and `devices_per_process`={devices_per_process} must be >= 1.")
    extra = extra_args_per_process or [[] for _ in range(n_processes)]
    if len(extra) != n_processes:
        raise ValueError(
            f"`extra_args_per_process` has {len(extra)} lists for {n_processes} processes; give one per process."
        )
    if not distributed and n_processes != 1:
        raise ValueError(f"`distributed=False` runs one plain process, got `n_processes`={n_processes}.")
    port = (port or free_port()) if distributed else None
    envs = [child_env(i, n_processes, devices_per_process, port, env) for i in range(n_processes)]
    return Group([list(argv) + list(e) for e in extra], envs, cwd)


def launch(
    argv: list[str],
    n_processes: int,
    devices_per_process: int,
    *,
    timeout: float = 300,
    env: dict | None = None,
    cwd: str | None = None,
    extra_args_per_process: list[list[str]] | None = None,
    distributed: bool = True,
) -> list[subprocess.CompletedProcess]:
    """Run ``n_processes`` copies of ``argv`` as one JAX job to completion (see :func:`start`).

    Returns:
      Each child's ``CompletedProcess`` (``stdout``, ``stderr`` as text), in process order.

    Raises:
      AssertionError: a child exited non-zero or ``timeout`` seconds passed; every child is
        killed first, and the message holds each one's exit code and output tails.
    """
    with start(
        argv, n_processes, devices_per_process, env=env, cwd=cwd, extra_args_per_process=extra_args_per_process,
        distributed=distributed,
    ) as group:
        return group.wait(timeout)


def run_once(name: str, shared_dir: str, fn: Callable[[str], Any]) -> Any:
    """``fn(workdir)`` run once per test session, even when pytest-xdist workers all ask for it.

    The first caller takes a lock in ``shared_dir`` (a directory every worker of the session
    sees, e.g. the parent of each worker's ``tmp_path_factory.getbasetemp()``), runs ``fn`` in
    ``shared_dir/name`` and stores its JSON result; the others wait on the lock and read it. A
    failure is stored too, and re-raised to every caller (``fn`` is not run again).
    """
    os.makedirs(shared_dir, exist_ok=True)
    workdir = os.path.join(shared_dir, name)
    result_path = os.path.join(shared_dir, f"{name}.json")
    with open(os.path.join(shared_dir, f"{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(result_path):
            with open(result_path) as f:
                stored = json.load(f)
            if "error" in stored:
                raise AssertionError(f"{name} failed (in another pytest worker):\n{stored['error']}")
            return stored["result"]
        os.makedirs(workdir, exist_ok=True)
        try:
            result = fn(workdir)
        except BaseException:
            with open(result_path, "w") as f:
                json.dump({"error": traceback.format_exc()}, f)
            raise
        with open(result_path, "w") as f:
            json.dump({"result": result}, f)
        return result
