"""lrtt.models against transformers 5 (PyTorch) per family: the max relative logit difference in
each direction, measured in one run on tiny random checkpoints (tests/_model_configs.py).

    .venv-hf5/bin/python benchmarks/families.py      # needs transformers >= 5, torch, peft (scripts/install_hf5.sh)

For each family: transformers builds a random model (norms and biases perturbed) and saves it;
``load``: lrtt.models.load's logits vs transformers'; ``merged -> HF``: a LoRA (r = 4, all-linear,
random non-zero factors) merged and written by lrtt.models.save, loaded by
AutoModelForCausalLM.from_pretrained, vs lrtt's merged forward; ``PEFT``: the LoRA written by
lrtt.save_peft and served by PeftModel vs lrtt's factored forward; ``PEFT LorettaRep``: the same
for a LorettaRep adapter (written as the LoRA it equals). Differences are
``max |a - b| / max |b|`` in float32 over a (2, 12) batch of token ids.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")]


def _relative(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - b).max() / np.abs(b).max())


def main() -> None:
    import jax
    import jax.numpy as jnp
    import peft
    import torch
    import transformers

    import lrtt
    import lrtt.models
    from _model_configs import CONFIGS, random_hf_model

    tokens = np.random.default_rng(0).integers(0, 128, (2, 12)).astype(np.int32)

    def torch_logits(model):
        with torch.no_grad():
            return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()

    print(f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
          f"jax {jax.__version__}")
    print("| family (model_type) | load: HF -> lrtt | merged: lrtt -> HF | PEFT LoRA -> PeftModel | PEFT LorettaRep -> PeftModel |")
    print("|---|---|---|---|---|")
    for name in sorted(CONFIGS):
        with tempfile.TemporaryDirectory() as tmp:
            hf = random_hf_model(name)
            hf.save_pretrained(f"{tmp}/src")
            model, params = lrtt.models.load(f"{tmp}/src")
            x = jnp.asarray(tokens)
            row = [_relative(model(params, x), torch_logits(hf))]
            peft_cells = []
            for i, method in enumerate([lrtt.LoRA(rank=4, alpha=8, targets="all-linear"),
                                        lrtt.LorettaRep(rank=4, tt_rank=3, targets="all-linear")]):
                adapter = method.init(jax.random.key(0), params)
                adapter = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), adapter)
                factored = np.asarray(lrtt.factored(model)(lrtt.wrap(method, params, adapter), x))
                if i == 0:
                    merged = lrtt.merge(method, params, adapter)
                    lrtt.models.save(f"{tmp}/merged", model, merged)
                    back = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/merged").eval()
                    row.append(_relative(model(merged, x), torch_logits(back)))
                try:
                    lrtt.save_peft(f"{tmp}/peft{i}", method, adapter, params, task_type="CAUSAL_LM")
                except ValueError as err:
                    peft_cells.append(f"refused: {str(err).split(':')[0][:60]}")
                    continue
                base = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/src")
                served = peft.PeftModel.from_pretrained(base, f"{tmp}/peft{i}").eval()
                peft_cells.append(f"{_relative(factored, torch_logits(served)):.1e}")
            cells = [f"{v:.1e}" for v in row] + peft_cells
            print(f"| {name} ({CONFIGS[name]['model_type']}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
