"""The two real tasks the CLI runs: MiniLM topic classification and SmolLM2 language modelling.

A task bundles the model, the frozen params, tokenized BBC News splits and three pure
functions: ``apply(params, batch, rng) -> outputs``, ``loss(outputs, batch) -> scalar`` and
``metrics(outputs, batch) -> {name: (sum, count)}`` (summed over a batch, so evaluation can
average over any number of batches).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lrtt.cli._schema import ConfigError, RunConfig


@dataclasses.dataclass
class Task:
    name: str  # "classification" | "lm"
    model: Any
    params: Any
    splits: dict[str, dict[str, np.ndarray]]
    apply: Callable
    loss: Callable
    metrics: Callable
    headline: str  # the metric reported at the end ("accuracy" | "perplexity")
    source: str | None = None  # a language model's checkpoint directory (its tokenizer, chat template)
    data_format: str | None = None  # the user's files' format (text | prompt_completion | chat), else None


def _cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def _token_losses(logits, batch):
    """Next-token cross-entropy of every position but the last: ``(batch, len - 1)``."""
    ids = batch["input_ids"]
    return _cross_entropy(logits[:, :-1], ids[:, 1:])


def _lm_loss(logits, batch):
    return _token_losses(logits, batch).mean()


def _lm_metrics(logits, batch):
    losses = _token_losses(logits, batch)
    return {"loss": (losses.sum(), losses.size)}


def _masked_lm_loss(logits, batch):
    """Mean next-token loss over the tokens ``loss_mask`` counts, within each packed example."""
    from lrtt.data import masked_lm_loss

    total, count = masked_lm_loss(logits, batch)
    return total / jnp.maximum(count, 1)


def _masked_lm_metrics(logits, batch):
    from lrtt.data import masked_lm_loss

    return {"loss": masked_lm_loss(logits, batch)}


DEFAULT_EVAL_FRACTION = 0.05


def file_splits(config: RunConfig, directory: str, *, eval_files: Any = None) -> tuple[dict, str, int]:
    """``({"train", "validation", "test"}: rows, format, largest token id)`` of the user's files: read and
    tokenized by :mod:`lrtt.data` with the checkpoint's own tokenizer (``AutoTokenizer`` of
    ``directory``: its chat template, BOS/EOS), padded or packed into ``data.max_len`` rows
    (``input_ids``, ``loss_mask``, ``segment_ids``, ``positions``), memory-mapped from files
    written as the rows stream (:mod:`lrtt.cli._rowfiles`: a data set larger than memory trains). ``validation``
    and ``test`` are the same held-out rows (``data.eval`` files, or ``data.eval_fraction`` of
    ``data.train``; ``eval_files`` replaces them, for ``lrtt eval --data``). What was read — the
    format chosen, bad rows skipped, examples truncated — is printed to stderr.

    Raises:
      ConfigError: no file matched, a bad row (with ``on_bad_row: error``), no tokenizer.
    """
    import sys

    import lrtt.data
    from transformers import AutoTokenizer

    from lrtt.cli import _rowfiles

    d = config.data
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise ConfigError(f"the tokenizer of {directory!r} could not be loaded ({err}); `data.train` is tokenized "
                          "with the checkpoint's own tokenizer files (tokenizer.json, tokenizer_config.json).") from None
    if eval_files is not None:  # only these files, as the held-out rows
        train_files, held_out, fraction = eval_files, None, None
    else:
        train_files, held_out = d.train, d.eval
        fraction = None if held_out is not None else (d.eval_fraction or DEFAULT_EVAL_FRACTION)
    try:
        parts = lrtt.data.load(train_files, tokenizer, max_len=d.max_len, eval=held_out, eval_fraction=fraction or 0.0,
                               seed=d.seed, format=d.format, fields=d.fields, roles=d.roles,
                               on_bad_row=d.on_bad_row, train_on_prompt=d.train_on_prompt,
                               use_chat_template=d.chat_template)
        rows = {}
        for name, part in parts.items():
            make = lrtt.data.packed_rows if d.packing else lrtt.data.padded_rows
            limit = d.train_limit if name == "train" else d.eval_limit
            # streamed to memory-mapped files: a data set larger than memory trains
            arrays, count = _rowfiles.spill(make(part, d.max_len, part.pad_id), tuple(lrtt.data.ROW_KEYS),
                                            d.max_len, limit)
            if not count:
                raise ConfigError(f"`data.{'train' if name == 'train' else 'eval'}` gave no examples "
                                  f"({part.stats.summary()}).")
            rows[name if eval_files is None else "eval"] = arrays
            if eval_files is not None:
                name = "eval"
            held = "" if name == "train" else (f" (held out: {fraction:g} of data.train)" if fraction else " (held out)")
            print(f"data {name}{held}: {part.stats.summary()}; {count:,} rows of {d.max_len} tokens"
                  f"{' (packed)' if d.packing else ''}", file=sys.stderr)
        print(f"data: {parts['train'].format_note}", file=sys.stderr)
        rows.setdefault("train", rows["eval"])
    except (ValueError, FileNotFoundError) as err:  # lrtt.data.BadRowError is a ValueError
        raise ConfigError(f"data: {err}") from None
    too_large = int(max(int(r["input_ids"].max(initial=0)) for r in rows.values()))
    splits = {"train": rows["train"], "validation": rows["eval"], "test": rows["eval"]}
    return splits, parts["train"].format, too_large


def check_positions(config: RunConfig, positions: int, name: str) -> None:
    """Refuse ``data.max_len`` past the model's position embeddings (it would index past them)."""
    if config.data.max_len > positions:
        raise ConfigError(
            f"`data.max_len`={config.data.max_len} is past {name}'s {positions} positions "
            f"(max_position_embeddings); set data.max_len to {positions} or less."
        )


