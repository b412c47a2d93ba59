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


from lrtt.data._errors import BadRowError as BadRowError, Stats as Stats
from lrtt.data._format import FORMATS as FORMATS, ROLES as ROLES
from lrtt.data._load import load as load, raw_rows as raw_rows
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
    "BadRowError",
    "Encoder",
    "FORMATS",
    "ROLES",
    "ROW_KEYS",
    "Reader",
    "Stats",
    "Subset",
    "Tokenized",
    "batches",
    "in_eval",
    "load",
    "loss_weights",
    "masked_lm_loss",
    "packed_rows",
    "pad_id_of",
    "padded_rows",
    "raw_rows",
    "read",
    "shuffled",
    "split",
    "tokenize",
]
