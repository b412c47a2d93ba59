"""Tiny models of the JAX LLM stacks that lrtt's family presets name: the gemma package's Gemma 3,
google-tunix's NNX Llama 3 (with remat), a MaxText-style linen decoder (``nn.scan`` stacking the
layers on kernel axis 1) and a ``ragged_dot`` mixture-of-experts layer.

Each builder is cached (one model per process) and returns a :class:`TinyModel`: the parameters
(float32 unless asked, random but deterministic), a pure ``apply(params, tokens) -> logits`` and
example tokens. Parameters are filled from ``jax.eval_shape`` of the model's own init with numpy
noise: the exact shapes, dtypes and tree of the real init, without compiling it (gemma's init
alone compiles for ~7 s on two cores).

The gemma and tunix builders import their package inside the builder: on Python >= 3.12 a missing
package is an ImportError (a failure), and the tests skip them only on older Pythons, where
gemma 4 and google-tunix do not install.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import sys
import types
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

VOCAB, EMBED, HIDDEN, HEADS, HEAD_DIM, LAYERS = 128, 32, 64, 4, 8, 2
BATCH, SEQ = 2, 6


@dataclasses.dataclass(frozen=True, eq=False)
class TinyModel:
    """A model as lrtt sees it: frozen params and a pure function of them."""

    params: Any
    apply: Callable[..., jax.Array]  # apply(params, tokens) -> logits
    tokens: jax.Array
    module: Any = None


def example_tokens(batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB, seed: int = 0) -> jax.Array:
    """Token ids in [3, vocab): no padding id 0, no BOS/EOS."""
    return jnp.asarray(np.random.default_rng(seed).integers(3, vocab, size=(batch, seq), dtype=np.int32))


def fill(shapes: Any, seed: int = 0, scale: float = 0.2, norm_center: float = 1.0) -> Any:
    """Random arrays of the shapes and dtypes of ``shapes`` (``ShapeDtypeStruct`` leaves, NNX
    ``Variable`` values included): kernels ``N(0, scale²)``, norm scales (1-D leaves, and any
    leaf with ``norm`` in its path: scanned ones are 2-D) ``norm_center + N(0, 0.1²)``;
    deterministic in ``seed`` and the leaf order."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for i, (path, leaf) in enumerate(flat):
        noise = np.random.default_rng(seed + i).standard_normal(leaf.shape).astype(np.float32)
        is_norm = len(leaf.shape) == 1 or "norm" in jax.tree_util.keystr(path)
        value = norm_center + 0.1 * noise if is_norm else scale * noise
        out.append(jnp.asarray(value, dtype=leaf.dtype))
    return jax.tree.unflatten(treedef, out)


# --- gemma (the `gemma` package, Flax linen) -------------------------------------------------------
def import_gemma():
    """``from gemma import gm``, without tensorflow installed.

    gemma 4's ``kauldron.typing`` imports tensorflow only to name ``tf.Tensor`` in a type alias;
    a stub module stands in for it while ``kauldron.typing`` loads and is removed right after, so
    nothing else ever sees a fake tensorflow.
    """
    original_param = nn.Module.param
    if "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow") is None:
        stub = types.ModuleType("tensorflow")
        stub.Tensor = type("Tensor", (), {})
        sys.modules["tensorflow"] = stub
        try:
            import kauldron.typing  # noqa: F401
        finally:
            del sys.modules["tensorflow"]
    from gemma import gm
    from gemma.gm.utils import _dtype_params  # noqa: F401  (gm loads lazily: apply its patch now)

    # gemma 4.0.1 replaces flax.linen.Module.param for every module in the process (to cast
    # params to a dtype at init) and then calls init functions as init_fn(key, shape, dtype):
    # transformers' Flax Llama/Mistral, whose RMSNorm init takes (key, shape), can no longer be
    # initialized. Keep the replacement to gemma's own inits (gemma_param_patch).
    global _GEMMA_PARAM
    if nn.Module.param is not original_param:
        _GEMMA_PARAM = nn.Module.param
        nn.Module.param = original_param
    return gm


_GEMMA_PARAM = None


