"""LoRA on a MaxText-style decoder whose layers are stacked by `nn.scan` on kernel axis 1.

MaxText (`scan_layers: true`, `param_scan_axis: 1`) remats one decoder layer and scans it, so
each kernel holds every layer on its axis 1: `decoder/layers/self_attention/query/kernel` is
`(embed, layers, heads, head_dim)`, `.../out/kernel` `(heads, layers, head_dim, embed)`,
`decoder/layers/mlp/wi_0/kernel` `(embed, layers, mlp)`. The model below is a small linen
re-creation with MaxText's names (MaxText itself is not a pip dependency).

`lrtt.discover(apply, params, tokens)` reads every kernel's layout off the model (which axes are
contracted, which are the layer axis consumed by the scan, which are outputs), finds the head
and the embedding; `targets="all-linear", layouts=found` adapts every linear kernel but the head.
Each adapted kernel gets per-layer factors `A: (layers, in, r)`, `B: (layers, r, out)`, and the
factored forward keeps them symbolic through the remat and the scan.

Run: python examples/maxtext_scan_lora.py
"""

import time

start = time.time()

import math  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lrtt  # noqa: E402
from _lm import counting_tokens, fit_and_check, random_linen_params  # noqa: E402  (examples/_lm.py)

VOCAB, EMBED, LAYERS, HEADS, HEAD_DIM, MLP = 128, 32, 2, 4, 8, 64


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


class Layer(nn.Module):
    """One decoder layer, with MaxText's names: `self_attention/{query,key,value,out}`,
    `mlp/{wi_0,wi_1,wo}`."""

    @nn.compact
    def __call__(self, x, mask):
        h = RMSNorm(name="pre_self_attention_layer_norm")(x)
        x = x + SelfAttention(name="self_attention")(h, mask)
        h = RMSNorm(name="post_self_attention_layer_norm")(x)
        return x + Mlp(name="mlp")(h), None


class SelfAttention(nn.Module):
    @nn.compact
    def __call__(self, h, mask):
        q, k, v = (nn.DenseGeneral((HEADS, HEAD_DIM), use_bias=False, name=n)(h) for n in ("query", "key", "value"))
        scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(HEAD_DIM)
        probs = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
        out = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
        return nn.DenseGeneral(EMBED, axis=(-2, -1), use_bias=False, name="out")(out)


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, h):
        gate = nn.Dense(MLP, use_bias=False, name="wi_0")(h)
        up = nn.Dense(MLP, use_bias=False, name="wi_1")(h)
        return nn.Dense(EMBED, use_bias=False, name="wo")(jax.nn.silu(gate) * up)


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))[None, None]
        layers = nn.scan(
            nn.remat(Layer, prevent_cse=False),
            variable_axes={"params": 1},  # MaxText's param_scan_axis
            split_rngs={"params": True}, in_axes=(nn.broadcast,), length=LAYERS,
        )
        x, _ = layers(name="layers")(x, mask)
        return nn.Dense(VOCAB, use_bias=False, name="logits_dense")(RMSNorm(name="decoder_norm")(x))


class Transformer(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        return Decoder(name="decoder")(nn.Embed(VOCAB, EMBED, name="token_embedder")(tokens))


model = Transformer()
rng = np.random.default_rng(0)
tokens = counting_tokens(rng)  # 8 sequences of 16 tokens counting up by a stride
params = random_linen_params(model, tokens, rng)  # with MaxText: a restored checkpoint's params


def apply(params, tokens):
    return model.apply({"params": params}, tokens)


found = lrtt.discover(apply, params, tokens)
print(found, end="\n\n")

method = lrtt.LoRA(rank=4, targets="all-linear", layouts=found)
lrtt.print_trainable_parameters(params, method, lrtt.LorettaRep(rank=4, tt_rank=2, targets="all-linear", layouts=found))
adapter = method.init(jax.random.key(1), params)
query = adapter["decoder"]["layers"]["self_attention"]["query"]["kernel"]
print(f"query kernel {params['decoder']['layers']['self_attention']['query']['kernel'].shape}: "
      f"A {query.a.shape}, B {query.b.shape}")

fit_and_check(method, params, apply, tokens)
print(f"done in {time.time() - start:.1f} s")
