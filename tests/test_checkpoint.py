"""`lrtt.CheckpointManager`: adapter-only Orbax checkpoints, mismatch and damage errors, exact
resume across processes, and a SIGKILL in the middle of a save.

Restoring onto other shardings (Mesh <-> one device) runs in test_multidevice.py.
"""

import glob
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import checkpoint_child as child
import lrtt
from conftest import perturb

HERE = os.path.dirname(os.path.abspath(__file__))
# A failed tensorstore read leaves an asyncio callback that fires after its loop closed.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
N = 3  # exact resume: N steps, save, restore in another process, N more == 2N straight


def _state(method, tx=None, seed=1):
    params = child.init_params()
    tx = tx or optax.adamw(1e-3)
    adapter = perturb(method.init(jax.random.key(0), params), jax.random.key(seed))
    return params, adapter, tx.init(adapter), tx


def _equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _save_steps(directory, method, steps, **kw):
    params, adapter, opt_state, tx = _state(method)
    mgr = lrtt.CheckpointManager(directory, method, **kw)
    saved = {}
    for s in steps:
        adapter_s = jax.tree.map(lambda x: x + s, adapter)
        mgr.save(s, adapter_s, opt_state, data_position={"next_batch": s * 10})
        saved[s] = adapter_s
    mgr.wait()
    return mgr, params, saved, opt_state


@pytest.mark.parametrize("method", [lrtt.LoRA(rank=4, targets="attention"), lrtt.LorettaRep(rank=4, tt_rank=2)], ids=["lora", "rep"])
def test_roundtrip_saves_the_adapter_alone(tmp_path, method):
    params, adapter, opt_state, _ = _state(method)
    rng = jax.random.key(123)
    mgr = lrtt.CheckpointManager(tmp_path, method)
    mgr.save(7, adapter, opt_state, data_position={"epoch": 1, "next_batch": 70}, rng=rng)
    mgr.wait()
    like = lrtt.adapter_shapes(method, params)  # shapes only
    r = mgr.restore(adapter_like=like, opt_state_like=jax.eval_shape(optax.adamw(1e-3).init, like))
    assert (r.step, r.data_position) == (7, {"epoch": 1, "next_batch": 70})
    assert _equal(r.adapter, adapter) and _equal(r.opt_state, opt_state)
    assert jax.tree.structure(r.adapter) == jax.tree.structure(adapter)
    assert np.array_equal(jax.random.key_data(r.rng), jax.random.key_data(rng))
    # Nothing of the frozen weights on disk: the step is about the size of adapter + moments.
    on_disk = sum(os.path.getsize(f) for f in glob.glob(f"{tmp_path}/7/**", recursive=True) if os.path.isfile(f))
    adapter_bytes = 3 * 4 * lrtt.num_params(adapter)  # the adapter and Adam's two moments, float32
    assert on_disk < adapter_bytes + 64_000
    assert on_disk < 4 * lrtt.num_params(params)


def test_keeps_the_last_n(tmp_path):
    method = lrtt.LoRA(rank=2, targets="attention")
    mgr, params, saved, _ = _save_steps(tmp_path, method, [1, 2, 3, 4, 5], max_to_keep=2)
    assert mgr.all_steps() == [4, 5] and mgr.latest_step() == 5
    r = mgr.restore(4, adapter_like=lrtt.adapter_shapes(method, params))
    assert r.opt_state is None and r.data_position == {"next_batch": 40} and _equal(r.adapter, saved[4])


RESTORED_WITH = {
    "method": (lrtt.LorettaRep(rank=4, tt_rank=2), ["method: checkpoint 'LoRA', now 'LorettaRep'", "kind"]),
    "rank": (lrtt.LoRA(rank=8, targets="attention"), ["rank: checkpoint 4, now 8", "[32, 4]"]),
    "targets": (lrtt.LoRA(rank=4, targets="qv"), ["targets:", "only in the checkpoint (4)"]),
}