def classification_task(config: RunConfig) -> Task:
    """all-MiniLM-L6-v2 with a fresh 5-way head on BBC News topics."""
    from lrtt.cli._data import BBC_CLASSES, bbc_news, encode_classification
    from lrtt.cli.zoo import load_minilm

    model, tokenizer = load_minilm(num_labels=len(BBC_CLASSES), seed=config.train.seed)
    check_positions(config, model.config.max_position_embeddings, "all-MiniLM-L6-v2")
    raw = bbc_news(seed=config.data.seed)
    limits = {"train": config.data.train_limit, "validation": config.data.eval_limit, "test": config.data.eval_limit}
    # Each example is encoded on its own (truncated, padded to max_len): limiting first is the same, faster.
    splits = {name: encode_classification(tokenizer, examples[: limits[name]], config.data.max_len)
              for name, examples in raw.items()}

    def apply(params, batch, rng):
        del rng  # the frozen model runs deterministically; adapter dropout is the method's
        return model(batch["input_ids"], batch["attention_mask"], params=params, train=False).logits

    def loss(logits, batch):
        return _cross_entropy(logits, batch["labels"]).mean()

    def metrics(logits, batch):
        correct = (jnp.argmax(logits, -1) == batch["labels"]).sum()
        n = batch["labels"].shape[0]
        return {"accuracy": (correct, n), "loss": (_cross_entropy(logits, batch["labels"]).sum(), n)}

    return Task("classification", model, model.params, splits, apply, loss, metrics, "accuracy")


def checkpoint_tokenizer(directory: str):
    """The ``tokenizers.Tokenizer`` of a checkpoint directory (its ``tokenizer.json``).

    Raises:
      ConfigError: the directory has no ``tokenizer.json`` (naming it and the fix).
    """
    from pathlib import Path

    from tokenizers import Tokenizer

    file = Path(directory).expanduser() / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(
            f"`model.path` {str(directory)!r} holds no tokenizer.json: the language-model task tokenizes BBC News "
            "with the checkpoint's own fast tokenizer. Copy the model's tokenizer.json into the directory "
            "(transformers' AutoTokenizer.from_pretrained(...).save_pretrained(DIR) writes it)."
        )
    return Tokenizer.from_file(str(file))


