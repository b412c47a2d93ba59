"""The method interface every lrtt method implements, and the helpers they share.

A *method* is a frozen dataclass of hyperparameters (``LoRA``, ``LorettaRep``, ``LorettaAdp``).
It holds no arrays and is hashable, so it can be a static argument of ``jax.jit``. Each one has:

* ``init(key, params) -> adapter``: the trainable entries (see :mod:`lrtt._adapter`), keyed
  like the params they adapt. ``params`` may be concrete arrays or ``jax.ShapeDtypeStruct``
  leaves under ``jax.eval_shape`` (parameter counting from shapes only).
* ``plan(params) -> tuple[Target, ...]``: the leaves it adapts (errors for a bad selection are
  raised here, at trace time, never on traced values: a ``targets`` regex of a list or a
  ``trainable`` pattern that matches nothing, a rank too large, ...). ``lrtt.wrap`` and
  ``lrtt.merge`` call it to check that the adapter has an entry for every leaf it selects.
* ``to_config() -> dict``: a JSON-able description (checkpoints compare it on restore), and
  ``Method.from_config(config)``, its inverse.
* ``mergeable``: whether ``W0 + ΔW`` is exact (LoRA, LorettaRep) or not (LorettaAdp).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from typing import Any, Collection, Sequence

import jax
import jax.numpy as jnp

from lrtt._adapter import Trainable
from lrtt._paths import named_leaves
from lrtt._targets import dead_pattern_message, dead_patterns, freeze_targets, matches
from lrtt.tt import _core as _tt


class Method:
    """The interface every lrtt method implements; subclasses are frozen, keyword-only dataclasses.

    Defaults here are those of a method without the feature (a subclass's dataclass field
    overrides them): no target patterns, no layouts, no adapter dropout, not mergeable.
    Subclasses implement :meth:`init` and :meth:`plan` and name the fields shown in their
    :attr:`label` in ``LABEL_FIELDS``.

    Every subclass is registered when it is defined: by its class name (what :meth:`to_config`
    writes and :meth:`from_config` reads) and by ``NAME``, its short snake_case name (``"lora"``;
    by default the class name in snake_case, ``LorettaRep`` → ``"loretta_rep"``), which the
    ``lrtt`` command's ``method.name`` takes (:meth:`registered`).
    """

    targets: tuple = ()
    layouts: tuple = ()
    dropout: float = 0.0
    mergeable: bool = False
    LABEL_FIELDS: tuple[str, ...] = ()
    NAME: str = ""
    _REGISTRY: dict[str, type] = {}  # class name -> class: the one registry of methods

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "NAME" not in cls.__dict__:  # a subclass of a method gets its own name, not its parent's
            cls.NAME = _snake_case(cls.__name__)
        other = Method.registered().get(cls.NAME)
        if other is not None and other.__name__ != cls.__name__:
            raise TypeError(f"method {cls.__name__} has the NAME {cls.NAME!r} of {other.__name__}; give it "
                            "another NAME (a class attribute).")
        Method._REGISTRY[cls.__name__] = cls

    @staticmethod
    def registered() -> dict[str, type]:
        """``{NAME: class}`` of every method class defined so far, in the order they were defined.

        Example:
          >>> import lrtt
          >>> lrtt.Method.registered()["lora"] is lrtt.LoRA
          True
        """
        return {cls.NAME: cls for cls in Method._REGISTRY.values()}

    def init(self, key: jax.Array, params: Any) -> Any:
        """The adapter: a tree of the new, trainable entries, keyed like the leaves they adapt."""
        raise NotImplementedError

    def plan(self, params: Any) -> tuple:
        """The :class:`lrtt._targets.Target` leaves this method adapts (errors raised here)."""
        raise NotImplementedError

    def to_config(self) -> dict:
        """A JSON-able dict of the method's fields plus its class name under ``"method"``."""

        def plain(value):
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            if isinstance(value, type) or hasattr(value, "itemsize"):  # a dtype
                return jnp.dtype(value).name
            return value

        fields = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"method": type(self).__name__, **fields}

    @classmethod
    def from_config(cls, config: dict) -> "Method":
        """The method ``config`` describes: the inverse of :meth:`to_config`.

        ``Method.from_config`` picks the class named under ``"method"``; ``LoRA.from_config``
        also checks that the config is a LoRA's. Lists become tuples and dtype names dtypes.

        Raises:
          ValueError: no class of that name, or a config of another method than ``cls``.

        Example:
          >>> import lrtt
          >>> m = lrtt.LoRA(rank=4, targets=("q_proj/kernel",))
          >>> lrtt.Method.from_config(m.to_config()) == m
          True
        """
        config = dict(config)
        name = config.pop("method", None)
        method_cls = Method._REGISTRY.get(name)
        if method_cls is None:
            raise ValueError(
                f"method config names {name!r}; known methods: {sorted(Method._REGISTRY)}. Pass a dict "
                "made by method.to_config()."
            )
        if not issubclass(method_cls, cls):
            raise ValueError(f"{cls.__name__}.from_config got the config of a {name}; use Method.from_config.")
        fields = set(inspect.signature(method_cls).parameters)  # the fields and init-only aliases
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"{name} has no fields {unknown}; its fields are {sorted(fields)}.")

        def restore(key, value):
            if isinstance(value, list):
                return tuple(restore(key, v) for v in value)
            if key.endswith("dtype") and isinstance(value, str):
                return jnp.dtype(value)
            return value

        return method_cls(**{k: restore(k, v) for k, v in config.items()})

    @property
    def label(self) -> str:
        """``"LoRA(rank=8)"``: the class and the fields that tell two instances apart in a table."""
        shown = ", ".join(f"{k}={getattr(self, k)}" for k in self.LABEL_FIELDS)
        return f"{type(self).__name__}({shown})"


