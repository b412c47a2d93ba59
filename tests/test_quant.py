"""Quantized frozen bases (QLoRA): lrtt.quantize with qwix, merge over a quantized base, and
factored execution that dequantizes each kernel at its dot_general only."""

import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.ad_checkpoint import print_saved_residuals
import pytest
from conftest import model_logits, perturb, tiny_inputs, tiny_model
from test_factored import factored_and_merged

import lrtt

qwix = pytest.importorskip("qwix")

# |W - dequantize(quantize(W))| <= bound · absmax of the block (symmetric absmax calibration):
# int8 and int4 round to a step of absmax/127.5 and absmax/7.5; NF4's widest gap between two
# code values is 1 - 0.6962 (Dettmers et al. 2023, appendix E), so half of it.
BOUND = {"int8": 0.5 / 127.5, "int4": 0.5 / 7.5, "nf4": (1.0 - 0.6961928009986877) / 2}


@pytest.mark.parametrize("qtype", ["nf4", "int8", "int4"])
@pytest.mark.parametrize("block_size", [16, None])
def test_quantize_then_dequantize_is_within_the_format_bound(qtype, block_size):
    w = jax.random.normal(jax.random.key(0), (64, 24)) * jnp.linspace(0.1, 3.0, 24)  # per-channel spread
    q = lrtt.quantize({"w": w}, "w", qtype=qtype, block_size=block_size)["w"]
    assert isinstance(q, qwix.QArray) and q.shape == w.shape
    assert q.scale.shape == ((64 // block_size, 24) if block_size else (1, 24))
    err = np.abs(np.asarray(lrtt.dequantize({"w": q})["w"] - w))
    blocks = np.asarray(w).reshape(-1, block_size or 64, 24)
    absmax = np.repeat(np.abs(blocks).max(axis=1), block_size or 64, axis=0)
    assert (err <= BOUND[qtype] * absmax * (1 + 1e-4) + 1e-6).all(), float((err / absmax).max())
    assert err.max() > 0  # it did quantize


@pytest.mark.parametrize("block_size", [16, None])
@pytest.mark.parametrize("packed", [False, True])
def test_nf4_dequantization_equals_qwix_bit_for_bit(block_size, packed):
    """lrtt looks NF4 codes up itself (one take over the array, then the block scales): the values
    must be qwix.dequantize's exactly, stacked axes, block scales and packed values included."""
    from lrtt._quant import NF4_CODE_BOOK, dequantize_leaf, unpacked
    from qwix._src.core import numerics

    assert np.array_equal(np.asarray(numerics.get_nf4_buckets(), np.float32), np.float32(NF4_CODE_BOOK))
    w = jax.random.normal(jax.random.key(0), (3, 64, 24))
    q = lrtt.quantize({"w": w}, "w", qtype="nf4", block_size=block_size, packed=packed,
                      layouts={"w": "layer in out"})["w"]
    assert np.array_equal(np.asarray(dequantize_leaf(q)), np.asarray(qwix.dequantize(unpacked(q))))


def test_quantize_refuses_a_block_size_that_does_not_divide_and_an_unknown_format():
    params = {"w": jnp.ones((48, 8))}
    with pytest.raises(ValueError, match=r"cannot quantize 'w' of shape \(48, 8\) in blocks of 64"):
        lrtt.quantize(params, "w")
    with pytest.raises(ValueError, match="`qtype` must be one of"):
        lrtt.quantize(params, "w", qtype="fp3")
    with pytest.raises(ValueError, match=r"cannot pack the nf4 values of 'v' of shape \(64, 7\).*packed=False"):
        lrtt.quantize({"v": jnp.ones((64, 7))}, "v", packed=True)


@functools.cache  # params are immutable: tests share one quantized copy per family and format
def _quantized(family, qtype="nf4"):
    model = tiny_model(family)
    params = lrtt.quantize(model.params, "all-linear", qtype=qtype, block_size=16)
    return model, params


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", [lrtt.LoRA(rank=4, targets="qv"),
                                    lrtt.LorettaRep(rank=4, tt_rank=2, targets="qv")], ids=["lora", "rep"])
