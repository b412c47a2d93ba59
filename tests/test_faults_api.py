"""The API fails loudly on misuse and damaged files: each error names the problem, the file, leaf
or pattern, and the fix; a failing call leaves every file on disk byte for byte as it was."""

import hashlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file, save_file

import lrtt
from conftest import tiny_model

KEY = jax.random.key(0)
# A failed tensorstore read leaves an asyncio callback that fires after its loop closed.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def tree_hash(directory) -> str:
    """One digest of every path (files and folders) under ``directory`` and every file's bytes."""
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(directory)):
        dirs.sort()
        digest.update(os.path.relpath(root, directory).encode() + b"/\0")
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def _llama_params(layers: int) -> dict:
    """Float32 params of a tiny Flax Llama with ``layers`` layers (from shapes: no init compile)."""
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=16)
    shapes = FlaxLlamaForCausalLM(config, _do_init=False).params_shape_tree
    rng = np.random.default_rng(layers)
    return jax.tree.map(lambda s: np.asarray(0.02 * rng.standard_normal(s.shape), np.float32), shapes)


# --- PEFT files: truncated safetensors, invalid JSON, NaN factors (cases 1-3) -------------------


@pytest.fixture
def peft_dir(tmp_path):
    params = tiny_model("gpt2").params
    method = lrtt.LoRA(rank=2, alpha=4, targets="qv")
    adapter = jax.tree.map(lambda x: x + 0.5, method.init(KEY, params))
    lrtt.save_peft(tmp_path, method, adapter, params)
    return str(tmp_path), params


def test_truncated_safetensors_is_an_lrtt_error_naming_the_file(peft_dir):
    directory, params = peft_dir
    file = os.path.join(directory, "adapter_model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    before = tree_hash(directory)
    with pytest.raises(lrtt.PeftFileError) as info:
        lrtt.load_peft(directory, params)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for fragment in (file, "does not read as a safetensors file", "truncated or damaged", "save the adapter again"):
        assert fragment in message, message
    assert tree_hash(directory) == before


def test_invalid_adapter_config_json_names_the_file_line_and_column(peft_dir):
    directory, params = peft_dir
    config = os.path.join(directory, "adapter_config.json")
    with open(config, "w") as f:
        f.write('{\n  "peft_type": "LORA",\n  "r": 2\n  "lora_alpha": 4\n}\n')  # missing comma, line 4
    before = tree_hash(directory)
    with pytest.raises(lrtt.PeftFileError, match=r"is not valid JSON: Expecting ',' delimiter at line 4, column 3") as info:
        lrtt.load_peft(directory, params)
    assert config in str(info.value) and isinstance(info.value, ValueError)
    assert tree_hash(directory) == before
    with open(config, "w") as f:
        f.write('["not", "a", "config"]')
    with pytest.raises(lrtt.PeftFileError, match="holds a JSON list, not an object"):
        lrtt.load_peft(directory, params)


def test_non_finite_peft_factors_are_refused_naming_the_tensors(peft_dir):
    directory, params = peft_dir
    file = os.path.join(directory, "adapter_model.safetensors")
    tensors = load_file(file)
    a0 = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    b1 = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    tensors[a0][0, 0] = np.nan
    tensors[b1][-1, -1] = np.inf
    save_file(tensors, file, metadata={"format": "pt"})
    before = tree_hash(directory)
    with pytest.raises(lrtt.NonFiniteError) as info:
        lrtt.load_peft(directory, params)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for fragment in ("2 tensor(s)", a0, b1, file, "NaN or inf", "earlier checkpoint"):
        assert fragment in message, message
    assert tree_hash(directory) == before


# --- CheckpointManager: foreign checkpoints, paths, non-finite saves, summaries (cases 4-7) ---


def _lora_state(params, rank=2, targets="qv"):
    method = lrtt.LoRA(rank=rank, targets=targets)
    adapter = jax.tree.map(lambda x: x + 0.25, method.init(KEY, params))
    tx = optax.adamw(1e-3)
    return method, adapter, tx.init(adapter), tx


@pytest.mark.parametrize("writer", ["manager", "standard_checkpointer"])
def test_a_foreign_orbax_checkpoint_is_named_as_not_lrtt_s(tmp_path, writer):
    directory = str(tmp_path / "ckpt")
    if writer == "manager":
        with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True)) as other:
            other.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.ones(3)}),
                                                  extra=ocp.args.JsonSave({"lr": 0.1})))
            other.wait_until_finished()
    else:
        os.makedirs(directory)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(directory, "5"), {"w": jnp.ones(3)})
    params = tiny_model("gpt2").params
    method, adapter, opt_state, _ = _lora_state(params)
    before = tree_hash(directory)
    mgr = lrtt.CheckpointManager(directory, method)
    for fallback in (False, True):
        with pytest.raises(lrtt.ForeignCheckpointError) as info:
            mgr.restore(adapter_like=adapter, fallback=fallback)
        message = str(info.value)
        for fragment in ("cannot restore step 5", directory, "did not write", "step 5 holds",
                         "not an lrtt adapter checkpoint", "<output.dir>/checkpoints", "orbax.checkpoint directly"):
            assert fragment in message, message
        assert "damaged" not in message
    # Saving there would mix runs, and keeping the last N would delete the foreign step.
    with pytest.raises(lrtt.ForeignCheckpointError, match="refusing to save here .*would delete them"):
        mgr.save(6, adapter, opt_state)
    mgr.close()
    assert tree_hash(directory) == before


