"""The filesystem side of lrtt's adapter checkpoints: checks of the directory and its path, the
OS error behind a failed write, the free space a step needs, and the message of a
:class:`CheckpointWriteError`.
"""

from __future__ import annotations

import errno as errno_lib
import fnmatch
import json
import os
import re
import shutil
from typing import Any

import jax.numpy as jnp

from lrtt.io._checkpoint_errors import CheckpointDirectoryError, CheckpointNotFoundError, CheckpointPathError
from lrtt.io._checkpoint_meta import LRTT_ITEMS


def _check_directory(directory: str, create: bool) -> None:
    """Refuse a path that is a file (or lies under one), and a missing directory unless ``create``.

    Raises:
      CheckpointDirectoryError: ``directory`` or an ancestor is a file.
      CheckpointNotFoundError: ``directory`` does not exist and ``create`` is False.
    """
    if os.path.isdir(directory):
        return
    if os.path.exists(directory):
        raise CheckpointDirectoryError(
            f"lrtt.CheckpointManager needs a directory, but {directory} is a file "
            f"({os.path.getsize(directory)} bytes); it is left as it is. Pass the directory that "
            f"holds (or will hold) the step directories, e.g. {os.path.dirname(directory)}/checkpoints."
        )
    if not create:
        raise CheckpointNotFoundError(
            f"there is no checkpoint directory at {directory} (create=False: nothing was created). "
            "Pass the directory a run saved its checkpoints to (the CLI's <output.dir>/checkpoints), "
            "or create=True to start a new one."
        )
    parent = os.path.dirname(directory)
    while parent and not os.path.exists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise CheckpointDirectoryError(
            f"cannot create the checkpoint directory {directory}: {parent} is a file, not a "
            "directory (it is left as it is). Pass a path under a directory."
        )


_GLOB_MAGIC = re.compile(r"[*?[]")


def _check_path(directory: str) -> None:
    """Refuse a path Orbax cannot save under, before anything is written.

    Orbax finds the files of a step with Python's ``glob`` on the full path, so a component that
    is not matched by itself as a glob pattern (``[x]`` matches ``x``, not ``[x]``) makes every
    step it writes unrestorable; ``*`` and ``?`` match themselves and are fine. TensorStore reads
    ``\\`` as a path separator and would write the arrays outside ``directory``.

    Raises:
      CheckpointPathError: ``directory`` holds ``\\``, or a component with ``[...]``.
    """
    if "\\" in directory:
        fixed = directory.replace("\\", "_")
        raise CheckpointPathError(
            f"lrtt.CheckpointManager cannot use the directory {directory}: it holds the character "
            "'\\', which TensorStore (Orbax's storage layer) reads as a path separator, so the "
            "arrays would be written outside it and no step would restore. Choose a directory "
            f"name without '\\' (e.g. {fixed}); nothing was written."
        )
    for part in directory.split(os.sep):
        if _GLOB_MAGIC.search(part) and not fnmatch.fnmatchcase(part, part):
            fixed = directory.replace("[", "(").replace("]", ")")
            raise CheckpointPathError(
                f"lrtt.CheckpointManager cannot use the directory {directory}: its component "
                f"{part!r} holds the characters '[' and ']', which Orbax reads as a glob pattern "
                "when it finds a step's files, so every step saved there would be unrestorable. "
                f"Choose a directory name without '[' and ']' (e.g. {fixed}; rename the directory "
                "to read steps copied there); nothing was written."
            )


