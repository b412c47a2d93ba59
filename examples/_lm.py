"""What the stack examples share: a toy language-modelling batch, and a short factored fine-tune
with `lrtt.train` followed by the check that the merged export computes what factored did."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lrtt


def counting_tokens(rng: np.random.Generator, batch: int = 8, length: int = 16, vocab: int = 128) -> jax.Array:
    """``(batch, length)`` token ids that count up by a per-sequence stride: learnable structure."""
    starts, strides = rng.integers(3, vocab, size=(batch, 1)), rng.integers(1, 4, size=(batch, 1))
    return jnp.asarray(3 + (starts + strides * np.arange(length)) % (vocab - 3), jnp.int32)


def random_linen_params(model, tokens, rng: np.random.Generator):
    """Random weights of a linen model's real shapes: ``jax.eval_shape`` traces its init without
    compiling it (with a real model, the params of a restored checkpoint go here). Norm scales
    around 1, everything else ``N(0, 0.2²)``."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(("norm" in jax.tree_util.keystr(path)) + 0.2 * rng.standard_normal(x.shape), x.dtype),
        shapes)


def fit_and_check(method, params, apply, tokens, *, steps: int = 30, learning_rate: float = 1e-2):
    """AdamW on next-token loss through ``lrtt.factored(apply)``; then ``merge`` must reproduce it.

    ``apply(params, tokens) -> logits (batch, length, vocab)``. Returns the trained adapter.
    """
    def next_token_loss(logits, tokens):
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    optimizer = optax.adamw(learning_rate)
    loss = lrtt.train.make_loss(method, lambda p, t, _rng: apply(p, t), next_token_loss)
    step = lrtt.train.jit_step(loss, optimizer)  # params: a jit argument, never a baked-in constant
    state = lrtt.train.init_state(method.init(jax.random.key(1), params), optimizer)
    losses = []
    for i in range(steps):
        state, value = step(state, params, tokens)
        losses.append(float(value))
        if i % 5 == 0 or i == steps - 1:
            print(f"step {i:2d}  loss {losses[-1]:.4f}")
    assert losses[-1] < losses[0], losses

    merged = lrtt.merge(method, params, state.adapter)  # W0 + ΔW, the params' own structure
    factored_apply = lrtt.factored(apply)
    factored_logits, merged_logits = jax.jit(lambda p, m, ad, t: (
        factored_apply(lrtt.wrap(method, p, ad), t), apply(m, t)))(params, merged, state.adapter, tokens)
    error = float(jnp.linalg.norm(merged_logits - factored_logits) / jnp.linalg.norm(factored_logits))
    print(f"merged vs factored logits: relative error {error:.1e}")
    assert error < 1e-5, error
    return state.adapter
