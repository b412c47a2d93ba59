"""Multi-process JAX for real: 2 processes x 4 CPU devices on 127.0.0.1 against 1 process x 8.

``tests/multiprocess_worker.py`` is launched by ``tests/_multiprocess.py`` (each process with
``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` and its own device count,
Gloo collectives), the TPU-pod code path: :func:`lrtt.train.initialize_distributed`,
``MeshStep.put_params``/``put_state`` from the same host values in every process,
``put_local_batch`` with each process's rows only, ``lrtt.CheckpointManager`` called by every
process on one directory. All launches of the session run once (:func:`_multiprocess.run_once`,
shared by the pytest-xdist workers):

1. 2x4 ``save``+``errors``: the 8 configurations (gpt2/llama x fsdp/tensor x LoRA/LorettaRep),
   3 steps each; gpt2/tensor/LoRA saved at step 3. Alongside: 1x8 ``train`` (the
   single-process reference), and 2x4 ``killrun``, which saves steps 1 and 2, then has its
   process 1 SIGKILLed mid-run (and the job torn down).
2. 2x4 ``resume`` (from the killed run's step 2, to step 3) + restores of (1)'s checkpoint;
   1x8 restore; 1x1 restore.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import _multiprocess as mp

WORKER = os.path.join(mp.TESTS, "multiprocess_worker.py")
CONFIGS = [f"{f}/{r}/{m}" for f in ("gpt2", "llama") for r in ("fsdp", "tensor") for m in ("LoRA", "LorettaRep")]
ADAPTER_TOL = 1e-6  # the brief's bound; the measured differences are in the report
LAUNCH_TIMEOUT = 400


def _report(procs) -> tuple[dict, list[dict]]:
    """Process 0's JSON report and every process's own line."""
    own = []
    for i, proc in enumerate(procs):
        line = next(line for line in proc.stdout.splitlines() if line.startswith(f"process {i}: "))
        own.append(json.loads(line.split(": ", 1)[1]))
    return json.loads(procs[0].stdout.strip().splitlines()[-1]), own


def _killed_run(workdir: str) -> dict:
    """2x4 killrun: wait until both processes committed step 2, SIGKILL process 1, tear down."""
    ckpt = os.path.join(workdir, "kill", "ckpt")
    os.makedirs(os.path.dirname(ckpt))
    markers = [os.path.join(workdir, "kill", f"ready-{i}") for i in range(2)]
    with mp.start([sys.executable, WORKER, workdir, f"killrun={ckpt}"], 2, 4) as group:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not all(os.path.exists(m) for m in markers):
            if any(code is not None for code in group.poll()) or time.monotonic() > deadline:
                group.stop()
                raise AssertionError(f"the killrun never reached its checkpoint at step 2:\n{group.logs()}")
            time.sleep(0.1)
        group.kill(1, signal.SIGKILL)
        codes_after_kill = group.poll()
        group.stop()  # process 0 would wait for process 1 in the next collective: a launcher restarts the job
        with open(markers[1]) as f:
            steps_at_kill = f.read()
    return {"ckpt": ckpt, "codes_after_kill": codes_after_kill, "steps_at_kill": steps_at_kill}


def _launch(workdir, jobs, n, d, *, distributed=True, name=None):
    out = os.path.join(workdir, name or f"{n}x{d}")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    procs = mp.launch([sys.executable, WORKER, out, *jobs], n, d, timeout=LAUNCH_TIMEOUT, distributed=distributed)
    report, own = _report(procs)
    return {"dir": out, "report": report, "own": own, "wall": round(time.perf_counter() - t0, 1)}


def _all_runs(workdir: str) -> dict:
    """Two phases of concurrent launches (the second restores what the first saved)."""
    ckpt = os.path.join(workdir, "ckpt")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(_launch, workdir, [f"save={ckpt}", "errors"], 2, 4)
        eight = pool.submit(_launch, workdir, ["train"], 1, 8, distributed=False)
        killed = pool.submit(_killed_run, workdir)
        first, eight, killed = first.result(), eight.result(), killed.result()
    t1 = time.perf_counter()
    with ThreadPoolExecutor(3) as pool:
        two = pool.submit(_launch, workdir, [f"resume={killed['ckpt']}", f"restore={ckpt}:tensor", f"restore={ckpt}:default"], 2, 4)
        eight_restore = pool.submit(_launch, workdir, [f"restore={ckpt}:tensor"], 1, 8, distributed=False, name="1x8-restore")
        one = pool.submit(_launch, workdir, [f"restore={ckpt}:default"], 1, 1, distributed=False)
        two, eight_restore, one = two.result(), eight_restore.result(), one.result()
    wall = {"phase1": round(t1 - t0, 1), "phase2": round(time.perf_counter() - t1, 1)}
    return {"first": first, "killed": killed, "two": two, "eight": eight, "eight_restore": eight_restore, "one": one,
            "wall": wall}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return mp.run_once("multiprocess_runs", str(shared), _all_runs)


def _npz(run, name):
    with np.load(os.path.join(run["dir"], name)) as f:
        return {k: f[k] for k in f.files}


# --- the job ------------------------------------------------------------------------------


def test_two_processes_form_one_job_of_eight_devices(runs):
    own = runs["first"]["own"]
    assert [o["process"] for o in own] == [0, 1]
    for o in own:
        assert (o["processes"], o["devices"], o["local_devices"]) == (2, 8, 4)
        assert o["job"][1:] == [2, o["process"]]
    # each process feeds its own half of the global batch of 16 rows
    assert [o["jobs"]["errors"]["local_rows"] for o in own] == [[0, 8], [8, 16]]
    eight = runs["eight"]["own"][0]
    assert (eight["processes"], eight["devices"], eight["job"]) == (1, 8, None)
    assert sorted(runs["eight"]["report"]["jobs"]["train"]) == sorted(CONFIGS)  # the reference ran them all


# --- mesh_step: 2 processes x 4 devices == 1 process x 8 devices --------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_mesh_step_across_processes_equals_one_process(runs, config):
    multi, single = _npz(runs["first"], "train.npz"), _npz(runs["eight"], "train.npz")
    paths = [k for k in multi if k.startswith(config + "/")]
    assert paths and sorted(paths) == sorted(k for k in single if k.startswith(config + "/"))
    diff = max(float(np.max(np.abs(multi[k] - single[k]))) for k in paths)
    moved = max(float(np.max(np.abs(multi[k] - multi[f"init/{k}"]))) for k in paths)
    assert moved > 1e-2, moved  # both runs trained (3 Adam steps of lr 1e-2)
    assert diff <= ADAPTER_TOL, (config, diff)
    losses = runs["first"]["report"]["jobs"]["save"][config]["losses"]
    ref = runs["eight"]["report"]["jobs"]["train"][config]["losses"]
    assert len(losses) == 3
    np.testing.assert_allclose(losses, ref, rtol=1e-6, atol=0)  # measured: 0 to 1 float32 ulp apart
    # both processes computed the same (replicated) loss
    own = runs["first"]["own"]
    assert own[0]["jobs"]["save"][config]["losses"] == own[1]["jobs"]["save"][config]["losses"]


def test_tensor_rules_shard_the_lora_factors_across_processes(runs):
    specs = runs["first"]["report"]["jobs"]["save"]["gpt2/tensor/LoRA"]["adapter_specs"]
    assert "P(None, 'model')" in specs and "P('model', None)" in specs
    assert "P(None, 'data')" in runs["first"]["report"]["jobs"]["save"]["gpt2/fsdp/LoRA"]["adapter_specs"]


# --- misuse -------------------------------------------------------------------------------


def test_misuse_raises_clear_errors_in_every_process(runs):
    for o in runs["first"]["own"]:
        errors = o["jobs"]["errors"]
        assert errors["same_params"] is None
        assert "differs between the processes" in errors["different_params"]
        assert "process(es) [1]" in errors["different_params"]
        assert "transformer/h/0/attn/c_attn/kernel" in errors["different_params"]
        assert "multiple of 4" in errors["odd_rows"] and "local_rows" in errors["odd_rows"]
        assert errors["again_same"] is True
        assert "already initialized" in errors["again_other"]
        assert "this process's devices only" in errors["local_save"] and "put_state" in errors["local_save"]
        assert errors["local_save_wrote"] is False  # refused before anything was created


# --- checkpoints across topologies -------------------------------------------------------

RESTORES = [("two", "restored-tensor.npz"), ("two", "restored-default.npz"), ("eight_restore", "restored-tensor.npz"),
            ("one", "restored-default.npz")]


@pytest.mark.parametrize("run,name", RESTORES, ids=["2x4-tensor", "2x4-replicated", "1x8-tensor", "1x1"])
def test_checkpoint_from_two_processes_restores_bit_identically(runs, run, name):
    saved, restored = _npz(runs["first"], "saved.npz"), _npz(runs[run], name)
    assert sorted(saved) == sorted(restored)
    assert any(k.startswith("opt_state/") for k in saved) and any(k.startswith("adapter/") for k in saved)
    unequal = [k for k in saved if not np.array_equal(saved[k], restored[k])]
    assert not unequal, unequal
    assert int(restored["step"]) == 3
    assert json.loads(str(restored["data_position"])) == {"batch": 3, "epoch": 0}


def test_restored_arrays_land_on_the_requested_topology(runs):
    two = runs["two"]["report"]["jobs"]
    assert "P(None, 'model')" in two["restore-tensor"]["adapter_specs"]
    assert two["restore-default"]["adapter_specs"] == ["P()"] and two["restore-default"]["adapter_device_counts"] == [8]
    assert "P(None, 'model')" in runs["eight_restore"]["report"]["jobs"]["restore-tensor"]["adapter_specs"]
    assert runs["one"]["report"]["jobs"]["restore-default"]["adapter_device_counts"] == [1]


# --- SIGKILL mid-run, relaunch, resume ---------------------------------------------------


def test_killed_worker_relaunch_resumes_exactly(runs):
    killed = runs["killed"]
    assert killed["codes_after_kill"][1] == -signal.SIGKILL
    assert killed["steps_at_kill"] == "[1, 2]"
    resumed = runs["two"]["report"]["jobs"]["resume"]
    assert resumed["committed_before"] == [1, 2] and resumed["restored_step"] == 2
    assert resumed["data_position"] == {"batch": 2, "epoch": 0}
    assert len(resumed["losses"]) == 1 and resumed["committed_after"] == [1, 2, 3]
    # the uninterrupted run's state at step 3 is what (1) saved; the resumed one must equal it bit for bit
    uninterrupted, after = _npz(runs["first"], "saved.npz"), _npz(runs["two"], "resumed.npz")
    keys = [k for k in uninterrupted if k.startswith(("adapter/", "opt_state/"))] + ["step", "rng"]
    unequal = [k for k in keys if not np.array_equal(uninterrupted[k], after[k])]
    assert not unequal, unequal
    last = runs["first"]["report"]["jobs"]["save"]["gpt2/tensor/LoRA"]["losses"][-1]
    assert resumed["losses"][0] == last


# --- initialize_distributed: settings checked before anything starts ---------------------

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@pytest.fixture
def no_job_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_initialize_distributed_without_settings_stays_single_process(no_job_env):
    import jax

    import lrtt

    assert lrtt.train.initialize_distributed() is None
    no_job_env.setenv("JAX_NUM_PROCESSES", "1")  # a launcher that always sets it
    assert lrtt.train.initialize_distributed() is None
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize(
    "args,env,match",
    [
        (("localhost", 2, 0), {}, "'host:port'"),
        (("10.0.0.2:99999", 2, 0), {}, "'host:port'"),
        (("127.0.0.1:1234", 2, 2), {}, r"must be in 0\.\.1"),
        (("127.0.0.1:1234", 2, -1), {}, r"must be in 0\.\.1"),
        (("127.0.0.1:1234", None, 0), {}, "number of processes"),
        ((None, 2, 0), {}, "needs the coordinator"),
        (("127.0.0.1:1234", 2, None), {}, "`process_id` is not set"),
        ((None, None, None), {"JAX_NUM_PROCESSES": "two", "JAX_COORDINATOR_ADDRESS": "a:1"}, "JAX_NUM_PROCESSES='two'"),
        ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"}, r"0\.\.1"),
        (("127.0.0.1:1234", 0, 0), {}, ">= 1"),
        (("127.0.0.1:1234", "2", 0), {}, "must be an int"),
    ],
)
def test_initialize_distributed_rejects_bad_settings(no_job_env, args, env, match):
    import lrtt

    for name, value in env.items():
        no_job_env.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        lrtt.train.initialize_distributed(*args)


def test_put_local_batch_in_one_process_is_the_whole_batch():
    import jax
    import optax
    from jax.sharding import Mesh

    import lrtt

    method = lrtt.LoRA(rank=2, targets=".*")
    params = {"dense": {"kernel": jax.ShapeDtypeStruct((4, 4), np.float32)}}
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    ms = lrtt.train.mesh_step(lambda a, p, b, r: 0.0, optax.sgd(0.1), mesh, method=method, params=params)
    batch = {"x": np.arange(12, dtype=np.float32).reshape(6, 2)}
    local = ms.put_local_batch(batch)
    assert ms.local_rows(6) == slice(0, 6)
    assert local["x"].sharding == ms.batch_sharding
    np.testing.assert_array_equal(np.asarray(local["x"]), batch["x"])