def test_factored_over_a_quantized_base_equals_merged_over_its_dequantized_form(family, method):
    """Outputs and adapter gradients; the kernels outside q, v are quantized and not adapted."""
    model, params = _quantized(family)
    quantized = [p for p, leaf in lrtt._paths.named_leaves(params) if lrtt._paths.is_quantized(leaf)]
    assert len(quantized) > 4
    adapter = perturb(method.init(jax.random.key(0), params), jax.random.key(1))
    ids = tiny_inputs()
    factored_and_merged(method, params, adapter, lambda p, x: model_logits(model, p, x), ids)


def test_int8_base_and_merge_dtype():
    model, params = _quantized("llama", "int8")
    method = lrtt.LoRA(rank=2, targets="qv")
    adapter = perturb(method.init(jax.random.key(0), params), jax.random.key(1))
    merged = lrtt.merge(method, params, adapter, dtype=jnp.bfloat16)
    quantized = {p for p, x in lrtt._paths.named_leaves(params) if lrtt._paths.is_quantized(x)}
    kernels = [x for p, x in lrtt._paths.named_leaves(merged) if p in quantized]
    assert len(kernels) == 14 and all(k.dtype == jnp.bfloat16 and not lrtt._paths.is_quantized(k) for k in kernels)
    assert dict(lrtt._paths.named_leaves(merged))["lm_head/kernel"].dtype == jnp.float32  # float leaves keep theirs
    dense = lrtt.merge(method, lrtt.dequantize(params), adapter)
    q_proj = "model/layers/0/self_attn/q_proj/kernel"
    np.testing.assert_allclose(np.asarray(dict(lrtt._paths.named_leaves(merged))[q_proj], np.float32),
                               dict(lrtt._paths.named_leaves(dense))[q_proj], rtol=1e-2, atol=1e-2)


