"""`lrtt.models.save_flax_model`: a transformers 4 Flax model's params -> PyTorch names and layouts
(the rule of transformers' own Flax -> PyTorch conversion), checked against that conversion and
against the PyTorch class loading the directory (main .venv: transformers 4 + torch). The
transformers 5 side: tests/test_models_hf.py (the CLI's MiniLM export)."""

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FlaxBertForSequenceClassification"):
    pytest.skip("needs transformers 4's Flax classes (the main .venv)", allow_module_level=True)

from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model  # noqa: E402

from lrtt.models import save_flax_model  # noqa: E402
from lrtt.models._safetensors import tensor_index  # noqa: E402

pytestmark = pytest.mark.torch
IDS = np.array([[5, 7, 9, 11, 2, 30]])


def _bert():
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=37, num_labels=3, vocab_size=99)
    return transformers.FlaxBertForSequenceClassification(config, seed=1), transformers.BertForSequenceClassification


def _llama(tie):
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=37, vocab_size=99, tie_word_embeddings=tie)
    return transformers.FlaxLlamaForCausalLM(config, seed=1), transformers.LlamaForCausalLM


@pytest.mark.parametrize("case", ["bert", "llama_untied", "llama_tied_random_head", "llama_tied_equal_head"])
def test_names_layouts_and_logits_match_transformers(tmp_path, case):
    flax_model, torch_class = _bert() if case == "bert" else _llama(tie="tied" in case)
    params = copy.deepcopy(flax_model.params)
    if case == "llama_tied_equal_head":
        params["lm_head"]["kernel"] = params["model"]["embed_tokens"]["embedding"].T
    files = save_flax_model(tmp_path, flax_model, params)
    assert files == ["model.safetensors", "config.json"]
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == [torch_class.__name__] and raw["dtype"] == "float32"
    # Flax Llama never ties: a head that is not the embedding transposed is written and untied
    assert config.tie_word_embeddings == (case in ("bert", "llama_tied_equal_head"))
    reference = load_flax_weights_in_pytorch_model(torch_class(config), params)
    expected = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    got = {name: f[key] for name, (f, key) in tensor_index(tmp_path).items()}
    tied = {"lm_head.weight"} if case == "llama_tied_equal_head" else set()
    assert set(got) == set(expected) - tied
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    loaded, info = torch_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        logits = loaded.eval()(torch.tensor(IDS)).logits.numpy()
    flax_logits = np.asarray(flax_model(IDS, params=params).logits)
    np.testing.assert_allclose(logits, flax_logits, rtol=1e-5, atol=1e-6)


def test_bfloat16_sharded_and_refusals(tmp_path):
    import jax
    import jax.numpy as jnp

    flax_model, _ = _bert()
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), flax_model.params)
    files = save_flax_model(tmp_path, flax_model, params, max_shard_size="20KB")
    assert "model.safetensors.index.json" not in files and len(files) > 2
    got = {name: f[key] for name, (f, key) in tensor_index(tmp_path).items()}
    assert got["classifier.weight"].dtype.name == "bfloat16" and got["classifier.weight"].shape == (3, 32)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    mixed = copy.deepcopy(flax_model.params)
    mixed["classifier"]["bias"] = mixed["classifier"]["bias"].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="mix dtypes"):
        save_flax_model(tmp_path / "mixed", flax_model, mixed)
