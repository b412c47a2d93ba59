"""Files: Orbax checkpoints of the adapter, merged exports, and PEFT's adapter format."""

from lrtt.io._checkpoint import (
    CheckpointCorruptError,
    CheckpointDirectoryError,
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ForeignCheckpointError,
    NonFiniteError,
)
from lrtt.io._export import ExportError, export_merged, load_merged
from lrtt.io._peft import PeftFileError, load_peft, save_peft

__all__ = [
    "CheckpointCorruptError",
    "CheckpointDirectoryError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "ExportError",
    "ForeignCheckpointError",
    "NonFiniteError",
    "PeftFileError",
    "export_merged",
    "load_merged",
    "load_peft",
    "save_peft",
]
