"""Files: Orbax checkpoints of the adapter, merged exports, and PEFT's adapter format."""

from lrtt.io._checkpoint import CheckpointCorruptError, CheckpointManager, CheckpointMismatchError
from lrtt.io._export import export_merged, load_merged
from lrtt.io._peft import load_peft, save_peft

__all__ = [
    "CheckpointCorruptError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "export_merged",
    "load_merged",
    "load_peft",
    "save_peft",
]
