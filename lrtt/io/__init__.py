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
from lrtt.io._export import export_directory, export_merged, load_merged
from lrtt.io._export_target import ExportError, ExportTarget, check_export_target, inspect_export
from lrtt.io._peft_format import PeftFileError
from lrtt.io._peft_load import load_peft
from lrtt.io._peft_save import check_vllm, save_peft

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
