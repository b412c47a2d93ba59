"""Trainable-parameter counts from shapes only (DESIGN §4), on the real model configs."""

import pytest

import lrtt


def _llama_shapes(layers, hidden, inter, heads, kv_heads):
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=32000,
    )
    return FlaxLlamaForCausalLM(config, _do_init=False).params_shape_tree


@pytest.fixture(scope="module")
def llama2_7b():
    return _llama_shapes(32, 4096, 11008, 32, 32)


def _count(method, shapes):
    return lrtt.num_params(lrtt.adapter_shapes(method, shapes))


def test_llama2_7b_lora_qv(llama2_7b):
    assert _count(lrtt.LoRA(rank=8, targets="qv"), llama2_7b) == 4_194_304


def test_llama2_70b_lora_qv():
    shapes = _llama_shapes(80, 8192, 28672, 64, 8)
    assert _count(lrtt.LoRA(rank=8, targets="qv"), shapes) == 16_384_000


def test_llama2_7b_loretta_rep(llama2_7b):
    method = lrtt.LorettaRep(rank=8, tt_rank=5, tt_shape="loretta", targets="qv")
    assert _count(method, llama2_7b) == 102_400


def test_llama2_7b_loretta_adp(llama2_7b):
    method = lrtt.LorettaAdp(bottleneck=64, tt_rank=5, train_norms=True)
    assert _count(method, llama2_7b) == 876_800
    adapters_only = lrtt.LorettaAdp(bottleneck=64, tt_rank=5, train_norms=False)
    assert _count(adapters_only, llama2_7b) == 610_560


def test_roberta_base_loretta_adp():
    from transformers import FlaxRobertaForSequenceClassification, RobertaConfig

    shapes = FlaxRobertaForSequenceClassification(RobertaConfig(num_labels=2), _do_init=False).params_shape_tree
    method = lrtt.LorettaAdp(bottleneck=64, tt_rank=5, tensorized_classifier=True, train_head=True)
    assert _count(method, shapes) == 99_194


def test_table_lists_each_target_group_and_totals(llama2_7b):
    table = lrtt.parameter_table(llama2_7b, [lrtt.LoRA(rank=8), lrtt.LorettaRep(tt_shape="loretta")])
    import re

    assert re.search(r"model/layers/\*/self_attn/q_proj/kernel\s+32\s+2,097,152\n", table)
    assert re.search(r"LoRA\(rank=8\)\s+4,194,304\s+0.0622%", table)
    assert re.search(r"LorettaRep\(rank=8, tt_rank=5\)\s+102,400\s+0.0015%", table)
    assert re.search(r"full fine-tune\s+6,738,415,616\s+100.0000%", table)


def test_table_takes_labelled_methods_and_refuses_a_non_method(llama2_7b):
    table = lrtt.parameter_table(llama2_7b, {"lora-qv": lrtt.LoRA(rank=8)})
    assert "lora-qv\n" in table and "4,194,304" in table
    with pytest.raises(TypeError, match="where a method .* was expected"):
        lrtt.parameter_table(llama2_7b, ["lora"])
