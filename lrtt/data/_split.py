"""A held-out split of a stream, decided per example by a seeded hash of its content."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

from lrtt.data._errors import Stats
from lrtt.data._read import sources


def in_eval(example: Any, fraction: float, seed: int) -> bool:
    """Whether ``example`` belongs to the held-out split: ``u < fraction`` with ``u`` in [0, 1)
    from BLAKE2b (keyed by ``seed``) of the example's canonical JSON."""
    if fraction <= 0:
        return False
    text = json.dumps(example, sort_keys=True, ensure_ascii=False, default=str)
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < fraction


class Subset:
    """The train or eval side of :func:`split`: lazy and re-iterable like its source."""

    def __init__(self, source: Iterable[Any], fraction: float, seed: int, held_out: bool):
        self.source, self.fraction, self.seed, self.held_out = source, fraction, seed, held_out
        self.format = getattr(source, "format", None)
        self.format_note = getattr(source, "format_note", None)
        self.on_bad_row = getattr(source, "on_bad_row", None)
        self.stats = Stats()

    def with_sources(self, stats: Stats | None = None) -> Iterator[tuple[str, Any]]:
        for where, example in sources(self.source, stats):
            if in_eval(example, self.fraction, self.seed) == self.held_out:
                yield where, example
            elif stats is not None:  # read, but the other side's
                stats.examples -= 1
                stats.other_split += 1

    def __iter__(self) -> Iterator[Any]:
        self.stats.reset()
        for _, example in self.with_sources(self.stats):
            yield example

    def __repr__(self) -> str:
        side = "eval" if self.held_out else "train"
        return f"Subset({side}, fraction={self.fraction}, seed={self.seed}, of {self.source!r})"


def split(examples: Iterable[Any], eval_fraction: float, *, seed: int = 0) -> tuple[Subset, Subset]:
    """``(train, eval)``: each example goes to ``eval`` with probability ``eval_fraction``,
    decided by a hash of its content and ``seed`` — deterministic, independent of file order
    and of the other examples, and identical examples always land on the same side (no leak).

    Both sides stream their source (a pass over ``eval`` reads all the files, skipping the
    training examples): for large data, prefer separate eval files, or keep a slice of the
    eval side in memory (``list(itertools.islice(tokenized_eval, n))``). The eval share is
    ``eval_fraction`` on average, not exactly.

    Args:
      examples: a :class:`Reader` (or any re-iterable of example dicts).
      eval_fraction: in [0, 1).
      seed: the split; the same seed gives the same split on any machine.

    Returns:
      ``(train, eval)`` :class:`Subset` views; bad rows are counted in the ``stats`` of
      whichever view is iterated.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"`eval_fraction` must be in [0, 1), got {eval_fraction!r}; e.g. eval_fraction=0.05.")
    return Subset(examples, eval_fraction, seed, False), Subset(examples, eval_fraction, seed, True)
