"""Child processes of test_checkpoint.py (exact resume across processes; SIGKILL mid-save).

Also importable: :func:`init_params` and :func:`apply_fn` are a tiny pure-JAX decoder with
GPT-2's parameter names and Conv1D ``(out, in)`` kernels (so lrtt's GPT-2 presets apply) that
imports in a second, unlike transformers.

Modes (``python tests/checkpoint_child.py MODE ...``):

* ``first DIR N``: LoRA with dropout, factored forward, AdamW with a schedule: train N steps,
  save step N asynchronously and keep training (donating the state) while it writes, print
  ``SAVED``; then ``killloop DIR/kill``. The test restores step N in its own process, trains N
  more steps and compares with 2N steps straight, bit for bit.
* ``killloop DIR``: save a large adapter at steps 1, 2, 3, ... back to back (adapter of step s
  is all ``s``), printing ``COMMITTED s`` once step s is on disk, until killed.
"""

from __future__ import annotations

import os
import sys
import warnings

warnings.filterwarnings("ignore")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lrtt  # noqa: E402

VOCAB, WIDTH, LAYERS, HEADS, SEQ, BATCH = 64, 32, 2, 4, 16, 8


def init_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(0.02 * rng.standard_normal(shape), jnp.float32)

    def norm():
        return {"scale": jnp.ones(WIDTH), "bias": jnp.zeros(WIDTH)}

    def dense(n_out, n_in):  # GPT-2 Conv1D kernel: (out, in)
        return {"kernel": normal(n_out, n_in), "bias": jnp.zeros(n_out)}

    def block():
        return {
            "ln_1": norm(),
            "attn": {"c_attn": dense(3 * WIDTH, WIDTH), "c_proj": dense(WIDTH, WIDTH)},
            "ln_2": norm(),
            "mlp": {"c_fc": dense(4 * WIDTH, WIDTH), "c_proj": dense(WIDTH, 4 * WIDTH)},
        }

    return {
        "transformer": {
            "wte": {"embedding": normal(VOCAB, WIDTH)},
            "wpe": {"embedding": normal(SEQ, WIDTH)},
            "h": {str(i): block() for i in range(LAYERS)},
            "ln_f": norm(),
        }
    }


def _ln(p, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _conv1d(p, x):
    return x @ p["kernel"].T + p["bias"]


def apply_fn(params, batch, rng):
    ids = batch["input_ids"]
    t = params["transformer"]
    n, length = ids.shape
    x = t["wte"]["embedding"][ids] + t["wpe"]["embedding"][:length]
    causal = jnp.tril(jnp.ones((length, length), bool))
    for i in range(LAYERS):
        blk = t["h"][str(i)]
        q, k, v = jnp.split(_conv1d(blk["attn"]["c_attn"], _ln(blk["ln_1"], x)), 3, axis=-1)
        q, k, v = (z.reshape(n, length, HEADS, WIDTH // HEADS) for z in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(WIDTH // HEADS)
        att = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(n, length, WIDTH)
        x = x + _conv1d(blk["attn"]["c_proj"], o)
        x = x + _conv1d(blk["mlp"]["c_proj"], jax.nn.gelu(_conv1d(blk["mlp"]["c_fc"], _ln(blk["ln_2"], x))))
    return _ln(t["ln_f"], x) @ t["wte"]["embedding"].T


def loss_fn(logits, batch):
    ids = batch["input_ids"]
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def batch_at(index: int) -> dict:
    """The data stream: batch ``index`` depends on its position only (a resumable order)."""
    rng = np.random.default_rng(1000 + index)
    return {"input_ids": rng.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32)}


METHOD = lrtt.LoRA(rank=4, targets="attention", dropout=0.1)
OPTIMIZER = lrtt.train.adamw(1e-2, warmup=2, total=20, weight_decay=0.01)


def setup():
    """``(params, step, fresh_state)``: the run both processes compile identically."""
    params = init_params()
    step = lrtt.train.jit_step(lrtt.train.make_loss(METHOD, apply_fn, loss_fn), OPTIMIZER)
    state = lrtt.train.init_state(METHOD.init(jax.random.key(0), params), OPTIMIZER, rng=jax.random.key(42))
    return params, step, state


def train(step, state, params, start, stop):
    for i in range(start, stop):
        state, _ = step(state, params, batch_at(i))
    return state


def first(directory, n):
    params, step, state = setup()
    state = train(step, state, params, 0, n)
    mgr = lrtt.CheckpointManager(os.path.join(directory, "resume"), METHOD, async_save=True)
    mgr.save(n, state.adapter, state.opt_state, data_position={"next_batch": n}, rng=state.rng)
    state = train(step, state, params, n, n + 2)  # keeps training (donating) while it writes
    mgr.wait()
    mgr.close()
    print("SAVED", flush=True)
    killloop(os.path.join(directory, "kill"))


def big_adapter(value: float):
    method = lrtt.LoRA(rank=512, targets=r"^big/kernel$")
    like = {"big": {"kernel": jax.ShapeDtypeStruct((2048, 2048), jnp.float32)}}
    adapter = jax.tree.map(lambda x: jnp.full(x.shape, value, x.dtype), lrtt.adapter_shapes(method, like))
    return method, adapter


def killloop(directory):
    method, adapter = big_adapter(0.0)
    mgr = lrtt.CheckpointManager(directory, method, max_to_keep=100, async_save=True)
    s = 1
    while True:
        _, adapter = big_adapter(float(s))
        mgr.save(s, adapter, None, data_position={"next_batch": s})  # waits for the previous save
        if s > 1:
            print(f"COMMITTED {s - 1}", flush=True)
        s += 1


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "first":
        first(args[0], int(args[1]))
    elif mode == "killloop":
        killloop(args[0])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
