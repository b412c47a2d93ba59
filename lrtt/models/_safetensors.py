"""safetensors files read and written with numpy alone (no torch, no ``safetensors`` package).

The format: 8 bytes little-endian header length, a JSON header ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, then the raw little-endian data. Reading
memory-maps the file and returns one tensor at a time (a copy, so the map can close); bf16 and
fp8 come as ``ml_dtypes`` arrays. Writing streams one tensor at a time into shards of at most
``max_shard_size`` bytes, with transformers' ``model.safetensors.index.json`` when there are
several (``model-00001-of-00003.safetensors``, ...).
"""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import re
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_COPY_CHUNK = 64 << 20


class SafetensorsFile:
    """One ``.safetensors`` file, memory-mapped; ``file[name]`` reads one tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{os.fspath(self.path)!r} is not a safetensors file: it is {len(head)} bytes long.")
            (n,) = struct.unpack("<Q", head)
            size = self.path.stat().st_size
            if n > size - 8:
                raise ValueError(f"{os.fspath(self.path)!r} is truncated or not safetensors: its header claims "
                                 f"{n} bytes, the file has {size}.")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ValueError(f"{os.fspath(self.path)!r}: the safetensors header is not valid JSON ({e}).") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.header = header
        self._start = 8 + n
        self._size = size

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{os.fspath(self.path)!r}: tensor {name!r} has dtype {info['dtype']!r}; "
                             f"lrtt.models reads {sorted(_DTYPES)}.")
        dtype = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end - begin != count * dtype.itemsize or self._start + end > self._size:
            raise ValueError(f"{os.fspath(self.path)!r}: tensor {name!r} does not fit the file (truncated?).")
        if count == 0:
            return np.zeros(info["shape"], dtype)
        out = np.empty(count, dtype)
        flat, first = out.view(np.uint8), self._start + begin
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            for lo in range(0, end - begin, _COPY_CHUNK):  # each copied piece's pages dropped from the map:
                hi = min(lo + _COPY_CHUNK, end - begin)    # the file's pages never add to RSS
                flat[lo:hi] = np.frombuffer(mapped[first + lo:first + hi], np.uint8)
                page = (first + lo) // mmap.PAGESIZE * mmap.PAGESIZE
                mapped.madvise(mmap.MADV_DONTNEED, page, first + hi - page)
        return out.reshape(info["shape"])


def tensor_index(directory: str | os.PathLike) -> dict[str, tuple[SafetensorsFile, str]]:
    """``{tensor name: (file, name)}`` of a ``save_pretrained`` directory, sharded or not.

    Raises:
      FileNotFoundError: neither ``model.safetensors`` nor ``model.safetensors.index.json``.
    """
    directory = pathlib.Path(directory)
    if (directory / INDEX).is_file():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        files = {f: SafetensorsFile(directory / f) for f in sorted(set(weight_map.values()))}
        return {name: (files[f], name) for name, f in weight_map.items()}
    if (directory / SINGLE).is_file():
        f = SafetensorsFile(directory / SINGLE)
        return {name: (f, name) for name in f.keys()}
    found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else "not a directory"
    raise FileNotFoundError(
        f"{os.fspath(directory)!r} holds neither {SINGLE} nor {INDEX} (found: {found}): lrtt.models reads "
        "transformers checkpoints in safetensors (save_pretrained's default). Convert a pytorch_model.bin "
        "with transformers first.")


def parse_size(size: int | str) -> int:
    """Bytes of ``5GB`` (10⁹), ``500MiB`` (2²⁰), ``10KB``, or an int (transformers' convention)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"`max_shard_size`={size!r}: give bytes as an int or a string like '5GB' or '500MiB'.")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(match.group(1)) * scale)


def _header(entries: list[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_sharded(directory: str | os.PathLike, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
                  max_shard_size: int | str = "5GB") -> list[str]:
    """Write ``(name, shape, dtype, produce)`` tensors, ``produce()`` called once each while writing.

    One ``model.safetensors`` if everything fits ``max_shard_size``, else shards plus the index
    (a tensor larger than the limit gets a shard of its own, as transformers does).

    Returns:
      The file names written.
    """
    directory = pathlib.Path(directory)
    limit = parse_size(max_shard_size)
    shards: list[list] = [[]]
    size = total = 0
    for entry in tensors:
        name, shape, dtype, _ = entry
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise ValueError(f"cannot write tensor {name!r} of dtype {dtype} to safetensors.")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), dtype, entry[3]))
        size += nbytes
        total += nbytes
    names = [SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(names, shards):
        with open(directory / file, "wb") as f:
            f.write(_header([(n, s, d) for n, s, d, _ in shard]))
            for name, shape, dtype, produce in shard:
                value = np.ascontiguousarray(np.asarray(produce()), dtype=dtype)
                if value.shape != shape:
                    raise ValueError(f"tensor {name!r} was produced with shape {value.shape}, announced {shape}.")
                f.write(value.tobytes())
                del value
    index = directory / INDEX
    if len(shards) > 1:
        weight_map = {name: file for file, shard in zip(names, shards) for name, *_ in shard}
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    elif index.exists():
        index.unlink()  # a stale index would shadow the single file
    return names
