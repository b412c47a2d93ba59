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
    num_params as num_params,
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
    "num_params",
    "preset_dims",
    "resolve_dims",
    "tt_ranks",
    "tt_svd",
    "validate",
]
