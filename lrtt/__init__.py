"""lrtt: Low-Rank and Tensor-Train adaptation (LoRA, LoRETTA) for JAX/Flax parameter pytrees.

Methods are frozen dataclasses; everything else is a pure function over pytrees::

    method = lrtt.LoRA(rank=8, targets="qv")
    adapter = method.init(key, params)            # only the new, trainable leaves
    merged = lrtt.merge(method, params, adapter)  # W0 + (alpha/r)·A·B, exact
    out = lrtt.factored(apply)(lrtt.wrap(method, params, adapter), x)  # x·W0 + s·(x·A)·B
"""

from lrtt import io as io, methods as methods, optim as optim, train as train, tt as tt
from lrtt._adapter import (
    BottleneckAdapter as BottleneckAdapter,
    Entry as Entry,
    LoraFactors as LoraFactors,
    NotMergeableError as NotMergeableError,
    Site as Site,
    Trainable as Trainable,
    TTFactors as TTFactors,
    TTKernel as TTKernel,
    entries as entries,
    register_entry as register_entry,
)
from lrtt._combine import combine as combine
from lrtt._count import (
    adapter_shapes as adapter_shapes,
    num_params as num_params,
    parameter_table as parameter_table,
    print_trainable_parameters as print_trainable_parameters,
)
from lrtt._discover import Discovery as Discovery, LeafInfo as LeafInfo, LeafUse as LeafUse, discover as discover
from lrtt._factored import (
    AdaptedLeaf as AdaptedLeaf,
    AdapterLeaf as AdapterLeaf,
    LowRankLeaf as LowRankLeaf,
    factored as factored,
    wrap as wrap,
)
from lrtt._errors import Error as Error
from lrtt._groups import LayerGroups as LayerGroups, group_layers as group_layers, ungroup_layers as ungroup_layers
from lrtt._merge import delta as delta, merge as merge, unmerge as unmerge
from lrtt._resolve import AdapterMismatchError as AdapterMismatchError, Resolved as Resolved, resolve as resolve
from lrtt._quant import dequantize as dequantize, load_quantized as load_quantized, quantize as quantize
from lrtt._stack import AdapterStack as AdapterStack, member as member, set_member as set_member, stack as stack
from lrtt._targets import TARGET_PRESETS as TARGET_PRESETS, Layout as Layout, select as select
from lrtt.io import (
    CheckpointCorruptError as CheckpointCorruptError,
    CheckpointDirectoryError as CheckpointDirectoryError,
    CheckpointManager as CheckpointManager,
    CheckpointMismatchError as CheckpointMismatchError,
    CheckpointNotFoundError as CheckpointNotFoundError,
    CheckpointPathError as CheckpointPathError,
    CheckpointWriteError as CheckpointWriteError,
    ExportError as ExportError,
    ExportTarget as ExportTarget,
    ForeignCheckpointError as ForeignCheckpointError,
    NonFiniteError as NonFiniteError,
    PeftFileError as PeftFileError,
    export_merged as export_merged,
    inspect_export as inspect_export,
    load_merged as load_merged,
    load_peft as load_peft,
    save_peft as save_peft,
)
from lrtt.methods import (
    FullFineTune as FullFineTune,
    LoRA as LoRA,
    LorettaAdp as LorettaAdp,
    LorettaRep as LorettaRep,
    Method as Method,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptedLeaf",
    "AdapterLeaf",
    "AdapterMismatchError",
    "AdapterStack",
    "BottleneckAdapter",
    "CheckpointCorruptError",
    "CheckpointDirectoryError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointPathError",
    "CheckpointWriteError",
    "Discovery",
    "Entry",
    "Error",
    "ExportError",
    "ExportTarget",
    "ForeignCheckpointError",
    "FullFineTune",
    "LayerGroups",
    "Layout",
    "LeafInfo",
    "LeafUse",
    "LoRA",
    "LoraFactors",
    "LorettaAdp",
    "LorettaRep",
    "LowRankLeaf",
    "Method",
    "NonFiniteError",
    "NotMergeableError",
    "PeftFileError",
    "Resolved",
    "Site",
    "TARGET_PRESETS",
    "TTFactors",
    "TTKernel",
    "Trainable",
    "adapter_shapes",
    "combine",
    "delta",
    "dequantize",
    "discover",
    "entries",
    "export_merged",
    "factored",
    "group_layers",
    "inspect_export",
    "io",
    "load_merged",
    "load_peft",
    "load_quantized",
    "member",
    "merge",
    "methods",
    "num_params",
    "optim",
    "parameter_table",
    "print_trainable_parameters",
    "quantize",
    "register_entry",
    "resolve",
    "save_peft",
    "select",
    "set_member",
    "stack",
    "train",
    "tt",
    "ungroup_layers",
    "unmerge",
    "wrap",
]