def load_lm(config: RunConfig, directory: str | None = None) -> tuple[str, Any, Any, Any]:
    """``(checkpoint directory, tokenizers.Tokenizer, lrtt.models.Model, params)`` of a
    language-model config (``model: smollm2``, or ``{path: DIR, dtype: ...}``; ``directory``
    instead: a merged export of the run). Nothing is quantized here."""
    import lrtt.models

    dtype = "float32" if config.checkpoint is None else config.model["dtype"]
    if directory is None and config.checkpoint is None:
        from lrtt.cli.zoo import smollm2_checkpoint

        directory = str(smollm2_checkpoint())
    elif directory is None:
        directory = config.model["path"]
    tokenizer = checkpoint_tokenizer(directory)  # before the weights: a missing tokenizer fails at once
    try:
        model, params = lrtt.models.load(directory, dtype=dtype)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"`model.path` {str(directory)!r}: {err}") from None
    return directory, tokenizer, model, params


def lm_task(config: RunConfig, eval_files: Any = None) -> Task:
    """A causal LM loaded with :func:`lrtt.models.load` — a transformers checkpoint directory
    (``model: {path: DIR, dtype: ...}``) or the bundled SmolLM2-135M-Instruct (``model: smollm2``,
    its GGUF converted once into a checkpoint directory, float32) — with next-token loss on BBC
    News text blocks of ``max_len`` tokens, tokenized by the checkpoint's ``tokenizer.json``, or
    on the user's files (``data.train``; :func:`file_splits`): the loss over the tokens each
    example's ``loss_mask`` counts (the completion / assistant turns by default)."""
    from lrtt.cli._data import bbc_news, lm_blocks

    directory, tokenizer, model, params = load_lm(config)
    raw_config = model.config.raw
    positions = raw_config.get("max_position_embeddings", raw_config.get("n_positions"))
    if isinstance(positions, int):
        check_positions(config, positions, str(directory))
    if config.data.train is not None or eval_files is not None:
        splits, data_format, too_large = file_splits(config, directory, eval_files=eval_files)
    else:
        eos = raw_config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        raw = bbc_news(seed=config.data.seed)
        splits, data_format = {}, None
        for name, examples in raw.items():
            blocks = lm_blocks(tokenizer, [text for text, _ in examples], config.data.max_len,
                               eos_id=eos if isinstance(eos, int) else None)
            limit = config.data.train_limit if name == "train" else config.data.eval_limit
            splits[name] = {"input_ids": blocks if limit is None else blocks[:limit]}
        too_large = int(max(int(b["input_ids"].max(initial=0)) for b in splits.values()))
    if too_large >= model.config.vocab_size:
        raise ConfigError(f"`model.path` {str(directory)!r}: its tokenizer gives token id {too_large}, past the "
                          f"model's vocab_size {model.config.vocab_size}: the tokenizer is not the model's.")

    if data_format is None:
        def apply(params, batch, rng):
            del rng
            return model(params, batch["input_ids"])

        return Task("lm", model, params, splits, apply, _lm_loss, _lm_metrics, "perplexity", str(directory))

    def apply_rows(params, batch, rng):  # padded or packed rows: attention within each example
        del rng
        return model(params, batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])

    return Task("lm", model, params, splits, apply_rows, _masked_lm_loss, _masked_lm_metrics, "perplexity",
                str(directory), data_format)


def build_task(config: RunConfig, eval_files: Any = None) -> Task:
    """The task of ``config``; with ``quantize.qtype`` set, its frozen base quantized (every
    linear kernel but the head, :func:`lrtt.quantize`). ``eval_files``: a language model's
    held-out rows read from these files instead (``lrtt eval --data``)."""
    task = classification_task(config) if config.model == "minilm" else lm_task(config, eval_files)
    return dataclasses.replace(task, params=quantized_base(config, task.params))


def quantized_base(config: RunConfig, params: Any) -> Any:
    """``params`` as the run trains over them: with ``quantize.qtype`` set, every linear kernel
    but the head quantized (:func:`lrtt.quantize`), else as they are."""
    if config.quantize.qtype == "none":
        return params
    import lrtt

    return lrtt.quantize(params, "all-linear", qtype=config.quantize.qtype, block_size=config.quantize.block_size)


def summarize(sums: dict[str, tuple[float, int]]) -> dict[str, float]:
    """Averages of summed metrics, plus perplexity = exp(mean token loss) for a language model."""
    out = {name: float(total) / max(int(count), 1) for name, (total, count) in sums.items()}
    if "accuracy" not in out and "loss" in out:
        out["perplexity"] = float(np.exp(out["loss"]))
    return out
