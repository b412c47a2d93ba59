"""Examples → ``input_ids`` and ``loss_mask``, tokenized as the checkpoint's tokenizer does.

The rules (docs/data.md has them with examples):

* ``text``: ``tokenizer(text)`` with the special tokens it adds itself (a BOS for Llama, none
  for SmolLM2/Qwen), then the tokenizer's EOS appended unless the sequence already ends with
  it. The loss counts every token.
* ``prompt_completion`` (strings): ``prompt + completion`` (no separator: put the space or
  newline you want in your data), the tokenizer's own special tokens around it and EOS as for
  text; the loss counts the completion and the EOS (``train_on_prompt=True``: every token).
  No chat template unless ``use_chat_template=True`` (TRL's rule: a template only for
  conversational data); then the pair is the chat ``[user: prompt, assistant: completion]``.
* ``prompt_completion`` with lists of messages, and ``chat``: the tokenizer's chat template
  renders the conversation, tokenized without adding special tokens (the template writes BOS
  where the model wants one), nothing appended. The loss counts each assistant message from
  its first content token through what the template writes after it in that message (the
  end-of-turn token such as ``<|im_end|>`` or ``<|eot_id|>``, and a newline ChatML puts
  after it): the text between ``render(messages[:i], add_generation_prompt=True)`` and
  ``render(messages[:i+1])``. For prompt/completion lists, only the completion's assistant
  messages.

Exact positions: the whole string is tokenized once, with offsets; a token belongs to the
loss when its first character lies inside a trained span. If a token straddles a span's edge
(a BPE merge across it), the string is tokenized piecewise instead, span by span, so the edge
is a token boundary as at inference, where the prompt is tokenized before the reply is
generated.

``loss_mask[t] = 1`` means token ``t`` is a target the loss counts (predicted from position
``t - 1``); the first token of an example is never one (nothing in its example precedes it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from lrtt.data._errors import BadRowError, RowProblem, Stats, check_on_bad_row, handle
from lrtt.data._format import DEFAULT_FIELDS, check_roles, format_of, normalize
from lrtt.data._read import sources

_SENTINEL = "\ue000lrtt-content\ue001"  # private-use characters: never in a template's own text
_CHUNK = 64  # examples tokenized per call of the tokenizer
_ROLES = check_roles(None)
_NO_TEMPLATE = (
    "the tokenizer has no chat template, which {what} needs: load a checkpoint whose tokenizer_config.json "
    "(or chat_template.jinja) has one, or set tokenizer.chat_template = '...' (a Jinja template such as "
    "ChatML's), or use prompt/completion strings with use_chat_template=False."
)


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text by itself (``add_special_tokens=True``)."""
    probe = "a b"
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    body = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for k in range(len(full) - len(body) + 1):
        if full[k : k + len(body)] == body:
            return list(full[:k]), list(full[k + len(body) :])
    return [], []


