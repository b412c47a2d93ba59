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

from lrtt.cli._config import ConfigError, RunConfig


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


def lm_task(config: RunConfig) -> Task:
    """A causal LM loaded with :func:`lrtt.models.load` — a transformers checkpoint directory
    (``model: {path: DIR, dtype: ...}``) or the bundled SmolLM2-135M-Instruct (``model: smollm2``,
    its GGUF converted once into a checkpoint directory, float32) — with next-token loss on BBC
    News text blocks of ``max_len`` tokens, tokenized by the checkpoint's ``tokenizer.json``."""
    import lrtt.models
    from lrtt.cli._data import bbc_news, lm_blocks

    if config.checkpoint is None:
        from lrtt.cli.zoo import smollm2_checkpoint

        directory, dtype = str(smollm2_checkpoint()), "float32"
    else:
        directory, dtype = config.model["path"], config.model["dtype"]
    tokenizer = checkpoint_tokenizer(directory)  # before the weights: a missing tokenizer fails at once
    try:
        model, params = lrtt.models.load(directory, dtype=dtype)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"`model.path` {str(directory)!r}: {err}") from None
    raw_config = model.config.raw
    positions = raw_config.get("max_position_embeddings", raw_config.get("n_positions"))
    if isinstance(positions, int):
        check_positions(config, positions, str(directory))
    eos = raw_config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    raw = bbc_news(seed=config.data.seed)
    splits = {}
    for name, examples in raw.items():
        blocks = lm_blocks(tokenizer, [text for text, _ in examples], config.data.max_len,
                           eos_id=eos if isinstance(eos, int) else None)
        limit = config.data.train_limit if name == "train" else config.data.eval_limit
        splits[name] = {"input_ids": blocks if limit is None else blocks[:limit]}
    too_large = int(max(int(b["input_ids"].max(initial=0)) for b in splits.values()))
    if too_large >= model.config.vocab_size:
        raise ConfigError(f"`model.path` {str(directory)!r}: its tokenizer.json gives token id {too_large}, past the "
                          f"model's vocab_size {model.config.vocab_size}: the tokenizer is not the model's.")

    def apply(params, batch, rng):
        del rng
        return model(params, batch["input_ids"])

    return Task("lm", model, params, splits, apply, _lm_loss, _lm_metrics, "perplexity")


def build_task(config: RunConfig) -> Task:
    """The task of ``config``; with ``quantize.qtype`` set, its frozen base quantized (every
    linear kernel but the head, :func:`lrtt.quantize`)."""
    task = classification_task(config) if config.model == "minilm" else lm_task(config)
    if config.quantize.qtype != "none":
        import lrtt

        params = lrtt.quantize(task.params, "all-linear", qtype=config.quantize.qtype,
                               block_size=config.quantize.block_size)
        task = dataclasses.replace(task, params=params)
    return task


def summarize(sums: dict[str, tuple[float, int]]) -> dict[str, float]:
    """Averages of summed metrics, plus perplexity = exp(mean token loss) for a language model."""
    out = {name: float(total) / max(int(count), 1) for name, (total, count) in sums.items()}
    if "accuracy" not in out and "loss" in out:
        out["perplexity"] = float(np.exp(out["loss"]))
    return out
