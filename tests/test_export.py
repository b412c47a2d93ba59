"""`lrtt.export_merged` / `lrtt.load_merged`: the merged tiny GPT-2 in its own formats."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from transformers import FlaxGPT2LMHeadModel

import lrtt
from conftest import perturb, tiny_inputs, tiny_model

METHODS = {
    "lora": lrtt.LoRA(rank=4, alpha=8, targets="attention"),
    "rep": lrtt.LorettaRep(rank=4, tt_rank=2),
}


def _trained(name, params):
    method = METHODS[name]
    return method, perturb(method.init(jax.random.key(0), params), jax.random.key(1), scale=0.2)


def _logits(params, ids):
    return tiny_model("gpt2")(ids, params=params, train=False).logits


def _same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype


@pytest.mark.parametrize("name", ["lora", "rep"])
def test_save_pretrained_export_loads_and_matches_the_factored_model(tmp_path, name):
    model = tiny_model("gpt2")
    params = model.params
    method, adapter = _trained(name, params)
    merged = lrtt.export_merged(method, params, adapter, tmp_path, model=model)
    assert os.path.exists(tmp_path / "config.json")
    _, loaded = FlaxGPT2LMHeadModel.from_pretrained(tmp_path, _do_init=False)
    _same_tree(loaded, params)
    ids = tiny_inputs(batch=2, seq=8)
    logits = jax.jit(_logits)  # one compile for the three same-shaped trees (eager dispatch is the slow part)
    factored = jax.jit(lrtt.factored(_logits))(lrtt.wrap(method, params, adapter), ids)
    reloaded = logits(loaded, ids)
    np.testing.assert_allclose(reloaded, factored, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(reloaded, logits(merged, ids))
    assert float(jnp.abs(reloaded - logits(params, ids)).max()) > 1e-3  # the adapter mattered


@pytest.mark.parametrize("suffix", [".safetensors", ".msgpack"])
def test_plain_pytree_formats_keep_the_base_dtype(tmp_path, suffix):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny_model("gpt2").params)
    method, adapter = _trained("lora", params)
    path = tmp_path / f"merged{suffix}"
    merged = lrtt.export_merged(method, params, adapter, path)
    _same_tree(merged, params)  # bf16 in, bf16 out (the sum is formed in float32)
    for loaded in (lrtt.load_merged(path, like=params), lrtt.load_merged(path)):
        flat = dict(lrtt._paths.named_leaves(loaded))
        for p, x in lrtt._paths.named_leaves(merged):
            assert flat[p].dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(flat[p], np.float32), np.asarray(x, np.float32))
    _same_tree(lrtt.load_merged(path, like=params), params)


def test_safetensors_names_are_the_slash_joined_paths(tmp_path):
    params = tiny_model("gpt2").params
    method, adapter = _trained("rep", params)
    path = tmp_path / "m.safetensors"
    lrtt.export_merged(method, params, adapter, path)
    with safe_open(path, framework="np") as f:
        assert set(f.keys()) == {p for p, _ in lrtt._paths.named_leaves(params)}
        assert f.metadata() == {"format": "lrtt-merged"}


def test_merged_inference_is_the_base_program():
    """Same structure, shapes and dtypes: the jitted inference step compiles to the same HLO."""
    params = tiny_model("gpt2").params
    method, adapter = _trained("lora", params)
    merged = lrtt.merge(method, params, adapter)
    ids = jnp.asarray(tiny_inputs(batch=2, seq=8))
    infer = jax.jit(_logits)
    assert infer.lower(merged, ids).as_text() == infer.lower(params, ids).as_text()


def test_export_errors(tmp_path):
    params = tiny_model("gpt2").params
    with pytest.raises(ValueError, match="cannot be merged"):
        adp = lrtt.LorettaAdp(bottleneck=4, tt_rank=2, tt_shape=None)
        lrtt.export_merged(adp, params, adp.init(jax.random.key(0), params), tmp_path / "x.safetensors")
    method, adapter = _trained("lora", params)
    with pytest.raises(ValueError, match="cannot tell the format"):
        lrtt.export_merged(method, params, adapter, tmp_path / "merged.bin")
    with pytest.raises(ValueError, match="`format` must be one of"):
        lrtt.export_merged(method, params, adapter, tmp_path / "m.safetensors", format="gguf")
    with pytest.raises(ValueError, match="needs `model`"):
        lrtt.export_merged(method, params, adapter, tmp_path, format="pretrained")
    with pytest.raises(ValueError, match=r"must end in \.safetensors or \.msgpack"):
        lrtt.load_merged(tmp_path / "m.bin")
    assert json.loads(json.dumps(method.to_config()))["method"] == "LoRA"


# --- What is at `path`: lrtt replaces only the exports it wrote (issue "Nothing lost, round two") ---

SMALL = {"dense": {"kernel": jnp.ones((8, 8))}}


def _small():
    method = lrtt.LoRA(rank=2, targets="dense/kernel")
    return method, perturb(method.init(jax.random.key(0), SMALL), jax.random.key(1))


def _gpt2_export(path, **kwargs):
    model = tiny_model("gpt2")
    method, adapter = _trained("lora", model.params)
    return lrtt.export_merged(method, model.params, adapter, path, model=model, **kwargs)


def _snapshot(root):
    """Every file and folder under ``root`` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _manifest(path):
    return json.loads((path / "lrtt-export.json").read_text())


