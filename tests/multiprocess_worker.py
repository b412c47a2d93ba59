"""One process of a multi-process (or the single-process reference) run, for test_multiprocess.py.

Started by :mod:`tests._multiprocess` (``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/
``JAX_PROCESS_ID`` and the device count in the environment) or alone with
``--xla_force_host_platform_device_count``. Usage::

    multiprocess_worker.py OUT_DIR JOB [JOB ...]

Jobs (run in order, in every process):

* ``train``: every configuration — tiny GPT-2 and tiny Llama (tests/conftest.py's configs) x
  rules ``fsdp`` (mesh ``data=8``) and ``tensor`` (mesh ``data=4 x model=2``) x LoRA and
  LorettaRep — for 3 steps, each process feeding only its rows of the global batch
  (``MeshStep.put_local_batch``). Writes ``train.npz`` (the initial and final adapters).
* ``save=DIR``: the ``train`` run of gpt2/tensor/LoRA saved at step 3 into ``DIR`` by every
  process, with its data position and rng; writes ``saved.npz`` (what was saved).
* ``killrun=DIR``: gpt2/tensor/LoRA saving every step into ``DIR``; after step 2 is committed it
  writes ``DIR/../ready-<process>`` and waits to be killed (exits 3 if no one does in 120 s).
* ``resume=DIR``: restores the latest step of ``DIR`` and trains on to step 3 from the restored
  data position; writes ``resumed.npz``.
* ``restore=DIR:LAYOUT``: restores the latest step of ``DIR`` onto ``LAYOUT`` (``tensor``: the
  tensor-parallel mesh's shardings; ``default``: no shardings given); writes
  ``restored-LAYOUT.npz``.
* ``errors``: the misuses that must raise (different params per process, a batch slice of the
  wrong size, joining again with other settings, saving a process-local adapter).

Process 0 writes the ``.npz`` files (global arrays gathered) and prints one JSON report on the
last line of stdout; every process prints ``process <i>: <json>`` with what it saw.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("USE_TORCH", "0")
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import jax  # noqa: E402
import lrtt  # noqa: E402

JOB = lrtt.train.initialize_distributed(initialization_timeout=120)  # before anything touches a device

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

STEPS, BATCH, SEQ, VOCAB = 3, 16, 16, 64
OPTIMIZER = optax.adam(1e-2)
METHODS = {"LoRA": lrtt.LoRA(rank=4, targets="attention"), "LorettaRep": lrtt.LorettaRep(rank=4, tt_rank=2)}
CONFIGS = [(f, r, m) for f in ("gpt2", "llama") for r in ("fsdp", "tensor") for m in METHODS]
CKPT_CONFIG = ("gpt2", "tensor", "LoRA")
PRIMARY = jax.process_index() == 0


def _model(family):
    """tests/conftest.py's tiny models, built without init (params come from :func:`_params`)."""
    if family == "gpt2":
        from transformers import FlaxGPT2LMHeadModel, GPT2Config

        config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=SEQ)
        return FlaxGPT2LMHeadModel(config, seed=0, _do_init=False)
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ,
    )
    return FlaxLlamaForCausalLM(config, seed=0, _do_init=False)


_MODELS: dict = {}


def model_and_params(family):
    """The model and host (numpy) params, the same in every process (seeded numpy draws)."""
    if family not in _MODELS:
        model = _model(family)
        shapes = jax.eval_shape(lambda key: model.init_weights(key, (1, 1)), jax.random.key(0))
        rng = np.random.default_rng(0)

        def leaf(path, s):
            name = lrtt._paths.path_str(path)
            if name.endswith(("scale", "weight")) and len(s.shape) == 1:
                return np.ones(s.shape, s.dtype)
            if name.endswith("bias"):
                return np.zeros(s.shape, s.dtype)
            return (0.02 * rng.standard_normal(s.shape)).astype(s.dtype)

        _MODELS[family] = (model, jax.tree_util.tree_map_with_path(leaf, shapes))
    return _MODELS[family]


def loss_for(family, method):
    model, _ = model_and_params(family)

    def apply_fn(p, batch, rng):
        return model(batch["input_ids"], params=p, train=False).logits

    def loss_fn(logits, batch):
        ids = batch["input_ids"]
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    return lrtt.train.make_loss(method, apply_fn, loss_fn)


