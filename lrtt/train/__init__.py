"""Training: steps that differentiate the adapter only (jit, pmap, jit + Mesh), their state,
the sharding rules of a Mesh, and joining a multi-process job. See :mod:`lrtt.train._steps`
(one device), :mod:`lrtt.train._pmap`, :mod:`lrtt.train._mesh`, :mod:`lrtt.train._sharding` and
:mod:`lrtt.train._distributed`."""

from lrtt._count import adapter_shapes as adapter_shapes
from lrtt.train._distributed import (
    Distributed as Distributed,
    DistributedSettingError as DistributedSettingError,
    initialize_distributed as initialize_distributed,
)
from lrtt.train._guard import DivergenceError as DivergenceError, nonfinite_counts as nonfinite_counts, skip_nonfinite as skip_nonfinite
from lrtt.train._sharding import (
    PARAM_RULE_PRESETS as PARAM_RULE_PRESETS,
    adapter_specs as adapter_specs,
    param_specs as param_specs,
)
from lrtt.train._mesh import MeshStep as MeshStep, mesh_step as mesh_step
from lrtt.train._pmap import (
    pmap_step as pmap_step,
    replicate as replicate,
    replicate_params as replicate_params,
    split_batch as split_batch,
    unreplicate as unreplicate,
)
from lrtt.train._steps import (
    FORWARDS as FORWARDS,
    TrainState as TrainState,
    adamw as adamw,
    init_state as init_state,
    jit_step as jit_step,
    make_loss as make_loss,
)

__all__ = [
    "Distributed",
    "DistributedSettingError",
    "DivergenceError",
    "FORWARDS",
    "MeshStep",
    "PARAM_RULE_PRESETS",
    "TrainState",
    "adamw",
    "adapter_shapes",
    "adapter_specs",
    "init_state",
    "initialize_distributed",
    "jit_step",
    "make_loss",
    "mesh_step",
    "nonfinite_counts",
    "param_specs",
    "pmap_step",
    "replicate",
    "replicate_params",
    "skip_nonfinite",
    "split_batch",
    "unreplicate",
]