class Encoder:
    """Tokenizes one example (or a chunk) into ``(input_ids, loss_mask)`` lists; see the module's
    rules. ``tokenizer`` is a transformers tokenizer (``AutoTokenizer.from_pretrained(dir)``)."""

    def __init__(self, tokenizer, *, train_on_prompt: bool = False, use_chat_template: bool = False,
                 add_eos: bool = True):
        self.tokenizer = tokenizer
        self.train_on_prompt = bool(train_on_prompt)
        self.use_chat_template = bool(use_chat_template)
        self.eos_id = tokenizer.eos_token_id if add_eos else None
        self.head, self.tail = _special_tokens(tokenizer)
        self._fast = bool(getattr(tokenizer, "is_fast", False))

    # -- rendering ---------------------------------------------------------------------------
    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as err:  # jinja2.TemplateError (raise_exception), a template's own bugs
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError(_NO_TEMPLATE.format(what="chat data")) from err
            raise RowProblem("template error", f"the chat template refused the conversation ({type(err).__name__}: {err})") from None

    def _content_start(self, messages: list[dict], i: int) -> str:
        """The rendered text before assistant message ``i``'s content."""
        if i > 0:
            return self._render(messages[:i], True)
        text = self._render([{"role": "assistant", "content": _SENTINEL}], False)
        k = text.find(_SENTINEL)
        if k < 0:
            raise RowProblem("template error", "the chat template does not write an assistant message's content verbatim")
        return text[:k]

    def _chat_plan(self, messages: list[dict], trained: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(_NO_TEMPLATE.format(what="chat data"))
        full = self._render(messages, False)
        if self.train_on_prompt:
            return full, [(0, len(full))]
        if not trained:
            raise RowProblem("empty after templating", "the conversation has no assistant message: no token for the loss")
        spans: list[tuple[int, int]] = []
        for i in trained:
            before = self._content_start(messages, i)
            through = self._render(messages[: i + 1], False)
            if not (through.startswith(before) and full.startswith(through)) or (spans and len(before) < spans[-1][1]):
                raise RowProblem(
                    "template not incremental",
                    f"the chat template renders the conversation up to message {i} differently from the start of "
                    "the whole conversation (it rewrites earlier turns), so assistant tokens cannot be located "
                    "exactly; split the conversation so that its last message is the one to train on",
                )
            if len(through) > len(before):
                spans.append((len(before), len(through)))
        return full, spans

    def plan(self, example: dict[str, Any]) -> tuple[str, list[tuple[int, int]], bool]:
        """``(text, trained character spans, wrap with the tokenizer's special tokens + EOS)``."""
        kind = format_of(example)
        example = normalize(example, kind, DEFAULT_FIELDS, _ROLES)  # checks examples not from read()
        if kind == "text":
            return example["text"], [(0, len(example["text"]))], True
        if kind == "chat":
            messages = example["messages"]
            trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            return (*self._chat_plan(messages, trained), False)
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, list) or self.use_chat_template:
            if isinstance(prompt, list):
                messages = list(prompt) + list(completion)
            else:
                messages = ([{"role": "user", "content": prompt}] if prompt else [])
                messages.append({"role": "assistant", "content": completion})
            first = len(prompt) if isinstance(prompt, list) else len(messages) - 1
            trained = [i for i in range(first, len(messages)) if messages[i]["role"] == "assistant"]
            return (*self._chat_plan(messages, trained), False)
        text = prompt + completion
        return text, [(0 if self.train_on_prompt else len(prompt), len(text))], True

    # -- tokenizing --------------------------------------------------------------------------
    def _ids(self, texts: list[str], offsets: bool):
        out = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                             return_token_type_ids=False, return_offsets_mapping=offsets, verbose=False)
        return out["input_ids"], (out["offset_mapping"] if offsets else [None] * len(texts))

    def _piecewise(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        cuts = sorted({0, len(text), *(a for a, _ in spans), *(b for _, b in spans)})
        pieces = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
        ids, mask = [], []
        for (a, b), piece_ids in zip(pieces, self._ids([text[a:b] for a, b in pieces], False)[0]):
            trained = any(s <= a and b <= e for s, e in spans)
            ids += piece_ids
            mask += [int(trained)] * len(piece_ids)
        return ids, mask

    def _aligned(self, text, spans, ids, offsets) -> tuple[list[int], list[int]] | None:
        """The mask of the whole string's tokens by their first character, or None when a token
        straddles a span's edge."""
        if not spans:
            return list(ids), [0] * len(ids)
        if spans == [(0, len(text))]:
            return list(ids), [1] * len(ids)
        if offsets is None:
            return None
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        first, last = offsets[:, 0], offsets[:, 1]
        for edge in sorted({x for span in spans for x in span} - {0, len(text)}):
            if np.any((first < edge) & (edge < last)):
                return None
        starts = np.asarray([a for a, _ in spans])
        ends = np.asarray([b for _, b in spans])
        j = np.searchsorted(starts, first, side="right") - 1
        mask = (j >= 0) & (first < ends[np.maximum(j, 0)])
        return list(ids), mask.astype(np.int32).tolist()

    def encode_many(self, examples: Sequence[dict[str, Any]]) -> list[tuple[list[int], list[int]] | RowProblem]:
        """``(input_ids, loss_mask)`` per example, or the :class:`RowProblem` that makes it bad."""
        plans: list[Any] = []
        for example in examples:
            try:
                plans.append(self.plan(example))
            except RowProblem as problem:
                plans.append(problem)
        todo = [p for p in plans if not isinstance(p, RowProblem)]
        # offsets only where a span has an edge inside the text (not for plain text)
        offsets = self._fast and any(x not in (0, len(p[0])) for p in todo for span in p[1] for x in span)
        tokenized = iter(zip(*self._ids([p[0] for p in todo], offsets))) if todo else iter(())
        out: list[Any] = []
        for plan in plans:
            if isinstance(plan, RowProblem):
                out.append(plan)
                continue
            text, spans, wrap = plan
            ids, offsets = next(tokenized)
            got = self._aligned(text, spans, ids, offsets) or self._piecewise(text, spans)
            ids, mask = got
            if wrap:
                first = int(self.train_on_prompt or (spans and spans[0][0] == 0))
                ids = self.head + ids + self.tail
                mask = [first] * len(self.head) + mask + [1] * len(self.tail)
                if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
                    ids, mask = ids + [self.eos_id], mask + [1]
            if mask:
                mask[0] = 0
            if not any(mask):
                out.append(RowProblem("empty after templating", "no token of the example is counted by the loss "
                                      f"({len(ids)} tokens, none after the first in a trained part)"))
                continue
            out.append((ids, mask))
        return out

    def encode(self, example: dict[str, Any]) -> tuple[list[int], list[int]]:
        """``(input_ids, loss_mask)`` of one example.

        Raises:
          RowProblem: the example gives no token for the loss, or the template refuses it.
        """
        got = self.encode_many([example])[0]
        if isinstance(got, RowProblem):
            raise got
        return got


def pad_id_of(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS, else 0 (padding is masked
    out by ``segment_ids == 0`` whatever it is)."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value)
    return 0


class Tokenized:
    """Tokenized examples, lazy and re-iterable like their source; see :func:`tokenize`.

    Attributes:
      stats: :class:`Stats` of the latest pass (rows, bad rows skipped, truncated, tokens).
      max_len, pad_id: as given / found (``pad_id_of(tokenizer)``).
      format, format_note: the source's (a :class:`~lrtt.data.Reader`'s), else None.
    """

    def __init__(self, examples, tokenizer, *, max_len: int, train_on_prompt: bool = False,
                 use_chat_template: bool = False, add_eos: bool = True, on_bad_row: str | None = None):
        if int(max_len) < 2:
            raise ValueError(f"`max_len` must be at least 2 (a token and its target), got {max_len!r}.")
        self.examples = examples
        self.max_len = int(max_len)
        self.on_bad_row = check_on_bad_row(on_bad_row or getattr(examples, "on_bad_row", "error"))
        self.format = getattr(examples, "format", None)
        self.format_note = getattr(examples, "format_note", None)
        self.pad_id = pad_id_of(tokenizer)
        self.encoder = Encoder(tokenizer, train_on_prompt=train_on_prompt, use_chat_template=use_chat_template,
                               add_eos=add_eos)
        self.stats = Stats()

    def _chunks(self, stats: Stats) -> Iterator[list[tuple[str, Any]]]:
        chunk: list[tuple[str, Any]] = []
        for item in sources(self.examples, stats):
            chunk.append(item)
            if len(chunk) == _CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        stats = self.stats
        stats.reset()
        for chunk in self._chunks(stats):
            for (source, _), got in zip(chunk, self.encoder.encode_many([example for _, example in chunk])):
                if isinstance(got, RowProblem):
                    handle(BadRowError(source, got.reason, got.detail), self.on_bad_row, stats)
                    continue
                ids, mask = got
                if len(ids) > self.max_len:
                    stats.truncated += 1
                    ids, mask = ids[: self.max_len], mask[: self.max_len]
                    if not any(mask):
                        stats.dropped_truncated += 1
                        continue
                stats.tokenized += 1
                stats.tokens += len(ids)
                stats.loss_tokens += sum(mask)
                yield {"input_ids": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)}

    def __repr__(self) -> str:
        return f"Tokenized(max_len={self.max_len}, of {self.examples!r})"


def tokenize(
    examples: Iterable[dict[str, Any]],
    tokenizer,
    *,
    max_len: int,
    train_on_prompt: bool = False,
    use_chat_template: bool = False,
    add_eos: bool = True,
    on_bad_row: str | None = None,
) -> Tokenized:
    """Tokenize examples for a causal LM: per example ``input_ids`` and ``loss_mask``.

    Args:
      examples: a :class:`~lrtt.data.Reader` (or a :func:`~lrtt.data.split` side), or any
        iterable of example dicts with the canonical keys (``text`` / ``prompt`` + ``completion``
        / ``messages``), e.g. a ``datasets.IterableDataset`` already in those names.
      tokenizer: a transformers tokenizer, ``AutoTokenizer.from_pretrained(checkpoint_dir)``;
        chat data needs its ``chat_template``.
      max_len: longer examples are cut to their first ``max_len`` tokens and counted in
        ``stats.truncated``; one left with no loss token is dropped (``stats.dropped_truncated``).
      train_on_prompt: count the prompt (and for chat, every token) in the loss too.
      use_chat_template: render string prompt/completion pairs with the chat template as
        ``[user: prompt, assistant: completion]`` (default False: plain concatenation, TRL's rule
        for non-conversational pairs). Lists of messages always use the template.
      add_eos: append the tokenizer's EOS to text and string prompt/completion examples that do
        not end with it (chat examples end with the template's end-of-turn token instead).
      on_bad_row: ``'error'`` or ``'skip'`` for examples that give no loss token or that the chat
        template refuses; default the source's (``read(..., on_bad_row=)``), else ``'error'``.

    Returns:
      A re-iterable :class:`Tokenized`; each pass yields ``{"input_ids": (n,) int32,
      "loss_mask": (n,) int32}`` with ``2 <= n <= max_len`` typically (``n >= 1``), and
      ``loss_mask[0] == 0``.

    Raises:
      BadRowError: (while iterating) a bad example with ``on_bad_row='error'``.
      ValueError: chat data and a tokenizer without a chat template; ``max_len < 2``.
    """
    return Tokenized(examples, tokenizer, max_len=max_len, train_on_prompt=train_on_prompt,
                     use_chat_template=use_chat_template, add_eos=add_eos, on_bad_row=on_bad_row)
