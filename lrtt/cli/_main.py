"""The ``lrtt`` command: ``train``, ``eval``, ``export``, ``generate`` and ``count`` on a YAML config.

    lrtt train configs/minilm_bbc_loretta_rep.yaml --set train.steps=100
    lrtt train CONFIG --coordinator-address 10.0.0.2:8476 --num-processes 2 --process-id 0   # host 0 of 2
    lrtt eval configs/minilm_bbc_loretta_rep.yaml --split test
    lrtt export configs/minilm_bbc_loretta_rep.yaml --out merged/
    lrtt export my_llama.yaml --format peft --for vllm --out adapter/   # model: {path: DIR, dtype: bfloat16}
    lrtt count configs/smollm2_bbc_loretta_rep.yaml
    lrtt generate my_chat.yaml --prompt "Which topic is this article about? ..." --json
    lrtt eval my_chat.yaml --data held_out.jsonl

Exit status: 0 done; 2 a config, setting or file that does not fit (nothing in the run changed);
3 training diverged (the last good checkpoint and export are kept); 1 any other failure (the
message names it); 130 stopped by SIGINT (Ctrl-C), 143 by SIGTERM, at any moment, with one line
naming the last committed checkpoint. Every failure is one line ``lrtt: error: ...``;
``LRTT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

from lrtt._extras import needs_extra
from lrtt.cli import _signals


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrtt", description="LoRA / LoRETTA fine-tuning of Flax models.")
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name, help_text):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("config", help="a YAML config (see configs/)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a config key, e.g. --set train.steps=50 (repeatable)")
        return sub

    def restore_options(sub):
        sub.add_argument("--restore-step", type=int, default=None, metavar="N",
                         help="start from checkpoint step N instead of the newest")
        sub.add_argument("--fallback", action="store_true",
                         help="if the newest checkpoint is damaged, use the newest one that reads back whole")
        return sub

    train = restore_options(add("train", "train (or resume) the run of a config"))
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    job = train.add_argument_group(
        "multi-process job (one process per host, every one running this command)",
        "default: the variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; none set: one process",
    )
    job.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                     help="process 0's address and a free port on it (the same in every process)")
    job.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes in the job")
    job.add_argument("--process-id", type=int, default=None, metavar="I", help="this process: 0 .. N-1")
    evaluate = restore_options(add("eval", "evaluate the run's latest checkpoint"))
    evaluate.add_argument("--split", default="test", choices=("train", "validation", "test"))
    evaluate.add_argument("--data", default=None, metavar="FILES",
                          help="a language model: the loss and perplexity on these files (a path, directory or "
                               "glob), read as the config's data section says")
    generate = restore_options(add("generate", "complete prompts with the run's adapted model"))
    what = generate.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="a prompt (repeatable)")
    what.add_argument("--prompts", default=None, metavar="FILE",
                      help="prompts from a file: text lines, or JSONL/JSON/CSV/Parquet rows with `prompt`, `text` "
                           "or `messages` (a chat's last assistant turn, if any, is left out)")
    generate.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    generate.add_argument("--top-k", type=int, default=None, metavar="K")
    generate.add_argument("--top-p", type=float, default=None, metavar="P")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="end a completion at this text (repeatable; EOS always ends it)")
    generate.add_argument("--chat", choices=("auto", "yes", "no"), default="auto",
                          help="apply the checkpoint's chat template to each prompt: auto (default) when the run "
                               "trained on chat data (or prompt/completion with data.chat_template)")
    generate.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per batch (default 8)")
    generate.add_argument("--merged", default=None, metavar="DIR",
                          help="generate from this merged export (lrtt export --format hf) instead of the run's "
                               "checkpoint (factored)")
    generate.add_argument("--adapters", action="append", default=None, metavar="NAME=DIR",
                          help="many adapters on the config's base model in one batch: a PEFT LoRA directory per "
                               "name (repeatable); each --prompts row names its adapter in an `adapter` field "
                               "(missing or null: the base alone)")
    generate.add_argument("--json", action="store_true",
                          help="one JSON line per prompt: {prompt, completion, tokens} (+ adapter)")
    export = restore_options(add("export", "write the merged params of the run's latest checkpoint"))
    export.add_argument("--out", default=None, help="directory (default: <output.dir>/merged); an existing one "
                        "must be an lrtt export of this run (or an empty directory)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an lrtt export of another run at --out (never anything else)")
    export.add_argument("--format", default=None, choices=("hf", "peft", "flax"),
                        help="hf (default): the merged model as a PyTorch-format transformers checkpoint "
                             "(what transformers 5 loads); peft: the adapter as a PEFT LoRA directory; flax: the "
                             "merged transformers Flax directory (bundled models only)")
    export.add_argument("--for", dest="serve_for", default=None, choices=("vllm",),
                        help="with --format peft: refuse an adapter vLLM does not serve (rank, modules, "
                             "modules_to_save), before anything is written")
    add("count", "print the trainable-parameter table (from shapes only)")
    return parser


MAX_LINES = 4  # an error's first lines joined into the one line printed; the rest counted
MAX_CHARS = 1500  # and that line cut at this length


def _message(err: BaseException) -> str:
    """One line for an expected failure: lrtt's messages as they are (a multi-line summary
    joined: its first lines, then how many more), OS errors with the path."""
    if isinstance(err, OSError) and err.strerror and not type(err).__module__.startswith("lrtt"):
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror}{where}. Check that the path exists and that you may write there."
    text = str(err) or type(err).__name__
    if not type(err).__module__.startswith(("lrtt", "builtins")):
        text = f"{type(err).__module__.split('.')[0]} failed: {text}"
    return one_line(text)


def one_line(text: str) -> str:
    """``text`` as one line: its first :data:`MAX_LINES` lines joined with "; ", then how many
    were left out, then its last line (where lrtt's messages give the fix)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > MAX_LINES + 1:
        left_out = len(lines) - MAX_LINES - 1
        lines = [*lines[:MAX_LINES], f"… and {left_out} more line{'s' if left_out > 1 else ''}", lines[-1]]
    joined = "; ".join(lines)
    if len(joined) > MAX_CHARS:
        joined = joined[: MAX_CHARS - 1] + "…"
    return joined


def _stopped(signum: int, invocation: Any = None) -> str:
    """The one line printed when a signal stops the command: the signal and the last committed
    checkpoint of the run (read off its directory)."""
    line = f"lrtt: stopped by {_signals.NAMES.get(signum, f'signal {signum}')}"
    if invocation is None or invocation.command != "train" or not invocation.output_dir:
        return line
    run = Path(invocation.output_dir)
    steps = _signals.committed_steps(run / "checkpoints")
    if steps:
        return f"{line}; the last committed checkpoint is step {steps[-1]} in {run} (resume with `lrtt train`)"
    return f"{line}; no checkpoint of {run} has been committed (`lrtt train` starts it again)"


def _quiet_orbax_leftovers() -> None:
    """After a failed restore, orbax's pending asyncio coroutines are collected (during the
    error or when the process exits) and print "Exception ignored in: <coroutine ...>" /
    "Event loop is closed" by the hundred. The error is reported once, as a sentence; such
    unraisable leftovers (which cannot change the outcome) are not shown."""
    default = sys.unraisablehook
    if getattr(default, "lrtt_quiet", False):
        return

    def hook(unraisable):
        text = f"{unraisable.exc_value!r} {unraisable.object!r}"
        if "Event loop is closed" in text or "coroutine" in text or "orbax" in text:
            return
        default(unraisable)

    hook.lrtt_quiet = True
    sys.unraisablehook = hook


def _not_never_retrieved(record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in record.getMessage()


class _Invocation:
    """What the stop message needs to know about the command line (filled in as it is read)."""

    command: str | None = None
    output_dir: str | None = None


def main(argv: list[str] | None = None) -> int:
    invocation = _Invocation()
    with _signals.installed(lambda signum: _stopped(signum, invocation)):
        try:
            return _run(argv, invocation)
        except KeyboardInterrupt as err:  # a signal, at any moment (startup included)
            signum = getattr(err, "signum", signal.SIGINT)
            _signals.stand_down()
            print(_stopped(signum, invocation), file=sys.stderr)
            return _signals.STATUS.get(signum, 130)


def _run(argv: list[str] | None, invocation: _Invocation) -> int:
    _quiet()
    if not os.environ.get("LRTT_DEBUG"):
        _quiet_orbax_leftovers()
        # Orbax logs a failed or interrupted background save through absl with a traceback; the
        # command reports every failure itself, as one line (LRTT_DEBUG=1 shows the logs too).
        logging.getLogger("absl").setLevel(logging.CRITICAL)
        # A failed restore leaves orbax's other read tasks failed and unawaited; when they are
        # collected, asyncio logs "Task exception was never retrieved" with each traceback.
        logging.getLogger("asyncio").addFilter(_not_never_retrieved)
    args = _parser().parse_args(argv)
    invocation.command = args.command
    with needs_extra():
        from lrtt.cli import _config, _evaluate, _export, _job, _methods, _outputs, _restore, _schema

    try:
        config = _config.load(args.config, args.overrides)
        invocation.output_dir = config.output.dir
        _signals.check()
        restore = _restore.RestoreFrom(getattr(args, "restore_step", None), getattr(args, "fallback", False))
        if args.command == "train":
            from lrtt.cli import _cluster

            _cluster.join(args.coordinator_address, args.num_processes, args.process_id)
            _job.train(config, progress=not args.no_progress, restore=restore)
        elif args.command == "generate":
            from lrtt.cli import _generate

            _generate.run(config, args, restore)
        elif args.command == "eval":
            result = _evaluate.evaluate(config, args.split, restore, data=args.data)
            if "perplexity" in result:  # a language model: one JSON line {"loss", "perplexity", "tokens"}
                print(json.dumps(result))
            else:
                print(json.dumps(result, indent=2))
        elif args.command == "export":
            path = _export.export(config, out=args.out, restore=restore, overwrite=args.overwrite,
                                  format=args.format, serve_for=args.serve_for)
            what = {"peft": "PEFT adapter"}.get(args.format, "merged params")
            fmt = args.format or _export.default_format(config)
            print(f"{what} ({fmt}) written to {path}")
        else:
            method = _methods.build_method(config)
            from lrtt.cli._tasks import build_task

            print(_outputs.count_table(build_task(config).params, method))
    except _schema.ConfigError as err:
        print(f"lrtt: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        raise
    except Exception as err:  # every expected failure is one line; LRTT_DEBUG=1 for the traceback
        if os.environ.get("LRTT_DEBUG"):
            raise
        code = 3 if isinstance(err, FloatingPointError) else 2 if isinstance(err, (ValueError, TypeError)) else 1
        print(f"lrtt: error: {_message(err)} (LRTT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
