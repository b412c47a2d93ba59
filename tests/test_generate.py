"""Packed rows, padded batches with the KV cache, and ``lrtt.models.generate`` (no torch: the
comparison with transformers' ``generate`` is tests/test_generate_hf.py, .venv-hf5).

Tiny float32 models of tests/_model_configs.py: Llama (llama3 rope scaling, GQA), Gemma 2 (sliding
window 4 on alternate layers, attention and final soft-capping), GPT-2 (learned positions). The
sequences are longer than the window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrtt
import lrtt.models
from _model_configs import CONFIGS
from lrtt.models import _generate

PROMPTS = [[5, 17, 9, 40, 2, 33, 8, 91, 64], [7, 1, 30], [12, 99, 3, 45, 6, 70]]  # lengths 9, 3, 6


def _model(name, **overrides):
    model = lrtt.models.Model.from_config({**CONFIGS[name], **overrides})
    return model, model.init(jax.random.key(0))


def _alone(model, params, ids):
    """The logits of ``ids`` alone (right-padded to 16 so that one compilation serves every length:
    the model is causal, what follows changes nothing)."""
    buf = np.zeros((1, 16), np.int32)
    buf[0, :len(ids)] = ids
    return np.asarray(model(params, buf)[0, :len(ids)])


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_packed_rows_give_each_example_alone(name):
    model, params = _model(name)
    rng = np.random.default_rng(0)
    examples = [rng.integers(0, 128, n).tolist() for n in (6, 7, 2, 9, 5)]
    # row 0: examples 0, 1, 2 then padding; row 1: examples 3, 4, no padding... both 16 wide
    rows = [(examples[0] + examples[1] + examples[2] + [0], [1] * 6 + [2] * 7 + [3] * 2 + [0]),
            (examples[3] + examples[4] + [0, 0], [4] * 9 + [5] * 5 + [0, 0])]
    tokens = jnp.asarray([r[0] for r in rows], jnp.int32)
    segments = jnp.asarray([r[1] for r in rows], jnp.int32)
    packed = np.asarray(jax.jit(lambda p, t, s: model(p, t, segment_ids=s))(params, tokens, segments))
    assert np.all(np.isfinite(packed))  # padding included
    spans = [(0, 0, 6), (0, 6, 13), (0, 13, 15), (1, 0, 9), (1, 9, 14)]
    for ids, (row, a, b) in zip(examples, spans):
        np.testing.assert_allclose(packed[row, a:b], _alone(model, params, ids), rtol=1e-5, atol=1e-5)
    # explicit positions (restarting per example) are the default
    positions = lrtt.models._decoder.segment_positions(segments)
    assert positions[0, 6:9].tolist() == [0, 1, 2] and positions[1, 9:11].tolist() == [0, 1]
    np.testing.assert_allclose(model(params, tokens, positions=positions, segment_ids=segments), packed, atol=1e-6)


def test_packed_rows_run_factored():
    """Packed training rows through lrtt.factored: the factored logits are the merged ones."""
    model, params = _model("gemma2")
    method = lrtt.LoRA(rank=4, targets="qv")
    adapter = jax.tree.map(lambda x: x + 0.1, method.init(jax.random.key(2), params))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 16)), jnp.int32)
    segments = jnp.asarray([[1] * 5 + [2] * 9 + [0] * 2, [3] * 16], jnp.int32)
    factored = jax.jit(lrtt.factored(model))(lrtt.wrap(method, params, adapter), tokens, segment_ids=segments)
    merged = model(lrtt.merge(method, params, adapter), tokens, segment_ids=segments)
    np.testing.assert_allclose(factored, merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_left_padded_batch_with_the_cache_gives_each_prompt_alone(name):
    model, params = _model(name)
    P = max(map(len, PROMPTS))
    tokens = np.zeros((3, P), np.int32)
    segments = np.zeros((3, P), np.int32)
    for b, p in enumerate(PROMPTS):
        tokens[b, P - len(p):], segments[b, P - len(p):] = p, 1
    step = jax.jit(lambda p, t, c, s=None: model(p, t, cache=c, segment_ids=s))
    logits, cache = step(params, tokens, model.init_cache(3, 16), segments)
    assert np.all(np.isfinite(np.asarray(logits)))
    follow = np.asarray([[11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34]], np.int32)
    steps = [np.asarray(logits)]
    for t in range(follow.shape[1]):  # one token at a time, then the last one through a 1-token call
        logits, cache = step(params, follow[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    for b, p in enumerate(PROMPTS):
        full = _alone(model, params, p + follow[b].tolist())
        np.testing.assert_allclose(steps[0][b, P - len(p):], full[:len(p)], rtol=1e-5, atol=1e-5)
        got = np.stack([s[b, -1] for s in steps[1:]])
        np.testing.assert_allclose(got, full[len(p):], rtol=1e-5, atol=1e-5)
    assert cache["positions"][1, P - 3:P + 4].tolist() == list(range(7))  # row 1 (3 tokens): its own positions
    assert cache["segment_ids"][1].tolist() == [0] * (P - 3) + [1] * 7 + [0] * (16 - P - 4)


def _reference(model, params, prompt, n, eos=()):
    """Greedy decoding the slow way: the whole sequence through the full forward at each step
    (right-padded to a fixed width, so one compilation; causal, so the padding changes nothing)."""
    forward = jax.jit(model)
    seq = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, 32), np.int32)
        buf[0, :len(seq)] = seq
        seq.append(int(np.argmax(np.asarray(forward(params, buf))[0, len(seq) - 1])))
        if seq[-1] in eos:
            break
    return seq[len(prompt):]


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_greedy_generate_equals_the_reference_loop(name):
    model, params = _model(name)
    out = lrtt.models.generate(model, params, PROMPTS, max_new_tokens=10, eos_token_id=[])
    assert [len(o) for o in out] == [10, 10, 10]
    assert out == [_reference(model, params, p, 10) for p in PROMPTS]


def _cut(row, eos=(), stops=()):
    """``row`` up to and including its first EOS id or the end of its first stop sequence."""
    for i, token in enumerate(row):
        if token in eos or any(row[max(0, i + 1 - len(s)):i + 1] == list(s) for s in stops):
            return row[:i + 1]
    return row


def test_eos_and_stop_sequences_end_a_row():
    model, params = _model("llama")
    free = lrtt.models.generate(model, params, PROMPTS, max_new_tokens=10, eos_token_id=[])
    eos = free[0][3]  # row 0 ends at its 4th token or before; the others at their first eos, if any
    out = lrtt.models.generate(model, params, PROMPTS, max_new_tokens=10, eos_token_id=eos)
    assert out == [_cut(row, {eos}) for row in free] and len(out[0]) <= 4 and out[0][-1] == eos
    stops = [[127, 126, 125], free[1][2:4]]
    out = lrtt.models.generate(model, params, PROMPTS, max_new_tokens=10, eos_token_id=[], stop=stops)
    assert out == [_cut(row, stops=stops) for row in free] and out[1][-2:] == stops[1]
    # the default is the config's eos_token_id (an int or a list)
    model_eos, _ = _model("llama", eos_token_id=[126, eos])
    assert lrtt.models.generate(model_eos, params, PROMPTS, max_new_tokens=10) == [_cut(r, {126, eos}) for r in free]


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model, params = _model("llama")
    greedy = lrtt.models.generate(model, params, PROMPTS, max_new_tokens=8, eos_token_id=[])
    run = lambda **kw: lrtt.models.generate(model, params, PROMPTS, max_new_tokens=8, eos_token_id=[],  # noqa: E731
                                            temperature=1.0, **kw)
    a, b, c = run(seed=1), run(seed=1), run(seed=2)
    assert a == b and a != c and a != greedy and all(len(o) == 8 for o in a)
    assert run(top_k=1, seed=3) == greedy
    assert run(top_k=5, top_p=1e-6, seed=4) == greedy  # the nucleus is the argmax alone


def test_other_prompt_lengths_of_the_bucket_do_not_recompile():
    model, params = _model("qwen3")  # a config no other test compiles
    before = dict(_generate._TRACES)
    first = lrtt.models.generate(model, params, [[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=6, eos_token_id=[])
    traced = {k: _generate._TRACES[k] - before.get(k, 0) for k in ("prefill", "decode")}
    assert traced == {"prefill": 1, "decode": 1}  # 6 tokens, one decode compilation: none per token
    again = dict(_generate._TRACES)
    second = lrtt.models.generate(model, params, [[9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [19]],
                                  max_new_tokens=9, eos_token_id=[])  # prompt bucket 16, new-token bucket 16
    assert dict(_generate._TRACES) == again
    assert [len(o) for o in first] == [6, 6] and [len(o) for o in second] == [9, 9]
    assert lrtt.models._generate.bucket(17) == 32 and lrtt.models._generate.bucket(1500) == 1536


def test_generation_with_a_factored_adapter_equals_the_merged_params():
    model, params = _model("llama")
    method = lrtt.LoRA(rank=4, targets="qv")
    adapter = method.init(jax.random.key(2), params)
    rng = np.random.default_rng(3)  # numpy: no compilation per leaf shape
    adapter = jax.tree.map(lambda x: x + 0.5 * rng.standard_normal(x.shape).astype(np.float32), adapter)
    apply = lrtt.factored(model)
    wrapped = lrtt.wrap(method, params, adapter)
    factored = lrtt.models.generate(model, wrapped, PROMPTS, max_new_tokens=8, eos_token_id=[], apply=apply)
    merged = lrtt.models.generate(model, lrtt.merge(method, params, adapter), PROMPTS, max_new_tokens=8, eos_token_id=[])
    base = lrtt.models.generate(model, params, PROMPTS, max_new_tokens=8, eos_token_id=[])
    assert factored == merged and merged != base


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([], {}, "prompts is empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([1, 2, 3], {}, "pass \\[prompt\\]"),
    ([[1, 500]], {}, "token id 500, outside the model's vocabulary"),
    ([[1] * 60], {}, "max_new_tokens to 4"),
    ([[1]], {"max_new_tokens": 0}, "positive int"),
    ([[1]], {"top_k": 3}, "temperature > 0"),
    ([[1]], {"temperature": 1.0, "top_p": 1.5}, "top_p=1.5"),
    ([[1]], {"stop": [[]]}, "empty sequence"),
])
def test_errors_name_the_problem_and_the_fix(prompts, kwargs, message):
    model, params = _model("llama")  # max_position_embeddings 64
    with pytest.raises(ValueError, match=message):
        lrtt.models.generate(model, params, prompts, **{"max_new_tokens": 8, **kwargs})


def test_an_old_style_cache_is_an_error_naming_init_cache():
    model, params = _model("llama")
    cache = model.init_cache(1, 8)
    del cache["segment_ids"]
    with pytest.raises(ValueError, match="init_cache"):
        model(params, jnp.ones((1, 2), jnp.int32), cache=cache)
