"""CLI config validation: every shipped config parses; bad keys and types are clear errors."""

import re
from pathlib import Path

import pytest

from lrtt.cli import _config, _methods, _overrides, _resume_rules, _schema, _show, _strict_yaml, _validate

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def test_there_is_a_config_per_model_and_method():
    names = {p.stem for p in CONFIGS}
    for model in ("minilm", "smollm2"):
        for method in _methods.method_names():
            assert f"{model}_bbc_{method}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_parse(path):
    config = _config.load(path)
    assert config.model in _schema.MODELS and config.method_name in _methods.method_names()
    assert path.stem.endswith(config.method_name)


def _raw():
    return {"model": "minilm", "method": {"name": "lora", "rank": 4}, "train": {"steps": 10}}


def test_overrides_are_parsed_as_yaml():
    raw = _overrides.apply_overrides(_raw(), ["train.steps=50", "train.lr=1e-3", "method.targets=[q_proj, v_proj]"])
    config = _validate.parse(raw)
    assert config.train.steps == 50 and config.train.lr == 1e-3
    assert config.method["targets"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r["train"].update(stepz=3), r"unknown key `train.stepz`.*did you mean `steps`"),
        (lambda r: r["train"].update(steps="many"), r"`train.steps` must be int, got 'many' \(str\)"),
        (lambda r: r["train"].update(steps=True), r"`train.steps` must be int"),
        (lambda r: r.update(modle="x"), r"unknown key `modle`.*did you mean `model`"),
        (lambda r: r.update(model="gpt5"), r"`model` must be one of \['minilm', 'smollm2'\]"),
        (lambda r: r["method"].update(name="dora"), r"`method.name` must be one of"),
        (lambda r: r.pop("method"), r"missing required key `method`"),
        (lambda r: r.update(data=[1, 2]), r"`data` must be a mapping"),
        (lambda r: r["train"].update(forward="dense"), r"`train.forward` must be one of \['factored', 'merged'\]"),
        (lambda r: r["train"].update(eval_every=0), r"`train.eval_every` must be >= 1, got 0"),
        (lambda r: r["train"].update(batch_size=-4), r"`train.batch_size` must be >= 1, got -4"),
        (lambda r: r["train"].update(lr=0), r"`train.lr` must be a finite number > 0, got 0"),
        (lambda r: r.update(output={"keep": 0}), r"`output.keep` must be >= 1"),
    ],
)
def test_bad_configs_name_the_key_and_the_fix(mutate, match):
    raw = _raw()
    mutate(raw)
    with pytest.raises(_schema.ConfigError, match=match):
        _validate.parse(raw, source="x.yaml")


@pytest.fixture
def toy_method(monkeypatch):
    """A method class defined here, registered in a copy of lrtt's registry that the fixture's
    teardown (``monkeypatch.undo``) puts back: no other test sees it."""
    import dataclasses

    from lrtt.methods import Method

    monkeypatch.setattr(Method, "_REGISTRY", dict(Method._REGISTRY))

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ToyAdapter(Method):
        scale: float = 1.0

    return ToyAdapter


def test_a_new_method_class_is_known_to_the_config_by_its_name(toy_method, monkeypatch):
    assert toy_method.NAME == "toy_adapter" and "toy_adapter" in _methods.method_names()
    config = _validate.parse({**_raw(), "method": {"name": "toy_adapter", "scale": 2.0}})
    assert _methods.build_method(config) == toy_method(scale=2.0)
    with pytest.raises(_schema.ConfigError, match=r"must be one of \[.*'toy_adapter'\], got 'toy_adaptr'; did you "
                                                  r"mean `toy_adapter`"):
        _validate.parse({**_raw(), "method": {"name": "toy_adaptr"}})
    with pytest.raises(_schema.ConfigError, match=r"unknown key\(s\) \['method.rank'\] for method `toy_adapter`"):
        _methods.build_method(_validate.parse({**_raw(), "method": {"name": "toy_adapter", "rank": 4}}))
    monkeypatch.undo()  # the fixture's teardown: the class is known no more
    assert "toy_adapter" not in _methods.method_names() and "lora" in _methods.method_names()


