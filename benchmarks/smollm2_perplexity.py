"""Check the SmolLM2 GGUF conversion: perplexity on an ordinary English paragraph.

Run: ``PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/smollm2_perplexity.py [--cache-dir DIR]``.
A correct conversion gives 8.42 on the paragraph below — the same as transformers' own GGUF
loader into PyTorch ``LlamaForCausalLM`` (8.4176). Measured failure modes: no q/k
un-permutation at all gives ~57 (q and k permuted alike leave q·k intact, only the rotary pairs
are wrong); un-permuting q but not k gives ~2,900. The rotary base (1e5 for SmolLM2, which
FlaxLlama would ignore) barely moves a 94-token paragraph; tests/test_gguf.py checks it exactly.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

PARAGRAPH = (
    "Every morning, Sarah wakes up at seven o'clock. She brushes her teeth, takes a shower, and "
    "gets dressed for work. Then she goes to the kitchen and makes a cup of coffee. She usually "
    "eats toast with butter and jam for breakfast. After breakfast, she walks to the bus stop and "
    "takes the bus to her office in the city center. She works as a teacher at a local school, "
    "and she enjoys helping her students learn new things every day."
)


def perplexity(model, tokenizer, text: str = PARAGRAPH) -> float:
    """exp of the mean next-token cross-entropy of ``text`` (no BOS; the first token is context)."""
    ids = jnp.asarray([tokenizer.encode(text).ids], dtype=jnp.int32)

    @jax.jit
    def mean_nll(params, ids):
        logits = model(ids, params=params).logits[0, :-1].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1).mean()

    return float(jnp.exp(mean_nll(model.params, ids)))


def main() -> None:
    from lrtt.cli.zoo import load_smollm2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="conversion cache (default: $LRTT_CACHE/...)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(cache_dir=args.cache_dir)
    t1 = time.perf_counter()
    n_tokens = len(tokenizer.encode(PARAGRAPH).ids)
    ppl = perplexity(model, tokenizer)
    t2 = time.perf_counter()
    print(f"load (convert or cached): {t1 - t0:.1f} s; forward: {t2 - t1:.1f} s; tokens: {n_tokens}")
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF -> Flax) perplexity: {ppl:.3f}")


if __name__ == "__main__":
    main()
