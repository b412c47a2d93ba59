"""``lrtt.models``: Hugging Face causal-LM checkpoints in, PyTorch-format checkpoints out.

``load(path)`` reads a transformers checkpoint directory by its ``config.json`` (Llama incl.
Llama 3 rope scaling, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text, GPT-2) into one
config-driven JAX decoder whose params are a plain dict with the layers stacked (scanned);
``save(dir, model, params)`` writes safetensors that ``transformers.AutoModelForCausalLM``
(5.x) loads, without torch; ``save_flax_model(dir, flax_model, params)`` does the same for a
transformers 4 Flax model (e.g. the CLI's bundled MiniLM classifier); ``generate(model, params,
prompts, max_new_tokens=...)`` decodes a batch of prompts of different lengths with the KV cache
(greedy or sampled, EOS / stop sequences, factored adapters through ``apply=``). A llama.cpp
``.gguf`` loads as the transformers Llama it came from (``convert_gguf`` writes it as a checkpoint
directory). ``save_tunix`` / ``save_gemma`` write merged google-tunix and gemma-package trees as
PyTorch-format checkpoints. Not imported by ``import lrtt``.
"""

from lrtt.models._config import FAMILIES, DecoderConfig, parse_config
from lrtt.models._flax_hf import save_flax_model
from lrtt.models._generate import generate
from lrtt.models._gguf import convert as convert_gguf
from lrtt.models._load import load
from lrtt.models._model import Model
from lrtt.models._save import save
from lrtt.models._tunix import save_gemma, save_tunix
from lrtt.models._tunix_hf_config import gemma_hf_config, tunix_hf_config

__all__ = ["DecoderConfig", "FAMILIES", "Model", "convert_gguf", "gemma_hf_config", "generate", "load", "parse_config",
           "save", "save_flax_model", "save_gemma", "save_tunix", "tunix_hf_config"]