def test_method_names_are_the_registered_classes_names(toy_method):
    import lrtt

    bundled = {"full": lrtt.FullFineTune, "lora": lrtt.LoRA, "loretta_adp": lrtt.LorettaAdp,
               "loretta_rep": lrtt.LorettaRep}
    assert {name: lrtt.Method.registered()[name] for name in bundled} == bundled
    assert set(bundled) < set(_methods.method_names())
    with pytest.raises(TypeError, match="has the NAME 'lora' of LoRA; give it another NAME"):
        class Lora(lrtt.Method):  # noqa: F841  (a second class under one name is refused when defined)
            pass


def test_ints_are_accepted_for_floats_and_bad_override_syntax_is_refused():
    config = _validate.parse({**_raw(), "train": {"lr": 1}})
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    with pytest.raises(_schema.ConfigError, match="section.key=value"):
        _overrides.apply_overrides(_raw(), ["train.steps"])
    with pytest.raises(_schema.ConfigError, match="does not exist"):
        _config.load("configs/nope.yaml")


def test_cli_reports_bad_method_settings_without_a_traceback(capsys):
    from lrtt.cli import _main as cli

    assert cli.main(["count", "configs/minilm_bbc_lora.yaml", "--set", "method.alpha=foo"]) == 2
    assert "`alpha` must be a finite, non-zero number" in capsys.readouterr().err


# --- files: every failure is one line naming the file (and the line / byte / key) ----------------

GOOD = "model: minilm\nmethod:\n  name: lora\n  rank: 8\noutput:\n  dir: runs/x\n"


