"""``lrtt.models.generate`` against transformers 5's own ``generate`` (PyTorch, greedy): a batch of
prompts of different lengths, left-padded by lrtt, gives token for token what transformers gives
for each prompt alone, EOS handling included (transformers' generation config, the EOS token kept).

Runs only where transformers >= 5 and torch are installed: ``bash scripts/install_hf5.sh &&
.venv-hf5/bin/python -m pytest -q tests/test_generate_hf.py``."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(f"needs transformers >= 5 (found {transformers.__version__}, the main .venv's Flax line); "
                "run it in .venv-hf5 (scripts/install_hf5.sh)", allow_module_level=True)

import lrtt.models  # noqa: E402
from _model_configs import random_hf_model  # noqa: E402

pytestmark = pytest.mark.torch
PROMPTS = [[5, 17, 9, 40, 2, 33, 8, 91, 64], [7, 1, 30], [12, 99, 3, 45, 6, 70]]  # longer than the windows (4)
NEW = 12
OVERRIDES = {"gpt2": {"initializer_range": 0.2}}  # at 0.02 random GPT-2 repeats one token: nothing to compare


def _hf_model(name):
    """transformers' model of the config dict, norms and biases perturbed (as in test_models_hf.py)."""
    return random_hf_model(name, **OVERRIDES.get(name, {}))


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2", "gemma3_text", "gpt2"])
def test_greedy_generate_equals_transformers_generate(tmp_path, name):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path)
    model, params = lrtt.models.load(tmp_path)
    eos = hf.generation_config.eos_token_id
    ours = lrtt.models.generate(model, params, PROMPTS, max_new_tokens=NEW)
    theirs = []
    for prompt in PROMPTS:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=NEW, pad_token_id=eos if eos is not None else 0)
        theirs.append(out[0, len(prompt):].tolist())
    assert ours == theirs
    assert len({tuple(row) for row in ours}) == len(PROMPTS)  # the rows differ: each follows its prompt
    # the default EOS is transformers' (generation_config.json); check that it cut a row when hit
    eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
    for row in ours:
        assert len(row) == NEW or row[-1] in eos_ids


def test_eos_from_the_checkpoint_cuts_rows_like_transformers(tmp_path):
    """An EOS id that the free-running greedy decoding hits: both stop there and keep it."""
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path / "free")
    model, params = lrtt.models.load(tmp_path / "free")
    free = lrtt.models.generate(model, params, PROMPTS, max_new_tokens=NEW, eos_token_id=[])
    eos = free[1][2]
    hf.generation_config.eos_token_id = eos
    hf.config.eos_token_id = eos
    hf.save_pretrained(tmp_path / "eos")
    model, params = lrtt.models.load(tmp_path / "eos")
    ours = lrtt.models.generate(model, params, PROMPTS, max_new_tokens=NEW)
    assert len(ours[1]) <= 3 and ours[1][-1] == eos
    for prompt, row in zip(PROMPTS, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW, pad_token_id=eos)
        assert row == out[0, len(prompt):].tolist()
    assert np.all([len(r) >= 1 for r in ours])
