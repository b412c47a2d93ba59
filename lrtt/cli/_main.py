"""The ``lrtt`` command: ``train``, ``eval``, ``export`` and ``count`` on a YAML config.

    lrtt train configs/minilm_bbc_loretta_rep.yaml --set train.steps=100
    lrtt train CONFIG --coordinator-address 10.0.0.2:8476 --num-processes 2 --process-id 0   # host 0 of 2
    lrtt eval configs/minilm_bbc_loretta_rep.yaml --split test
    lrtt export configs/minilm_bbc_loretta_rep.yaml --out merged/
    lrtt count configs/smollm2_bbc_loretta_rep.yaml

Exit status: 0 done; 2 a config, setting or file that does not fit (nothing in the run changed);
3 training diverged (the last good checkpoint and export are kept); 1 any other failure (the
message names it); 130 interrupted. Every failure is one line ``lrtt: error: ...``;
``LRTT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from lrtt._extras import needs_extra


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
    export = restore_options(add("export", "write the merged params of the run's latest checkpoint"))
    export.add_argument("--out", default=None, help="directory (default: <output.dir>/merged)")
    add("count", "print the trainable-parameter table (from shapes only)")
    return parser


def _message(err: BaseException) -> str:
    """One sentence for an expected failure: lrtt's messages as they are; OS errors with the path."""
    if isinstance(err, OSError) and err.strerror and not type(err).__module__.startswith("lrtt"):
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror}{where}. Check that the path exists and that you may write there."
    text = str(err) or type(err).__name__
    if type(err).__module__.startswith(("lrtt", "builtins")):
        return text
    return f"{type(err).__module__.split('.')[0]} failed: {text}"


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


def main(argv: list[str] | None = None) -> int:
    _quiet()
    if not os.environ.get("LRTT_DEBUG"):
        _quiet_orbax_leftovers()
    args = _parser().parse_args(argv)
    with needs_extra():
        from lrtt.cli import _config, _job

    try:
        config = _config.load(args.config, args.overrides)
        restore = _job.RestoreFrom(getattr(args, "restore_step", None), getattr(args, "fallback", False))
        if args.command == "train":
            from lrtt.cli import _cluster

            _cluster.join(args.coordinator_address, args.num_processes, args.process_id)
            _job.train(config, progress=not args.no_progress, restore=restore)
        elif args.command == "eval":
            print(json.dumps(_job.evaluate(config, args.split, restore), indent=2))
        elif args.command == "export":
            print(f"merged params written to {_job.export(config, out=args.out, restore=restore)}")
        else:
            method = _job.build_method(config)
            from lrtt.cli._tasks import build_task

            print(_job.count_table(build_task(config).params, method))
    except _config.ConfigError as err:
        print(f"lrtt: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lrtt: interrupted; the last committed checkpoint is kept (resume with `lrtt train`)", file=sys.stderr)
        return 130
    except Exception as err:  # every expected failure is one sentence; LRTT_DEBUG=1 for the traceback
        if os.environ.get("LRTT_DEBUG"):
            raise
        code = 3 if isinstance(err, FloatingPointError) else 2 if isinstance(err, (ValueError, TypeError)) else 1
        print(f"lrtt: error: {_message(err)}\n(set LRTT_DEBUG=1 to see the traceback)", file=sys.stderr)
        return code
    return 0

if __name__ == "__main__":
    sys.exit(main())
