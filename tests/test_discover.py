"""lrtt.discover: kernel layouts, roles and the output head read off an abstract trace."""

from __future__ import annotations

import doctest
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lrtt
from conftest import tiny_inputs, tiny_model
from lrtt import _discover
from lrtt._discover import Discovery, LeafInfo, LeafUse, discover


def _x(*shape):
    return jnp.ones(shape, jnp.float32)


def test_plain_kernels_and_transposed_kernel():
    params = {"a": {"kernel": _x(8, 16)}, "b": {"kernel": _x(8, 16)}}
    found = discover(lambda p, x: (x @ p["a"]["kernel"]) @ p["b"]["kernel"].T, params, _x(2, 8))
    assert dict(found) == {"a/kernel": "in out", "b/kernel": "out in"}
    assert found.leaves["a/kernel"].role == "linear" and not found.leaves["a/kernel"].head
    assert found.leaves["b/kernel"].head
    assert found.linear() == ["a/kernel"]
    assert found.linear(include_head=True) == ["a/kernel", "b/kernel"]


def test_params_as_shape_dtype_structs_and_bf16_cast():
    params = {"w": jax.ShapeDtypeStruct((8, 4), jnp.bfloat16)}
    found = discover(lambda p, x: x @ p["w"].astype(jnp.float32), params, jax.ShapeDtypeStruct((3, 8), jnp.float32))
    assert found["w"] == "in out"
    assert found.leaves["w"].shape == (8, 4)


@pytest.mark.parametrize("spec, shape, layout", [
    ("BTD,NDH->BTNH", (4, 8, 2), "out in out"),       # Gemma q_einsum
    ("BTD,DNH->BTNH", (8, 4, 2), "in out out"),       # DenseGeneral (embed, heads, head_dim)
    ("BTNH,NHD->BTD", (4, 2, 8), "in in out"),        # Gemma attn_vec_einsum
])
def test_einsum_kernels(spec, shape, layout):
    lhs = (2, 5, 8) if spec.startswith("BTD") else (2, 5, 4, 2)
    found = discover(lambda p, x: jnp.einsum(spec, x, p["w"]), {"w": _x(*shape)}, _x(*lhs))
    assert found["w"] == layout


def test_gemma_kv_einsum():
    params = {"kv": _x(2, 3, 8, 4)}
    found = discover(lambda p, x: jnp.einsum("BSD,CKDH->CBSKH", x, p["kv"]), params, _x(2, 5, 8))
    assert found["kv"] == "out out in out"


def test_reshape_split_and_merge_axes():
    # (in, heads*head_dim) split into (in, heads, head_dim); (L*in, out) indexed per layer.
    params = {"q": _x(8, 12), "stack": _x(3, 8, 8)}

    def fn(p, x):
        q = jnp.einsum("bd,dnh->bnh", x, p["q"].reshape(8, 3, 4))
        merged = p["stack"].reshape(3, 64).reshape(3, 8, 8)[1]
        return q.sum() + (x @ merged).sum()

    found = discover(fn, params, _x(2, 8))
    assert found["q"] == "in out"
    assert found["stack"] == "layer in out"


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.tanh(nn.Dense(8)(x)), None


class _Scanned(nn.Module):
    axis: int = 0
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(_Block) if self.remat else _Block
        layers = nn.scan(block, variable_axes={"params": self.axis}, split_rngs={"params": True},
                         length=3, in_axes=nn.broadcast)
        x, _ = layers(name="layers")(x, None)
        return nn.Dense(5, name="head")(x)


@pytest.mark.parametrize("axis, layout", [(0, "layer in out"), (1, "in layer out")])
def test_linen_scan_over_layers(axis, layout):
    model = _Scanned(axis=axis)
    x = _x(2, 8)
    params = jax.eval_shape(model.init, jax.random.key(0), x)  # no weights are ever made
    found = discover(model.apply, params, x)
    kernel = "params/layers/Dense_0/kernel"
    assert found[kernel] == layout
    assert found.leaves[kernel].role == "linear"
    assert found.leaves["params/layers/Dense_0/bias"].role == "other"
    assert found.leaves["params/head/kernel"].head
    assert found.linear() == [kernel]


def test_checkpointed_scanned_body():
    model = _Scanned(axis=0, remat=True)
    x = _x(2, 8)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    assert discover(model.apply, params, x)["params/layers/Dense_0/kernel"] == "layer in out"


