"""lrtt.models against transformers 5 itself (PyTorch): for every family, a tiny random model that
transformers builds and saves is loaded by lrtt with equal logits; a LoRA trained on it for a few
factored steps, merged and saved by lrtt, is loaded back by ``AutoModelForCausalLM.from_pretrained``
with no missing or unexpected key and the logits of lrtt's merged forward.

Runs only where transformers >= 5 and torch are installed: ``bash scripts/install_hf5.sh &&
.venv-hf5/bin/python -m pytest -q -n 2 tests/test_models.py tests/test_models_hf.py``
(the main .venv pins transformers < 5 for its Flax classes)."""

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(f"needs transformers >= 5 (found {transformers.__version__}, the main .venv's Flax line); "
                "run it in .venv-hf5 (scripts/install_hf5.sh)", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lrtt  # noqa: E402
import lrtt.models  # noqa: E402
from _model_configs import CONFIGS, random_hf_model  # noqa: E402

pytestmark = pytest.mark.torch
FAMILIES = sorted(CONFIGS)
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 12)).astype(np.int32)  # 12 > the sliding windows (4)


def _hf_model(name, dtype=torch.float32, **overrides):
    return random_hf_model(name, dtype, **overrides)


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


def _relative(a, b):
    return float(np.abs(np.asarray(a, np.float32) - b).max() / np.abs(b).max())


def _loading_problems(info):
    return {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}


@pytest.mark.parametrize("name", FAMILIES)
def test_load_train_merge_save_round_trip_through_transformers(tmp_path, name):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path / "src")
    model, params = lrtt.models.load(tmp_path / "src", dtype="float32")
    tokens = jnp.asarray(TOKENS)
    assert _relative(model(params, tokens), _torch_logits(hf)) <= 1e-4

    method = lrtt.LoRA(rank=4, targets="all-linear")
    adapter = method.init(jax.random.key(0), params)
    adapter = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape), adapter)  # B != 0
    optimizer = optax.adamw(1e-2)

    @jax.jit
    def step(adapter, opt_state):
        def loss(adapter):
            logits = lrtt.factored(model)(lrtt.wrap(method, params, adapter), tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(adapter)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, value

    opt_state = optimizer.init(adapter)
    losses = []
    for _ in range(3):
        adapter, opt_state, value = step(adapter, opt_state)
        losses.append(float(value))
    assert losses[-1] < losses[0]

    merged = lrtt.merge(method, params, adapter)
    ours = np.asarray(model(merged, tokens))
    np.testing.assert_allclose(ours, lrtt.factored(model)(lrtt.wrap(method, params, adapter), tokens), rtol=1e-4, atol=1e-5)
    lrtt.models.save(tmp_path / "out", model, merged)
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not _loading_problems(info), info
    assert _relative(ours, _torch_logits(back.eval())) <= 1e-4
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == CONFIGS[name]["model_type"]
    assert (tmp_path / "out" / "generation_config.json").is_file()  # copied from the source


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sharded_checkpoints_both_ways(tmp_path, name):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    model, params = lrtt.models.load(tmp_path / "src")
    assert _relative(model(params, jnp.asarray(TOKENS)), _torch_logits(hf)) <= 1e-4
    files = lrtt.models.save(tmp_path / "out", model, params, max_shard_size="40KB")
    assert sum(f.endswith(".safetensors") for f in files) > 1
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not _loading_problems(info), info
    for (n, a), (m, b) in zip(hf.state_dict().items(), back.state_dict().items()):
        assert n == m and torch.equal(a, b), n  # bit-exact both ways


@pytest.mark.parametrize("name", ["qwen3", "gemma2"])
def test_bfloat16_checkpoints(tmp_path, name):
    hf = _hf_model(name)
    with torch.no_grad():  # float32 weights that bf16 holds exactly: the float32 reference of the bf16 file
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())
    reference = _torch_logits(hf)
    low = copy.deepcopy(hf).to(torch.bfloat16)  # (a copy: .to() also rounds the rotary inv_freq buffer)
    low.save_pretrained(tmp_path / "src")
    model, params = lrtt.models.load(tmp_path / "src", dtype=None)
    assert params["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    # lrtt computes in float32 over the bf16 weights: equal to torch's float32 forward of the same
    # weights, and within bf16 rounding of torch's bf16 forward
    ours = model(params, jnp.asarray(TOKENS))
    assert _relative(ours, reference) <= 1e-4
    assert _relative(ours, _torch_logits(low)) <= 5e-2
    lrtt.models.save(tmp_path / "out", model, params)
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not _loading_problems(info), info
    assert back.dtype == torch.bfloat16
    for (n, a), (_, b) in zip(low.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name, overrides, message", [
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
     "rope_type='yarn'"),
    ("llama", {"attention_bias": True}, "attention_bias=True"),
    ("qwen3", {"attention_bias": True}, "attention_bias=True"),
])
def test_unsupported_checkpoints_are_refused(tmp_path, name, overrides, message):
    _hf_model(name, **overrides).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not supported") as info:
        lrtt.models.load(tmp_path)
    assert message in str(info.value)


