"""``lrtt generate``: the run's adapted language model completes prompts.

The model is the run's base with its checkpoint's adapter, run factored
(``lrtt.factored(model)`` over ``lrtt.wrap(method, params, adapter)``: no merged copy of the
weights), or a merged export (``--merged DIR``). Prompts are tokenized by the checkpoint's own
tokenizer; with the chat template (``--chat``, by default when the run trained on chat data)
each prompt is a user turn rendered with ``add_generation_prompt``. Decoding is
:func:`lrtt.models.generate`: one jitted prefill and one jitted decode loop over a KV cache,
greedy or sampled. A completion ends at the model's EOS (not shown) or at the first ``--stop``
text (cut there; the loop itself stops at EOS or ``--max-new-tokens``).
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

from lrtt.cli._schema import ConfigError, RunConfig

TEXT_SUFFIXES = (".txt", ".text", ".md")


def read_prompts(path: str, config: RunConfig, adapters: dict[str, Any] | None = None) -> list[Any]:
    """The prompts of a file: a text file's non-blank lines, or the rows of a JSONL / JSON / CSV /
    Parquet file holding ``messages`` (a chat: its trailing assistant turn, the reference answer,
    is left out), ``prompt`` or ``text`` (names as ``data.fields`` maps them). A chat is a list of
    ``{role, content}`` dicts, anything else a string.

    With ``adapters`` (``--adapters``: name → directory), ``(prompt, name)`` pairs: each row's
    ``adapter`` field, one of the names, or missing / null / empty for the base alone."""
    file = pathlib.Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--prompts {path!r}: no such file.")
    if file.suffix.lower() in TEXT_SUFFIXES:
        if adapters is not None:
            raise ConfigError(f"--prompts {path!r} is a text file, but --adapters needs each prompt to name its "
                              "adapter: give a JSONL file of {\"prompt\": ..., \"adapter\": NAME} rows.")
        prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        import lrtt.data

        fields = dict(config.data.fields or {})
        try:
            prompts = []
            for where, row in lrtt.data.raw_rows(str(file)):
                if not isinstance(row, dict):
                    raise ConfigError(f"--prompts {where}: {row}.")
                prompt = _prompt_of(row, fields, where)
                if adapters is not None:
                    name = row.get("adapter")
                    if name not in (None, "") and name not in adapters:
                        raise ConfigError(f"--prompts {where}: adapter {name!r} is not one of --adapters "
                                          f"{sorted(adapters)}; name one of them, or leave it out for the base.")
                    prompt = (prompt, name or None)
                prompts.append(prompt)
        except ValueError as err:
            raise ConfigError(f"--prompts {path!r}: {err}") from None
    if not prompts:
        raise ConfigError(f"--prompts {path!r} holds no prompt.")
    return prompts


def parse_adapters(values: list[str]) -> dict[str, str]:
    """``--adapters NAME=DIR`` values as ``{name: directory}`` (each a PEFT LoRA directory)."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        name = name.strip()
        if not sep or not name or not directory:
            raise ConfigError(f"--adapters {value!r}: give NAME=DIR (a name, then a PEFT adapter directory).")
        if name in out:
            raise ConfigError(f"--adapters names {name!r} twice.")
        path = pathlib.Path(directory).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"--adapters {name}={directory}: no adapter_config.json there; give a PEFT LoRA "
                              "directory (lrtt export CONFIG --format peft --out DIR writes one).")
        out[name] = str(path)
    return out


def _stacked_adapters(directories: dict[str, str], params: Any) -> tuple[Any, Any, list[str]]:
    """``(method, stack, names)``: the PEFT adapters read onto ``params`` and stacked (LoRA ranks
    padded to the largest, scales folded into B where they differ)."""
    import lrtt

    names, methods, adapters = list(directories), [], []
    for name in names:
        try:
            method, adapter = lrtt.load_peft(directories[name], params)
        except (ValueError, OSError) as err:
            raise ConfigError(f"--adapters {name}: {err}") from None
        methods.append(method)
        adapters.append(adapter)
    try:
        return methods[0], lrtt.stack(methods[0], adapters), names
    except ValueError as err:
        raise ConfigError(f"--adapters: {err}") from None


def _prompt_of(row: dict, fields: dict, where: str) -> Any:
    messages = row.get(fields.get("messages", "messages"))
    if isinstance(messages, list) and messages:
        role, content = fields.get("role", "role"), fields.get("content", "content")
        turns = [{"role": m.get(role), "content": m.get(content)} for m in messages if isinstance(m, dict)]
        while turns and turns[-1]["role"] == "assistant":
            turns.pop()
        if turns:
            return turns
    for key in ("prompt", "text"):
        value = row.get(fields.get(key, key))
        if isinstance(value, str) and value:
            return value
    raise ConfigError(f"--prompts {where}: the row has no `messages`, `prompt` or `text` to complete "
                      f"(keys: {sorted(row)}); map other names with data.fields.")


def _uses_chat(config: RunConfig, choice: str) -> bool:
    if choice != "auto":
        return choice == "yes"
    d = config.data
    if d.train is None:
        return False
    if d.format == "chat" or (d.format == "prompt_completion" and d.chat_template):
        return True
    if d.format == "auto":
        import lrtt.data

        try:
            detected = lrtt.data.read(d.train, fields=d.fields, roles=d.roles, on_bad_row="skip").format
        except (ValueError, FileNotFoundError):
            return False
        return detected == "chat" or (detected == "prompt_completion" and d.chat_template)
    return False