def test_jax_checkpoint_jit_cond_custom_vjp():
    @jax.custom_vjp
    def double(x):
        return 2 * x

    double.defvjp(lambda x: (2 * x, None), lambda _, g: (2 * g,))

    def fn(p, x):
        h = jax.checkpoint(lambda w, x: x @ w)(p["a"], x)
        h = jax.jit(lambda w, h: h @ w.T)(p["b"], h)
        h = lax.cond(h.sum() > 0, lambda h: h @ p["c"], lambda h: -(h @ p["c"]), h)
        return double(h) @ p["d"]

    params = {"a": _x(8, 8), "b": _x(6, 8), "c": _x(6, 6), "d": _x(6, 4)}
    found = discover(fn, params, _x(2, 8))
    assert dict(found) == {"a": "in out", "b": "out in", "c": "in out", "d": "in out"}
    assert [p for p, i in found.leaves.items() if i.head] == ["d"]


def test_fori_loop_indexes_a_stacked_kernel():
    fn = lambda p, x: lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"][i]), x)
    found = discover(fn, {"w": _x(3, 8, 8)}, _x(2, 8))
    assert found["w"] == "layer in out"


def test_while_loop_consts_and_fused_kernels():
    def fn(p, x):
        def body(carry):
            i, h = carry
            return i + 1, jnp.tanh(h @ p["stack"][i])

        h = lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]
        qk = h @ jnp.concatenate([p["q"], p["k"]], axis=1)  # kernels fused at call time
        a, b = jnp.split(p["ab"], 2, axis=1)  # one fused kernel split at call time
        return qk.sum() + ((h @ a) * (h @ b)).sum() + jnp.einsum("bd,edf->ebf", h, jnp.stack([p["e0"], p["e1"]])).sum()

    params = {"stack": _x(3, 4, 4), "q": _x(4, 2), "k": _x(4, 2), "ab": _x(4, 6), "e0": _x(4, 5), "e1": _x(4, 5)}
    found = discover(fn, params, _x(2, 4))
    assert found["stack"] == "layer in out"
    assert all(found[p] == "in out" for p in ("q", "k", "ab", "e0", "e1"))


def test_nnx_state():
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(4, 8, rngs=rngs)
            self.norm = nnx.RMSNorm(8, rngs=rngs)
            self.out = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(self.norm(self.up(x)))

    graphdef, state = nnx.split(Model(nnx.Rngs(0)))
    found = discover(lambda s, x: nnx.merge(graphdef, s)(x), state, _x(2, 4))
    assert found.linear() == ["up/kernel"] and found.leaves["out/kernel"].head
    assert found.leaves["norm/scale"].role == "other"


def test_embedding_and_tied_head():
    params = {"emb": _x(16, 8), "norm": {"scale": _x(8)}}

    def fn(p, ids):
        h = p["emb"][ids]
        h = h * p["norm"]["scale"]
        return h @ p["emb"].T

    found = discover(fn, params, jnp.zeros((2, 5), jnp.int32))
    emb = found.leaves["emb"]
    assert (emb.role, emb.layout, emb.head) == ("tied_head", "out in", True)
    assert {u.primitive for u in emb.uses} == {"gather", "dot_general"}
    assert found.leaves["norm/scale"].role == "other"
    assert found.linear() == [] and found.linear(include_head=True) == ["emb"]


def test_untied_head_and_embedding_only():
    params = {"emb": _x(16, 8), "proj": _x(8, 8), "lm_head": _x(8, 16), "unused": _x(3)}
    fn = lambda p, ids: jax.nn.relu(jnp.take(p["emb"], ids, axis=0) @ p["proj"]) @ p["lm_head"]
    found = discover(fn, params, np.zeros((2, 5), np.int32))
    assert found.leaves["emb"].role == "embedding" and "emb" not in found
    assert found.leaves["lm_head"].head and not found.leaves["proj"].head
    assert found.leaves["unused"].role == "unused"
    assert found.linear() == ["proj"]
    assert found.linear(include_head=True) == ["lm_head", "proj"]  # tree order


