"""Tiny ``config.json`` dicts, one per family lrtt.models supports, written by hand: the jax-only
tests (tests/test_models.py) parse them directly; tests/test_models_hf.py builds the same models
with transformers 5 (``AutoConfig.for_model(**config)``)."""

_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=64)

CONFIGS = {
    "llama": dict(_BASE, model_type="llama", architectures=["LlamaForCausalLM"], tie_word_embeddings=False,
                  rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "llama_tied": dict(_BASE, model_type="llama", architectures=["LlamaForCausalLM"], tie_word_embeddings=True),
    "mistral": dict(_BASE, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=4, head_dim=24,
                    tie_word_embeddings=False),
    "qwen2": dict(_BASE, model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True),
    "qwen3": dict(_BASE, model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=32, tie_word_embeddings=False),
    "gemma": dict(_BASE, model_type="gemma", architectures=["GemmaForCausalLM"], head_dim=16,
                  hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(_BASE, model_type="gemma2", architectures=["Gemma2ForCausalLM"], head_dim=16, sliding_window=4,
                   query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                   hidden_activation="gelu_pytorch_tanh"),
    "gemma3_text": dict(_BASE, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=16,
                        sliding_window=4, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
                        rope_theta=1e6, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                        hidden_activation="gelu_pytorch_tanh"),
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                 n_positions=64, activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0),
}
"""Sequences longer than 4 tokens exercise the sliding windows (Mistral, Gemma 2, Gemma 3)."""


def random_hf_model(name, dtype=None, **overrides):
    """transformers' own model of ``CONFIGS[name]`` (with ``overrides``), seeded, every 1-D weight
    (norms, biases) perturbed by ``0.1 * N(0, 1)`` so that Gemma's ``1 + w``, the biases and the q/k
    norms matter; in ``dtype`` (a torch dtype) when given. Needs torch and transformers >= 5."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**dict(CONFIGS[name], **overrides))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model if dtype is None else model.to(dtype)
