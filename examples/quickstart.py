"""Quick start: adapt a transformers Flax GPT-2 with each lrtt method and print the count table.

Runs offline in seconds: the model is a small GPT-2 built from its config with random weights.
"""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import numpy as np
from transformers import FlaxGPT2LMHeadModel, GPT2Config

import lrtt

model = FlaxGPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1000), seed=0)
params = model.params
methods = [
    lrtt.LoRA(rank=8, targets="qv"),
    lrtt.LorettaRep(rank=8, tt_rank=5, targets="qv"),
    lrtt.LorettaAdp(bottleneck=64, tt_rank=5, tt_shape=None),
]
lrtt.print_trainable_parameters(params, *methods)

ids = np.arange(16, dtype=np.int32)[None] % 1000
before = model(ids, params=params).logits
for method in methods[:2]:
    adapter = method.init(jax.random.key(0), params)
    merged = lrtt.merge(method, params, adapter)  # W0 + ΔW; ΔW = 0 at step 0
    change = float(abs(model(ids, params=merged).logits - before).max())
    print(f"{type(method).__name__}: {lrtt.num_params(adapter):,} trainable, output change at init {change:.1e}")