def _snake_case(name: str) -> str:
    """``"LorettaRep"`` → ``"loretta_rep"``: a class name as a method's default ``NAME``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` (numpy integers too, not bool) if ``>= 1``, else a ValueError."""
    return _tt._check_int(value, name)


def check_scale_numerator(value: Any, name: str) -> None:
    """``alpha`` (and per-target overrides): a finite, non-zero real number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value != 0
    if not ok:
        raise ValueError(f"`{name}` must be a finite, non-zero number (the scale is alpha / rank), got {value!r}.")


def check_probability(value: Any, name: str) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a probability in [0, 1), got {value!r}.")


def check_choice(value: Any, name: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def check_rank(rank: int, target, name: str = "rank", *, override: str | None = "rank_pattern") -> None:
    """A low-rank bottleneck must satisfy ``1 <= rank <= min(in, out)``.

    ``override``: the method's per-leaf rank field the message suggests (LoRA's
    ``rank_pattern``), or None for a method with one rank for every target (LorettaRep), whose
    message suggests leaving the leaf out of ``targets`` instead.
    """
    limit = min(target.n_in, target.n_out)
    if rank > limit:
        if override is not None:
            fix = f"or an override for this leaf (e.g. {override}={{{target.path!r}: {limit}}})"
        else:
            fix = (
                f"or leave {target.path!r} out of `targets` (this method has one rank for every "
                "target; lrtt.LoRA takes per-leaf ranks with rank_pattern)"
            )
        raise ValueError(
            f"`{name}`={rank} is larger than min(in, out)={limit} of {target.path!r} "
            f"(matrix ({target.n_in}, {target.n_out})): a rank above that cannot be reached by "
            f"any product A·B. Use {name} <= {limit}, {fix}."
        )


def check_trainable(
    params: Any, patterns: Sequence[str], adapted: Collection[str] = (), *, name: str = "trainable"
) -> None:
    """Every pattern of ``trainable`` must select a leaf to train in full besides ``adapted``.

    Raises:
      ValueError: a pattern matches no leaf of ``params``, or only leaves that already take an
        adapter (``adapted``), so nothing would train in full for it.
    """
    if not patterns:
        return
    paths = [p for p, _ in named_leaves(params)]
    dead = dead_patterns(paths, patterns)
    if dead:
        raise ValueError(dead_pattern_message(name, dead, paths, "no leaf would train in full for it"))
    adapted = set(adapted)
    covered = dead_patterns([p for p in paths if p not in adapted], patterns)
    if covered:
        inside = [p for p in paths if p in adapted and matches(p, covered)]
        shown = repr(covered[0]) if len(covered) == 1 else str(covered)
        raise ValueError(
            f"`{name}` pattern{'s' if len(covered) > 1 else ''} {shown} matched only leaves that "
            f"already take an adapter ({inside[:5]}), so no leaf trains in full for it: a leaf gets "
            f"either an adapter or full training. Narrow `targets`, or drop the pattern from `{name}`."
        )


def freeze_patterns(value: Any, name: str, layouts: Any = ()) -> tuple[str, ...]:
    """Normalize a regex / list / preset field for storage in a frozen, hashable dataclass
    (``"all-linear"`` over ``layouts=lrtt.discover(...)``: the discovered kernels)."""
    return freeze_targets(value, layouts, name=name)


def trainable_copies(params: Any, patterns: Sequence[str], *, exclude: set[str]) -> dict[str, Trainable]:
    """``{path: Trainable(leaf)}`` for every leaf matching ``patterns`` and not in ``exclude``.

    The copy keeps the leaf's dtype; under ``jax.eval_shape`` it is a shape only.
    """
    if not patterns:
        return {}
    out = {}
    for path, leaf in named_leaves(params):
        if path in exclude or not matches(path, patterns):
            continue
        out[path] = Trainable(jnp.array(leaf, copy=True))
    return out


def split_keys(key: jax.Array, n: int) -> list[jax.Array]:
    return list(jax.random.split(key, max(n, 1)))[:n]