DATA = [np.random.default_rng(0).integers(0, VOCAB, (STEPS, BATCH, SEQ), dtype=np.int32)[i] for i in range(STEPS)]


def make_mesh(rules):
    devices = np.array(jax.devices())  # in process order: each process's devices are neighbours
    if rules == "tensor":
        return Mesh(devices.reshape(-1, 2), ("data", "model"))
    return Mesh(devices, ("data",))


class Run:
    """One configuration's Mesh step, placed params and (fresh) state."""

    def __init__(self, family, rules, method_name):
        self.method = METHODS[method_name]
        _, self.params = model_and_params(family)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.params)
        self.ms = lrtt.train.mesh_step(
            loss_for(family, self.method), OPTIMIZER, make_mesh(rules), method=self.method, params=shapes, rules=rules
        )
        self.placed = self.ms.put_params(self.params)
        self.like = lrtt.adapter_shapes(self.method, shapes)
        self.opt_like = jax.eval_shape(OPTIMIZER.init, self.like)

    def fresh(self):
        adapter = self.method.init(jax.random.key(0), self.params)  # process-local, same everywhere
        return self.ms.put_state(lrtt.train.init_state(adapter, OPTIMIZER, 7))

    def train(self, state, start, stop, on_step=None):
        losses = []
        for i in range(start, stop):
            local = {"input_ids": DATA[i][self.ms.local_rows(BATCH)]}  # this process's rows only
            state, loss = self.ms.step(state, self.placed, self.ms.put_local_batch(local))
            losses.append(float(loss))
            if on_step:
                on_step(i + 1, state)
        return state, losses

    def manager(self, directory):
        return lrtt.CheckpointManager(directory, self.method, max_to_keep=3)


def host_values(tree):
    """``{path: numpy}`` of a tree of (possibly global) arrays; PRNG keys as their key data."""
    out = {}
    for path, x in lrtt._paths.named_leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        out[path] = np.asarray(x)
    return out


def dump(out_dir, name, arrays):
    if PRIMARY:
        np.savez(os.path.join(out_dir, name), **arrays)


def state_arrays(state, extra=None):
    arrays = {f"adapter/{p}": v for p, v in host_values(state.adapter).items()}
    arrays.update({f"opt_state/{p}": v for p, v in host_values(state.opt_state).items()})
    arrays["rng"] = host_values({"rng": state.rng})["rng"]
    arrays["step"] = np.asarray(host_values({"s": state.step})["s"])
    arrays.update(extra or {})
    return arrays


def job_train(out_dir, save_dir=None):
    arrays, report = {}, {}
    for config in CONFIGS:
        name = "/".join(config)
        t0 = time.perf_counter()
        run = Run(*config)
        state = run.fresh()
        arrays.update({f"init/{name}/{p}": v for p, v in host_values(state.adapter).items()})
        state, losses = run.train(state, 0, STEPS)
        report[name] = {"losses": losses, "seconds": round(time.perf_counter() - t0, 2)}
        report[name]["adapter_specs"] = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.adapter)})
        arrays.update({f"{name}/{p}": v for p, v in host_values(state.adapter).items()})
        if save_dir and config == CKPT_CONFIG:
            with run.manager(save_dir) as mgr:
                mgr.save(STEPS, state.adapter, state.opt_state, data_position={"batch": STEPS, "epoch": 0}, rng=state.rng)
                mgr.wait()
            dump(out_dir, "saved.npz", state_arrays(state, {"data_position": np.asarray(json.dumps({"batch": STEPS, "epoch": 0}))}))
    dump(out_dir, "train.npz", arrays)
    return report


def job_killrun(out_dir, directory):
    run = Run(*CKPT_CONFIG)
    mgr = run.manager(directory)

    def on_step(step, state):
        mgr.save(step, state.adapter, state.opt_state, data_position={"batch": step, "epoch": 0}, rng=state.rng)
        if step == 2:
            mgr.wait()  # committed: the checkpoint a relaunch resumes from
            with open(os.path.join(os.path.dirname(directory), f"ready-{jax.process_index()}"), "w") as f:
                f.write(str(mgr.all_steps()))
            time.sleep(120)  # killed here, mid-run, by the test
            print("never killed", flush=True)
            sys.exit(3)

    run.train(run.fresh(), 0, STEPS, on_step)
    raise AssertionError("unreachable: the run waits to be killed after step 2")