def _error(path, overrides=(), names=None) -> str:
    """The ConfigError message of loading ``path``, checked to be one line that names the file
    (or ``names``: ``--set`` for an override's own errors)."""
    with pytest.raises(_schema.ConfigError) as info:
        _config.load(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert (names or str(path)) in message, message
    return message


def _write(tmp_path, content, name="run.yaml"):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def test_a_good_file_loads(tmp_path):
    config = _config.load(_write(tmp_path, GOOD))
    assert config.method == {"name": "lora", "rank": 8} and config.output.dir == "runs/x"


@pytest.mark.parametrize(
    "content, found",
    [("- model: minilm\n- method: lora\n", "found a list: [{'model': 'minilm'}, {'method': 'lora'}]"),
     ("minilm\n", "found a str: 'minilm'"), ("3\n", "found a int: 3"), ("[]\n", "found a list: []")],
)
def test_a_top_level_that_is_not_a_mapping_is_named(tmp_path, content, found):
    message = _error(_write(tmp_path, content))
    assert "the top level must be a mapping of sections (model, method" in message and found in message


def test_an_empty_file_asks_for_the_required_keys(tmp_path):
    assert "missing required key `model`" in _error(_write(tmp_path, "# nothing yet\n"))


@pytest.mark.parametrize(
    "content, key, lines",
    [
        (GOOD.replace("  rank: 8\n", "  rank: 8\n  rank: 64\n"), "`method.rank`", "line 4 and line 5"),
        ("model: minilm\nmethod: {name: lora}\nmodel: smollm2\n", "`model`", "line 1 and line 3"),
        (GOOD + "train:\n  lr: 1.0e-3\n  steps: 5\n  lr: 5.0e-3\n", "`train.lr`", "line 8 and line 10"),
        (GOOD.replace("  rank: 8\n", "  targets:\n    - {a: 1, a: 2}\n"), "`method.targets[0].a`", "line 5 and line 5"),
    ],
)
def test_a_key_given_twice_is_named_with_both_lines(tmp_path, content, key, lines):
    message = _error(_write(tmp_path, content))
    assert f"{key} is given twice, at {lines}; keep one" in message


def test_merge_keys_may_override_what_they_merge():
    loaded = _strict_yaml.load_yaml("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  x: 3\n", "f.yaml")
    assert loaded["use"] == {"x": 3, "y": 2}


def test_a_file_that_is_not_utf8_names_the_byte_offset(tmp_path):
    message = _error(_write(tmp_path, GOOD.encode() + b"train: {steps: \xff\xfe}\n"))
    offset = len(GOOD.encode()) + len("train: {steps: ")
    assert f"not UTF-8 text: byte 0xff at byte offset {offset} (line 7)" in message


def test_a_binary_file_that_decodes_names_the_byte_offset(tmp_path):
    message = _error(_write(tmp_path, "model: é\x00\x01\x02".encode()))
    assert "not a text file: control character '\\x00' at byte offset 9 (line 1)" in message


def test_a_directory_or_an_unreadable_file_is_named(tmp_path, monkeypatch):
    _write(tmp_path, GOOD, "inside.yaml")
    assert "is a directory, not a config file; give a YAML file (it holds inside.yaml)" in _error(tmp_path)
    path = _write(tmp_path, GOOD)

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_bytes", refuse)  # the tests may run as root, where chmod does not bite
    assert "cannot be read (Permission denied); check its permissions" in _error(path)


@pytest.mark.parametrize(
    "content, where",
    [
        ("model: minilm\nmethod: {name: lora\n", "at line 3, column 1 (while parsing a flow mapping at line 2, column 9)"),
        ("model: minilm\n  method: x\n", "at line 2, column 9"),
        ("model: minilm\n---\nmodel: smollm2\n", "expected a single document in the stream"),
        ("train: {steps: " + "1" * 5000 + "}\n", "has too many digits for Python (quote it if it is text) at line 1, column 16"),
    ],
)
def test_yaml_errors_are_one_line_with_the_line_and_column(tmp_path, content, where):
    message = _error(_write(tmp_path, content))
    assert "not valid YAML: " in message and where in message


def test_a_huge_value_gives_a_short_message(tmp_path):
    path = _write(tmp_path, "model: " + "x" * 2_000_000 + "\nmethod: {name: lora}\n")  # YAML reads ~2 MB/s: 1 s
    message = _error(path)
    assert len(message) < 300 and "…' (2000000 characters)" in message
    huge = "y" * 10_000_000
    for override in (f"train.forward={huge}", f"train.{huge}=1", f"output.dir={huge}\0", f"train.{huge}.x=1"):
        message = _error("configs/minilm_bbc_lora.yaml", [override], names="--set" if ".x=" in override else None)
        assert len(message) < 300 and "(1000000" in message, message[:600]
    message = _error("configs/minilm_bbc_lora.yaml", ["method.targets=[" + "y" * 1_000_000], names="--set")
    assert len(message) < 400 and "(1000016 characters)" in message  # a flow list is read by YAML: 1 MB, not 10


def test_the_cli_reports_a_bad_file_on_one_line(tmp_path, capsys):
    from lrtt.cli import _main as cli

    path = _write(tmp_path, "- a\n- b\n")
    assert cli.main(["count", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"lrtt: error: {path}: the top level must be a mapping")


# --- --set: numbers, bools and null are typed; everything else is the text as written ------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("50", 50), ("-3", -3), (" 5 ", 5), ("1e-3", 1e-3), ("5.0e-3", 5.0e-3), (".5", 0.5), ("2.", 2.0),
        ("true", True), ("False", False), ("TRUE", True), ("null", None), ("Null", None), ("~", None),
        ("none", "none"), ("yes", "yes"), ("", ""), (" ", " "), ("/x/run #1", "/x/run #1"), ("a: b", "a: b"),
        ("'2024'", "2024"), ('"a\\tb"', "a\tb"), ("'it''s'", "it's"), ("inf", "inf"), ("0x10", "0x10"),
        ("[q_proj,v_proj]", ["q_proj", "v_proj"]), ("[q_proj, v_proj]", ["q_proj", "v_proj"]),
        ("{a: 1, b: [x]}", {"a": 1, "b": ["x"]}), ("[]", []), ("^classifier/", "^classifier/"),
        ("1" * 5000, "1" * 5000),
    ],
)
def test_override_values(text, value):
    got = _overrides.override_value(text)
    assert got == value and type(got) is type(value)


