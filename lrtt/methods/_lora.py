"""LoRA (Hu et al., 2021): a trainable low-rank update of each target kernel."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lrtt._adapter import LoraFactors
from lrtt._paths import nest
from lrtt._targets import Target, as_pairs, first_match, select
from lrtt.methods._base import (
    Method,
    check_positive_int,
    check_probability,
    check_rank,
    check_scale_numerator,
    check_trainable,
    freeze_patterns,
    split_keys,
    trainable_copies,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA(Method):
    """Low-rank adaptation of the kernels matched by ``targets``.

    .. math::  y = x W_0 + \\tfrac{\\alpha}{r}\\, \\mathrm{dropout}(x) A B + b,
       \\qquad A: (\\text{in}, r),\\; B: (r, \\text{out})

    ``A`` is drawn Kaiming-uniform (``a = √5``, fan-in = in, as loralib and PEFT), ``B = 0``, so
    the adapted model equals the pretrained one at step 0. With ``rslora`` the scale is
    ``α/√r``.

    Args:
      rank: bottleneck rank ``r``; ``1 <= r <= min(in, out)`` for every target.
      alpha: scale numerator; ``None`` (default) means ``alpha = rank`` (scale 1), so changing
        the rank does not change the size of the update. PEFT's default is ``lora_alpha=8``.
      targets: preset (``"qv"``, ``"attention"``, ``"all-linear"``), regex or list of regexes.
      dropout: dropout rate on the adapter's input ``x`` (factored execution with an rng only).
      rslora: use ``α/√r`` instead of ``α/r``.
      rank_pattern: ``{regex: rank}`` per-target overrides (first match wins).
      alpha_pattern: ``{regex: alpha}`` per-target overrides.
      layouts: ``{regex: layout}`` for kernels that are not 2-D ``(in, out)``, e.g.
        ``"layer in out"`` for ``nn.scan``-stacked layers, ``"out in out"`` for Gemma's
        ``q_einsum``; or the :class:`lrtt.Discovery` of ``lrtt.discover(fn, params, *args)``
        (then ``targets="all-linear"`` means every discovered linear kernel but the head).
      trainable: regexes of leaves trained in full besides the factors (PEFT's
        ``modules_to_save``), e.g. a classification head.
      param_dtype: dtype of the factors (float32 by default, whatever the base's dtype).

    Example:
      >>> import jax, jax.numpy as jnp, lrtt
      >>> params = {"attn": {"q_proj": {"kernel": jnp.ones((16, 32))}}}
      >>> adapter = lrtt.LoRA(rank=4, targets="q_proj").init(jax.random.key(0), params)
      >>> jax.tree.map(jnp.shape, adapter)["attn"]["q_proj"]["kernel"]
      LoraFactors(a=(16, 4), b=(4, 32), scale=1.0)
    """

    rank: int = 8
    alpha: float | None = None
    targets: str | Sequence[str] = "qv"
    dropout: float = 0.0
    rslora: bool = False
    rank_pattern: Mapping[str, int] | Sequence[tuple[str, int]] = ()
    alpha_pattern: Mapping[str, float] | Sequence[tuple[str, float]] = ()
    layouts: Mapping[str, str] | Sequence[tuple[str, str]] = ()
    trainable: str | Sequence[str] | None = None
    param_dtype: Any = jnp.float32

    mergeable = True
    LABEL_FIELDS = ("rank",)
    NAME = "lora"

    def __post_init__(self):
        object.__setattr__(self, "rank", check_positive_int(self.rank, "rank"))
        check_probability(self.dropout, "dropout")
        object.__setattr__(self, "targets", freeze_patterns(self.targets, "targets", self.layouts))
        object.__setattr__(self, "trainable", freeze_patterns(self.trainable, "trainable"))
        object.__setattr__(self, "rank_pattern", tuple(
            (pattern, check_positive_int(rank, f"rank_pattern[{pattern!r}]")) for pattern, rank in as_pairs(self.rank_pattern)))
        object.__setattr__(self, "alpha_pattern", as_pairs(self.alpha_pattern))
        object.__setattr__(self, "layouts", as_pairs(self.layouts))
        if self.alpha is not None:
            check_scale_numerator(self.alpha, "alpha")
        for pattern, alpha in self.alpha_pattern:
            check_scale_numerator(alpha, f"alpha_pattern[{pattern!r}]")

    def rank_for(self, path: str) -> int:
        override = first_match(path, self.rank_pattern)
        return self.rank if override is None else override

    def scale_for(self, path: str) -> float:
        rank = self.rank_for(path)
        alpha = first_match(path, self.alpha_pattern)
        if alpha is None:
            alpha = rank if self.alpha is None else self.alpha
        return float(alpha) / (math.sqrt(rank) if self.rslora else rank)

    def plan(self, params: Any) -> tuple[Target, ...]:
        targets = tuple(select(params, self.targets, layouts=self.layouts))
        for target in targets:
            check_rank(self.rank_for(target.path), target)
        check_trainable(params, self.trainable, {t.path for t in targets})
        return targets

    def init(self, key: jax.Array, params: Any) -> dict:
        """The LoRA factors of every target (``B = 0``) plus copies of ``trainable`` leaves."""
        targets = self.plan(params)
        flat: dict[str, Any] = {}
        for target, k in zip(targets, split_keys(key, len(targets))):
            rank = self.rank_for(target.path)
            bound = 1.0 / math.sqrt(target.n_in)  # kaiming_uniform(a=√5) with fan_in = in
            a = jax.random.uniform(k, (*target.stack, target.n_in, rank), self.param_dtype, -bound, bound)
            b = lax.broadcast(np.zeros((), self.param_dtype), (*target.stack, rank, target.n_out))  # one primitive
            flat[target.path] = LoraFactors(a, b, scale=self.scale_for(target.path))
        flat.update(trainable_copies(params, self.trainable, exclude=set(flat)))
        return nest(flat)

