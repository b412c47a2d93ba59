"""The trainable-parameter table of LLaMA-2-7B for LoRA, LorettaRep and LorettaAdp, from shapes only.

No weights are downloaded or allocated: the param tree is ``FlaxLlamaForCausalLM(config,
_do_init=False).params_shape_tree`` of the LLaMA-2-7B config. LoRA r=8 on q,v; LorettaRep r=8,
TT rank 5, the paper's TT shapes (``tt_shape="loretta"``); LorettaAdp with its defaults.

    python benchmarks/count_table.py
"""

from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lrtt  # noqa: E402


def main() -> None:
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    shapes = FlaxLlamaForCausalLM(config, _do_init=False).params_shape_tree
    lrtt.print_trainable_parameters(
        shapes, lrtt.LoRA(rank=8, targets="qv"), lrtt.LorettaRep(rank=8, tt_rank=5, tt_shape="loretta"), lrtt.LorettaAdp()
    )


if __name__ == "__main__":
    main()
