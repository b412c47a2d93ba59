"""The ``lrtt`` command: ``train``, ``eval``, ``export`` and ``count`` on a YAML config.

    lrtt train configs/minilm_bbc_loretta_rep.yaml --set train.steps=100
    lrtt eval configs/minilm_bbc_loretta_rep.yaml --split test
    lrtt export configs/minilm_bbc_loretta_rep.yaml --out merged/
    lrtt count configs/smollm2_bbc_loretta_rep.yaml
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

    train = add("train", "train (or resume) the run of a config")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate = add("eval", "evaluate the run's latest checkpoint")
    evaluate.add_argument("--split", default="test", choices=("train", "validation", "test"))
    export = add("export", "write the merged params of the run's latest checkpoint")
    export.add_argument("--out", default=None, help="directory (default: <output.dir>/merged)")
    add("count", "print the trainable-parameter table (from shapes only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet()
    args = _parser().parse_args(argv)
    with needs_extra():
        from lrtt.cli import _config, _job

    try:
        config = _config.load(args.config, args.overrides)
        if args.command == "train":
            _job.train(config, progress=not args.no_progress)
        elif args.command == "eval":
            print(json.dumps(_job.evaluate(config, args.split), indent=2))
        elif args.command == "export":
            print(f"merged params written to {_job.export(config, out=args.out)}")
        else:
            method = _job.build_method(config)
            from lrtt.cli._tasks import build_task

            print(_job.count_table(build_task(config).params, method))
    except _config.ConfigError as err:
        print(f"lrtt: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as err:  # lrtt's errors for bad settings (no target matched, ...)
        if os.environ.get("LRTT_DEBUG"):
            raise
        print(f"lrtt: error: {err}\n(set LRTT_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