def test_an_unsupported_family_is_refused(tmp_path):
    config = transformers.AutoConfig.for_model("phi3", vocab_size=128, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type='phi3' is not supported"):
        lrtt.models.load(tmp_path)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3_text"])
def test_peft_adapter_of_stacked_params_serves_in_peft(tmp_path, name):
    """lrtt.save_peft on lrtt.models' params writes one PyTorch module per layer
    (``model.layers.N.self_attn.q_proj``): PeftModel on transformers' model gives lrtt's factored logits."""
    peft = pytest.importorskip("peft")
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path / "src")
    model, params = lrtt.models.load(tmp_path / "src")
    method = lrtt.LoRA(rank=4, alpha=8, targets="all-linear")
    adapter = method.init(jax.random.key(0), params)
    adapter = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapter)
    config = lrtt.save_peft(tmp_path / "peft", method, adapter, params, task_type="CAUSAL_LM")
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    ours = np.asarray(lrtt.factored(model)(lrtt.wrap(method, params, adapter), jnp.asarray(TOKENS)))
    served = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src"), tmp_path / "peft").eval()
    assert _relative(ours, _torch_logits(served)) <= 1e-4

    loaded_method, loaded = lrtt.load_peft(tmp_path / "peft", params)
    again = lrtt.factored(model)(lrtt.wrap(loaded_method, params, loaded), jnp.asarray(TOKENS))
    np.testing.assert_allclose(again, ours, rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(loaded_method.init(jax.random.key(0), params)) == jax.tree.structure(loaded)


def test_peft_adapter_trained_by_peft_loads_onto_stacked_params(tmp_path):
    """The other direction: a PEFT LoRA on some layers and modules (as peft initializes it, B
    perturbed) loads onto lrtt.models' params; the layers it leaves out get zero factors."""
    peft = pytest.importorskip("peft")
    hf = _hf_model("qwen3")
    hf.save_pretrained(tmp_path / "src")
    lora = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
                           task_type="CAUSAL_LM")
    served = peft.get_peft_model(hf, lora)
    with torch.no_grad():
        for n, p in served.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    served.save_pretrained(tmp_path / "peft")
    model, params = lrtt.models.load(tmp_path / "src")
    method, adapter = lrtt.load_peft(tmp_path / "peft", params)
    ours = lrtt.factored(model)(lrtt.wrap(method, params, adapter), jnp.asarray(TOKENS))
    assert _relative(ours, _torch_logits(served.eval())) <= 1e-4
    q = adapter["layers"]["attn"]["q_proj"]["kernel"]
    assert q.a.shape == (2, 64, 4) and not np.any(np.asarray(q.b[0])) and np.any(np.asarray(q.b[1]))