def _float_kernel_residuals(fn, arg, shapes):
    """The values of ``fn``'s gradient that are kept from the forward pass for the backward one
    (``jax.ad_checkpoint.print_saved_residuals``), float and of a quantized kernel's shape, that
    the forward pass computed (not the inputs and constants it was given)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(fn, arg)
    wanted = {"f32[" + ",".join(map(str, s)) + "]" for s in shapes}
    return [line for line in buf.getvalue().splitlines()
            if line.split(" ")[0] in wanted and "from a constant" not in line and "from the argument" not in line]


def test_no_float_copy_of_a_quantized_kernel_outlives_its_matmul():
    """Between the forward and the backward pass only the quantized kernels are kept: the float
    copy made at each dot_general is checkpointed (the backward dequantizes again)."""
    model, params = _quantized("llama")
    method = lrtt.LoRA(rank=4, targets="qv")
    adapter = method.init(jax.random.key(0), params)
    ids = tiny_inputs()
    shapes = {tuple(x.shape) for p, x in lrtt._paths.named_leaves(params) if lrtt._paths.is_quantized(x)}

    def factored(ad):
        return jnp.mean(lrtt.factored(lambda p, x: model_logits(model, p, x))(lrtt.wrap(method, params, ad), ids))

    def merged(ad):
        return jnp.mean(model_logits(model, lrtt.merge(method, params, ad), ids))

    assert not _float_kernel_residuals(factored, adapter, shapes)
    assert len(_float_kernel_residuals(merged, adapter, shapes)) > 4  # the check sees dense kernels when kept


def test_a_quantized_leaf_a_rule_cannot_carry_is_named():
    params = {"emb": {"kernel": jax.random.normal(jax.random.key(0), (32, 16))}, "dense": {"kernel": jnp.ones((16, 8))}}
    params = lrtt.quantize(params, "emb/kernel", block_size=16)
    method = lrtt.LoRA(rank=2, targets="dense/kernel")
    wrapped = lrtt.wrap(method, params, method.init(jax.random.key(0), params))
    rows = jnp.array([1, 3])
    with pytest.raises(ValueError, match=r"the quantized leaf 'emb/kernel' \(shape \(32, 16\), nf4\) reached `gather`"):
        lrtt.factored(lambda p: p["emb"]["kernel"][rows] @ p["dense"]["kernel"])(wrapped)
    out = lrtt.factored(lambda p: jnp.ones((2, 32)) @ p["emb"]["kernel"] @ p["dense"]["kernel"])(wrapped)
    dense = lrtt.dequantize(params)
    np.testing.assert_allclose(out, jnp.ones((2, 32)) @ dense["emb"]["kernel"] @ dense["dense"]["kernel"], rtol=1e-5)
    adapted = lrtt.LoRA(rank=2, targets="emb/kernel")
    with pytest.raises(ValueError, match="emb/kernel"):
        lrtt.factored(lambda p: jnp.sum(p["emb"]["kernel"]))(lrtt.wrap(adapted, params, adapted.init(jax.random.key(0), params)))


def test_a_scan_over_stacked_quantized_layers_slices_values_and_scales_together():
    """Kernels ``(L, in, out)`` quantized with per-layer scales go through ``lax.scan`` (and
    ``jax.checkpoint``) as values and scales, factored == merged with gradients."""
    n_layers, d = 3, 32
    params = {"layers": {"w": jax.random.normal(jax.random.key(0), (n_layers, d, d)) / d**0.5},
              "other": {"w": jax.random.normal(jax.random.key(1), (n_layers, d, d)) / d**0.5}}
    layouts = {"layers/w": "layer in out", "other/w": "layer in out"}
    params = lrtt.quantize(params, "w$", qtype="nf4", block_size=16, layouts=layouts)
    assert params["layers"]["w"].scale.shape == (n_layers, 2, d)
    method = lrtt.LoRA(rank=4, targets="layers/w", layouts=layouts)
    adapter = perturb(method.init(jax.random.key(2), params), jax.random.key(3))

    def fn(p, x):
        def body(h, ws):
            w, v = ws
            return jnp.tanh(h @ w) @ v, None

        return jax.lax.scan(jax.checkpoint(body), x, (p["layers"]["w"], p["other"]["w"]))[0]

    factored_and_merged(method, params, adapter, fn, jax.random.normal(jax.random.key(4), (2, d)))


def test_a_tree_quantized_by_qwix_quantize_params_is_adapted_as_it_is():
    """qwix's PTQ wraps each quantized kernel (``WithAux(array=QArray)``); lrtt reads it as the
    kernel ``…/kernel`` and runs the float model over it, factored == merged."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(32, name="down")(jax.nn.relu(nn.Dense(64, name="up")(x)))

    model, x = MLP(), jax.random.normal(jax.random.key(0), (2, 32))
    params = model.init(jax.random.key(1), x)["params"]
    rule = qwix.QuantizationRule(module_path=".*", weight_qtype="nf4", tile_size=16)
    qmodel = qwix.quantize_model(model, qwix.PtqProvider([rule]))
    qparams = qwix.quantize_params(params, jax.eval_shape(qmodel.init, jax.random.key(0), x)["params"])
    assert [p for p, leaf in lrtt._paths.named_leaves(qparams) if lrtt._paths.is_quantized(leaf)] == ["down/kernel", "up/kernel"]
    method = lrtt.LoRA(rank=4, targets="kernel")
    adapter = perturb(method.init(jax.random.key(2), qparams), jax.random.key(3))
    factored_and_merged(method, qparams, adapter, lambda p, x: model.apply({"params": p}, x), x)
    np.testing.assert_allclose(model.apply({"params": lrtt.dequantize(qparams)}, x), qmodel.apply({"params": qparams}, x),
                               rtol=1e-5, atol=1e-5)  # lrtt's dequantized base is the one qwix's model runs


def test_large_kernels_are_quantized_in_pieces_exactly_as_whole(monkeypatch):
    """lrtt.quantize splits a kernel along an output axis to bound qwix's temporaries; every
    output channel has its own scales, so the pieces join into the same QArray."""
    import lrtt._quant

    w = jax.random.normal(jax.random.key(0), (128, 96))
    whole = lrtt.quantize({"w": w}, "w", qtype="nf4", block_size=32)["w"]
    monkeypatch.setattr(lrtt._quant, "CHUNK", 1000)  # 96 output channels in 13 pieces
    pieces = lrtt.quantize({"w": w}, "w", qtype="nf4", block_size=32)["w"]
    assert pieces.qtype == "nf4" and pieces.qvalue.dtype == whole.qvalue.dtype
    np.testing.assert_array_equal(np.asarray(pieces.qvalue, np.uint8), np.asarray(whole.qvalue, np.uint8))
    np.testing.assert_array_equal(pieces.scale, whole.scale)


