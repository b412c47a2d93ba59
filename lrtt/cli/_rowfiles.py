"""The CLI's tokenized rows on disk: memory-mapped arrays, so a data set larger than memory trains.

``lrtt.data`` streams the user's files row by row; the command then needs random access to the
rows (an exactly resumable shuffle per epoch). :func:`spill` writes each row's arrays as they
come to one raw int32 file per key under ``$LRTT_CACHE/rows`` (``~/.cache/lrtt/rows``), maps
them read-only with ``np.memmap`` and unlinks the files at once: the mapping keeps the data
while the process lives, the kernel pages rows in as batches touch them, and nothing is left
behind when it ends (however it ends; a process killed *while* writing leaves its folder, which
the next :func:`spill` removes).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable, Mapping

import numpy as np

from lrtt.cli._schema import ConfigError
from lrtt.cli.zoo import cache_root


def rows_root() -> str:
    return str(cache_root() / "rows")


def _remove_stale(root: str) -> None:
    """Folders of writers that are gone (``rows-<pid>-...`` of a pid that no longer runs)."""
    for name in os.listdir(root):
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != "rows" or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except PermissionError:  # another user's live process
            pass


def spill(rows: Iterable[Mapping[str, np.ndarray]], keys: tuple[str, ...], width: int,
          limit: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """``(arrays, n)``: the first ``limit`` (default all) rows of ``rows`` as read-only
    ``(n, width)`` int32 memory maps, one per key (empty dict when there is no row).

    Raises:
      ConfigError: the rows could not be written (a full disk, no permission), naming the folder.
    """
    root = rows_root()
    folder = None
    try:
        os.makedirs(root, exist_ok=True)
        _remove_stale(root)
        folder = tempfile.mkdtemp(prefix=f"rows-{os.getpid()}-", dir=root)
        paths = {key: os.path.join(folder, f"{key}.int32") for key in keys}
        files = {key: open(path, "wb") for key, path in paths.items()}
        n = 0
        try:
            for row in rows:
                for key in keys:
                    values = np.ascontiguousarray(row[key], dtype=np.int32)
                    if values.shape != (width,):
                        raise ValueError(f"a row's {key!r} has shape {values.shape}, not ({width},)")
                    files[key].write(values.tobytes())
                n += 1
                if limit is not None and n == limit:
                    break
        finally:
            for f in files.values():
                f.close()
        arrays = {key: np.memmap(path, dtype=np.int32, mode="r", shape=(n, width)) for key, path in paths.items()} \
            if n else {}
        return arrays, n
    except OSError as err:
        where = folder or root
        raise ConfigError(f"data: writing the tokenized rows to {where} failed ({err.strerror or err}); free space "
                          "there, or point LRTT_CACHE at a disk with room (the rows take 16 bytes per token).") from None
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)  # the maps keep the data; the names go now
