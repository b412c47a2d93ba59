"""Optimizer masking for one tree of frozen and adapter leaves. See :mod:`lrtt.optim._frozen`."""

from lrtt.optim._frozen import (
    FROZEN as FROZEN,
    TRAINABLE as TRAINABLE,
    adapter_labels as adapter_labels,
    apply_updates as apply_updates,
    combine as combine,
    masked as masked,
    partition as partition,
    trainable_mask as trainable_mask,
)

__all__ = ["FROZEN", "TRAINABLE", "adapter_labels", "apply_updates", "combine", "masked", "partition", "trainable_mask"]