def test_a_directory_export_lists_exactly_its_files_in_its_manifest(tmp_path):
    out = tmp_path / "merged"
    _gpt2_export(out, source="runs/a")
    manifest = _manifest(out)
    assert manifest["format"] == "lrtt-merged-export" and manifest["version"] == 1
    assert manifest["source"] == "runs/a"
    on_disk = {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    assert manifest["files"] == {k: v for k, v in on_disk.items() if k != "lrtt-export.json"}
    assert "config.json" in manifest["files"] and "flax_model.msgpack" in manifest["files"]
    target = lrtt.io.inspect_export(out)
    assert (target.kind, target.source, target.is_dir) == ("lrtt", "runs/a", True)
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # no staging left behind


def test_a_directory_with_user_files_is_refused_and_kept_byte_identical(tmp_path):
    out = tmp_path / "u"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.tex").write_text("\\section{Results}")
    (out / "sub" / "data.csv").write_text("1,2\n")
    before = _snapshot(out)
    for overwrite in (False, True):
        with pytest.raises(lrtt.ExportError) as e:
            _gpt2_export(out, overwrite=overwrite)
        message = str(e.value)
        assert "\n" not in message and str(out) in message
        assert "holding 2 files: ['sub/', 'thesis.tex']" in message and "no lrtt-export.json" in message
        assert "choose another path" in message and "even with overwrite=True" in message
        assert _snapshot(out) == before
    with pytest.raises(lrtt.ExportError, match="lrtt did not write"):  # refused before any merge work
        lrtt.export_merged(object(), {}, {}, out, model=tiny_model("gpt2"))
    assert sorted(os.listdir(tmp_path)) == ["u"]
    assert lrtt.io.inspect_export(out).kind == "foreign"


def test_a_user_file_that_appears_during_the_export_is_kept(tmp_path):
    out = tmp_path / "u"
    out.mkdir()
    model = tiny_model("gpt2")
    method, adapter = _trained("lora", model.params)

    class UserSavesMeanwhile:  # the export is staged; meanwhile the user saves a file into `out`
        def save_pretrained(self, directory, params):
            model.save_pretrained(directory, params=params)
            (out / "thesis.tex").write_text("draft")

    with pytest.raises(lrtt.ExportError, match=r"holding 1 file: \['thesis.tex'\]"):
        lrtt.export_merged(method, model.params, adapter, out, model=UserSavesMeanwhile())
    assert _snapshot(out) == {"thesis.tex": b"draft"} and sorted(os.listdir(tmp_path)) == ["u"]


def test_an_empty_directory_is_written_into(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert lrtt.io.inspect_export(out).kind == "empty"
    _gpt2_export(out)
    assert (out / "config.json").is_file() and _manifest(out)["source"] is None


def test_a_directory_export_of_the_same_source_is_replaced_another_needs_overwrite(tmp_path):
    out = tmp_path / "merged"
    _gpt2_export(out, source="runs/a")
    first = _snapshot(out)
    _gpt2_export(out, source="runs/a")  # the same run exports again: replaced
    assert _manifest(out)["source"] == "runs/a"
    with pytest.raises(lrtt.ExportError, match=r"holds the lrtt export of 'runs/a', not of 'runs/b'; pass overwrite=True \(lrtt export --overwrite\)") as e:
        _gpt2_export(out, source="runs/b")
    assert "\n" not in str(e.value) and str(out) in str(e.value)
    assert _snapshot(out).keys() == first.keys() and _manifest(out)["source"] == "runs/a"
    _gpt2_export(out, source="runs/b", overwrite=True)
    assert _manifest(out)["source"] == "runs/b"
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_an_lrtt_export_with_a_user_file_added_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "merged"
    _gpt2_export(out, source="runs/a")
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    for source, overwrite in (("runs/a", False), ("runs/b", True)):
        with pytest.raises(lrtt.ExportError, match=r"holds 1 file lrtt did not write: \['notes.txt'\]"):
            _gpt2_export(out, source=source, overwrite=overwrite)
        assert _snapshot(out) == before


@pytest.mark.parametrize("damage, expected", [
    (lambda out: (out / "lrtt-export.json").write_text("{not json"), "is not a valid lrtt export manifest"),
    (lambda out: (out / "lrtt-export.json").write_text('{"format": "lrtt-merged-export", "version": 1, '
                                                       '"source": null, "files": {"../x": 1}}'), "is not a valid"),
    (lambda out: (out / "config.json").write_text("{}"), "changed since lrtt wrote it ('config.json' has 2 bytes"),
    (lambda out: (out / "flax_model.msgpack").unlink(), "'flax_model.msgpack' is missing"),
], ids=["invalid-json", "path-outside", "resized", "missing"])
def test_a_damaged_directory_export_is_refused_even_with_overwrite(tmp_path, damage, expected):
    out = tmp_path / "merged"
    _gpt2_export(out)
    damage(out)
    before = _snapshot(out)
    with pytest.raises(lrtt.ExportError, match=re.escape(expected)):
        _gpt2_export(out, overwrite=True)
    assert _snapshot(out) == before


def test_a_previous_lrtt_export_is_kept_when_the_new_one_does_not_read_back(tmp_path):
    out = tmp_path / "merged"
    _gpt2_export(out)
    before = _snapshot(out)
    method, adapter = _trained("lora", tiny_model("gpt2").params)

    class WritesNothing:  # a save_pretrained that fails without raising (as with a full disk)
        def save_pretrained(self, directory, params):
            os.makedirs(directory, exist_ok=True)

    with pytest.raises(lrtt.ExportError, match="incomplete"):
        lrtt.export_merged(method, tiny_model("gpt2").params, adapter, out, model=WritesNothing())
    assert _snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["merged"]


def test_a_safetensors_export_records_its_source_and_is_replaced_by_the_same_source(tmp_path):
    method, adapter = _small()
    path = tmp_path / "m.safetensors"
    lrtt.export_merged(method, SMALL, adapter, path, source="runs/a")
    with safe_open(path, framework="np") as f:
        assert f.metadata() == {"format": "lrtt-merged", "source": "runs/a"}
    lrtt.export_merged(method, SMALL, adapter, path, source="runs/a")
    before = path.read_bytes()
    with pytest.raises(lrtt.ExportError, match=r"holds the lrtt export of 'runs/a', not of None; pass overwrite=True"):
        lrtt.export_merged(method, SMALL, adapter, path)
    assert path.read_bytes() == before
    lrtt.export_merged(method, SMALL, adapter, path, overwrite=True)
    with safe_open(path, framework="np") as f:
        assert f.metadata() == {"format": "lrtt-merged"}
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def _foreign_safetensors(path):
    from safetensors.numpy import save_file

    save_file({"w": np.ones((2, 2), np.float32)}, str(path), metadata={"format": "pt"})


def _msgpack(path):
    from flax import serialization

    path.write_bytes(serialization.to_bytes({"w": np.ones((2, 2), np.float32)}))


@pytest.mark.parametrize("name, write, expected, overwrite_replaces", [
    ("m.safetensors", _foreign_safetensors, "a safetensors file lrtt did not write", False),
    ("m.msgpack", _msgpack, "a msgpack file, which carries no mark", True),
    ("m.safetensors", lambda p: p.write_text("keep me"), "a file lrtt did not write (7 bytes", False),
    ("m.msgpack", lambda p: p.write_bytes(b""), "a file lrtt did not write (0 bytes", False),
], ids=["foreign-safetensors", "msgpack", "text", "empty"])
def test_a_file_lrtt_did_not_mark_is_refused(tmp_path, name, write, expected, overwrite_replaces):
    method, adapter = _small()
    path = tmp_path / name
    write(path)
    before = path.read_bytes()
    with pytest.raises(lrtt.ExportError, match=re.escape(expected)) as e:
        lrtt.export_merged(method, SMALL, adapter, path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert path.read_bytes() == before
    if overwrite_replaces:
        assert "pass overwrite=True (lrtt export --overwrite)" in str(e.value)
        lrtt.export_merged(method, SMALL, adapter, path, overwrite=True)
        assert path.read_bytes() != before
        np.testing.assert_array_equal(lrtt.load_merged(path)["dense"]["kernel"], lrtt.merge(method, SMALL, adapter)["dense"]["kernel"])
    else:
        with pytest.raises(lrtt.ExportError, match="even with overwrite=True"):
            lrtt.export_merged(method, SMALL, adapter, path, overwrite=True)
        assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [name]


def test_inspect_export_says_what_is_there(tmp_path):
    method, adapter = _small()
    inspect = lrtt.io.inspect_export
    assert inspect(tmp_path / "nothing").kind == "absent"
    lrtt.export_merged(method, SMALL, adapter, tmp_path / "m.safetensors", source="r")
    target = inspect(tmp_path / "m.safetensors")
    assert (target.kind, target.source, target.detail) == ("lrtt", "r", "the lrtt export of 'r'")
    assert target.replaceable("r") and not target.replaceable("s") and target.replaceable("s", overwrite=True)
    lrtt.export_merged(method, SMALL, adapter, tmp_path / "m.msgpack")
    unmarked = inspect(tmp_path / "m.msgpack")
    assert unmarked.kind == "unmarked" and not unmarked.replaceable() and unmarked.replaceable(overwrite=True)
    foreign = inspect(tmp_path)
    assert foreign.kind == "foreign" and foreign.is_dir and not foreign.replaceable(overwrite=True)
    assert "['m.msgpack', 'm.safetensors']" in foreign.detail


def test_source_and_overwrite_are_checked(tmp_path):
    method, adapter = _small()
    with pytest.raises(ValueError, match="`source` must be a string"):
        lrtt.export_merged(method, SMALL, adapter, tmp_path / "m.safetensors", source=3)
    with pytest.raises(ValueError, match="`overwrite` must be True or False"):
        lrtt.export_merged(method, SMALL, adapter, tmp_path / "m.safetensors", overwrite="yes")
    assert os.listdir(tmp_path) == []