def test_a_step_directory_or_a_run_directory_gets_a_hint(tmp_path):
    params = tiny_model("gpt2").params
    method, adapter, opt_state, _ = _lora_state(params)
    run = tmp_path / "run"
    with lrtt.CheckpointManager(run / "checkpoints", method, async_save=False) as mgr:
        mgr.save(3, adapter, opt_state)
    with pytest.raises(lrtt.CheckpointNotFoundError, match=r"looks like one step directory .* restore\(step=3"):
        lrtt.CheckpointManager(run / "checkpoints" / "3", method).restore(adapter_like=adapter)
    with pytest.raises(FileNotFoundError, match=r"subdirectory \['checkpoints'\] hold numbered steps"):
        lrtt.CheckpointManager(run, method).restore(adapter_like=adapter)


def test_a_file_path_is_refused_at_construction(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("not a directory")
    before = tree_hash(tmp_path)
    method = lrtt.LoRA(rank=2)
    with pytest.raises(lrtt.CheckpointDirectoryError, match=re.escape(f"{file} is a file")) as info:
        lrtt.CheckpointManager(file, method)
    assert isinstance(info.value, NotADirectoryError) and "checkpoints" in str(info.value)
    with pytest.raises(lrtt.CheckpointDirectoryError, match=re.escape(f"{file} is a file, not a directory")):
        lrtt.CheckpointManager(file / "sub", method)
    assert tree_hash(tmp_path) == before


def test_create_false_refuses_a_missing_directory_and_creates_nothing(tmp_path):
    params = tiny_model("gpt2").params
    method, adapter, opt_state, _ = _lora_state(params)
    missing = tmp_path / "runs" / "typo" / "checkpoints"
    with pytest.raises(lrtt.CheckpointNotFoundError, match=re.escape(f"no checkpoint directory at {missing}")) as info:
        lrtt.CheckpointManager(missing, method, create=False)
    assert isinstance(info.value, FileNotFoundError) and "create=False: nothing was created" in str(info.value)
    assert os.listdir(tmp_path) == []
    with lrtt.CheckpointManager(tmp_path / "ok", method, async_save=False) as mgr:
        mgr.save(1, adapter, opt_state)
    with lrtt.CheckpointManager(tmp_path / "ok", method, create=False) as mgr:  # an existing one opens
        assert mgr.restore(adapter_like=adapter).step == 1


def _poison(tree, paths, value):
    flat = dict(lrtt._paths.named_leaves(tree))
    for p in paths:
        flat[p] = flat[p].at[(0,) * flat[p].ndim].set(value)
    return jax.tree.unflatten(jax.tree.structure(tree), [flat[p] for p, _ in lrtt._paths.named_leaves(tree)])


def test_a_non_finite_save_is_refused_and_the_finite_steps_are_kept(tmp_path):
    params = tiny_model("gpt2").params
    method, adapter, opt_state, _ = _lora_state(params, targets="all-linear")
    mgr = lrtt.CheckpointManager(tmp_path, method, max_to_keep=1)
    mgr.save(1, adapter, opt_state)
    mgr.wait()
    before = tree_hash(tmp_path)
    adapter_paths = [p for p, _ in lrtt._paths.named_leaves(adapter)]
    nan_adapter = _poison(adapter, adapter_paths[:1], jnp.nan)
    with pytest.raises(lrtt.NonFiniteError) as info:
        mgr.save(2, nan_adapter, opt_state)
    message = str(info.value)
    for fragment in ("refusing to save checkpoint step 2", f"adapter {adapter_paths[0]}", "1 array(s)",
                     "Nothing was written for step 2", "earlier checkpoints are kept (steps [1])"):
        assert fragment in message, message
    # The optimizer state too (Adam's count is an int32 leaf: skipped), at most 5 paths named.
    opt_paths = [p for p, x in lrtt._paths.named_leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    inf_opt = _poison(opt_state, opt_paths[:7], jnp.inf)
    with pytest.raises(lrtt.NonFiniteError, match=r"7 array\(s\) hold NaN or inf: \['opt_state 0/mu/.*\] and 2 more"):
        mgr.save(2, adapter, inf_opt)
    mgr.wait()
    assert mgr.all_steps() == [1] and tree_hash(tmp_path) == before
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), mgr.restore(adapter_like=adapter).adapter, adapter))
    mgr.save(2, adapter, opt_state)  # a finite step saves, and the rotation keeps it alone
    mgr.wait()
    assert mgr.all_steps() == [2]


