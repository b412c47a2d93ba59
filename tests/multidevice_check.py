"""Single-device vs pmap vs Mesh training on 8 simulated CPU devices (run by test_multidevice.py).

Runs in its own process because ``--xla_force_host_platform_device_count`` must be set before
JAX initializes its backend and must not leak into the other tests. Prints one JSON object on
the last line of stdout: per method and configuration, the largest differences of the losses and
of the adapter from the single-device run, plus the shardings observed and checkpoint
cross-sharding restores.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("USE_TORCH", "0")
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from transformers import FlaxGPT2LMHeadModel, GPT2Config  # noqa: E402

import lrtt  # noqa: E402

N_STEPS = 3
BATCH, SEQ = 16, 16

model = FlaxGPT2LMHeadModel(
    GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16), seed=0, _do_init=False
)


def _random_params(shapes):
    """GPT-2-like random weights from the shapes alone (skips compiling the model's init)."""
    rng = np.random.default_rng(0)

    def leaf(path, s):
        if path.endswith("scale"):
            return jnp.ones(s.shape, s.dtype)
        if path.endswith("bias"):
            return jnp.zeros(s.shape, s.dtype)
        return jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(lambda kp, s: leaf(lrtt._paths.path_str(kp), s), shapes)


params = _random_params(jax.eval_shape(lambda key: model.init_weights(key, (1, 1)), jax.random.key(0)))


def apply_fn(p, batch, rng):
    return model(batch["input_ids"], params=p, train=False).logits


def loss_fn(logits, batch):
    ids = batch["input_ids"]
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def batches():
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, 64, (BATCH, SEQ), dtype=np.int32)} for _ in range(N_STEPS)]


DATA = batches()
OPTIMIZER = optax.adam(1e-2)


def fresh_state(method):
    return lrtt.train.init_state(method.init(jax.random.key(0), params), OPTIMIZER, 7)


def flat(tree):
    return {p: np.asarray(jax.device_get(x)) for p, x in lrtt._paths.named_leaves(tree)}


def run_single(method, accumulate=1):
    step = lrtt.train.jit_step(lrtt.train.make_loss(method, apply_fn, loss_fn), OPTIMIZER, accumulate=accumulate)
    state, losses = fresh_state(method), []
    for batch in DATA:
        state, loss = step(state, params, batch)
        losses.append(float(loss))
    return state, losses


def run_pmap(method):
    step = lrtt.train.pmap_step(lrtt.train.make_loss(method, apply_fn, loss_fn), OPTIMIZER)
    state = lrtt.train.replicate(fresh_state(method))
    placed = lrtt.train.replicate_params(params)
    losses = []
    for batch in DATA:
        state, loss = step(state, placed, lrtt.train.split_batch(batch))
        losses.append(float(loss[0]))
    return lrtt.train.unreplicate(state), losses


def make_mesh(kind):
    devices = np.array(jax.devices())
    if kind == "tensor":
        return Mesh(devices.reshape(4, 2), ("data", "model")), "tensor"
    if kind == "tensor_make_mesh":  # jax.make_mesh: Explicit axis types by default
        return jax.make_mesh((4, 2), ("data", "model")), "tensor"
    return Mesh(devices, ("data",)), (None if kind == "data" else kind)


def run_mesh(method, kind, accumulate=1):
    mesh, rules = make_mesh(kind)
    loss = lrtt.train.make_loss(method, apply_fn, loss_fn)
    ms = lrtt.train.mesh_step(loss, OPTIMIZER, mesh, method=method, params=params, rules=rules, accumulate=accumulate)
    state, placed, losses = ms.put_state(fresh_state(method)), ms.put_params(params), []
    for batch in DATA:
        state, loss_value = ms.step(state, placed, ms.put_batch(batch))
        losses.append(float(loss_value))
    return state, losses, ms, placed


def compare(method, ref, other):
    """Largest |difference| of the losses and the adapter leaves; how far training moved them."""
    (ref_state, ref_losses), (state, losses) = ref, other
    a, b, a0 = flat(ref_state.adapter), flat(state.adapter), flat(fresh_state(method).adapter)
    return {
        "loss_diff": float(np.max(np.abs(np.array(ref_losses) - np.array(losses)))),
        "adapter_diff": max(float(np.max(np.abs(a[p] - b[p]))) for p in a),
        "adapter_moved": max(float(np.max(np.abs(a[p] - a0[p]))) for p in a),
        "losses": losses,
    }


