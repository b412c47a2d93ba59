"""LoRA (and LoRETTA_rep) on the experts of a mixture-of-experts layer run with `lax.ragged_dot`.

The MoE block routes each token to its top-1 expert, sorts the tokens by expert, and runs all
experts at once with `jax.lax.ragged_dot(x_sorted, w, group_sizes)` over expert kernels
`wi (experts, embed, mlp)` and `wo (experts, mlp, embed)` (as MaxText's and tunix's Qwen 3 MoE do
with megablox / ragged_dot), then unsorts. An expert kernel's layout is `"layer in out"`: each
expert gets its own factors, `A: (experts, in, r)`, `B: (experts, r, out)`, and the factored
forward runs them with the same `ragged_dot` and group sizes. `lrtt.discover` reads that layout
off the model.

Run: python examples/moe_ragged_lora.py
"""

import time

start = time.time()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import lrtt  # noqa: E402
from _lm import counting_tokens, fit_and_check, random_linen_params  # noqa: E402  (examples/_lm.py)

VOCAB, EMBED, EXPERTS, MLP = 128, 32, 4, 64


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


class MoeBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        batch, seq, embed = x.shape
        tokens = x.reshape(-1, embed)
        wi = self.param("wi", nn.initializers.normal(0.2), (EXPERTS, embed, MLP))
        wo = self.param("wo", nn.initializers.normal(0.2), (EXPERTS, MLP, embed))
        router_logits = nn.Dense(EXPERTS, use_bias=False, name="router")(tokens)
        expert = jnp.argmax(router_logits, axis=-1)  # top-1
        weight = jnp.take_along_axis(jax.nn.softmax(router_logits), expert[:, None], axis=-1)
        order = jnp.argsort(expert)  # tokens grouped by expert
        group_sizes = jnp.bincount(expert, length=EXPERTS).astype(jnp.int32)
        self.sow("intermediates", "group_sizes", group_sizes)  # a no-op unless asked for
        h = jax.nn.silu(lax.ragged_dot(tokens[order], wi, group_sizes))
        y = lax.ragged_dot(h, wo, group_sizes)[jnp.argsort(order)]  # back to token order
        return (y * weight).reshape(batch, seq, embed)


class MoeModel(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, EMBED, name="embedder")(tokens)
        x = x + MoeBlock(name="moe")(RMSNorm(name="norm")(x))
        return nn.Dense(VOCAB, use_bias=False, name="head")(RMSNorm(name="final_norm")(x))


model = MoeModel()
rng = np.random.default_rng(0)
tokens = counting_tokens(rng)  # 8 sequences of 16 tokens counting up by a stride
params = random_linen_params(model, tokens, rng)


def apply(params, tokens):
    return model.apply({"params": params}, tokens)


found = lrtt.discover(apply, params, tokens)
print(found, end="\n\n")
assert found["moe/wi"] == found["moe/wo"] == "layer in out"

experts = r"^moe/(wi|wo)$"  # the experts only: the router and the head stay frozen
method = lrtt.LoRA(rank=4, targets=experts, layouts=found)
lrtt.print_trainable_parameters(
    params, method, lrtt.LorettaRep(rank=4, tt_rank=2, targets=experts, layouts={experts: "layer in out"}))
adapter = method.init(jax.random.key(1), params)
print(f"moe/wi {params['moe']['wi'].shape}: A {adapter['moe']['wi'].a.shape}, B {adapter['moe']['wi'].b.shape}")
sown = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["intermediates"])[1])(params, tokens)
print("tokens per expert:", np.asarray(sown["intermediates"]["moe"]["group_sizes"][0]))

fit_and_check(method, params, apply, tokens)
print(f"done in {time.time() - start:.1f} s")