@contextlib.contextmanager
def gemma_param_patch():
    """gemma's ``Module.param`` while a gemma model initializes (see :func:`import_gemma`)."""
    original = nn.Module.param
    nn.Module.param = _GEMMA_PARAM or original
    try:
        yield
    finally:
        nn.Module.param = original


@functools.lru_cache(maxsize=None)
def gemma3(mha: bool = False, dtype: str = "float32") -> TinyModel:
    """A 2-layer Gemma 3 ``gm.nn.Transformer`` (a local sliding and a global layer, QK norm,
    transposed gating einsum, tied embedding). GQA with one kv head (``q_einsum`` +
    ``kv_einsum``), or MHA (``qkv_einsum``) when ``mha``. ``dtype`` is gemma's param dtype."""
    gm = import_gemma()
    config = gm.nn.config.TransformerConfig(
        num_embed=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN, num_heads=HEADS, head_dim=HEAD_DIM,
        num_kv_heads=HEADS if mha else 1,
        final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
        attention_types=(gm.nn.AttentionType.LOCAL_SLIDING, gm.nn.AttentionType.GLOBAL),
        query_pre_attn_norm=gm.nn.config.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM,
        attn_logits_soft_cap=None, sliding_window_size=16, transpose_gating_einsum=True,
        local_base_frequency=10_000, global_base_frequency=1_000_000, vision_encoder=None,
    )
    model = gm.nn.Transformer(config=config, dtype=jnp.dtype(dtype))
    tokens = example_tokens()
    with gemma_param_patch():
        shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    params = fill(shapes, norm_center=0.0)  # gemma's RMSNorm multiplies by (1 + scale)

    def apply(p, tokens):
        return model.apply({"params": p}, tokens).logits

    return TinyModel(params, apply, tokens, model)


# --- google-tunix Llama 3 (Flax NNX) ----------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def tunix_llama3(remat: str = "BLOCK") -> TinyModel:
    """A 2-layer tunix ``Llama3`` (GQA 4/2 heads, untied ``lm_head``) with ``RematConfig[remat]``;
    params are its ``nnx.Param`` state, ``apply`` merges them back with ``nnx.merge``."""
    from flax import nnx
    from tunix.models.llama3 import model as llama3

    config = llama3.ModelConfig(
        num_layers=LAYERS, vocab_size=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN, num_heads=HEADS,
        head_dim=HEAD_DIM, num_kv_heads=2, rope_theta=500_000, norm_eps=1e-5, weight_tying=False,
        remat_config=llama3.RematConfig[remat],
    )
    abstract = nnx.eval_shape(lambda: llama3.Llama3(config, rngs=nnx.Rngs(params=0)))
    graphdef, shapes, rest = nnx.split(abstract, nnx.Param, ...)
    params = fill(shapes)
    tokens = example_tokens()
    batch, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq)[None], (batch, seq))
    mask = jnp.tril(jnp.ones((batch, seq, seq), bool))

    def apply(p, tokens):
        return nnx.merge(graphdef, p, rest)(tokens, positions, None, mask)[0]

    return TinyModel(params, apply, tokens, graphdef)


# --- MaxText-style decoder (Flax linen, layers scanned on kernel axis 1) ---------------------------
class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


class SelfAttention(nn.Module):
    heads: int
    head_dim: int

    @nn.compact
    def __call__(self, x, mask):
        def proj(name):  # kernel (embed, heads, head_dim)
            return nn.DenseGeneral((self.heads, self.head_dim), use_bias=False, name=name)(x)

        q, k, v = proj("query"), proj("key"), proj("value")
        scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(self.head_dim)
        scores = jnp.where(mask, scores, -1e9)
        out = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(scores, axis=-1), v)
        # kernel (heads, head_dim, embed)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), use_bias=False, name="out")(out)


