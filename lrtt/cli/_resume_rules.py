"""Which config keys a resumed run may change: :data:`FIXED` ones (refused: the saved state
depends on them), :data:`APPLIES` ones (applied from the resumed step) and the run's
:data:`IDENTITY`; :func:`resume_changes` compares a run's saved config with the new one and
:func:`format_table` renders the classification for docs/cli.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from lrtt.cli._schema import SECTIONS, ConfigError, RunConfig
from lrtt.cli._show import show

FIXED: dict[str, str] = {  # key -> what a change would reinterpret: refused on resume
    "model": "the base weights the adapter was trained on (a name, or a checkpoint's path and dtype)",
    "method.*": "the adapter's parameters: their shapes and what they mean (name, rank, targets, tt_rank, ...)",
    "quantize.qtype": "the frozen base the adapter was trained against",
    "quantize.block_size": "the frozen base the adapter was trained against",
    "data.max_len": "the examples (LM blocks) the saved data position counts",
    "data.seed": "the shuffled order the saved data position indexes",
    "data.train_limit": "the training examples the saved data position indexes",
    "data.train": "the training examples the saved data position indexes",
    "data.eval": "which examples are held out (with eval_fraction: which are trained on)",
    "data.eval_fraction": "which examples are held out and which are trained on",
    "data.format": "how the rows are read into examples",
    "data.fields": "how the rows are read into examples",
    "data.roles": "how the rows are read into examples",
    "data.on_bad_row": "which rows are examples (skipped ones shift the data position)",
    "data.packing": "the rows the saved data position counts",
    "data.train_on_prompt": "the loss the adapter was trained on",
    "data.chat_template": "the token sequences the adapter was trained on",
    "train.batch_size": "the examples a step takes, which the saved data position counts",
    "train.accumulate": "what one step (one update) is",
    "train.seed": "the adapter's initialization and the saved random state",
}
APPLIES: dict[str, str] = {  # key -> what a change does: applies from the resumed step
    "train.steps": "where the run ends",
    "train.lr": "the learning-rate schedule",
    "train.warmup": "the learning-rate schedule",
    "train.weight_decay": "the optimizer's weight decay",
    "train.eval_every": "when validation runs",
    "train.eval_batch_size": "evaluation's batches (not its result)",
    "train.forward": "how the forward pass is computed (not its result)",
    "train.on_nonfinite": "what a non-finite step does",
    "train.max_skips": "what a non-finite step does",
    "data.eval_limit": "the validation and test examples evaluated",
    "output.save_every": "when checkpoints are written",
    "output.keep": "how many checkpoints are kept",
    "output.export": "whether the merged params are written at the end",
}
IDENTITY = ("output.dir",)  # the run itself: never compared


class _Unset:
    """A method key the config does not give (shown as ``(not set)``)."""

    def __repr__(self) -> str:
        return "(not set)"


UNSET = _Unset()


class Change(NamedTuple):
    """One key whose value differs between a run's saved config and the new one."""

    key: str  # dotted: 'train.lr', 'method.rank'
    old: Any  # UNSET for a method key the saved config does not give
    new: Any  # UNSET for a method key the new config does not give

    def __str__(self) -> str:
        return f"{self.key} {show(self.old)} → {show(self.new)}"


def _plain(value: Any) -> Any:
    """Tuples as lists (a config saved as JSON reads back lists), for comparing."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _saved(old: dict, key: str) -> Any:
    """The value of dotted ``key`` in a saved config; a missing section or key is the default."""
    section, _, field = key.partition(".")
    if not field:
        return old.get(section)
    values = old.get(section)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"the run's saved config: `{section}` must be a mapping of keys, got {show(values)}.")
    default = {f.name: f.default for f in dataclasses.fields(SECTIONS[section])}[field]
    return values.get(field, default)


def _method_changes(old: Any, new: dict) -> list[Change]:
    """The method keys that differ, key by key (a key given on one side only is a change)."""
    old = old if isinstance(old, dict) else {}
    keys = list(dict.fromkeys([*new, *old]))
    return [
        Change(f"method.{k}", old.get(k, UNSET), new.get(k, UNSET))
        for k in keys
        if k not in old or k not in new or _plain(old[k]) != _plain(new[k])
    ]


def resume_changes(old: dict, new: RunConfig) -> tuple[list[Change], list[Change]]:
    """(refused, applied): the keys that differ between a run's saved config (old, RunConfig.to_dict()
    form, possibly from an older lrtt missing some keys — missing means the default) and the new one,
    each a Change(key, old, new) NamedTuple with `key` dotted like 'train.lr'.

    ``refused`` holds the :data:`FIXED` keys (``method.*`` compared key by key, e.g.
    ``method.rank``), ``applied`` the :data:`APPLIES` keys, each in the tables' order;
    ``output.dir`` is never compared. Keys of ``old`` that lrtt no longer has are ignored.
    """
    current = new.to_dict()
    refused: list[Change] = []
    applied: list[Change] = []
    for key in (*FIXED, *APPLIES):
        if key == "method.*":
            changes = _method_changes(old.get("method"), new.method)
        else:
            section, _, field = key.partition(".")
            before, after = _saved(old, key), (current[section][field] if field else current[section])
            if key == "model" and isinstance(before, dict) and isinstance(after, dict):  # {path, dtype}: by key
                changes = [Change(f"model.{k}", before.get(k, UNSET), after.get(k, UNSET))
                           for k in dict.fromkeys([*after, *before]) if _plain(before.get(k)) != _plain(after.get(k))]
            else:
                changes = [] if _plain(before) == _plain(after) else [Change(key, before, after)]
        (refused if key in FIXED else applied).extend(changes)
    return refused, applied


def format_table() -> str:
    """:data:`FIXED` and :data:`APPLIES` as a Markdown table (for docs/cli.md)."""
    rows = ["| key | a change on resume | what the key sets |", "|---|---|---|"]
    rows += [f"| `{key}` | refused | {why} |" for key, why in FIXED.items()]
    rows += [f"| `{key}` | applies from the resumed step | {why} |" for key, why in APPLIES.items()]
    rows += [f"| `{key}` | (the run itself: not compared) | which run is resumed |" for key in IDENTITY]
    return "\n".join(rows)
