"""`lrtt.factored` on tiny transformers Flax models (GPT-2, Llama, BERT), random weights.

LoRA and LorettaRep: factored == merged (logits and adapter gradients). LorettaAdp: factored ==
the same model run with each adapted layer's ``__call__`` intercepted by hand
(``flax.linen.intercept_methods``): ``h + f(h)`` after, ``x + f(x)`` before.
"""

import os
import re
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import lrtt  # noqa: E402
from lrtt._paths import replace_leaves  # noqa: E402
from conftest import quick_jit  # noqa: E402
from test_factored import _dense_products, _normal, assert_close, factored_and_merged, random_adapter  # noqa: E402

FAMILIES = ("gpt2", "llama", "bert")
_models: dict = {}


def hf_model(family):
    """A tiny transformers Flax model and random float32 params (no init compile: shapes only)."""
    if family not in _models:
        import transformers as tf

        if family == "gpt2":
            config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
            model = tf.FlaxGPT2LMHeadModel(config, _do_init=False)
        elif family == "llama":
            config = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=64, max_position_embeddings=16)
            model = tf.FlaxLlamaForCausalLM(config, _do_init=False)
        else:
            config = tf.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   vocab_size=64, max_position_embeddings=16, num_labels=3)
            model = tf.FlaxBertForSequenceClassification(config, _do_init=False)
        shapes = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 8)))
        leaves, treedef = jax.tree.flatten(shapes)
        params = jax.tree.unflatten(treedef, [_normal(100 + i, x.shape, 0.1) for i, x in enumerate(leaves)])
        _models[family] = (model, params)
    return _models[family]


IDS = np.random.default_rng(0).integers(3, 64, size=(2, 8), dtype=np.int32)
METHODS = {
    "lora": lrtt.LoRA(rank=4, alpha=8, targets="all-linear"),
    "rep": lrtt.LorettaRep(rank=4, tt_rank=3, targets="all-linear"),
}


def logits(model):
    return lambda params, ids: model(ids, params=params).logits


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_factored_equals_merged(family, name):
    model, params = hf_model(family)
    method = METHODS[name]
    factored_and_merged(method, params, random_adapter(method, params), logits(model), IDS)


def intercepted_reference(model, params, adapter):
    """Logits with every adapted layer rewritten by hand around the module's own ``__call__``."""
    entries = lrtt.entries(adapter)
    dense = {p: e.value for p, e in entries.items() if isinstance(e, lrtt.Trainable)}
    dense |= {p: e.matrix() for p, e in entries.items() if isinstance(e, lrtt.TTKernel)}

    def interceptor(call, args, kwargs, context):
        entry = entries.get("/".join(context.module.path) + "/kernel")
        if context.method_name != "__call__" or not isinstance(entry, lrtt.BottleneckAdapter):
            return call(*args, **kwargs)
        if entry.position == "before":
            return call(args[0] + entry(args[0]), *args[1:], **kwargs)
        h = call(*args, **kwargs)  # x·W0 + b0
        return h + entry(h)

    with nn.intercept_methods(interceptor):
        return model(IDS, params=replace_leaves(params, dense)).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_loretta_adp_matches_the_intercepted_reference(family):
    model, params = hf_model(family)
    bert = family == "bert"
    method = lrtt.LorettaAdp(bottleneck=8, tt_rank=3, tt_shape=None, tensorized_classifier=bert, train_head=bert)
    adapter = random_adapter(method, params)
    kinds = {type(e).__name__ for e in lrtt.entries(adapter).values()}
    assert {"BottleneckAdapter", "Trainable"} <= kinds and (("TTKernel" in kinds) == bert)

    def run(adapter):
        fac = lambda ad: lrtt.factored(logits(model))(lrtt.wrap(method, params, ad), IDS)  # noqa: E731
        ref = lambda ad: intercepted_reference(model, params, ad)  # noqa: E731
        loss = lambda f: lambda ad: jnp.sum(jnp.sin(f(ad)))  # noqa: E731
        return fac(adapter), ref(adapter), jax.grad(loss(fac))(adapter), jax.grad(loss(ref))(adapter)

    y, y_ref, g, g_ref = quick_jit(run)(adapter)
    assert_close(y, y_ref)
    assert_close(g, g_ref)
    base = np.asarray(model(IDS, params=params).logits) if not bert else None
    if base is not None:
        assert np.abs(np.asarray(y) - base).max() > 1e-3  # the adapters do act


def test_gpt2_grad_step_forms_no_dense_weight_or_weight_gradient():
    model, params = hf_model("gpt2")
    method = METHODS["lora"]
    adapter = random_adapter(method, params)
    fn = logits(model)
    fac = jax.grad(lambda ad: jnp.sum(lrtt.factored(fn)(lrtt.wrap(method, params, ad), IDS) ** 2))
    mer = jax.grad(lambda ad: jnp.sum(fn(lrtt.merge(method, params, ad), IDS) ** 2))
    shapes = {(32, 96), (96, 32), (32, 32), (32, 128), (128, 32)}  # c_attn, c_proj, c_fc, mlp c_proj
    assert _dense_products(jax.make_jaxpr(mer)(adapter).jaxpr, shapes)  # the check sees them
    assert _dense_products(jax.make_jaxpr(fac)(adapter).jaxpr, shapes) == []
    for step, expect in ((fac, False), (mer, True)):  # the same in the lowered StableHLO
        products = re.findall(r"stablehlo\.dot_general.*-> tensor<([0-9x]+)xf32>", jax.jit(step).lower(adapter).as_text())
        weight_shaped = [p for p in products if tuple(map(int, p.split("x")))[-2:] in shapes]
        assert bool(weight_shaped) == expect, weight_shaped