def test_cli_export_loads_in_transformers_and_peft(tmp_path):
    """`lrtt train` on a checkpoint transformers 5 saved (`model: {path: DIR}`), then `lrtt export
    --format hf`: `AutoModelForCausalLM.from_pretrained` loads it with no missing or unexpected key
    and lrtt's adapted logits; `--format peft --for vllm`: `PeftModel.from_pretrained` gives them too."""
    import yaml
    from peft import PeftModel
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lrtt.cli import _main as cli

    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path / "src")
    words = "the a of to and in is that for it on was with he said as at by be has from have".split()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "</s>", *words])}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "src" / "tokenizer.json"))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(tmp_path / "src")}, "method": {"name": "lora", "rank": 8, "targets": "all-linear"},
        "data": {"max_len": 16, "train_limit": 8, "eval_limit": 4},
        "train": {"steps": 3, "batch_size": 4, "lr": 0.05, "warmup": 0, "eval_every": 3, "eval_batch_size": 4},
        "output": {"dir": str(tmp_path / "run"), "save_every": 3, "export": False}}))
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    assert cli.main(["export", str(config), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert cli.main(["export", str(config), "--format", "peft", "--for", "vllm", "--out", str(tmp_path / "peft")]) == 0

    model, params = lrtt.models.load(tmp_path / "src")
    method = lrtt.LoRA(rank=8, targets="all-linear")
    with lrtt.CheckpointManager(tmp_path / "run" / "checkpoints", method, create=False) as manager:
        adapter = manager.restore(adapter_like=lrtt.adapter_shapes(method, params)).adapter
    expected = np.asarray(lrtt.factored(model)(lrtt.wrap(method, params, adapter), jnp.asarray(TOKENS)))
    assert _relative(_torch_logits(hf), expected) > 1e-3  # training changed the model
    merged, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not _loading_problems(info)
    assert _relative(_torch_logits(merged.eval()), expected) <= 1e-4
    served = PeftModel.from_pretrained(_hf_model("llama"), tmp_path / "peft").eval()
    assert _relative(_torch_logits(served), expected) <= 1e-4


MINILM_RUN = """
import json, sys
import numpy as np
import lrtt
from lrtt.cli import _config, _methods, _restore, _tasks
from lrtt.cli import _main as cli

out, sets = sys.argv[1], sys.argv[2:]
assert cli.main(["train", "configs/minilm_bbc_lora.yaml", "--no-progress",
                 *[a for s in sets for a in ("--set", s)]]) == 0
config = _config.load("configs/minilm_bbc_lora.yaml", sets)
task = _tasks.build_task(config)
method = _methods.build_method(config)
adapter = _restore.restore_adapter(config, method, task)
batch = {k: np.asarray(v[:4]) for k, v in task.splits["test"].items()}
merged = lrtt.merge(method, task.params, adapter)
np.save(f"{out}/input_ids.npy", batch["input_ids"])
np.save(f"{out}/attention_mask.npy", batch["attention_mask"])
np.save(f"{out}/merged_logits.npy", np.asarray(task.apply(merged, batch, None)))
np.save(f"{out}/base_logits.npy", np.asarray(task.apply(task.params, batch, None)))
"""


def test_cli_merged_export_of_minilm_loads_in_transformers_5(tmp_path):
    """The bundled MiniLM (a transformers 4 Flax BERT classifier, trained by `lrtt train` in the
    main .venv): `<run>/merged` (the default --format hf) loads in transformers 5's
    AutoModelForSequenceClassification with no missing or unexpected key and the merged Flax
    model's logits, classifier head included."""
    import os
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    python = root / ".venv" / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"needs the main .venv ({python} is missing: its transformers 4 Flax classes run `lrtt train` "
                    "on MiniLM); create it first (CI does, before the .venv-hf5 leg)")
    run = tmp_path / "run"
    sets = ["data.max_len=32", "data.train_limit=16", "data.eval_limit=16", "train.batch_size=8", "train.lr=2e-2",
            "train.warmup=0", "train.steps=2", "train.eval_every=2", "output.save_every=2",
            "train.eval_batch_size=16", f"output.dir={run}"]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run([str(python), "-c", MINILM_RUN, str(tmp_path), *sets], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    config = json.loads((run / "merged" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and len(config["id2label"]) == 5
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(run / "merged",
                                                                                  output_loading_info=True)
    assert type(model).__name__ == "BertForSequenceClassification" and not _loading_problems(info), info
    ids, mask = (torch.tensor(np.load(tmp_path / f"{k}.npy"), dtype=torch.long) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, attention_mask=mask).logits.float().numpy()
    expected, base = np.load(tmp_path / "merged_logits.npy"), np.load(tmp_path / "base_logits.npy")
    assert _relative(base, expected) > 1e-3  # training changed the logits (the LoRA and the trainable head)
    assert _relative(logits, expected) <= 1e-4, _relative(logits, expected)
