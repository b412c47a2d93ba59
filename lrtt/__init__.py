"""lrtt: Low-Rank and Tensor-Train adaptation (LoRA, LoRETTA) for JAX/Flax parameter pytrees.

Methods are frozen dataclasses; everything else is a pure function over pytrees::

    method = lrtt.LoRA(rank=8, targets="qv")
    adapter = method.init(key, params)            # only the new, trainable leaves
    merged = lrtt.merge(method, params, adapter)  # W0 + (alpha/r)·A·B, exact
    out = lrtt.factored(apply)(lrtt.wrap(method, params, adapter), x)  # x·W0 + s·(x·A)·B
"""

from lrtt import optim as optim, train as train, tt as tt
from lrtt._adapted import (
    AdaptedLeaf as AdaptedLeaf,
    AdapterLeaf as AdapterLeaf,
    LowRankLeaf as LowRankLeaf,
    wrap as wrap,
)
from lrtt._adapter import (
    BottleneckAdapter as BottleneckAdapter,
    LoraFactors as LoraFactors,
    TTFactors as TTFactors,
    TTKernel as TTKernel,
    Trainable as Trainable,
    entries as entries,
)
from lrtt._checkpoint import (
    CheckpointCorruptError as CheckpointCorruptError,
    CheckpointManager as CheckpointManager,
    CheckpointMismatchError as CheckpointMismatchError,
)
from lrtt._count import (
    adapter_shapes as adapter_shapes,
    num_params as num_params,
    parameter_table as parameter_table,
    print_trainable_parameters as print_trainable_parameters,
)
from lrtt._discover import Discovery as Discovery, LeafInfo as LeafInfo, LeafUse as LeafUse, discover as discover
from lrtt._export import export_merged as export_merged, load_merged as load_merged
from lrtt._factored import factored as factored
from lrtt._full import FullFineTune as FullFineTune
from lrtt._lora import LoRA as LoRA
from lrtt._method import Method as Method
from lrtt._loretta_adp import LorettaAdp as LorettaAdp
from lrtt._loretta_rep import LorettaRep as LorettaRep
from lrtt._merge import delta as delta, merge as merge, unmerge as unmerge
from lrtt._peft import load_peft as load_peft, save_peft as save_peft
from lrtt._targets import Layout as Layout, TARGET_PRESETS as TARGET_PRESETS, select as select

__version__ = "0.1.0"

__all__ = [
    "AdaptedLeaf",
    "AdapterLeaf",
    "BottleneckAdapter",
    "CheckpointCorruptError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "Discovery",
    "FullFineTune",
    "Layout",
    "LeafInfo",
    "LeafUse",
    "LoRA",
    "LoraFactors",
    "LorettaAdp",
    "LorettaRep",
    "LowRankLeaf",
    "Method",
    "TARGET_PRESETS",
    "TTFactors",
    "TTKernel",
    "Trainable",
    "adapter_shapes",
    "delta",
    "discover",
    "entries",
    "export_merged",
    "factored",
    "load_merged",
    "load_peft",
    "merge",
    "num_params",
    "optim",
    "parameter_table",
    "print_trainable_parameters",
    "save_peft",
    "select",
    "train",
    "tt",
    "unmerge",
    "wrap",
]
