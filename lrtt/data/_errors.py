"""Bad rows and the counts of one pass: what was read, skipped, truncated."""

from __future__ import annotations

import dataclasses

from lrtt._errors import Error

ON_BAD_ROW = ("error", "skip")

_FIX = (
    "Fix the row, or pass on_bad_row='skip' (`data.on_bad_row: skip` in a config) to skip such rows; "
    "skipped rows are counted and reported."
)


class BadRowError(Error, ValueError):
    """A row that cannot become a training example.

    ``str(err)`` is ``"<file>:<line>: <what is wrong>. <how to fix it>"``; the parts are the
    attributes ``source`` (``"data.jsonl:7"``, ``"data.parquet row 12"``), ``reason`` (a short
    category, the key of :attr:`Stats.skipped`) and ``detail``.
    """

    def __init__(self, source: str, reason: str, detail: str):
        self.source, self.reason, self.detail = source, reason, detail
        super().__init__(f"{source}: {detail}. {_FIX}")


class RowProblem(Exception):
    """Internal: raised by the per-row checks, turned into a :class:`BadRowError` (or a skip)
    once the row's source is known."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def check_on_bad_row(on_bad_row: str) -> str:
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"`on_bad_row` must be 'error' or 'skip', got {on_bad_row!r}.")
    return on_bad_row


@dataclasses.dataclass
class Stats:
    """Counts of one pass over the data (reset when a new pass starts).

    Attributes:
      files: files opened.
      rows: rows read (examples and bad rows).
      examples: examples produced by the reader (for a side of :func:`~lrtt.data.split`, that
        side's).
      other_split: examples read that belong to the other side of a split.
      skipped: bad rows skipped, by reason (``{"missing field": 2, "invalid JSON": 1}``).
      first_skipped: the first skipped row of each reason, ``reason -> "file:line: detail"``.
      tokenized: examples tokenized.
      truncated: examples longer than ``max_len``, cut to ``max_len`` tokens.
      dropped_truncated: examples whose every loss token lay past ``max_len`` (dropped).
      tokens: tokens kept (after truncation).
      loss_tokens: tokens the loss counts (``loss_mask`` ones).
    """

    files: int = 0
    rows: int = 0
    examples: int = 0
    other_split: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    first_skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    tokenized: int = 0
    truncated: int = 0
    dropped_truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0

    def reset(self) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, type(getattr(self, field.name))())

    def skip(self, err: BadRowError) -> None:
        self.skipped[err.reason] = self.skipped.get(err.reason, 0) + 1
        self.first_skipped.setdefault(err.reason, f"{err.source}: {err.detail}")

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line, e.g. ``"3 files, 1,000 rows: 997 examples; 3 bad rows skipped (2 missing
        field, first data.jsonl:7: ...; 1 invalid JSON, ...); 12 truncated to max_len"``."""
        parts = [f"{self.files:,} files, {self.rows:,} rows: {self.examples:,} examples"]
        if self.other_split:
            parts[0] += f" (and {self.other_split:,} of the other split)"
        if self.skipped:
            kinds = "; ".join(
                f"{n:,} {reason}, first {self.first_skipped[reason]}" for reason, n in sorted(self.skipped.items())
            )
            parts.append(f"{self.num_skipped:,} bad rows skipped ({kinds})")
        if self.tokenized:
            parts.append(f"{self.tokenized:,} tokenized, {self.tokens:,} tokens, {self.loss_tokens:,} in the loss")
        if self.truncated:
            parts.append(f"{self.truncated:,} truncated to max_len")
        if self.dropped_truncated:
            parts.append(f"{self.dropped_truncated:,} dropped (no loss token within max_len)")
        return "; ".join(parts)


def handle(err: BadRowError, on_bad_row: str, stats: Stats | None) -> None:
    """Raise ``err`` (``on_bad_row='error'``) or count it as skipped."""
    if on_bad_row == "error":
        raise err
    if stats is not None:
        stats.skip(err)
