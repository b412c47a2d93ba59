"""Files: Orbax checkpoints of the adapter, merged exports, and PEFT's adapter format."""

from lrtt.io._checkpoint import CheckpointManager
from lrtt.io._checkpoint_errors import (
    CheckpointCorruptError,
    CheckpointDirectoryError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointPathError,
    CheckpointWriteError,
    ForeignCheckpointError,
    NonFiniteError,
)
from lrtt.io._export import ExportError, ExportTarget, check_export_target, export_directory, export_merged, inspect_export, load_merged
from lrtt.io._peft import PeftFileError, check_vllm, load_peft, save_peft

__all__ = [
    "CheckpointCorruptError",
    "CheckpointDirectoryError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointPathError",
    "CheckpointWriteError",
    "ExportError",
    "ExportTarget",
    "ForeignCheckpointError",
    "NonFiniteError",
    "PeftFileError",
    "check_export_target",
    "check_vllm",
    "export_directory",
    "export_merged",
    "inspect_export",
    "load_merged",
    "load_peft",
    "save_peft",
]
