"""LoRA on q and v of a Gemma 3 from the `gemma` package (`gm.nn.Transformer`, Flax linen).

A tiny Gemma 3 (2 layers: one local sliding-window, one global; GQA with one kv head; QK norm;
tied embedding) with random weights stands in for a checkpoint: with a real one, use
`params = gm.ckpts.load_params(...)` and the same code. lrtt knows gemma's parameter names:
`targets="qv"` selects each layer's `attn/q_einsum/w` `(heads, embed, head_dim)` and the fused
`attn/kv_einsum/w` `(2, kv_heads, embed, head_dim)` (k and v in one kernel: adapting v adapts k
too), with their einsum layouts. The training runs factored (x·W0 + s·(x·A)·B at each einsum),
then the merged export gives the same logits with zero overhead.

Needs Python >= 3.12 (gemma 4). Run: python examples/gemma_lora.py
"""

import time

start = time.time()

import importlib.util  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lrtt  # noqa: E402
from _lm import counting_tokens, fit_and_check  # noqa: E402  (examples/_lm.py)


def import_gemma():
    """``from gemma import gm`` without tensorflow installed.

    gemma 4's ``kauldron.typing`` imports tensorflow only to name ``tf.Tensor`` in a type alias.
    Where tensorflow is not installed, a stub stands in while ``kauldron.typing`` loads and is
    removed right after, so no other library ever sees a fake tensorflow.
    """
    if "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow") is None:
        stub = types.ModuleType("tensorflow")
        stub.Tensor = type("Tensor", (), {})
        sys.modules["tensorflow"] = stub
        try:
            import kauldron.typing  # noqa: F401
        finally:
            del sys.modules["tensorflow"]
    from gemma import gm

    return gm


gm = import_gemma()

# --- a tiny Gemma 3 (the ready-made gm.nn.Gemma3_* classes load real tensorflow) ----------------
config = gm.nn.config.TransformerConfig(
    num_embed=128, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=1,
    final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
    attention_types=(gm.nn.AttentionType.LOCAL_SLIDING, gm.nn.AttentionType.GLOBAL),
    query_pre_attn_norm=gm.nn.config.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM,
    attn_logits_soft_cap=None, sliding_window_size=16, transpose_gating_einsum=True,
    local_base_frequency=10_000, global_base_frequency=1_000_000, vision_encoder=None,
)
model = gm.nn.Transformer(config=config, dtype=jnp.float32)

# Data: 8 sequences of 16 tokens that count up by a per-sequence stride (learnable structure).
rng = np.random.default_rng(0)
tokens = counting_tokens(rng)  # 8 sequences of 16 tokens counting up by a stride

# Random weights of the real shapes (jax.eval_shape: the init is traced, not compiled).
shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
leaves, treedef = jax.tree.flatten(shapes)
params = jax.tree.unflatten(treedef, [
    jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype) for x in leaves])


def apply(params, tokens):
    return model.apply({"params": params}, tokens).logits


# --- LoRA on q and v -----------------------------------------------------------------------------
method = lrtt.LoRA(rank=4, targets="qv")
lrtt.print_trainable_parameters(params, method, lrtt.LorettaRep(rank=4, tt_rank=2, targets="qv"))
for target in lrtt.select(params, method.targets):
    print(f"  {target.path:28} {str(target.shape):16} layout {str(target.layout)!r}")

fit_and_check(method, params, apply, tokens)
print(f"done in {time.time() - start:.1f} s")
