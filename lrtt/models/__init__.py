"""``lrtt.models``: Hugging Face causal-LM checkpoints in, PyTorch-format checkpoints out.

``load(path)`` reads a transformers checkpoint directory by its ``config.json`` (Llama incl.
Llama 3 rope scaling, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text, GPT-2) into one
config-driven JAX decoder whose params are a plain dict with the layers stacked (scanned);
``save(dir, model, params)`` writes safetensors that ``transformers.AutoModelForCausalLM``
(5.x) loads, without torch; ``save_flax_model(dir, flax_model, params)`` does the same for a
transformers 4 Flax model (e.g. the CLI's bundled MiniLM classifier). Not imported by ``import lrtt``.
"""

from lrtt.models._config import FAMILIES, DecoderConfig, parse_config
from lrtt.models._flax_hf import save_flax_model
from lrtt.models._load import load
from lrtt.models._model import Model
from lrtt.models._save import save

__all__ = ["DecoderConfig", "FAMILIES", "Model", "load", "parse_config", "save", "save_flax_model"]