@pytest.mark.parametrize("what", sorted(RESTORED_WITH))
def test_restoring_another_adapter_lists_the_differences(tmp_path, what):
    method = lrtt.LoRA(rank=4, targets="attention")
    _, params, _, _ = _save_steps(tmp_path, method, [1])
    other, expected = RESTORED_WITH[what]
    with pytest.raises(lrtt.CheckpointMismatchError) as info:
        lrtt.CheckpointManager(tmp_path, other).restore(adapter_like=lrtt.adapter_shapes(other, params))
    for fragment in expected + ["step 1", "differences (checkpoint vs now)"]:
        assert fragment in str(info.value), str(info.value)


def test_restoring_another_tt_shape_or_optimizer_lists_the_differences(tmp_path):
    method = lrtt.LorettaRep(rank=4, tt_rank=2, tt_shape=([4, 8, 4], [8, 8, 6]))
    params, adapter, opt_state, _ = _state(method)
    mgr = lrtt.CheckpointManager(tmp_path, method, async_save=False)
    mgr.save(1, adapter, opt_state)
    other = lrtt.LorettaRep(rank=4, tt_rank=2, tt_shape=([8, 16], [8, 8, 6]))
    with pytest.raises(lrtt.CheckpointMismatchError, match=r"tt_shape: checkpoint \[\[4, 8, 4\], \[8, 8, 6\]\], now \[\[8, 16\], \[8, 8, 6\]\]"):
        lrtt.CheckpointManager(tmp_path, other).restore(adapter_like=lrtt.adapter_shapes(other, params))
    sgd_state = optax.sgd(0.1, momentum=0.9).init(adapter)
    with pytest.raises(lrtt.CheckpointMismatchError, match="optimizer state leaf"):
        mgr.restore(adapter_like=adapter, opt_state_like=sgd_state)


def _data_files(step_dir):
    return [f for f in glob.glob(f"{step_dir}/adapter/d/*") if os.path.isfile(f)]


@pytest.mark.parametrize("damage", ["truncate", "delete", "metadata", "values"])
def test_a_damaged_step_raises_and_the_earlier_ones_restore(tmp_path, damage):
    method = lrtt.LoRA(rank=2, targets="attention")
    mgr, params, saved, opt_state = _save_steps(tmp_path, method, [1, 2, 3])
    step_dir = os.path.join(tmp_path, "3")
    if damage == "truncate":
        for f in _data_files(step_dir):
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    elif damage == "delete":
        for f in _data_files(step_dir):
            os.remove(f)
    elif damage == "metadata":
        with open(os.path.join(step_dir, "meta", "metadata"), "w") as fh:
            fh.write('{"step": 3, "meth')
    else:  # well-formed arrays with other values: only the fingerprints can tell
        forged = jax.tree.map(lambda x: x + 1.0, saved[3])
        flat = dict(lrtt._paths.named_leaves(forged))
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(step_dir, "forged"), lrtt._paths.nest(flat))
        os.rename(os.path.join(step_dir, "adapter"), os.path.join(step_dir, "adapter.orig"))
        os.rename(os.path.join(step_dir, "forged"), os.path.join(step_dir, "adapter"))
    like = lrtt.adapter_shapes(method, params)
    mgr = lrtt.CheckpointManager(tmp_path, method)
    with pytest.raises(lrtt.CheckpointCorruptError) as info:
        mgr.restore(adapter_like=like)
    message = str(info.value)
    assert "checkpoint step 3" in message and "restore(step=2" in message, message
    assert (info.value.step, info.value.earlier) == (3, (1, 2))  # what a caller reads, not the text
    if damage == "values":
        assert "changed since the save" in message  # caught by the fingerprints, not by Orbax
    assert mgr.all_steps() == [1, 2, 3]  # nothing deleted
    for s in (1, 2):
        assert _equal(mgr.restore(s, adapter_like=like).adapter, saved[s])
    with pytest.warns(UserWarning, match="skipping damaged checkpoint step 3"):
        r = mgr.restore(adapter_like=like, fallback=True)
    assert r.step == 2 and _equal(r.adapter, saved[2])