def test_overrides_set_strings_as_written_and_empty_sections():
    raw = {**_raw(), "output": None}  # `output:` with nothing under it
    raw = _overrides.apply_overrides(raw, ["output.dir=/x/run #1", "train.lr = 5.0e-3", "quantize.block_size=null"])
    config = _validate.parse(raw)
    assert config.output.dir == "/x/run #1" and config.train.lr == 5e-3 and config.quantize.block_size is None
    assert _raw()["train"] == {"steps": 10}  # the input is not changed


@pytest.mark.parametrize(
    "item, match",
    [
        ("method.targets=[q_proj", r"^--set 'method.targets=\[q_proj': not valid YAML: expected ',' or '\]', but got "
                                   r"'<stream end>' at column 8 of the value .*write a YAML flow list \(\[a, b\]\), or quote"),
        ("method.x={a: 1", r"^--set 'method.x=\{a: 1': not valid YAML: .*write a YAML flow mapping"),
        ("method.x={a: 1, a: 2}", r"^--set 'method.x=\{a: 1, a: 2\}': `a` is given twice, at columns 2 and 8 of the value"),
        ("method.trainable=[ab]c", r"method.trainable=\[ab\]c.*quote the whole value to keep it as text"),
        ("output.dir='it's'", r"output.dir='it's'.*a ' inside '...' is written ''"),
        ("train.=3", r"^--set: 'train.=3' names no key"),
        ("=3", r"names no key"),
        ("a.b.c=1", r"`a.b.c` has more than one dot"),
        ("train.steps", r"is not of the form section.key=value"),
    ],
)
def test_bad_overrides_are_named(item, match):
    with pytest.raises(_schema.ConfigError, match=match) as info:
        _overrides.apply_overrides(_raw(), [item])
    assert "\n" not in str(info.value)


def test_a_section_that_is_not_a_mapping_cannot_take_a_key():
    with pytest.raises(_schema.ConfigError, match=r"`train` is not a section \(it is 5\), cannot set `train.steps`"):
        _overrides.apply_overrides({**_raw(), "train": 5}, ["train.steps=3"])


def test_a_number_for_a_string_key_suggests_quoting():
    raw = _overrides.apply_overrides(_raw(), ["output.dir=2024"])
    with pytest.raises(_schema.ConfigError, match=r"`output.dir` must be str, got 2024 \(int\); quote it"):
        _validate.parse(raw)
    assert _validate.parse(_overrides.apply_overrides(_raw(), ["output.dir='2024'"])).output.dir == "2024"
    with pytest.raises(_schema.ConfigError, match=r"`output.export` must be bool, got 'yes' \(str\); write true or false"):
        _validate.parse(_overrides.apply_overrides(_raw(), ["output.export=yes"]))


# --- strings: output.dir names a directory; no NUL anywhere ------------------------------------


@pytest.mark.parametrize("value", ["", "   ", "\t"])
def test_output_dir_must_name_a_directory(value):
    raw = _overrides.apply_overrides(_raw(), [f"output.dir={value}"])
    expected = re.escape(f"x.yaml: `output.dir` must name a directory, got {value!r}; set it")
    with pytest.raises(_schema.ConfigError, match=f"^{expected}"):
        _validate.parse(raw, source="x.yaml")


def test_an_empty_output_dir_in_a_file_is_named(tmp_path):
    assert "`output.dir` must name a directory, got ''" in _error(_write(tmp_path, GOOD.replace("runs/x", "''")))


@pytest.mark.parametrize(
    "content, match",
    [
        (GOOD.replace("runs/x", '"runs/\\0x"'), r"`output.dir` holds a NUL character \(\\x00\) at position 5: 'runs/\\x00x'"),
        (GOOD.replace("  rank: 8\n", '  targets: [q, "v\\0"]\n'), r"`method.targets\[1\]` holds a NUL character"),
        (GOOD.replace("  rank: 8\n", '  "ra\\0nk": 8\n'), r"the key 'ra\\x00nk' under `method` holds a NUL character"),
    ],
)
def test_a_nul_character_in_any_string_is_refused(tmp_path, content, match):
    path = _write(tmp_path, content)
    message = _error(path)
    assert re.search(match, message), message


