"""Rows of ``max_len`` tokens — one example each (padded) or several (packed) — shuffled and
stacked into batches of numpy arrays.

Every row has four int32 arrays of length ``max_len``:

* ``input_ids``: the tokens, then ``pad_id``;
* ``loss_mask``: 1 where the token is a target the loss counts (see :mod:`lrtt.data._tokenize`);
* ``segment_ids``: 1, 2, 3, … for the 1st, 2nd, 3rd example of the row, 0 on padding;
* ``positions``: 0, 1, 2, … restarting at each example, 0 on padding.

The loss at position ``t`` (predicting token ``t + 1``) counts when ``loss_mask[t + 1] == 1``
and ``segment_ids[t + 1] == segment_ids[t] != 0``: the last token of one example never predicts
the first of the next (:func:`lrtt.data.masked_lm_loss`). Attention must not cross segments
either: that is the model's part (``segment_ids`` / ``positions`` in the decoder).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np

ROW_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")


def _row(examples: list[Mapping[str, np.ndarray]], max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    row = {key: np.zeros(max_len, np.int32) for key in ROW_KEYS}
    row["input_ids"][:] = pad_id
    at = 0
    for segment, example in enumerate(examples, start=1):
        n = len(example["input_ids"])
        row["input_ids"][at : at + n] = example["input_ids"]
        row["loss_mask"][at : at + n] = example["loss_mask"]
        row["segment_ids"][at : at + n] = segment
        row["positions"][at : at + n] = np.arange(n, dtype=np.int32)
        at += n
    return row


def _length(example: Mapping[str, np.ndarray], max_len: int) -> int:
    n = len(example["input_ids"])
    if not 1 <= n <= max_len:
        raise ValueError(
            f"an example of {n} tokens does not fit rows of max_len={max_len}; tokenize with "
            f"lrtt.data.tokenize(..., max_len={max_len}), which truncates."
        )
    return n


def padded_rows(examples: Iterable[Mapping[str, np.ndarray]], max_len: int, pad_id: int) -> Iterator[dict[str, np.ndarray]]:
    """One example per row, right-padded to ``max_len``."""
    for example in examples:
        _length(example, max_len)
        yield _row([example], max_len, pad_id)


def packed_rows(
    examples: Iterable[Mapping[str, np.ndarray]], max_len: int, pad_id: int, *, open_rows: int = 32
) -> Iterator[dict[str, np.ndarray]]:
    """Greedy first-fit packing: each example goes into the first open row with room for it
    whole (an example is never split across rows); a new row opens when none has room. At most
    ``open_rows`` rows are open: past that the oldest is emitted, and a row is emitted as soon as
    it is exactly full; the rest are emitted at the end, oldest first. Deterministic.

    Examples:
      >>> ex = [{"input_ids": np.arange(1, n + 1), "loss_mask": np.ones(n)} for n in (3, 4, 2)]
      >>> [row["segment_ids"].tolist() for row in packed_rows(ex, 6, 0)]
      [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]]
      >>> [row["positions"].tolist() for row in packed_rows(ex, 6, 0)][0]
      [0, 1, 2, 0, 1, 0]
    """
    if open_rows < 1:
        raise ValueError(f"`open_rows` must be positive, got {open_rows}.")
    rows: list[list[Mapping[str, np.ndarray]]] = []
    used: list[int] = []
    for example in examples:
        n = _length(example, max_len)
        k = next((i for i, u in enumerate(used) if u + n <= max_len), None)
        if k is None:
            if len(rows) == open_rows:
                yield _row(rows.pop(0), max_len, pad_id)
                used.pop(0)
            rows.append([])
            used.append(0)
            k = len(rows) - 1
        rows[k].append(example)
        used[k] += n
        if used[k] == max_len:
            yield _row(rows.pop(k), max_len, pad_id)
            used.pop(k)
    for row in rows:
        yield _row(row, max_len, pad_id)


def shuffled(items: Iterable, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """A buffer shuffle: the first ``buffer_size`` items fill a buffer; each next item replaces
    a random one of it, which is yielded; the rest leave in a random order. Items move at most
    about ``buffer_size`` places from where they were read, so the shuffle is global only when the
    buffer holds the whole stream. ``buffer_size <= 1`` keeps the order."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = int(rng.integers(buffer_size))
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def batches(
    examples: Iterable[Mapping[str, np.ndarray]],
    batch_size: int,
    *,
    max_len: int | None = None,
    packing: bool = False,
    pad_id: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    shuffle_buffer: int = 0,
    drop_last: bool = True,
    start: int = 0,
    open_rows: int = 32,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over tokenized examples as batches of rows: padded (one example per row) or
    packed (several per row, ``packing=True``).

    Args:
      examples: a :class:`~lrtt.data.Tokenized` (its ``max_len`` and ``pad_id`` are the
        defaults) or any iterable of ``{"input_ids", "loss_mask"}`` 1-D arrays.
      batch_size: rows per batch.
      max_len: tokens per row.
      packing: greedy first-fit packing (:func:`packed_rows`) instead of one example per row.
      pad_id: the id of padding (``tokenizer.pad_token_id``, else EOS, else 0).
      seed, epoch: the shuffle's order is ``np.random.default_rng((seed, epoch))``'s: the same
        arguments give the same batches.
      shuffle_buffer: examples in the shuffle buffer (:func:`shuffled`), before packing; 0 keeps
        the file order (use it for evaluation).
      drop_last: drop a last, partial batch (default); ``False`` fills it with empty rows
        (padding, ``segment_ids`` 0, no loss) so every batch has ``batch_size`` rows.
      start: skip the first ``start`` batches of this pass (resume at a saved position; the
        skipped examples are still read and tokenized).
      open_rows: rows kept open for packing (more: fuller rows, later emission).

    Yields:
      ``{"input_ids", "loss_mask", "segment_ids", "positions"}``, each ``(batch_size, max_len)``
      int32.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    if start < 0:
        raise ValueError(f"`start` must be >= 0, got {start}.")
    max_len = max_len if max_len is not None else getattr(examples, "max_len", None)
    if max_len is None:
        raise ValueError("`max_len` is needed: pass max_len= (or batch a lrtt.data.Tokenized, which knows it).")
    pad_id = pad_id if pad_id is not None else getattr(examples, "pad_id", 0)
    stream = shuffled(examples, shuffle_buffer, np.random.default_rng((seed, epoch)))
    rows = packed_rows(stream, max_len, pad_id, open_rows=open_rows) if packing else padded_rows(stream, max_len, pad_id)
    pending: list[dict[str, np.ndarray]] = []
    index = 0

    def stack(group):
        return {key: np.stack([row[key] for row in group]) for key in ROW_KEYS}

    for row in rows:
        pending.append(row)
        if len(pending) == batch_size:
            if index >= start:
                yield stack(pending)
            index += 1
            pending = []
    if pending and not drop_last and index >= start:
        empty = _row([], max_len, pad_id)
        yield stack(pending + [empty] * (batch_size - len(pending)))