def job_resume(out_dir, directory):
    run = Run(*CKPT_CONFIG)
    with run.manager(directory) as mgr:
        committed = mgr.all_steps()
        r = mgr.restore(adapter_like=run.like, opt_state_like=run.opt_like, shardings=run.ms.state_sharding)
        state = run.ms.put_state(lrtt.train.TrainState(r.adapter, r.opt_state, jnp.asarray(r.step, jnp.int32), r.rng))
        start = r.data_position["batch"]
        state, losses = run.train(state, start, STEPS)
        mgr.save(STEPS, state.adapter, state.opt_state, data_position={"batch": STEPS, "epoch": 0}, rng=state.rng)
        mgr.wait()
        after = mgr.all_steps()
    dump(out_dir, "resumed.npz", state_arrays(state))
    return {"committed_before": committed, "restored_step": r.step, "data_position": r.data_position,
            "losses": losses, "committed_after": after}


def job_restore(out_dir, directory, layout):
    family, _, name = CKPT_CONFIG
    method, (_, params) = METHODS[name], model_and_params(family)
    like = lrtt.adapter_shapes(method, params)
    shardings = Run(*CKPT_CONFIG).ms.state_sharding if layout == "tensor" else None  # else: no Mesh at all
    with lrtt.CheckpointManager(directory, method) as mgr:
        r = mgr.restore(adapter_like=like, opt_state_like=jax.eval_shape(OPTIMIZER.init, like), shardings=shardings)
    state = lrtt.train.TrainState(r.adapter, r.opt_state, jnp.asarray(r.step, jnp.int32), r.rng)
    dump(out_dir, f"restored-{layout}.npz", state_arrays(state, {"data_position": np.asarray(json.dumps(r.data_position))}))
    specs = sorted({str(getattr(x.sharding, "spec", type(x.sharding).__name__)) for x in jax.tree.leaves(r.adapter)})
    devices = sorted({len(x.sharding.device_set) for x in jax.tree.leaves(r.adapter)})
    return {"step": r.step, "data_position": r.data_position, "adapter_specs": specs, "adapter_device_counts": devices}


def _raises(fn) -> str | None:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


def job_errors(out_dir):
    run = Run("gpt2", "fsdp", "LoRA")
    out = {}
    if JOB is not None:
        other = jax.tree.map(lambda x: x + jax.process_index(), run.params)  # differs on process 1
        out["different_params"] = _raises(lambda: run.ms.put_params(other))
        out["same_params"] = _raises(lambda: run.ms.put_params(run.params))
        again = lrtt.train.initialize_distributed()
        out["again_same"] = list(again) == list(JOB)
        out["again_other"] = _raises(lambda: lrtt.train.initialize_distributed(
            JOB.coordinator_address, JOB.num_processes, (JOB.process_id + 1) % JOB.num_processes))
        never = os.path.join(out_dir, "never-written")
        local_adapter = run.method.init(jax.random.key(0), run.params)  # never placed on the Mesh
        with lrtt.CheckpointManager(never, run.method) as mgr:
            out["local_save"] = _raises(lambda: mgr.save(1, local_adapter))
        out["local_save_wrote"] = os.path.exists(never)
    rows = run.ms.local_rows(BATCH)
    out["local_rows"] = [rows.start, rows.stop]
    out["odd_rows"] = _raises(lambda: run.ms.put_local_batch({"input_ids": DATA[0][:3]}))
    return out


def main(argv):
    out_dir, jobs = argv[0], argv[1:]
    seen = {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
            "local_devices": jax.local_device_count(), "job": None if JOB is None else list(JOB)}
    report = dict(seen, jobs={})
    for job in jobs:
        name, _, arg = job.partition("=")
        t0 = time.perf_counter()
        if name == "train":
            result = job_train(out_dir)
        elif name == "save":
            result = job_train(out_dir, save_dir=arg)
        elif name == "killrun":
            result = job_killrun(out_dir, arg)
        elif name == "resume":
            result = job_resume(out_dir, arg)
        elif name == "restore":
            directory, _, layout = arg.rpartition(":")
            result = job_restore(out_dir, directory, layout)
        elif name == "errors":
            result = job_errors(out_dir)
        else:
            raise SystemExit(f"unknown job {job!r}")
        report["jobs"][name if name != "restore" else f"restore-{arg.rpartition(':')[2]}"] = result
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 2)
    print(f"process {jax.process_index()}: {json.dumps(report)}", flush=True)
    if PRIMARY:
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