def encode_prompts(tokenizer: Any, prompts: list[Any], chat: bool) -> list[list[int]]:
    """Token ids of each prompt: a chat (or, with ``chat``, a string as one user turn) through the
    tokenizer's chat template with the generation prompt; a string as the tokenizer encodes it
    (its BOS included, as in training)."""
    out = []
    for prompt in prompts:
        if isinstance(prompt, list) or chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError("the checkpoint's tokenizer has no chat template (tokenizer_config.json "
                                  "`chat_template`); pass --chat no and plain-text prompts.")
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            out.append([int(i) for i in ids])
        else:
            out.append([int(i) for i in tokenizer(prompt)["input_ids"]])
    return out


def _cut(tokenizer: Any, ids: list[int], eos: set[int], stops: list[str]) -> tuple[str, list[int]]:
    """The completion's text and ids: up to (without) the first EOS, then cut before the first
    stop text (the ids: the shortest prefix whose text reaches the cut)."""
    for i, t in enumerate(ids):
        if t in eos:
            ids = ids[:i]
            break
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [text.find(s) for s in stops if s and s in text]
    if not cuts:
        return text, ids
    text = text[: min(cuts)]
    for n in range(len(ids) + 1):
        if tokenizer.decode(ids[:n], skip_special_tokens=True).startswith(text) and \
                len(tokenizer.decode(ids[:n], skip_special_tokens=True)) >= len(text):
            return text, ids[:n]
    return text, ids


def run(config: RunConfig, args: Any, restore: Any) -> None:
    """Complete ``args.prompt`` / ``args.prompts`` and print the completions (``--json``: one JSON
    line per prompt, ``{"prompt", "completion", "tokens"}``)."""
    import jax
    from transformers import AutoTokenizer

    import lrtt
    import lrtt.models
    from lrtt.cli import _methods, _restore, _tasks

    if config.model == "minilm":
        raise ConfigError("lrtt generate needs a language model (model: smollm2 or {path: DIR}); MiniLM classifies.")
    for name, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}.")
    directories = parse_adapters(args.adapters) if args.adapters else None
    if directories is not None and (args.merged is not None or args.prompts is None):
        raise ConfigError("--adapters runs the config's base model with adapters named per prompt: give --prompts "
                          "FILE (rows with an `adapter` field), and no --merged.")
    prompts = args.prompt if args.prompt is not None else read_prompts(args.prompts, config, directories)
    names: list[Any] = [None] * len(prompts)
    if directories is not None:
        prompts, names = [p for p, _ in prompts], [n for _, n in prompts]
    merged_dir = None
    if args.merged is not None:
        merged_dir = str(pathlib.Path(args.merged).expanduser())
        if not (pathlib.Path(merged_dir) / "config.json").is_file():
            raise ConfigError(f"--merged {args.merged!r} is not a merged export (no config.json); write one with "
                              "`lrtt export CONFIG --format hf --out DIR`.")
    directory, _, model, params = _tasks.load_lm(config, merged_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise ConfigError(f"the tokenizer of {directory!r} could not be loaded ({err}).") from None
    chat = _uses_chat(config, args.chat)
    token_prompts = encode_prompts(tokenizer, prompts, chat)
    stacked = None
    if directories is not None:  # the base with a stack of adapters, one per prompt
        params = _tasks.quantized_base(config, params)
        method, stacked, order = _stacked_adapters(directories, params)
        apply = lrtt.factored(model)
    elif merged_dir is None:  # the run's checkpoint, factored over the (quantized) base
        method = _methods.build_method(config)
        params = _tasks.quantized_base(config, params)
        holder = _tasks.Task("lm", model, params, {}, None, None, None, "perplexity")
        adapter = _restore.restore_adapter(config, method, holder, restore)
        params, apply = lrtt.wrap(method, params, adapter), lrtt.factored(model)
    else:
        apply = model
    eos = set(lrtt.models._generate.default_eos_token_id(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, apply=apply, pad_token_id=int(pad))
    for start in range(0, len(token_prompts), args.batch_size):
        batch = token_prompts[start: start + args.batch_size]
        per_prompt = {}
        if stacked is not None:  # params: the base; each prompt's member of the stack
            ids = [-1 if n is None else order.index(n) for n in names[start: start + args.batch_size]]
            per_prompt = dict(adapters=(method, stacked), adapter_ids=ids)
        try:
            completions = lrtt.models.generate(model, params, batch, **per_prompt, **options)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"generate: {err}") from None
        jax.block_until_ready(completions)
        for i, ids in enumerate(completions):
            prompt = prompts[start + i]
            text, kept = _cut(tokenizer, [int(t) for t in ids], eos, args.stop)
            if args.json:
                line = {"prompt": prompt, "completion": text, "tokens": kept}
                if stacked is not None:
                    line["adapter"] = names[start + i]
                print(json.dumps(line, ensure_ascii=False))
            else:
                shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
                print(f"### prompt {start + i + 1}: {shown}\n{text}\n", flush=True)
    sys.stdout.flush()
