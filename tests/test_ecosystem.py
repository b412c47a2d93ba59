"""lrtt on the JAX LLM stacks its family presets name, built tiny from the real packages where
they exist: the gemma package's Gemma 3 (linen), google-tunix's Llama 3 (NNX, remat on), a
MaxText-style decoder (linen ``nn.scan`` stacking layers on kernel axis 1) and a ``ragged_dot``
mixture of experts.

Invariants: each preset selects exactly the kernels it promises; factored == merged, outputs and
adapter gradients (random adapters: no zero factor), for LoRA and LorettaRep; ``lrtt.discover``
reads the same layouts as the family table. gemma and tunix need Python >= 3.12: on older
Pythons their tests skip; on 3.12+ a missing package fails them.
"""

import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ecosystem_models as models
import lrtt
from conftest import quick_jit
from test_factored import factored_and_merged, random_adapter

LAYERS = models.LAYERS


def _needs_py312(package: str) -> None:
    """Skip only where the package cannot exist (Python < 3.12); on 3.12+ the builder's import
    runs and a missing package is a failure."""
    if sys.version_info < (3, 12):
        pytest.importorskip(
            package, reason=f"{package} needs Python >= 3.12; this is Python {platform.python_version()}")


def _gemma(**kwargs):
    _needs_py312("gemma")
    return models.gemma3(**kwargs)


def _tunix(remat):
    _needs_py312("tunix")
    return models.tunix_llama3(remat)


def _selected(method, params):
    return {t.path: str(t.layout) for t in lrtt.select(params, method.targets, layouts=method.layouts)}


METHODS = {
    "lora": lambda **kw: lrtt.LoRA(rank=2, **kw),
    "rep": lambda **kw: lrtt.LorettaRep(rank=2, tt_rank=2, **kw),
}


# --- gemma: gm.nn.Transformer (Gemma 3) ---------------------------------------------------------
GEMMA_QV = {f"layer_{i}/attn/{name}/w" for i in range(LAYERS) for name in ("q_einsum", "kv_einsum")}


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_gemma3_qv_adapts_q_and_kv_einsum_and_factored_equals_merged(method_name):
    model = _gemma()
    method = METHODS[method_name](targets="qv")
    selected = _selected(method, model.params)
    assert selected == {p: "out in out" if "q_einsum" in p else "out out in out" for p in GEMMA_QV}
    adapter = random_adapter(method, model.params)
    assert set(lrtt.entries(adapter)) == GEMMA_QV
    factored_and_merged(method, model.params, adapter, model.apply, model.tokens)


def test_gemma3_mha_qv_adapts_the_fused_qkv_einsum():
    model = _gemma(mha=True)
    method = lrtt.LoRA(rank=2, targets="qv")
    expected = {f"layer_{i}/attn/qkv_einsum/w" for i in range(LAYERS)}
    assert _selected(method, model.params) == dict.fromkeys(expected, "out out in out")
    adapter = random_adapter(method, model.params)
    entry = adapter["layer_0"]["attn"]["qkv_einsum"]["w"]
    assert entry.a.shape == (models.EMBED, 2) and entry.b.shape == (2, 3 * models.HEADS * models.HEAD_DIM)
    factored_and_merged(method, model.params, adapter, model.apply, model.tokens)


@pytest.mark.parametrize("mha", [False, True], ids=["gqa", "mha"])
def test_gemma3_discover_agrees_with_the_family_layouts_and_finds_the_tied_head(mha):
    model = _gemma(mha=mha)
    found = lrtt.discover(model.apply, model.params, model.tokens)
    by_family = _selected(lrtt.LoRA(targets="all-linear"), model.params)
    assert len(by_family) == LAYERS * (4 if mha else 5)  # q and kv (or qkv), attn_vec, gating, linear
    assert by_family == {p: found[p] for p in found.linear()}
    head = found.leaves["embedder/input_embedding"]
    assert (head.role, head.layout, head.head) == ("tied_head", "out in", True)
    assert "embedder/input_embedding" not in found.linear()
    assert not found.conflicts()


