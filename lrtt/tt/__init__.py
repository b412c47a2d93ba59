"""Tensor-train matrices: shapes, validation, Gaussian init, TT-SVD, materialize, apply.
See :mod:`lrtt.tt._core`."""

from lrtt.tt._core import (
    LORETTA_ADAPTER_DIMS as LORETTA_ADAPTER_DIMS,
    LORETTA_CLASSIFIER_DIMS as LORETTA_CLASSIFIER_DIMS,
    Cores as Cores,
    apply as apply,
    auto_dims as auto_dims,
    core_shapes as core_shapes,
    init_gaussian as init_gaussian,
    materialize as materialize,
    num_core_params as num_core_params,
    preset_dims as preset_dims,
    resolve_dims as resolve_dims,
    tt_ranks as tt_ranks,
    tt_svd as tt_svd,
    validate as validate,
)

__all__ = [
    "Cores",
    "LORETTA_ADAPTER_DIMS",
    "LORETTA_CLASSIFIER_DIMS",
    "apply",
    "auto_dims",
    "core_shapes",
    "init_gaussian",
    "materialize",
    "num_core_params",
    "preset_dims",
    "resolve_dims",
    "tt_ranks",
    "tt_svd",
    "validate",
]


_RENAMED = {"num_params": "num_core_params"}


def __getattr__(name: str):
    if name in _RENAMED:
        raise AttributeError(
            f"lrtt.tt.{name} was renamed lrtt.tt.{_RENAMED[name]} (the numbers a tensor train's cores hold, "
            f"from its shape); lrtt.num_params counts the leaves of a tree. Use lrtt.tt.{_RENAMED[name]}."
        )
    raise AttributeError(f"module 'lrtt.tt' has no attribute {name!r}")