def test_a_mismatch_is_summarized_not_listed_leaf_by_leaf(tmp_path):
    params = tiny_model("bert").params
    method, adapter, opt_state, tx = _lora_state(params, rank=2, targets="all-linear")
    with lrtt.CheckpointManager(tmp_path, method, async_save=False) as mgr:
        mgr.save(1, adapter, opt_state)
    other = lrtt.LoRA(rank=4, targets="all-linear")
    like = lrtt.adapter_shapes(other, params)
    with pytest.raises(lrtt.CheckpointMismatchError) as info:
        lrtt.CheckpointManager(tmp_path, other).restore(adapter_like=like, opt_state_like=jax.eval_shape(tx.init, like))
    message = str(info.value)
    n_leaves = 2 * 12  # a and b of 6 kernels per layer, 2 layers
    head = message.splitlines()[0]
    counts = f"{1 + 3 * n_leaves} in all: 1 method field, {n_leaves} leaves, {2 * n_leaves} optimizer state leaves"
    assert counts in head, head
    details = message.splitlines()[1:-1]
    assert len(details) == 13, message  # 12 differences, then the count of the others
    assert details[0].strip() == "rank: checkpoint 2, now 4"
    assert details[-1].strip() == f"… and {1 + 3 * n_leaves - 12} more differences"


# --- methods: dead patterns, adapters of other params, messages (cases 8-12) --------------------


@pytest.mark.parametrize("make", [
    lambda: lrtt.LoRA(rank=4, targets="qv", trainable="nomatch_head"),
    lambda: lrtt.LorettaRep(rank=4, tt_rank=2, targets="qv", trainable=["lm_head", "nomatch_head"]),
    lambda: lrtt.LorettaAdp(bottleneck=4, tt_rank=2, tt_shape=None, train_norms=False, trainable="nomatch_head"),
    lambda: lrtt.FullFineTune(trainable="nomatch_head"),
], ids=["lora", "rep", "adp", "full"])
def test_a_trainable_pattern_that_matches_nothing_is_an_error(make):
    params = tiny_model("llama").params
    method = make()
    with pytest.raises(ValueError, match=r"`trainable` pattern 'nomatch_head' matched no leaf of the params, "
                                         r"so no leaf would train in full(.|\n)*model/layers/0/"):
        method.init(KEY, params)
    with pytest.raises(ValueError, match="nomatch_head"):
        method.plan(params)


