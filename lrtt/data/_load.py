"""``lrtt.data.load`` (read + split + tokenize in one call) and ``raw_rows``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from lrtt.data._read import read
from lrtt.data._split import split
from lrtt.data._tokenize import Tokenized, tokenize

Paths = str | os.PathLike | Sequence[str | os.PathLike]


def raw_rows(paths: Paths, *, file_type: str | None = None):
    """``(where, row)`` of every row of the files ``paths`` names (as :func:`read` finds them),
    with no format applied: ``row`` a dict (a text file's rows are ``{"text": line}``) or, for a
    row that is not an object, the problem read (``where``: ``file:line`` or ``file row N``)."""
    from lrtt.data import _files, _rows

    for path in _files.resolve(paths, file_type_override=file_type):
        kind = _files.file_type(path, file_type)
        for where, row in _rows.rows(path, kind):
            yield where, (row if isinstance(row, dict) else str(row))


def load(
    train: Paths,
    tokenizer,
    *,
    max_len: int,
    eval: Paths | None = None,
    eval_fraction: float = 0.0,
    seed: int = 0,
    format: str = "auto",
    fields: Mapping[str, str] | None = None,
    roles: Mapping[str, str] | None = None,
    on_bad_row: str = "error",
    sample_by: str = "line",
    file_type: str | None = None,
    train_on_prompt: bool = False,
    use_chat_template: bool = False,
    add_eos: bool = True,
) -> dict[str, Tokenized]:
    """:func:`read` + (eval files or :func:`split`) + :func:`tokenize`, in one call.

    Args:
      train: the training files (a path, directory, glob or list; see :func:`read`).
      tokenizer: a transformers tokenizer (``AutoTokenizer.from_pretrained(dir)``).
      max_len: tokens per example (longer ones truncated and counted).
      eval: held-out files, read in the training files' format; or
      eval_fraction: the share of ``train``'s examples held out instead, by a hash of each
        example and ``seed`` (:func:`split`). Not both.
      seed: the split's seed.
      format, fields, roles, on_bad_row, sample_by, file_type: as :func:`read`.
      train_on_prompt, use_chat_template, add_eos: as :func:`tokenize`.

    Returns:
      ``{"train": Tokenized}`` plus ``"eval": Tokenized`` when ``eval`` or ``eval_fraction``
      is given. ``result["train"].format`` is the format read.
    """
    if eval is not None and eval_fraction:
        raise ValueError("give held-out files (`eval`) or `eval_fraction`, not both.")
    read_args = dict(fields=fields, roles=roles, on_bad_row=on_bad_row, sample_by=sample_by, file_type=file_type)
    reader = read(train, format, **read_args)
    parts = {"train": reader}
    if eval is not None:
        parts["eval"] = read(eval, reader.format, **read_args)
    elif eval_fraction:
        parts["train"], parts["eval"] = split(reader, eval_fraction, seed=seed)
    out = {}
    for name, part in parts.items():
        out[name] = tokenize(part, tokenizer, max_len=max_len, train_on_prompt=train_on_prompt,
                             use_chat_template=use_chat_template, add_eos=add_eos)
    return out
