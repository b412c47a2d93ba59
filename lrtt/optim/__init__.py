"""The optimizer of one tree that holds frozen and adapter leaves: :func:`adapter_only` trains
the adapter's leaves (optax's ``partition`` + ``set_to_zero``), and the masks, labels and
partitions it is made of."""

from lrtt.optim._frozen import (
    FROZEN,
    TRAINABLE,
    adapter_labels,
    adapter_only,
    apply_updates,
    combine,
    partition,
    trainable_mask,
)

__all__ = ["FROZEN", "TRAINABLE", "adapter_labels", "adapter_only", "apply_updates", "combine", "partition", "trainable_mask"]


def __getattr__(name: str):
    if name == "masked":
        raise AttributeError(
            "lrtt.optim.masked is now lrtt.optim.adapter_only (same arguments): the old name read "
            "like optax.masked, which passes masked-out updates through instead of zeroing them."
        )
    raise AttributeError(f"module 'lrtt.optim' has no attribute {name!r}")