def test_a_trainable_pattern_covered_by_the_targets_is_an_error():
    params = tiny_model("llama").params
    with pytest.raises(ValueError, match=r"`trainable` pattern 'v_proj' matched only leaves that already take an "
                                         r"adapter \(\['model/layers/0/self_attn/v_proj/kernel'"):
        lrtt.LoRA(rank=4, targets="qv", trainable="v_proj").init(KEY, params)
    adapter = lrtt.LoRA(rank=4, targets="qv", trainable=["lm_head", "embed"]).init(KEY, params)
    assert isinstance(adapter["lm_head"]["kernel"], lrtt.Trainable)


@pytest.mark.parametrize("cls", [lrtt.LoRA, lrtt.LorettaRep])
def test_a_targets_regex_that_matches_nothing_is_an_error_in_a_list(cls):
    params = tiny_model("llama").params
    with pytest.raises(ValueError, match=r"`targets` pattern 'nomatch' matched no leaf of the params, so the leaves "
                                         r"it was meant for would silently stay unadapted \(the other patterns matched 2"):
        cls(rank=4, targets=["q_proj", "nomatch"]).init(KEY, params)
    with pytest.raises(ValueError, match=r"'qv' is a preset name, and a preset is used alone"):
        cls(rank=4, targets=["qv", "o_proj"]).plan(params)
    # Presets resolve per family; lists that match, and internal exact-path look-ups, still work.
    assert len(cls(rank=4, targets="qv").plan(params)) == 4
    assert len(cls(rank=4, targets=["q_proj", "v_proj"]).plan(params)) == 4
    assert len(lrtt.select(params, ["q_proj", "nomatch"], require=False)) == 2


def test_a_user_given_adp_placement_must_match_pattern_by_pattern():
    params = tiny_model("llama").params
    with pytest.raises(ValueError, match=r"`after` pattern 'nomatch' matched no leaf"):
        lrtt.LorettaAdp(after=["down_proj/kernel$", "nomatch"], before=None, bottleneck=4).plan(params)
    reference = lrtt.LorettaAdp(bottleneck=4)  # every family's regexes: most match nothing here
    assert {t.path.split("/")[-2] for t in reference.plan(params)} == {"down_proj", "gate_proj", "up_proj"}


@pytest.mark.parametrize("op", ["wrap", "merge"])
def test_an_adapter_for_fewer_layers_is_refused(op):
    small, big = _llama_params(2), _llama_params(3)
    method = lrtt.LoRA(rank=2, targets="qv")
    adapter = method.init(KEY, small)
    with pytest.raises(ValueError) as info:
        getattr(lrtt, op)(method, big, adapter)
    message = str(info.value)
    for fragment in ("no entry for 2 of the 6 leaves that LoRA selects", "model/layers/2/self_attn/q_proj/kernel",
                     "made for other params (a model with fewer layers"):
        assert fragment in message, message
    getattr(lrtt, op)(method, small, adapter)  # its own params are fine


def test_lorettarep_rank_too_large_suggests_what_lorettarep_accepts():
    params = tiny_model("llama").params
    with pytest.raises(ValueError) as info:
        lrtt.LorettaRep(rank=20).init(KEY, params)
    message = str(info.value)
    assert "leave 'model/layers/0/self_attn/v_proj/kernel' out of `targets`" in message
    assert "rank_pattern={" not in message
    with pytest.raises(ValueError, match=re.escape("rank_pattern={'model/layers/0/self_attn/v_proj/kernel': 16}")):
        lrtt.LoRA(rank=20).init(KEY, params)


