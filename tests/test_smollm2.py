"""The real SmolLM2-135M-Instruct, converted from its GGUF wheel (cached), predicts English.

The first run converts the GGUF into the cache (``$LRTT_CACHE`` or ``~/.cache/lrtt``); later
runs verify its checksums and load it. The paragraph and the perplexity are those of
``benchmarks/smollm2_perplexity.py`` (8.42; a broken q/k un-permutation gives 57 to thousands).
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "smollm2_perplexity.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("smollm2_perplexity", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smollm2_perplexity_on_english():
    bench = _benchmark()
    model, params, tokenizer = bench.load()
    assert model.config.num_layers == 30 and model.config.raw["rope_theta"] == 1e5 and model.config.tie_word_embeddings
    assert [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tokenizer.decode(tokenizer.encode(bench.PARAGRAPH).ids) == bench.PARAGRAPH
    ppl = bench.perplexity(model, params, tokenizer)
    assert math.isfinite(ppl) and 1.0 < ppl < 30.0, ppl