def test_conflict_keeps_both_uses():
    found = discover(lambda p, x: x @ p["w"] + x @ p["w"].T, {"w": _x(4, 4)}, _x(2, 4))
    (info,) = found.conflicts()
    assert info.path == "w" and info.role == "conflict" and info.layout is None
    assert sorted(u.layout for u in info.uses) == ["in out", "out in"]
    assert "w" not in found and found.linear() == []
    assert "'out in'" in str(found)


def test_dot_and_other_use_is_a_conflict():
    found = discover(lambda p, x: x @ p["w"] + p["w"].sum(), {"w": _x(4, 4)}, _x(2, 4))
    info = found.leaves["w"]
    assert info.role == "conflict"
    assert {u.primitive for u in info.uses} == {"dot_general", "reduce_sum"}


def test_ragged_dot_expert_kernel():
    fn = lambda p, x, sizes: lax.ragged_dot(x, p["experts"], sizes)
    found = discover(fn, {"experts": _x(3, 8, 5)}, _x(6, 8), jnp.array([2, 2, 2], jnp.int32))
    assert found["experts"] == "layer in out"


def test_batched_expert_einsum():
    fn = lambda p, x: jnp.einsum("ebd,edf->ebf", x, p["w"])
    assert discover(fn, {"w": _x(3, 8, 5)}, _x(3, 2, 8))["w"] == "layer in out"


def test_gpt2():
    model = tiny_model("gpt2")
    found = discover(lambda p, ids: model(ids, params=p).logits, model.params, tiny_inputs())
    assert found["transformer/h/0/attn/c_attn/kernel"] == "out in"
    assert found["transformer/h/1/mlp/c_proj/kernel"] == "out in"
    wte = found.leaves["transformer/wte/embedding"]
    assert (wte.role, wte.layout, wte.head) == ("tied_head", "out in", True)
    assert found.leaves["transformer/wpe/embedding"].role == "embedding"
    assert found.leaves["transformer/ln_f/scale"].role == "other"
    assert len(found.linear()) == 8 and not found.conflicts()


def test_llama():
    model = tiny_model("llama")
    found = discover(lambda p, ids: model(ids, params=p).logits, model.params, tiny_inputs())
    assert found["model/layers/0/self_attn/q_proj/kernel"] == "in out"
    assert found.leaves["lm_head/kernel"].head
    assert found.leaves["model/embed_tokens/embedding"].role == "embedding"
    assert found.leaves["model/norm/weight"].role == "other"
    linear = found.linear()
    assert "lm_head/kernel" not in linear and len(linear) == 14
    assert [p for p, i in found.leaves.items() if i.head] == ["lm_head/kernel"]
    # The anchored regexes feed a method's `layouts=` directly.
    targets = lrtt.select(model.params, linear, layouts=tuple(found.as_layouts().items()))
    assert len(targets) == 14


def test_str_repr_and_immutability():
    found = discover(lambda p, x: x @ p["w"] * p["b"], {"w": _x(4, 3), "b": _x(3)}, _x(2, 4))
    text = str(found)
    assert text.splitlines()[0].split() == ["path", "shape", "role", "layout", "head"]
    assert "in out" in text and "head" in text.splitlines()[2]
    assert "2 leaves" in repr(found)
    with pytest.raises(AttributeError):
        found.leaves = {}
    assert isinstance(found.leaves["w"], LeafInfo) and isinstance(found.leaves["w"].uses[0], LeafUse)
    assert isinstance(found, Discovery) and len(found) == 1 and list(found) == ["w"]
    again = pickle.loads(pickle.dumps(found))
    assert again.leaves == found.leaves and dict(again) == dict(found)


def test_where_names_the_source_line():
    found = discover(lambda p, x: x @ p["w"], {"w": _x(4, 3)}, _x(2, 4))
    assert "test_discover.py" in found.leaves["w"].uses[0].where


def test_no_array_leaf_is_an_error():
    with pytest.raises(ValueError, match="no array leaf"):
        discover(lambda p, x: x, {"a": None, "b": "text"}, _x(2))


def test_tracing_failure_carries_a_note():
    with pytest.raises(TypeError) as info:
        discover(lambda p, x: x @ p["w"], {"w": _x(4, 3)}, _x(2, 5))
    assert any("example" in note for note in getattr(info.value, "__notes__", []))


def test_docstring_examples():
    result = doctest.testmod(_discover, verbose=False)
    assert result.attempted > 0 and result.failed == 0
