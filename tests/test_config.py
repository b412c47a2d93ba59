"""CLI config validation: every shipped config parses; bad keys and types are clear errors."""

from pathlib import Path

import pytest

from lrtt.cli import _config

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def test_there_is_a_config_per_model_and_method():
    names = {p.stem for p in CONFIGS}
    for model in ("minilm", "smollm2"):
        for method in _config.METHODS:
            assert f"{model}_bbc_{method}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_parse(path):
    config = _config.load(path)
    assert config.model in _config.MODELS and config.method_name in _config.METHODS
    assert path.stem.endswith(config.method_name)


def _raw():
    return {"model": "minilm", "method": {"name": "lora", "rank": 4}, "train": {"steps": 10}}


def test_overrides_are_parsed_as_yaml():
    raw = _config.apply_overrides(_raw(), ["train.steps=50", "train.lr=1e-3", "method.targets=[q_proj, v_proj]"])
    config = _config.parse(raw)
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
    with pytest.raises(_config.ConfigError, match=match):
        _config.parse(raw, source="x.yaml")


def test_ints_are_accepted_for_floats_and_bad_override_syntax_is_refused():
    config = _config.parse({**_raw(), "train": {"lr": 1}})
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    with pytest.raises(_config.ConfigError, match="section.key=value"):
        _config.apply_overrides(_raw(), ["train.steps"])
    with pytest.raises(_config.ConfigError, match="does not exist"):
        _config.load("configs/nope.yaml")


def test_cli_reports_bad_method_settings_without_a_traceback(capsys):
    from lrtt.cli import _main as cli

    assert cli.main(["count", "configs/minilm_bbc_lora.yaml", "--set", "method.alpha=foo"]) == 2
    assert "`alpha` must be a finite, non-zero number" in capsys.readouterr().err
