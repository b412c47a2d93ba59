"""LoRA on every linear layer of a google-tunix Llama 3 (Flax NNX), trained with remat on.

A tiny tunix `Llama3` (2 layers, GQA 4/2 heads, untied `lm_head`, `RematConfig.BLOCK`: the
attention and MLP blocks are recomputed on the backward pass) with random weights stands in for
a checkpoint (tunix's `params.create_model_from_safe_tensors` gives the same module). lrtt takes
the `nnx.State` of its `nnx.Param`s as the frozen params; `targets="all-linear"` selects q, k, v,
o (`attn/*_proj/w`, einsum kernels `(embed, heads, head_dim)` / `(heads, head_dim, embed)`) and
the gate, up and down projections of every layer, not `lm_head` (PEFT's all-linear). Factored
training goes through `nnx.remat`; the merged state is plugged back with `nnx.merge`.

Needs Python >= 3.12 (google-tunix). Run: python examples/tunix_llama_lora.py
"""

import time

start = time.time()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.models.llama3 import model as llama3  # noqa: E402

import lrtt  # noqa: E402
from _lm import counting_tokens, fit_and_check  # noqa: E402  (examples/_lm.py)

config = llama3.ModelConfig(
    num_layers=2, vocab_size=128, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
    num_kv_heads=2, rope_theta=500_000, norm_eps=1e-5, weight_tying=False,
    remat_config=llama3.RematConfig.BLOCK,
)
# nnx.eval_shape: the module's structure without running its initializers; random weights of the
# real shapes fill it (norm weights around 1).
abstract = nnx.eval_shape(lambda: llama3.Llama3(config, rngs=nnx.Rngs(params=0)))
graphdef, shapes, rest = nnx.split(abstract, nnx.Param, ...)
rng = np.random.default_rng(0)
params = jax.tree.map(
    lambda x: jnp.asarray((1.0 if x.ndim == 1 else 0.0) + 0.2 * rng.standard_normal(x.shape), x.dtype), shapes)

tokens = counting_tokens(rng)  # 8 sequences of 16 tokens counting up by a stride
batch, seq = tokens.shape
positions = jnp.broadcast_to(jnp.arange(seq)[None], (batch, seq))
mask = jnp.tril(jnp.ones((batch, seq, seq), bool))


def apply(params, tokens):
    """logits of the Llama3 whose Params are `params` (an nnx.State, plain or adapted)."""
    logits, _cache = nnx.merge(graphdef, params, rest)(tokens, positions, None, mask)
    return logits


method = lrtt.LoRA(rank=4, targets="all-linear")
lrtt.print_trainable_parameters(params, method)
targets = lrtt.select(params, method.targets)
print(f"{len(targets)} kernels adapted:", sorted({t.path.split('/', 2)[2] for t in targets}))

fit_and_check(method, params, apply, tokens)
print(f"done in {time.time() - start:.1f} s")
