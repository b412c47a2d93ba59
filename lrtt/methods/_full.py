"""Full fine-tuning expressed as a method: every leaf (or those matching ``trainable``) trains.

It exists so that the baseline every PEFT method is compared with runs through the same
steps, checkpoints, export and tables as the adapters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from lrtt._paths import nest
from lrtt.methods._base import Method, check_trainable, freeze_patterns, trainable_copies


@dataclasses.dataclass(frozen=True, kw_only=True)
class FullFineTune(Method):
    """Train the params themselves: the adapter is a ``Trainable`` copy of each selected leaf.

    Args:
      trainable: regexes of the leaves that train (default: all of them).
    """

    trainable: str | Sequence[str] = ".*"
    param_dtype: Any = jnp.float32

    mergeable = True
    LABEL_FIELDS = ()
    NAME = "full"
    layouts = ()

    def __post_init__(self):
        object.__setattr__(self, "trainable", freeze_patterns(self.trainable, "trainable"))

    def plan(self, params: Any) -> tuple:
        """No leaf takes an adapter; checks that every ``trainable`` pattern selects a leaf."""
        check_trainable(params, self.trainable)
        return ()

    def init(self, key: jax.Array, params: Any) -> dict:
        del key
        self.plan(params)
        return nest(trainable_copies(params, self.trainable, exclude=set()))

