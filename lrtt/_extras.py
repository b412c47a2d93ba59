"""Optional dependencies: a missing one is named with the extra that installs it.

    with needs_extra():
        import transformers

raises ``ModuleNotFoundError: `transformers` is not installed; ... pip install 'lrtt[hf]'``
instead of a bare import error. Modules not listed here re-raise unchanged.
"""

from __future__ import annotations

import contextlib

# top-level module -> the lrtt extra that installs it (pyproject.toml)
EXTRA_OF = {
    "transformers": "hf",
    "safetensors": "hf",
    "tokenizers": "hf",
    "gguf": "models",
    "matplotlib": "models",
    "torch": "interop",
    "peft": "interop",
    "yaml": "cli",
    "tqdm": "cli",
    "qwix": "quant",
    "pyarrow": "data",
    "jinja2": "data",
}


@contextlib.contextmanager
def needs_extra():
    """Re-raise a ``ModuleNotFoundError`` of an optional dependency with the install command."""
    try:
        yield
    except ModuleNotFoundError as err:
        top = (err.name or "").split(".")[0]
        if top not in EXTRA_OF:
            raise
        extra = EXTRA_OF[top]
        raise ModuleNotFoundError(
            f"`{top}` is not installed; it comes with lrtt's `{extra}` extra: pip install 'lrtt[{extra}]'",
            name=err.name,
        ) from err
