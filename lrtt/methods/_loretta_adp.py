"""LoRETTA_adp (Yang et al., NAACL 2024): tensorized bottleneck adapters beside frozen layers."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from lrtt import _families
from lrtt._adapter import ACTIVATIONS, BottleneckAdapter, TTKernel
from lrtt._paths import nest
from lrtt._targets import Target, as_pairs, select
from lrtt.methods._base import (
    Method,
    check_choice,
    check_positive_int,
    check_trainable,
    freeze_patterns,
    split_keys,
    trainable_copies,
)
from lrtt.tt import _core as _tt

ADP_INITS = ("identity", "gaussian")

# The LoRETTA reference placement (yifanycc/loretta: after attention and after the MLP): each family's adp_after / adp_before (lrtt._families).
ADP_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    position: {"loretta": _families.adp_placement(position)} for position in ("after", "before")
}
NORM_PATTERNS = (r"(^|/)(LayerNorm|layernorm|ln_\d+|ln_f|\w*_layernorm|norm)/(scale|bias|weight)$",)
CLASSIFIER_DENSE = (r"(^|/)(classifier/dense|pooler/dense)/kernel$",)
HEAD_PATTERNS = (
    r"(^|/)(classifier/dense|pooler/dense)/bias$",
    r"(^|/)(classifier/out_proj|classifier|score|qa_outputs)/(kernel|bias)$",
)


def _preset(value: Any, position: str, name: str | None = None) -> tuple[str, ...]:
    if isinstance(value, str) and value in ADP_PRESETS[position]:
        return ADP_PRESETS[position][value]
    return freeze_patterns(value, name or position)


class _Default(str):
    """The default of ``after``: ``"loretta"``, told apart from an ``after="loretta"`` passed
    explicitly (which, given with ``targets``, is two placements for one field)."""


_AFTER_DEFAULT = _Default("loretta")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LorettaAdp(Method):
    """Tensorized bottleneck adapters after (or before) the matched linear layers.

    .. math::  f(h) = s\\,(\\mathrm{act}(h D + d)\\, U + u), \\qquad
       D: (n, m),\\; U: (m, n) \\text{ as TT matrices}

    * after-linear targets: ``y = h + f(h)`` with ``h = x W_0 + b_0`` (BERT-family attention and
      FFN output dense, Llama ``down_proj``);
    * before-linear targets: ``y = (x + f(x)) W_0 + b_0`` (Llama ``gate_proj``, ``up_proj``).

    Not mergeable: ``f`` is non-linear; run it through :func:`lrtt.factored`.

    Args:
      bottleneck: ``m`` (reference 64).
      tt_rank: TT rank of the cores of ``D`` and ``U`` (reference 5).
      scale: ``s`` (reference 1.0).
      activation: one of ``relu`` (reference), ``gelu``, ``silu``, ``tanh``, ``identity``.
      tt_shape: ``"loretta"`` (reference tables, default), ``None`` (automatic), an int ``d``
        (automatic, into ``d`` cores) or dims.
      after, before: ``"loretta"`` (the reference placement), a regex or list, or ``None``.
        Each pattern given as a regex or list must match a leaf (the reference placement
        resolves per family and may match nothing on one side, e.g. ``before`` on BERT).
      targets: the same as ``after``: the linear layers an adapter follows (the name LoRA and
        LorettaRep use for what they adapt). Give ``targets`` or ``after``, not both (an error
        unless they agree); it is stored as ``after`` (``to_config`` holds ``after`` only), and
        ``method.targets`` reads it back.
      train_norms: train every layer norm's scale/bias in full (the paper counts them).
      tensorized_classifier: replace the pooler/classifier dense kernel by a fresh trainable TT
        matrix (reference shapes), for classification models.
      train_head: train the classification head (and the tensorized dense's bias) in full.
      initializer: ``"identity"`` (default; the last core of ``U`` and ``u`` are zero, so ``f = 0`` at
        step 0) or ``"gaussian"`` (the reference; every core Gaussian).
      layouts, trainable, param_dtype: as in :class:`lrtt.LoRA`.
    """

    bottleneck: int = 64
    tt_rank: int = 5
    scale: float = 1.0
    activation: str = "relu"
    tt_shape: Any = "loretta"
    after: str | Sequence[str] | None = _AFTER_DEFAULT
    before: str | Sequence[str] | None = "loretta"
    train_norms: bool = True
    tensorized_classifier: bool = False
    train_head: bool = False
    initializer: str = "identity"
    layouts: Mapping[str, str] | Sequence[tuple[str, str]] = ()
    trainable: str | Sequence[str] | None = None
    param_dtype: Any = jnp.float32
    targets: dataclasses.InitVar[str | Sequence[str] | None] = None

    mergeable = False
    LABEL_FIELDS = ("bottleneck", "tt_rank")
    NAME = "loretta_adp"

    def __post_init__(self, targets):
        object.__setattr__(self, "bottleneck", check_positive_int(self.bottleneck, "bottleneck"))
        object.__setattr__(self, "tt_rank", check_positive_int(self.tt_rank, "tt_rank"))
        check_choice(self.activation, "activation", tuple(ACTIVATIONS))
        check_choice(self.initializer, "initializer", ADP_INITS)
        object.__setattr__(self, "after", self._after(targets))
        object.__setattr__(self, "targets", self.after)  # an alias, not a field: eq/hash/config use `after`
        object.__setattr__(self, "before", _preset(self.before, "before"))
        object.__setattr__(self, "trainable", freeze_patterns(self.trainable, "trainable"))
        object.__setattr__(self, "layouts", as_pairs(self.layouts))
        object.__setattr__(self, "tt_shape", _tt.freeze_spec(self.tt_shape))

    def _after(self, targets: Any) -> tuple[str, ...]:
        """``after`` from the ``after`` and ``targets`` arguments (one of them at most).

        Raises:
          ValueError: both are given, with different placements.
        """
        if targets is None:
            return _preset(self.after, "after")
        placement = _preset(targets, "after", "targets")
        if self.after is not _AFTER_DEFAULT and _preset(self.after, "after") != placement:
            raise ValueError(
                f"LorettaAdp got both `targets`={targets!r} and `after`={self.after!r}. For LorettaAdp "
                "`targets` is the after-linear placement, the same as `after`: pass one of them (and "
                "`before=` for adapters before the linear layers)."
            )
        return placement

    def _placement(self, params: Any, position: str) -> list[Target]:
        """The targets of one side. A placement the user gave must match, pattern by pattern; the
        reference placement (``"loretta"``, every family's regexes) may find nothing on a side."""
        patterns = getattr(self, position)
        user_given = bool(patterns) and patterns != ADP_PRESETS[position]["loretta"]
        return select(params, patterns, layouts=self.layouts, name=position, require=user_given)

    def plan(self, params: Any) -> tuple[Target, ...]:
        after = self._placement(params, "after")
        before = self._placement(params, "before")
        both = {t.path for t in after} & {t.path for t in before}
        if both:
            raise ValueError(f"`after` and `before` both match {sorted(both)[:3]}; a leaf takes one adapter.")
        if not after and not before:
            select(params, self.after + self.before, name="after/before")  # raises the no-match error
        targets = tuple(after) + tuple(before)
        check_trainable(params, self.trainable, {t.path for t in targets})
        return targets

    def _bottleneck(self, key, target: Target, position: str) -> BottleneckAdapter:
        n = target.n_out if position == "after" else target.n_in
        m = self.bottleneck
        if m > n:
            raise ValueError(
                f"`bottleneck`={m} is larger than the {n} features of {target.path!r}; "
                f"use bottleneck <= {n}."
            )
        dims_down = _tt.resolve_dims(self.tt_shape, n, m)
        dims_up = _tt.resolve_dims(self.tt_shape, m, n)
        key_d, key_u = jax.random.split(key)
        common = dict(stack=target.stack, dtype=self.param_dtype)
        down = _tt.init_gaussian(key_d, dims_down, self.tt_rank, n_in=n, n_out=m, **common)
        up = _tt.init_gaussian(key_u, dims_up, self.tt_rank, n_in=m, n_out=n, **common)
        if self.initializer == "identity":
            up = (*up[:-1], jnp.zeros_like(up[-1]))
        return BottleneckAdapter(
            tuple(down),
            jnp.zeros((*target.stack, m), self.param_dtype),
            tuple(up),
            jnp.zeros((*target.stack, n), self.param_dtype),
            position=position,
            scale=float(self.scale),
            activation=self.activation,
            features=n,
            bottleneck=m,
        )

    def init(self, key: jax.Array, params: Any) -> dict:
        """Adapters for ``after``/``before`` targets, plus norms, classifier and head if asked."""
        targets = self.plan(params)
        after = {t.path for t in select(params, self.after, layouts=self.layouts, require=False)}
        keys = split_keys(key, len(targets) + 1)
        flat: dict[str, Any] = {}
        for target, k in zip(targets, keys):
            flat[target.path] = self._bottleneck(k, target, "after" if target.path in after else "before")
        if self.tensorized_classifier:
            classifier = select(params, CLASSIFIER_DENSE, layouts=self.layouts, name="tensorized_classifier")
            for i, target in enumerate(classifier):  # e.g. RoBERTa's head: dense and out_proj
                dims = _tt.resolve_dims(self.tt_shape, target.n_in, target.n_out)
                cores = _tt.init_gaussian(
                    jax.random.fold_in(keys[-1], i), dims, self.tt_rank, n_in=target.n_in, n_out=target.n_out,
                    stack=target.stack, dtype=self.param_dtype,
                )
                flat[target.path] = TTKernel(tuple(cores), n_in=target.n_in, n_out=target.n_out)
        patterns = self.trainable
        patterns += NORM_PATTERNS if self.train_norms else ()
        patterns += HEAD_PATTERNS if self.train_head else ()
        flat.update(trainable_copies(params, patterns, exclude=set(flat)))
        return nest(flat)

