"""lrtt._combine.combine against peft's own LoraModel.add_weighted_adapter (peft 0.21).

A bare PyTorch model (two blocks of q_proj (16→12) and v_proj (16→8) Linears, a head) and its
Flax-style params with the same weights; lrtt adapters with random non-zero factors are written
with lrtt.save_peft and loaded into PEFT as adapters a0, a1, a2. Both sides combine them; per
module the combined ΔW, the factors (up to the sign of each singular pair for svd), the merged
weights, and PEFT's saved result read back by lrtt.load_peft are compared.

Needs the interop extra (torch, peft): marked `torch` through the `interop` fixture (conftest),
so the Python 3.12 CI leg deselects it.
"""

import math
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrtt
from lrtt._combine import combine
from lrtt._paths import named_leaves

RTOL = 1e-5  # max |Δ| / max |reference|, float32 on both sides
MODULES = [f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
WEIGHTS = [0.7, -1.3, 0.4]


@pytest.fixture(scope="module")
def interop():
    import peft
    import torch

    return types.SimpleNamespace(torch=torch, peft=peft, model=_model_class(torch))


def _model_class(torch):
    nn = torch.nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(16, 12, bias=False), nn.Linear(16, 8, bias=False)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attention()

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(8, 4)

    return Tiny


def _params(model):
    """The Flax-style params of a PyTorch model: ``a.b.weight (out, in)`` → ``a/b/kernel (in, out)``."""
    params = {}
    for name, p in model.named_parameters():
        *modules, leaf = name.split(".")
        node = params
        for m in modules:
            node = node.setdefault(m, {})
        value = p.detach().numpy()
        node["kernel" if leaf == "weight" else leaf] = jnp.asarray(value.T if leaf == "weight" else value)
    return params


def _path(module):
    return module.replace(".", "/") + "/kernel"


def _noisy(method, params, seed):
    """The adapter ``method.init`` makes, every factor / core (and trained leaf) N(0, 0.5²) noise."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(method.init, jax.random.key(seed), params)  # no init compiled: fast
    return jax.tree.map(lambda x: jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype), shapes)


def _into_peft(interop, tmp_path, methods, adapters, params):
    """A PeftModel holding ``adapters`` as a0, a1, … (each written by lrtt.save_peft)."""
    peft_model = None
    for k, (method, adapter) in enumerate(zip(methods, adapters)):
        directory = tmp_path / f"a{k}"
        lrtt.save_peft(directory, method, adapter, params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if peft_model is None:
                peft_model = interop.peft.PeftModel.from_pretrained(interop.model(), directory, adapter_name="a0")
            else:
                peft_model.load_adapter(directory, adapter_name=f"a{k}")
    return peft_model


def _module(peft_model, name):
    return peft_model.base_model.model.get_submodule(name)


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / np.abs(want).max()


def _check(what, got, want, tol=RTOL):
    err = _rel(got, want)
    print(f"{what}: max |Δ| / max |ref| = {err:.1e}")
    assert err <= tol, f"{what}: {err:.2e} > {tol}"


def _torch(x):
    return x.detach().numpy()


CASES = {  # name: (method kind, ranks, alphas, how, rank)
    "linear": ("lora", (4, 4, 4), (8, 4, 2), "linear", None),
    "cat": ("lora", (2, 3, 2), (4, 3, 8), "cat", None),  # rank 7 <= min(in, out) of v_proj
    "svd-default-rank": ("lora", (2, 3, 4), (4, 3, 8), "svd", None),
    "svd-rank-3": ("lora", (2, 3, 4), (4, 3, 8), "svd", 3),
    "loretta-rep-cat": ("rep", (2, 2, 3), (4, 3, 8), "cat", None),
    "loretta-rep-svd": ("rep", (2, 4, 4), (4, 3, 8), "svd", 5),
}


def _methods(kind, ranks, alphas):
    if kind == "rep":
        return [lrtt.LorettaRep(rank=r, alpha=float(a), tt_rank=2, targets="q_proj|v_proj") for r, a in zip(ranks, alphas)]
    return [lrtt.LoRA(rank=r, alpha=a, targets="q_proj|v_proj") for r, a in zip(ranks, alphas)]


@pytest.mark.parametrize("case", list(CASES))
def test_combine_equals_peft_add_weighted_adapter(tmp_path, interop, case):
    kind, ranks, alphas, how, rank = CASES[case]
    params = _params(interop.model())
    methods = _methods(kind, ranks, alphas)
    adapters = [_noisy(m, params, seed) for seed, m in enumerate(methods)]
    peft_model = _into_peft(interop, tmp_path, methods, adapters, params)
    names = [f"a{k}" for k in range(len(adapters))]
    peft_model.add_weighted_adapter(names, WEIGHTS, "mixed", combination_type=how, svd_rank=rank)
    lora, mixed, error = combine(methods, adapters, WEIGHTS, how=how, rank=rank, return_error=True)

    assert peft_model.peft_config["mixed"].r == lora.rank  # PEFT: r = lora_alpha = the new rank
    ours = lrtt.delta(lora, params, mixed)
    for name in MODULES:
        module, path = _module(peft_model, name), _path(name)
        assert module.scaling["mixed"] == 1.0 == lrtt.entries(mixed)[path].scale
        want = sum(w * _torch(module.get_delta_weight(a)).T for w, a in zip(WEIGHTS, names))  # PEFT's inputs
        _check(f"{case} {name}: lrtt ΔW vs PEFT ΔW", ours[path], _torch(module.get_delta_weight("mixed")).T)
        a_peft, b_peft = _torch(module.lora_A["mixed"].weight).T, _torch(module.lora_B["mixed"].weight).T
        a, b = (np.asarray(x) for x in lrtt.entries(mixed)[path].factor_matrices())
        if how == "svd":  # singular vectors are unique up to sign: align each pair
            sign = np.sign((a * a_peft).sum(0))
            a, b = a * sign, b * sign[:, None]
            assert error[path] == pytest.approx(_frobenius_rel(ours[path], want), rel=1e-3)
        else:
            assert error[path] == pytest.approx(_frobenius_rel(ours[path], want), rel=1e-3, abs=1e-6)
        _check(f"{case} {name}: lrtt A vs PEFT lora_A.T", a, a_peft, 1e-4 if how == "svd" else 1e-6)
        _check(f"{case} {name}: lrtt B vs PEFT lora_B.T", b, b_peft, 1e-4 if how == "svd" else 1e-6)

    peft_model.save_pretrained(tmp_path / "saved", selected_adapters=["mixed"])  # PEFT's result, read by lrtt
    loaded_method, loaded = lrtt.load_peft(tmp_path / "saved" / "mixed", params)
    theirs = lrtt.delta(loaded_method, params, loaded)
    for path, dw in ours.items():
        _check(f"{case} {path}: lrtt.load_peft(PEFT's result) ΔW vs lrtt's", theirs[path], dw)

    merged = dict(named_leaves(lrtt.merge(lora, params, mixed)))
    unloaded = peft_model.merge_and_unload(adapter_names=["mixed"])
    for name in MODULES:
        _check(f"{case} {name}: merged weights", merged[_path(name)], _torch(unloaded.get_submodule(name).weight).T)


def _frobenius_rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def test_rslora_inputs_give_peft_s_factors_at_scale_one(tmp_path, interop):
    """peft ≤ 0.21.2 keeps use_rslora for the new adapter (scaling √r' instead of 1; fixed in
    huggingface/peft#3449). Its factors are lrtt's; lrtt's scale 1 gives the weighted sum."""
    params = _params(interop.model())
    methods = [lrtt.LoRA(rank=r, alpha=4.0, rslora=True, targets="q_proj|v_proj") for r in (2, 4)]
    adapters = [_noisy(m, params, seed) for seed, m in enumerate(methods)]
    peft_model = _into_peft(interop, tmp_path, methods, adapters, params)
    peft_model.add_weighted_adapter(["a0", "a1"], WEIGHTS[:2], "mixed", combination_type="cat")
    lora, mixed = combine(methods, adapters, WEIGHTS[:2], how="cat")
    assert not lora.rslora and lora.rank == 6
    ours = lrtt.delta(lora, params, mixed)
    for name in MODULES:
        module, path = _module(peft_model, name), _path(name)
        scaling = module.scaling["mixed"]
        assert scaling == pytest.approx(1.0) or scaling == pytest.approx(math.sqrt(6))
        want = sum(w * _torch(module.get_delta_weight(a)).T for w, a in zip(WEIGHTS, ("a0", "a1")))
        _check(f"rslora {name}: lrtt ΔW vs Σ w·ΔW (PEFT's inputs)", ours[path], want)
        _check(f"rslora {name}: lrtt ΔW vs PEFT ΔW / scaling", ours[path],
               _torch(module.get_delta_weight("mixed")).T / scaling)
        _check(f"rslora {name}: lrtt A vs PEFT lora_A.T", lrtt.entries(mixed)[path].a,
               _torch(module.lora_A["mixed"].weight).T, 1e-6)


@pytest.mark.parametrize("how", ["cat", "linear", "svd"])
def test_missing_zero_is_peft_s_union_of_targets(tmp_path, interop, how):
    """PEFT combines a module from the adapters that have it (cat pads the rank with zeros)."""
    params = _params(interop.model())
    methods = [lrtt.LoRA(rank=3, alpha=6, targets="q_proj|v_proj"), lrtt.LoRA(rank=3, targets="q_proj")]
    adapters = [_noisy(m, params, seed) for seed, m in enumerate(methods)]
    peft_model = _into_peft(interop, tmp_path, methods, adapters, params)
    peft_model.add_weighted_adapter(["a0", "a1"], WEIGHTS[:2], "mixed", combination_type=how)
    with pytest.raises(ValueError, match="adapter 1 lacks"):
        combine(methods, adapters, WEIGHTS[:2], how=how)
    lora, mixed = combine(methods, adapters, WEIGHTS[:2], how=how, missing="zero")
    ours = lrtt.delta(lora, params, mixed)
    for name in MODULES:
        _check(f"missing=zero {how} {name}: lrtt ΔW vs PEFT ΔW", ours[_path(name)],
               _torch(_module(peft_model, name).get_delta_weight("mixed")).T)


def test_peft_drops_modules_to_save_and_lrtt_refuses_them(tmp_path, interop):
    """The claim of lrtt's refusal: PEFT's combined adapter gets an untrained copy of the head."""
    params = _params(interop.model())
    methods = [lrtt.LoRA(rank=2, targets="q_proj|v_proj", trainable="^head/"), lrtt.LoRA(rank=2, targets="q_proj|v_proj")]
    adapters = [_noisy(m, params, seed) for seed, m in enumerate(methods)]
    peft_model = _into_peft(interop, tmp_path, methods, adapters, params)
    peft_model.add_weighted_adapter(["a0", "a1"], [1.0, 1.0], "mixed", combination_type="cat")
    head = _module(peft_model, "head")
    trained = head.modules_to_save["a0"].weight
    assert np.abs(_torch(trained) - _torch(head.original_module.weight)).max() > 0.1
    np.testing.assert_array_equal(_torch(head.modules_to_save["mixed"].weight), _torch(head.original_module.weight))
    with pytest.raises(ValueError, match="adapter 0 trains leaves in full"):
        combine(methods, adapters, [1.0, 1.0], how="cat")