def test_show_cuts_long_values():
    assert _show.show("abc") == "'abc'" and _show.show(3) == "3" and _show.show(None) == "None"
    assert _show.show("x" * 100) == "'" + "x" * 80 + "…' (100 characters)"
    assert _show.show("a\nb") == "'a\\nb'"
    assert len(_show.show(list(range(10**5)))) <= 81
    assert _show.show(10**5000) == f"an integer of {(10**5000).bit_length()} bits"
    loop = []
    loop.append(loop)
    assert _show.show(loop).endswith("...]]]]")  # a recursive list ends


# --- resuming: which keys may change --------------------------------------------------------------


def _all_keys() -> list[str]:
    """Every dotted key a RunConfig has (a method's keys as `method.*`)."""
    import dataclasses
    import typing

    keys = []
    for field in dataclasses.fields(_schema.RunConfig):
        section = typing.get_type_hints(_schema.RunConfig)[field.name]
        if dataclasses.is_dataclass(section):
            keys += [f"{field.name}.{f.name}" for f in dataclasses.fields(section)]
        else:
            keys.append(f"{field.name}.*" if section is dict else field.name)
    return keys


def test_every_key_is_either_fixed_or_applied_on_resume():
    keys = _all_keys()
    for key in keys:
        homes = [key in _resume_rules.FIXED, key in _resume_rules.APPLIES, key in _resume_rules.IDENTITY]
        assert homes.count(True) == 1, f"{key} must be in exactly one of FIXED, APPLIES (or IDENTITY): {homes}"
    assert set(_resume_rules.FIXED) | set(_resume_rules.APPLIES) | set(_resume_rules.IDENTITY) == set(keys)  # no stale key
    assert _resume_rules.IDENTITY == ("output.dir",)
    table = _resume_rules.format_table()
    assert table.startswith("| key |") and all(f"| `{key}` |" in table for key in keys)


def _config_of(*overrides):
    return _config.load("configs/minilm_bbc_lora.yaml", list(overrides))


def test_resume_changes_split_refused_and_applied():
    old = _config_of().to_dict()
    assert _resume_rules.resume_changes(old, _config_of()) == ([], [])
    new = _config_of("train.lr=5e-3", "train.steps=400", "method.rank=16", "data.seed=3", "output.dir=elsewhere",
                     "method.dropout=0.1")
    refused, applied = _resume_rules.resume_changes(old, new)
    assert refused == [
        _resume_rules.Change("method.rank", 8, 16), _resume_rules.Change("method.dropout", _resume_rules.UNSET, 0.1),
        _resume_rules.Change("data.seed", 0, 3),
    ]
    assert applied == [_resume_rules.Change("train.steps", 200, 400), _resume_rules.Change("train.lr", 2e-3, 5e-3)]


def test_resume_changes_read_missing_keys_as_defaults():
    new = _config_of("method.targets=[query, value]")
    old = new.to_dict()
    del old["quantize"], old["train"]["max_skips"], old["output"]["keep"]  # an older lrtt's config
    old["train"]["retired_key"] = 1  # a key lrtt no longer has
    old["method"]["targets"] = ("query", "value")  # a list read back as a tuple is the same list
    assert _resume_rules.resume_changes(old, new) == ([], [])
    old["train"]["on_nonfinite"] = "skip"
    old["method"].pop("alpha")
    refused, applied = _resume_rules.resume_changes(old, new)
    assert refused == [_resume_rules.Change("method.alpha", _resume_rules.UNSET, 16)]
    assert applied == [_resume_rules.Change("train.on_nonfinite", "skip", "stop")]


def test_a_change_reads_as_key_old_arrow_new():
    assert str(_resume_rules.Change("train.lr", 0.001, 0.005)) == "train.lr 0.001 → 0.005"
    assert str(_resume_rules.Change("method.alpha", _resume_rules.UNSET, 16)) == "method.alpha (not set) → 16"
    line = str(_resume_rules.Change("method.trainable", "x" * 10**6, "y"))
    assert len(line) < 150 and "(1000000 characters) → 'y'" in line


def test_docs_cli_holds_the_resume_table_as_the_code_has_it():
    from pathlib import Path

    docs = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    assert _resume_rules.format_table() in docs  # regenerate the table in docs/cli.md from format_table()