@pytest.mark.parametrize("qtype", ["nf4", "int4"])
def test_packed_4bit_values_are_the_same_kernel_and_scan_slices_them_as_bytes(qtype):
    """``packed=True`` holds 4-bit values two to a byte: the same dequantized kernel, the same
    factored gradients under a scan over stacked layers, and XLA's step keeps no byte-per-value
    copy of the stack (which it makes of a stacked ``uint4`` array that a loop slices)."""
    layers, width = 32, 256
    kernel = jax.random.normal(jax.random.key(0), (layers, width, width)) / 16
    params = {"layers": {"k": {"kernel": kernel}}}
    layouts = {r"layers/.*": "layer in out"}
    plain = lrtt.quantize(params, "layers/k/kernel", qtype=qtype, block_size=64, layouts=layouts)
    packed = lrtt.quantize(params, "layers/k/kernel", qtype=qtype, block_size=64, layouts=layouts, packed=True)
    assert isinstance(packed["layers"]["k"]["kernel"].qvalue, lrtt._quant.Packed4)
    assert packed["layers"]["k"]["kernel"].shape == kernel.shape
    assert jnp.array_equal(lrtt.dequantize(plain)["layers"]["k"]["kernel"], lrtt.dequantize(packed)["layers"]["k"]["kernel"])

    method = lrtt.LoRA(rank=2, targets="layers/k/kernel", layouts=layouts)
    adapter = jax.tree.map(lambda x: x + 0.01, method.init(jax.random.key(1), params))
    x = jax.random.normal(jax.random.key(2), (2, width))

    def loss(adapter, p, x):
        def fn(p, x):
            body = jax.checkpoint(lambda h, w: (jnp.tanh(h @ w), None))
            return jax.lax.scan(body, x, p["layers"]["k"]["kernel"])[0]
        return jnp.sum(lrtt.factored(fn)(lrtt.wrap(method, p, adapter), x))

    grad = jax.jit(jax.grad(loss))
    for a, b in zip(jax.tree.leaves(grad(adapter, plain, x)), jax.tree.leaves(grad(adapter, packed, x))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    temp = grad.lower(adapter, packed, x).compile().memory_analysis().temp_size_in_bytes
    assert temp < kernel.size / 2, (temp, kernel.size)  # less than the packed stack itself


@pytest.mark.parametrize("rules", ["fsdp", "tensor"])
def test_mesh_step_over_a_quantized_base_equals_jit_step(rules):
    """The Mesh step takes a quantized base: each quantized kernel gets its spec on its values and
    scales (an axis an array cannot split is replicated), its factors the kernel's own spec."""
    from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

    model, params = _quantized("llama")
    params = lrtt.quantize(lrtt.dequantize(params), "all-linear", qtype="nf4", block_size=16, packed=True)
    method = lrtt.LoRA(rank=4, targets="qv")
    wide = AbstractMesh((8, 2), ("data", "model"))
    specs = lrtt.train.param_specs(params, wide, rules)
    q = specs["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]  # kernel (32, 32): scales (2, 32)
    if rules == "fsdp":
        assert q.qvalue.data == P("data", None) and q.scale == P(None, None)  # 2 blocks do not split 8 ways
    else:
        assert q.qvalue.data == P(None, "model") and q.scale == P(None, "model")

    def loss_fn(logits, ids):
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    loss = lrtt.train.make_loss(method, lambda p, ids, _: model(ids, params=p).logits, loss_fn)
    optimizer = optax.adam(1e-2)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
    adapter = method.init(jax.random.key(0), params)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    ms = lrtt.train.mesh_step(loss, optimizer, mesh, method=method, params=params, rules=rules)
    state, value = ms.step(ms.put_state(lrtt.train.init_state(adapter, optimizer)), ms.put_params(params), ms.put_batch(ids))
    ref_state, ref_value = lrtt.train.jit_step(loss, optimizer)(lrtt.train.init_state(adapter, optimizer), params, ids)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(state.adapter), jax.tree.leaves(ref_state.adapter)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