def specs_of(tree):
    return {p: str(x.sharding.spec) for p, x in lrtt._paths.named_leaves(tree)}


def main():
    out: dict = {"devices": jax.device_count(), "methods": {}}
    methods = {
        "LoRA": lrtt.LoRA(rank=4, targets="attention"),
        "LorettaRep": lrtt.LorettaRep(rank=4, tt_rank=2),
    }
    # LoRA: pmap, tensor-parallel Mesh (data 4 x model 2), FSDP Mesh (data 8) with gradient
    # accumulation; LorettaRep: pmap, tensor-parallel Mesh built with Mesh(...) and with
    # jax.make_mesh (Explicit axes). Each is compared with one device.
    configs = {"LoRA": ("tensor", "fsdp"), "LorettaRep": ("tensor", "tensor_make_mesh")}
    kept = {}
    for name, method in methods.items():
        ref = run_single(method)
        res = {"single_losses": ref[1]}
        res["pmap"] = compare(method, ref, run_pmap(method))
        for kind in configs[name]:
            accumulate = 2 if kind == "fsdp" else 1
            state, losses, ms, placed = run_mesh(method, kind, accumulate)
            res[f"mesh_{kind}"] = compare(method, ref, (state, losses))
            res[f"mesh_{kind}"]["adapter_specs"] = specs_of(state.adapter)
            res[f"mesh_{kind}"]["param_specs"] = {
                p: s for p, s in specs_of(placed).items() if p.endswith("kernel") or p.endswith("embedding")
            }
            kept[(name, kind)] = (state, ms)
        kept[(name, "single")] = ref[0]
        out["methods"][name] = res

    # adapter dropout on: the Mesh step draws the masks for the global batch, as one device does.
    dropout = lrtt.LoRA(rank=4, targets="attention", dropout=0.3)
    ref = run_single(dropout)
    no_dropout = run_single(methods["LoRA"])
    state, losses, _, _ = run_mesh(dropout, "data")
    out["dropout_mesh"] = compare(dropout, ref, (state, losses))
    out["dropout_mesh"]["effect"] = float(np.max(np.abs(np.array(ref[1]) - np.array(no_dropout[1]))))

    # checkpoints across shardings: tensor-parallel Mesh -> one device, -> FSDP Mesh; one device -> Mesh.
    method = methods["LoRA"]
    tensor_state, _ = kept[("LoRA", "tensor")]
    _, fsdp_ms = kept[("LoRA", "fsdp")]
    single_state = kept[("LoRA", "single")]
    like = lrtt.adapter_shapes(method, params)
    opt_like = jax.eval_shape(OPTIMIZER.init, like)
    ck: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        mgr = lrtt.CheckpointManager(os.path.join(tmp, "a"), method, async_save=True)
        mgr.save(N_STEPS, tensor_state.adapter, tensor_state.opt_state, data_position={"batch": N_STEPS}, rng=tensor_state.rng)
        mgr.wait()
        one = mgr.restore(adapter_like=like, opt_state_like=opt_like)
        ck["to_single_equal"] = all(np.array_equal(flat(tensor_state.adapter)[p], v) for p, v in flat(one.adapter).items())
        ck["to_single_devices"] = sorted({str(d) for x in jax.tree.leaves(one.adapter) for d in x.devices()})
        fsdp = mgr.restore(adapter_like=like, opt_state_like=opt_like, shardings=fsdp_ms.state_sharding)
        ck["to_fsdp_equal"] = all(np.array_equal(flat(tensor_state.adapter)[p], v) for p, v in flat(fsdp.adapter).items())
        ck["to_fsdp_specs"] = specs_of(fsdp.adapter)
        ck["to_fsdp_expected_specs"] = {
            p: str(s.spec) for p, s in lrtt._paths.named_leaves(fsdp_ms.state_sharding.adapter, is_leaf=lambda x: hasattr(x, "spec"))
        }
        mgr.close()
        mgr = lrtt.CheckpointManager(os.path.join(tmp, "b"), method, async_save=False)
        mgr.save(N_STEPS, single_state.adapter, single_state.opt_state)
        _, tensor_ms = kept[("LoRA", "tensor")]
        back = mgr.restore(adapter_like=like, opt_state_like=opt_like, shardings=tensor_ms.state_sharding)
        ck["single_to_tensor_equal"] = all(np.array_equal(flat(single_state.adapter)[p], v) for p, v in flat(back.adapter).items())
        ck["single_to_tensor_specs"] = specs_of(back.adapter)
        mgr.close()
    out["checkpoint"] = ck
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