def test_lorettaadp_takes_targets_as_the_after_placement():
    params = tiny_model("bert").params
    kwargs = dict(bottleneck=4, tt_rank=2, tt_shape=None, before=None, train_norms=False)
    by_targets = lrtt.LorettaAdp(targets=r"output/dense/kernel$", **kwargs)
    by_after = lrtt.LorettaAdp(after=r"output/dense/kernel$", **kwargs)
    assert by_targets == by_after and hash(by_targets) == hash(by_after)
    assert by_targets.targets == by_targets.after == (r"output/dense/kernel$",)
    adapter = by_targets.init(KEY, params)
    positions = {e.position for e in lrtt.entries(adapter).values() if isinstance(e, lrtt.BottleneckAdapter)}
    assert positions == {"after"} and len(lrtt.entries(adapter)) == 4
    config = by_targets.to_config()
    assert "targets" not in config and lrtt.Method.from_config(config) == by_targets
    assert lrtt.Method.from_config({**config, "targets": config["after"]}) == by_targets
    with pytest.raises(ValueError, match="both `targets`=.* and `after`=.*pass one of them"):
        lrtt.LorettaAdp(targets="output/dense/kernel$", after="intermediate/dense/kernel$")
    with pytest.raises(ValueError, match="both `targets`"):
        lrtt.LorettaAdp(targets="output/dense/kernel$", after="loretta")


def test_save_peft_refuses_non_finite_factors_and_writes_nothing(tmp_path):
    params = {"layers": {"0": {"self_attn": {"q_proj": {"kernel": jnp.ones((16, 32))}}}}}
    method = lrtt.LoRA(rank=4, targets="q_proj")
    adapter = jax.tree.map(lambda x: x.at[0].set(jnp.nan), method.init(jax.random.key(0), params))
    with pytest.raises(lrtt.NonFiniteError, match=r"hold NaN or inf: \['base_model.model.layers.0.self_attn.q_proj.lora_A.weight'"):
        lrtt.save_peft(tmp_path / "out", method, adapter, params)
    assert not (tmp_path / "out").exists()


def test_an_export_that_does_not_read_back_is_an_error_and_the_previous_export_is_kept(tmp_path):
    params = {"dense": {"kernel": jnp.ones((8, 8))}}
    method = lrtt.LoRA(rank=2, targets="dense/kernel")
    adapter = method.init(jax.random.key(0), params)
    path = tmp_path / "merged"
    path.mkdir()
    (path / "config.json").write_text("{}")  # an earlier lrtt export (with its manifest)
    manifest = {"format": "lrtt-merged-export", "version": 1, "source": None, "files": {"config.json": 2}}
    (path / "lrtt-export.json").write_text(json.dumps(manifest))
    before = {f.name: f.read_bytes() for f in path.iterdir()}

    class WritesNothing:  # a save_pretrained that fails without raising (as with a full disk)
        def save_pretrained(self, directory, params):
            os.makedirs(directory, exist_ok=True)

    with pytest.raises(lrtt.ExportError, match="incomplete"):
        lrtt.export_merged(method, params, adapter, path, model=WritesNothing())
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # no staging left behind
    with pytest.raises(lrtt.ExportError, match="it is a directory"):
        lrtt.export_merged(method, params, adapter, path, format="safetensors")


def test_a_manager_that_only_reads_creates_no_directory(tmp_path):
    params = {"d": {"kernel": jnp.ones((4, 4))}}
    method = lrtt.LoRA(rank=2, targets="d/kernel")
    adapter = method.init(jax.random.key(0), params)
    missing = tmp_path / "typo" / "checkpoints"
    mgr = lrtt.CheckpointManager(missing, method)
    assert mgr.all_steps() == []
    with pytest.raises(lrtt.CheckpointNotFoundError, match="no committed checkpoint"):
        mgr.restore(adapter_like=adapter)
    assert not (tmp_path / "typo").exists()
    mgr.save(1, adapter, optax.sgd(0.1).init(adapter))  # the first save creates it
    mgr.wait()
    assert mgr.all_steps() == [1]