def test_gemma3_bfloat16_factored_and_merged_match_a_float32_reference():
    """bf16 params (gemma's default dtype): factored and merged agree with the float32 model
    (the same bf16-rounded weights, upcast) to bf16 rounding (outputs; and the factored adapter
    gradients); the factors and their gradients stay float32, ``merge`` returns bf16 kernels."""
    model16, model32 = _gemma(dtype="bfloat16"), _gemma()
    params16 = model16.params
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params16)
    method = lrtt.LoRA(rank=2, targets="qv")
    adapter = random_adapter(method, params16)
    assert lrtt.merge(method, params16, adapter)["layer_0"]["attn"]["q_einsum"]["w"].dtype == jnp.bfloat16

    def run(adapter):
        fns = (
            lambda ad: lrtt.factored(model16.apply)(lrtt.wrap(method, params16, ad), model16.tokens),
            lambda ad: model16.apply(lrtt.merge(method, params16, ad), model16.tokens),
            lambda ad: lrtt.factored(model32.apply)(lrtt.wrap(method, params32, ad), model32.tokens),
        )
        loss = lambda f: lambda ad: jnp.sum(jnp.sin(f(ad).astype(jnp.float32)))  # noqa: E731
        return [f(adapter) for f in fns], [jax.grad(loss(fns[i]))(adapter) for i in (0, 2)]

    (fac16, mer16, ref), (g_fac16, g_ref) = quick_jit(run)(adapter)
    assert fac16.dtype == mer16.dtype == jnp.bfloat16 and ref.dtype == jnp.float32

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert rel(fac16, ref) < 2e-2 and rel(mer16, ref) < 2e-2, (rel(fac16, ref), rel(mer16, ref))
    # gradients: measured ~3e-2 (the loss sums the sines of 1,536 bf16 logits)
    for a, b in zip(jax.tree.leaves(g_fac16), jax.tree.leaves(g_ref), strict=True):
        assert a.dtype == jnp.float32 and rel(a, b) < 1e-1, rel(a, b)


# --- google-tunix Llama 3 (NNX), remat on ---------------------------------------------------------
TUNIX_KINDS = {"attn/q_proj/w": "in out out", "attn/k_proj/w": "in out out", "attn/v_proj/w": "in out out",
               "attn/o_proj/w": "in in out", "mlp/gate_proj/kernel": "in out", "mlp/up_proj/kernel": "in out",
               "mlp/down_proj/kernel": "in out"}


@pytest.mark.parametrize("remat", ["BLOCK", "DECODER"])
def test_tunix_llama3_all_linear_under_remat_factored_equals_merged(remat):
    model = _tunix(remat)
    method = lrtt.LoRA(rank=2, targets="all-linear")
    expected = {f"layers/{i}/{kind}": layout for i in range(LAYERS) for kind, layout in TUNIX_KINDS.items()}
    selected = _selected(method, model.params)
    assert selected == expected
    assert not any(p.startswith("lm_head") for p in selected)
    primitives = _primitives(jax.make_jaxpr(model.apply)(model.params, model.tokens).jaxpr)
    assert primitives & {"checkpoint", "remat", "remat2"}, "the model was meant to run under remat"
    adapter = random_adapter(method, model.params)
    factored_and_merged(method, model.params, adapter, model.apply, model.tokens)


# --- MaxText-style: nn.scan, params stacked on axis 1 --------------------------------------------
MAXTEXT_LAYOUTS = {
    "decoder/layers/self_attention/query/kernel": "in layer out out",
    "decoder/layers/self_attention/key/kernel": "in layer out out",
    "decoder/layers/self_attention/value/kernel": "in layer out out",
    "decoder/layers/self_attention/out/kernel": "in layer in out",
    "decoder/layers/mlp/wi_0/kernel": "in layer out",
    "decoder/layers/mlp/wi_1/kernel": "in layer out",
    "decoder/layers/mlp/wo/kernel": "in layer out",
}