_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's in-flight step: "<step>.orbax-checkpoint-tmp[-<time>]"
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # TensorStore's errors carry the errno so
_OS_ERROR_TEXT = {  # ... or only the strerror text
    "No space left on device": errno_lib.ENOSPC,
    "Disk quota exceeded": errno_lib.EDQUOT,
    "Read-only file system": errno_lib.EROFS,
    "Permission denied": errno_lib.EACCES,
    "Operation not permitted": errno_lib.EPERM,
}
_NO_SPACE = (errno_lib.ENOSPC, errno_lib.EDQUOT)


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and its causes and contexts, each once."""
    out, todo = [], [err]
    while todo:
        e = todo.pop()
        if e is None or any(e is seen for seen in out):
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__]
    return out


def _os_errno(err: BaseException) -> int | None:
    """The OS error number behind a failed write (an ``OSError``, or TensorStore's ``ValueError``
    naming ``os_error_code``), or None when ``err`` is not an OS error."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno:
            return e.errno
        text = str(e)
        match = _OS_ERROR_CODE.search(text)
        if match:
            return int(match.group(1))
        for words, code in _OS_ERROR_TEXT.items():
            if words in text:
                return code
    return None


def _existing(path: str) -> str:
    """``path``, or its nearest ancestor that exists."""
    while path and not os.path.exists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    return path


def _is_os_error(err: BaseException) -> bool:
    return isinstance(err, OSError) or _os_errno(err) is not None


def _free_bytes(path: str) -> int | None:
    """Bytes free for this user on the filesystem of ``path`` (or of its nearest ancestor)."""
    try:
        return shutil.disk_usage(_existing(path)).free
    except OSError:
        return None


def _block_size(path: str) -> int:
    try:
        return os.statvfs(path).f_bsize or 4096
    except (OSError, AttributeError):
        return 4096


def _nbytes(x: Any) -> int:
    try:
        return int(x.size) * jnp.dtype(x.dtype).itemsize
    except (AttributeError, TypeError):
        return 8


def _needed_bytes(flat_adapter: dict, flat_opt: dict, meta: dict, block: int) -> int:
    """An upper estimate of the bytes a step takes on disk: its arrays (uncompressed), lrtt's JSON
    and Orbax's per-leaf metadata (3x the JSON), and Orbax's small files (a block each)."""
    arrays = sum(_nbytes(x) for x in (*flat_adapter.values(), *flat_opt.values()))
    files = 16 + (12 if flat_opt else 0) + (len(flat_adapter) + len(flat_opt)) // 3  # measured on tmpfs
    return arrays + 3 * len(json.dumps(meta)) + files * block


def _enough_space(free: int | None, needed: int) -> bool:
    """The pre-check of ``save``: ``needed`` (an upper estimate) fits in ``free`` (None: unknown)."""
    return free is None or free >= needed


def _size(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _with_path(err: OSError, path: str) -> OSError:
    """``err`` if it names a file (or ``path``), else the same kind of error naming ``path``."""
    if err.filename is not None or path in str(err):
        return err
    named = type(err)(err.errno, err.strerror or str(err), path) if err.errno else type(err)(f"{err}: {path}")
    named.__cause__ = err
    return named


def _items(step_dir: str) -> list[str]:
    """The subdirectories (Orbax items) of one step directory."""
    try:
        return sorted(n for n in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, n)))
    except OSError:
        return []


def _step_dirs_below(directory: str) -> str:
    """A hint for a directory without steps: a step directory itself, or a parent of the one meant."""
    items = _items(directory)
    if set(LRTT_ITEMS) <= set(items):
        parent, step = os.path.split(directory)
        return (f" {directory} looks like one step directory (it holds {items}): pass its parent "
                f"{parent} and restore(step={step}, ...)." if step.isdigit() else "")
    nested = [n for n in items if any(s.isdigit() for s in _items(os.path.join(directory, n)))]
    if nested:
        return f" Its subdirector{'ies' if len(nested) > 1 else 'y'} {nested[:3]} hold numbered steps: pass one of them."
    return ""


def _write_message(step: int, path: str, what: str, needed: int, free: int | None, directory: str,
                   code: int | None) -> str:
    """One line: the step directory, what failed, the space needed and free, and the fix."""
    fix = "free space and resume" if code in _NO_SPACE or code is None else (
        f"make {directory} writable (or choose another directory) and resume")
    return (f"could not write checkpoint step {step} to {path}: {what}; the step needs about "
            f"{_size(needed)} and {_size(free)} are free there; the earlier checkpoints are kept; "
            f"{fix} (restore() the latest step, then save again).")