def test_missing_steps_are_clear(tmp_path):
    method = lrtt.LoRA(rank=2, targets="attention")
    params = child.init_params()
    mgr = lrtt.CheckpointManager(tmp_path, method)
    with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
        mgr.restore(adapter_like=lrtt.adapter_shapes(method, params))
    os.makedirs(os.path.join(tmp_path, "9.orbax-checkpoint-tmp"))  # a save that never committed
    assert mgr.all_steps() == []
    with pytest.raises(ValueError, match="not the params"):
        mgr.save(1, params)


# --- across processes: exact resume, SIGKILL mid-save ----------------------------------------


@pytest.fixture(scope="module")
def child_run(tmp_path_factory):
    """Run the child: N steps + async save (then it keeps training), then saves in a loop until
    this process kills it with SIGKILL while a save is in flight."""
    directory = str(tmp_path_factory.mktemp("child"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "checkpoint_child.py"), "first", directory, str(N)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    reported, saved = [], False
    try:
        deadline = time.time() + 240
        for line in proc.stdout:
            saved |= line.startswith("SAVED")
            if line.startswith("COMMITTED"):
                reported.append(int(line.split()[1]))
                if len(reported) >= 2:
                    break
            if time.time() > deadline:
                break
        kill_dir = os.path.join(directory, "kill")
        in_flight = []
        while proc.poll() is None and time.time() < deadline:
            in_flight = [n for n in os.listdir(kill_dir) if "tmp" in n]
            if in_flight:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    leftovers = [n for n in os.listdir(kill_dir) if "tmp" in n]
    return {"dir": directory, "saved": saved, "reported": reported, "in_flight": in_flight, "leftovers": leftovers, "rc": proc.returncode}


def test_exact_resume_in_a_new_process_is_bit_for_bit(child_run):
    assert child_run["saved"]
    params, step, fresh = child.setup()
    mgr = lrtt.CheckpointManager(os.path.join(child_run["dir"], "resume"), child.METHOD)
    r = mgr.restore(adapter_like=fresh.adapter, opt_state_like=fresh.opt_state)
    assert (r.step, r.data_position) == (N, {"next_batch": N})
    state = lrtt.train.TrainState(r.adapter, r.opt_state, jnp.asarray(r.step, jnp.int32), r.rng)
    resumed = child.train(step, state, params, r.data_position["next_batch"], 2 * N)
    straight = child.train(step, fresh, params, 0, 2 * N)
    for a, b in zip(jax.tree.leaves((resumed.adapter, resumed.opt_state)), jax.tree.leaves((straight.adapter, straight.opt_state))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert int(resumed.step) == 2 * N


def test_sigkill_mid_save_keeps_every_committed_step(child_run):
    assert child_run["rc"] == -signal.SIGKILL
    assert child_run["in_flight"], "the child was not killed during a save"
    assert child_run["leftovers"]  # the killed save's temporary directory is still there
    method, _ = child.big_adapter(0.0)
    mgr = lrtt.CheckpointManager(os.path.join(child_run["dir"], "kill"), method)
    steps = mgr.all_steps()
    assert set(child_run["reported"]) <= set(steps)  # every reported commit survived
    in_flight_step = int(child_run["in_flight"][0].split(".")[0])
    assert mgr.latest_step() == in_flight_step - 1 == max(steps)
    like = lrtt.adapter_shapes(method, {"big": {"kernel": jax.ShapeDtypeStruct((2048, 2048), jnp.float32)}})
    for s in steps:  # the latest complete one and everything before it restore intact
        r = mgr.restore(s, adapter_like=like)
        assert r.step == s and all(bool(jnp.all(x == s)) for x in jax.tree.leaves(r.adapter))