def test_maxtext_scanned_all_linear_with_the_family_layouts():
    model = models.maxtext()
    params = model.params
    assert params["decoder"]["layers"]["self_attention"]["query"]["kernel"].shape == (
        models.EMBED, LAYERS, models.HEADS, models.HEAD_DIM)
    assert params["decoder"]["layers"]["self_attention"]["out"]["kernel"].shape == (
        models.HEADS, LAYERS, models.HEAD_DIM, models.EMBED)
    method = lrtt.LoRA(rank=2, targets="all-linear")
    assert _selected(method, params) == MAXTEXT_LAYOUTS
    adapter = random_adapter(method, params)
    query = adapter["decoder"]["layers"]["self_attention"]["query"]["kernel"]
    assert query.a.shape == (LAYERS, models.EMBED, 2) and query.b.shape == (LAYERS, 2, models.HEADS * models.HEAD_DIM)
    factored_and_merged(method, params, adapter, model.apply, model.tokens)


def test_maxtext_scanned_all_linear_with_discovered_layouts():
    model = models.maxtext()
    found = lrtt.discover(model.apply, model.params, model.tokens)
    assert {p: found[p] for p in found.linear()} == MAXTEXT_LAYOUTS
    assert found.leaves["decoder/logits_dense/kernel"].head
    assert found.leaves["token_embedder/embedding"].role == "embedding"
    method = lrtt.LorettaRep(rank=2, tt_rank=2, targets="all-linear", layouts=found)
    assert _selected(method, model.params) == MAXTEXT_LAYOUTS
    adapter = random_adapter(method, model.params)
    factored_and_merged(method, model.params, adapter, model.apply, model.tokens)


# --- mixture of experts: lax.ragged_dot over (E, in, out) kernels ---------------------------------
MOE_EXPERTS = r"^moe/(wi|wo)$"


def test_moe_discover_reads_the_expert_kernels_as_layer_in_out():
    model = models.moe()
    found = lrtt.discover(model.apply, model.params, model.tokens)
    assert found["moe/wi"] == found["moe/wo"] == "layer in out"
    assert found["moe/router/kernel"] == "in out" and not found.leaves["moe/router/kernel"].head
    assert found.leaves["head/kernel"].head
    assert found.linear() == ["moe/router/kernel", "moe/wi", "moe/wo"]


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_moe_ragged_dot_experts_factored_equals_merged(method_name):
    model = models.moe()
    method = METHODS[method_name](targets=MOE_EXPERTS, layouts={MOE_EXPERTS: "layer in out"})
    assert _selected(method, model.params) == {"moe/wi": "layer in out", "moe/wo": "layer in out"}
    group_sizes = np.bincount(np.asarray(jnp.argmax(
        _router_logits(model), axis=-1)), minlength=model.module.experts)
    assert (group_sizes > 0).sum() >= 2, group_sizes  # the tokens really are split between experts
    adapter = random_adapter(method, model.params)
    factored_and_merged(method, model.params, adapter, model.apply, model.tokens)
    grad_fn = jax.grad(lambda ad: lrtt.factored(model.apply)(lrtt.wrap(method, model.params, ad), model.tokens).sum())
    names = {e.primitive.name for e in jax.make_jaxpr(grad_fn)(adapter).jaxpr.eqns}
    assert "ragged_dot_general" in names


# --- helpers ----------------------------------------------------------------------------------------
def _primitives(jaxpr) -> set:
    """The primitive names of a jaxpr and of every jaxpr nested in its equations."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    names |= _primitives(sub)
    return names


def _router_logits(model):
    p = model.params
    x = p["embedder"]["embedding"][model.tokens].reshape(-1, models.EMBED)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * p["norm"]["scale"]
    return x @ p["moe"]["router"]["kernel"]
