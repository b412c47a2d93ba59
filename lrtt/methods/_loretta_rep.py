"""LoRETTA_rep (Yang et al., NAACL 2024): LoRA's two factors each held as tensor-train cores."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from lrtt._adapter import TTFactors
from lrtt._paths import nest
from lrtt._targets import Target, as_pairs, select
from lrtt.methods._base import (
    Method,
    check_choice,
    check_positive_int,
    check_probability,
    check_rank,
    check_scale_numerator,
    check_trainable,
    freeze_patterns,
    split_keys,
    trainable_copies,
)
from lrtt.tt import _core as _tt

REP_INITS = ("zero_delta", "gaussian")


def resolve_pair(tt_shape: Any, shape_a: tuple[int, int], shape_b: tuple[int, int]):
    """TT dims of the two matrices from a ``tt_shape`` field (one spec for both, or a pair)."""
    if isinstance(tt_shape, tuple) and tt_shape and isinstance(tt_shape[0], tuple):
        if len(tt_shape) != 2:
            raise ValueError(f"`tt_shape` as a pair must be (dims_a, dims_b), got {tt_shape!r}.")
        spec_a, spec_b = tt_shape
    else:
        spec_a = spec_b = tt_shape
    return _tt.resolve_dims(spec_a, *shape_a), _tt.resolve_dims(spec_b, *shape_b)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LorettaRep(Method):
    """LoRA whose factors ``A: (in, r)`` and ``B: (r, out)`` are tensor trains.

    .. math::  y = x W_0 + \\tfrac{\\alpha}{r}\\, \\mathrm{TT}_B(\\mathrm{TT}_A(\\mathrm{dropout}(x))) + b,
       \\qquad \\Delta W = \\tfrac{\\alpha}{r}\\, \\mathrm{TT}_A \\mathrm{TT}_B

    Each matrix is the row-major reshape of a tensor with dims ``k_1..k_d`` stored as cores
    ``(t_{i-1}, k_i, t_i)`` of TT rank ``t``; it trains ``Σ t_{i-1} k_i t_i`` numbers instead of
    ``in·r``.

    Train it at about 3× LoRA's learning rate: a step moves ``ΔW`` through a product of cores,
    so the same AdamW step size moves it less (SmolLM2-135M, r = 8: best 1e-2 against LoRA's 3e-3;
    benchmarks/lm_study.py, docs/results.md).

    Args:
      rank: the bottleneck ``r`` of ``ΔW`` (reference 8); ``r <= min(in, out)``.
      alpha: scale numerator (reference 16); scale ``alpha / rank``.
      tt_rank: TT rank of the cores (paper tables 5, reference scripts 8).
      tt_shape: ``None`` (balanced automatic factorization of ``in·r`` and ``r·out``), an int
        ``d`` (the same, into ``d`` cores each), ``"loretta"`` (the reference tables where a row
        fits, else automatic), one list of dims used for both matrices, or a pair
        ``(dims_a, dims_b)``.
      targets: preset, regex or list of regexes (reference: q and v, ``"qv"``).
      dropout: dropout rate on the adapter's input (factored execution with an rng only;
        reference 0.05).
      initializer: ``"zero_delta"`` (default): Gaussian cores with the last core of ``TT_B`` zero, so
        ``ΔW = 0`` at step 0; that core gets a non-zero gradient at once and the others after
        one step, as LoRA's ``B = 0``. ``"gaussian"``: every core Gaussian (the reference;
        perturbs the model at step 0).
      layouts, trainable, param_dtype: as in :class:`lrtt.LoRA`.
    """

    rank: int = 8
    alpha: float = 16.0
    tt_rank: int = 5
    tt_shape: Any = None
    targets: str | Sequence[str] = "qv"
    dropout: float = 0.0
    initializer: str = "zero_delta"
    layouts: Mapping[str, str] | Sequence[tuple[str, str]] = ()
    trainable: str | Sequence[str] | None = None
    param_dtype: Any = jnp.float32

    mergeable = True
    LABEL_FIELDS = ("rank", "tt_rank")
    NAME = "loretta_rep"

    def __post_init__(self):
        object.__setattr__(self, "rank", check_positive_int(self.rank, "rank"))
        object.__setattr__(self, "tt_rank", check_positive_int(self.tt_rank, "tt_rank"))
        check_scale_numerator(self.alpha, "alpha")
        check_probability(self.dropout, "dropout")
        check_choice(self.initializer, "initializer", REP_INITS)
        object.__setattr__(self, "targets", freeze_patterns(self.targets, "targets", self.layouts))
        object.__setattr__(self, "trainable", freeze_patterns(self.trainable, "trainable"))
        object.__setattr__(self, "layouts", as_pairs(self.layouts))
        object.__setattr__(self, "tt_shape", _tt.freeze_spec(self.tt_shape))

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def tt_dims(self, target: Target) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """TT dims of ``TT_A (in, r)`` and ``TT_B (r, out)`` for one target."""
        return resolve_pair(self.tt_shape, (target.n_in, self.rank), (self.rank, target.n_out))

    def plan(self, params: Any) -> tuple[Target, ...]:
        targets = tuple(select(params, self.targets, layouts=self.layouts))
        for target in targets:
            check_rank(self.rank, target, override=None)  # one rank for all: no rank_pattern
            self.tt_dims(target)  # validates the shapes now, not on a traced value
        check_trainable(params, self.trainable, {t.path for t in targets})
        return targets

    def init(self, key: jax.Array, params: Any) -> dict:
        """Gaussian TT cores for ``TT_A`` and ``TT_B`` of every target; with
        ``initializer="zero_delta"`` the last core of ``TT_B`` is zero (``ΔW = 0`` at step 0)."""
        targets = self.plan(params)
        flat: dict[str, Any] = {}
        for target, k in zip(targets, split_keys(key, len(targets))):
            dims_a, dims_b = self.tt_dims(target)
            key_a, key_b = jax.random.split(k)
            common = dict(stack=target.stack, dtype=self.param_dtype)
            a = _tt.init_gaussian(key_a, dims_a, self.tt_rank, n_in=target.n_in, n_out=self.rank, **common)
            b = _tt.init_gaussian(key_b, dims_b, self.tt_rank, n_in=self.rank, n_out=target.n_out, **common)
            if self.initializer == "zero_delta":
                b = (*b[:-1], jnp.zeros_like(b[-1]))
            flat[target.path] = TTFactors(
                tuple(a), tuple(b), scale=self.scale, n_in=target.n_in, rank=self.rank, n_out=target.n_out
            )
        flat.update(trainable_copies(params, self.trainable, exclude=set(flat)))
        return nest(flat)