class MlpBlock(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        gate = nn.Dense(self.hidden, use_bias=False, name="wi_0")(x)
        up = nn.Dense(self.hidden, use_bias=False, name="wi_1")(x)
        return nn.Dense(x.shape[-1], use_bias=False, name="wo")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    heads: int
    head_dim: int
    hidden: int

    @nn.compact
    def __call__(self, x, mask):
        x = x + SelfAttention(self.heads, self.head_dim, name="self_attention")(
            RMSNorm(name="pre_self_attention_layer_norm")(x), mask)
        x = x + MlpBlock(self.hidden, name="mlp")(RMSNorm(name="post_self_attention_layer_norm")(x))
        return x, None


class Decoder(nn.Module):
    vocab: int
    layers: int
    heads: int
    head_dim: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        seq = x.shape[1]
        mask = jnp.tril(jnp.ones((seq, seq), bool))[None, None]
        # MaxText: remat the layer, then scan it with the params stacked on axis 1
        # (config param_scan_axis: 1), so every kernel is (embed, layers, ...).
        layer = nn.remat(DecoderLayer, prevent_cse=False)
        stack = nn.scan(
            layer, variable_axes={"params": 1}, split_rngs={"params": True},
            in_axes=(nn.broadcast,), length=self.layers,
        )
        x, _ = stack(self.heads, self.head_dim, self.hidden, name="layers")(x, mask)
        x = RMSNorm(name="decoder_norm")(x)
        return nn.Dense(self.vocab, use_bias=False, name="logits_dense")(x)


class MaxTextLike(nn.Module):
    vocab: int = VOCAB
    embed: int = EMBED
    layers: int = LAYERS
    heads: int = HEADS
    head_dim: int = HEAD_DIM
    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.embed, name="token_embedder")(tokens)
        return Decoder(self.vocab, self.layers, self.heads, self.head_dim, self.hidden, name="decoder")(x)


@functools.lru_cache(maxsize=None)
def maxtext() -> TinyModel:
    """The MaxText-style decoder: ``decoder/layers/self_attention/query/kernel``
    ``(embed, layers, heads, head_dim)``, ``.../out/kernel`` ``(heads, layers, head_dim, embed)``,
    ``decoder/layers/mlp/wi_0|wi_1|wo/kernel`` ``(in, layers, out)``."""
    model = MaxTextLike()
    tokens = example_tokens()
    params = fill(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])

    def apply(p, tokens):
        return model.apply({"params": p}, tokens)

    return TinyModel(params, apply, tokens, model)


# --- mixture of experts with lax.ragged_dot ---------------------------------------------------------
class MoeBlock(nn.Module):
    """Top-1 routed experts: router -> argmax -> tokens sorted by expert -> ``ragged_dot`` with
    the expert kernels ``wi (E, D, F)``, ``wo (E, F, D)`` -> unsorted, weighted by the router."""

    experts: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        batch, seq, embed = x.shape
        tokens = x.reshape(-1, embed)
        init = nn.initializers.normal(0.2)
        wi = self.param("wi", init, (self.experts, embed, self.hidden))
        wo = self.param("wo", init, (self.experts, self.hidden, embed))
        logits = nn.Dense(self.experts, use_bias=False, name="router")(tokens)
        expert = jnp.argmax(logits, axis=-1)
        weight = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), expert[:, None], axis=-1)
        order = jnp.argsort(expert)
        group_sizes = jnp.bincount(expert, length=self.experts).astype(jnp.int32)
        h = jax.nn.silu(lax.ragged_dot(tokens[order], wi, group_sizes))
        y = lax.ragged_dot(h, wo, group_sizes)[jnp.argsort(order)]
        return (y * weight).reshape(batch, seq, embed)


class MoeModel(nn.Module):
    vocab: int = VOCAB
    embed: int = EMBED
    experts: int = 4
    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.embed, name="embedder")(tokens)
        x = x + MoeBlock(self.experts, self.hidden, name="moe")(RMSNorm(name="norm")(x))
        return nn.Dense(self.vocab, use_bias=False, name="head")(RMSNorm(name="final_norm")(x))


@functools.lru_cache(maxsize=None)
def moe() -> TinyModel:
    """An embedding, one ``ragged_dot`` MoE block (4 experts, ``moe/wi``, ``moe/wo``) and a head."""
    model = MoeModel()
    tokens = example_tokens(batch=2, seq=8)
    params = fill(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])

    def apply(p, tokens):
        return model.apply({"params": p}, tokens)

    return TinyModel(params, apply, tokens, model)
