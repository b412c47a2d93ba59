"""Your own files as causal-LM training data: read, check, split, tokenize, pad or pack, batch.

    import lrtt.data
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("/models/SmolLM2-135M-Instruct")
    reader = lrtt.data.read("data/*.jsonl", fields={"prompt": "question", "completion": "answer"})
    print(reader.format_note)                        # format 'prompt_completion' (auto: ...)
    train, held_out = lrtt.data.split(reader, 0.05, seed=0)
    examples = lrtt.data.tokenize(train, tokenizer, max_len=512)
    for batch in lrtt.data.batches(examples, 8, packing=True, shuffle_buffer=10_000, seed=0, epoch=0):
        ...  # batch: input_ids, loss_mask, segment_ids, positions — (8, 512) int32 numpy
        total, count = lrtt.data.masked_lm_loss(logits, batch)
    print(examples.stats.summary())                  # rows, bad rows skipped, truncated, tokens

Everything streams: a pass holds one row of a file, a shuffle buffer and the open packed rows,
so a file larger than memory trains. Formats, file types and the tokenization rules:
docs/data.md. ``import lrtt`` does not import this package (it needs transformers, and pyarrow
for Parquet: ``pip install 'lrtt[data]'``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from lrtt.data._errors import BadRowError as BadRowError, Stats as Stats
from lrtt.data._format import FORMATS as FORMATS, ROLES as ROLES
from lrtt.data._loss import loss_weights as loss_weights, masked_lm_loss as masked_lm_loss
from lrtt.data._pack import (
    ROW_KEYS as ROW_KEYS,
    batches as batches,
    packed_rows as packed_rows,
    padded_rows as padded_rows,
    shuffled as shuffled,
)
from lrtt.data._read import Reader as Reader, read as read
from lrtt.data._split import Subset as Subset, in_eval as in_eval, split as split
from lrtt.data._tokenize import Encoder as Encoder, Tokenized as Tokenized, pad_id_of as pad_id_of, tokenize as tokenize

__all__ = [
    "FORMATS",
    "ROLES",
    "ROW_KEYS",
    "BadRowError",
    "Encoder",
    "Reader",
    "Stats",
    "Subset",
    "Tokenized",
    "batches",
    "in_eval",
    "load",
    "loss_weights",
    "masked_lm_loss",
    "pad_id_of",
    "packed_rows",
    "padded_rows",
    "read",
    "shuffled",
    "split",
    "tokenize",
]

Paths = str | os.PathLike | Sequence[str | os.PathLike]


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
