"""Target selection: which leaves a method adapts, and how each leaf's axes are read.

``targets`` is a regular expression, a list of them, or a preset name (``"qv"``,
``"attention"``, ``"all-linear"``), matched with ``re.search`` against each leaf's ``/``-joined
path; each regex of a list must match some leaf (a preset is checked per family instead). Every selected leaf is read as a matrix ``(in, out)`` through its :class:`Layout`:

* ``"in out"``: a Flax ``Dense`` kernel (the default for a 2-D leaf).
* ``"out in"``: a transformers Flax GPT-2 ``Conv1D`` kernel (preset for GPT-2).
* ``"layer in out"``: a kernel stacked over layers by ``nn.scan``; factors get the same
  leading axis.
* ``"in out out"``: a ``DenseGeneral`` kernel ``(embed, heads, head_dim)``; the out group is
  flattened to ``heads*head_dim`` for the factors.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping, Sequence

from lrtt import _families
from lrtt._discover import Discovery
from lrtt._paths import exact_path, exact_patterns, named_leaves

LAYER, IN, OUT = "layer", "in", "out"
"""The axis kinds, one vocabulary for a :class:`Layout`'s words, the groups of an adapted leaf's
parts (:mod:`lrtt._leaves`) and the axes of the factored interpreter's views."""
AXIS_KINDS = (LAYER, IN, OUT)

LAYOUT_HELP = (
    "a layout is a space-separated list of the words 'layer', 'in', 'out', one per axis of the "
    "leaf, in any order, with at least one 'in' and one 'out': e.g. 'in out' (Flax Dense), "
    "'out in' (GPT-2 Conv1D), 'layer in out' (nn.scan-stacked Dense), 'in out out' (DenseGeneral "
    "with features=(heads, head_dim)), 'out in out' (Gemma's q_einsum (heads, embed, head_dim)), "
    "'in layer out out' (a MaxText kernel scanned on axis 1); lrtt.discover(fn, params, *args) "
    "reads them off the model"
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """What each axis of a kernel is: a stacked ``layer`` axis, an ``in`` axis or an ``out`` axis.

    The kernel is read as the matrices ``(*stack, in, out)``, where ``stack`` is the shape of its
    layer axes and ``in`` (``out``) the product of its in (out) axes, each group taken in the
    order its axes have in the kernel. The groups may interleave in any order:

    >>> import numpy as np
    >>> layout = Layout.parse("out in out")           # Gemma's q_einsum: (heads, embed, head_dim)
    >>> w = np.arange(4 * 3 * 2).reshape(4, 3, 2)
    >>> layout.split(w.shape)
    ((), (3,), (4, 2))
    >>> m = layout.to_matrix(w)                       # (in, out) = (3, 4·2)
    >>> m.shape, bool((layout.from_matrix(m, w.shape) == w).all())
    ((3, 8), True)

    Attributes:
      kinds: one word per axis, ``"layer"``, ``"in"`` or ``"out"``.
    """

    kinds: tuple[str, ...]

    def __post_init__(self):
        kinds = tuple(self.kinds)
        if any(k not in AXIS_KINDS for k in kinds) or IN not in kinds or OUT not in kinds:
            raise ValueError(f"invalid layout {' '.join(map(str, kinds))!r}: {LAYOUT_HELP}.")
        object.__setattr__(self, "kinds", kinds)

    @classmethod
    def parse(cls, spec: "str | Layout") -> "Layout":
        """A layout from its words (``"layer in out"``), or ``spec`` itself if it is one."""
        if isinstance(spec, Layout):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"invalid layout {spec!r}: {LAYOUT_HELP}.")
        return cls(tuple(spec.split()))

    def axes(self, kind: str) -> tuple[int, ...]:
        """The positions of the axes of one kind (``"layer"``, ``"in"``, ``"out"``), in order."""
        return tuple(a for a, k in enumerate(self.kinds) if k == kind)

    @property
    def ndim(self) -> int:
        return len(self.kinds)

    @property
    def n_stack(self) -> int:
        return len(self.axes(LAYER))

    @property
    def n_in(self) -> int:
        return len(self.axes(IN))

    @property
    def n_out(self) -> int:
        return len(self.axes(OUT))

    def __str__(self) -> str:
        return " ".join(self.kinds)

    @property
    def _order(self) -> tuple[int, ...]:
        return self.axes(LAYER) + self.axes(IN) + self.axes(OUT)

    def split(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``shape`` → ``(stack_shape, in_shape, out_shape)``, each in the kernel's axis order."""
        return tuple(tuple(shape[a] for a in self.axes(k)) for k in AXIS_KINDS)

    def to_matrix(self, w):
        """A kernel of this layout → ``(*stack, in, out)``."""
        stack, ins, outs = self.split(w.shape)
        order = self._order
        if order != tuple(range(len(order))):
            w = w.transpose(order)
        return w.reshape(*stack, math.prod(ins), math.prod(outs))

    def from_matrix(self, m, shape: Sequence[int]):
        """``(*stack, in, out)`` → a kernel of this layout with the given ``shape``."""
        stack, ins, outs = self.split(shape)
        order = self._order
        m = m.reshape(stack + ins + outs)
        if order != tuple(range(len(order))):
            m = m.transpose([order.index(a) for a in range(len(order))])
        return m


@dataclasses.dataclass(frozen=True)
class Conflict:
    """A leaf that :func:`lrtt.discover` saw used in incompatible ways: it has no one layout."""

    path: str
    uses: tuple[str, ...]

    def error(self, name: str) -> ValueError:
        uses = "\n  ".join(self.uses)
        return ValueError(
            f"`{name}` matched {self.path!r}, which the model uses in incompatible ways, so no "
            f"layout reads it as one matrix (in, out):\n  {uses}\nAn adapter on it would change "
            f"each use differently from what a dense ΔW does. Leave it out of `{name}`, or declare "
            f"the layout you mean with layouts={{{self.path!r}: '...'}} (and check the other use)."
        )


@dataclasses.dataclass(frozen=True)
class Target:
    """One selected leaf: its path, shape, dtype and layout."""

    path: str
    shape: tuple[int, ...]
    dtype: Any
    layout: Layout

    @property
    def stack(self) -> tuple[int, ...]:
        return self.layout.split(self.shape)[0]

    @property
    def n_in(self) -> int:
        return math.prod(self.layout.split(self.shape)[1])

    @property
    def n_out(self) -> int:
        return math.prod(self.layout.split(self.shape)[2])


# --- presets ---------------------------------------------------------------------------------
TARGET_PRESETS: dict[str, tuple[str, ...]] = {name: _families.preset_patterns(name) for name in _families.PRESETS}
"""Each preset's regexes over every known family (see :mod:`lrtt._families`). On params of a
recognized family a preset means that family's kinds, and each must be found."""

def normalize_patterns(targets: "str | Sequence[str] | None", *, name: str = "targets") -> tuple[str, ...]:
    """A preset name, a regex or a list of regexes → a tuple of checked regexes.

    A preset stays its name, ``("qv",)``: :func:`select` resolves it on the params' family.
    """
    if targets is None:
        return ()
    if isinstance(targets, str):
        targets = (targets,)
    patterns = tuple(targets)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"`{name}` must hold regex strings, got {pattern!r} ({type(pattern).__name__}).")
        if exact_path(pattern) is not None:
            continue  # an escaped, anchored path (exact_patterns): valid by construction
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"`{name}` pattern {pattern!r} is not a valid regex: {err}.") from None
    return patterns


def preset_of(patterns: Sequence[str]) -> str | None:
    """The preset name when ``patterns`` is one, else None."""
    return patterns[0] if len(patterns) == 1 and patterns[0] in TARGET_PRESETS else None


def _expand(patterns: Sequence[str]) -> tuple[str, ...]:
    preset = preset_of(patterns)
    return TARGET_PRESETS[preset] if preset else tuple(patterns)


@functools.lru_cache(maxsize=256)
def _index(patterns: tuple[str, ...]) -> tuple[dict[str, int], tuple[tuple[int, "re.Pattern"], ...]]:
    """``({exact path: first position}, ((position, compiled regex), ...))`` of a pattern list.

    Exact-path patterns are dict lookups: a 70B model's 560 targets stay O(1) per leaf (and
    Python's own regex cache of 512 entries does not thrash)."""
    exact: dict[str, int] = {}
    regexes = []
    for i, pattern in enumerate(patterns):
        path = exact_path(pattern)
        if path is not None:
            exact.setdefault(path, i)
        else:
            regexes.append((i, re.compile(pattern)))
    return exact, tuple(regexes)


def _first(path: str, patterns: tuple[str, ...]) -> int | None:
    exact, regexes = _index(patterns)
    found = exact.get(path)
    for i, regex in regexes:
        if found is not None and i > found:
            break
        if regex.search(path):
            return i
    return found


def matches(path: str, patterns: Sequence[str]) -> bool:
    return _first(path, tuple(_expand(patterns))) is not None


def first_match(path: str, mapping: Sequence[tuple[str, Any]]) -> Any | None:
    """The value of the first ``(regex, value)`` pair whose regex finds ``path``."""
    i = _first(path, tuple(pattern for pattern, _ in mapping))
    return None if i is None else mapping[i][1]


def freeze_targets(targets: "str | Sequence[str] | None", layouts: Any = (), *, name: str = "targets") -> tuple[str, ...]:
    """``targets`` for storage in a method; ``"all-linear"`` with ``layouts=lrtt.discover(...)``
    becomes the discovered linear kernels (the output head left out, as PEFT does)."""
    patterns = normalize_patterns(targets, name=name)
    if isinstance(layouts, Discovery) and preset_of(patterns) == "all-linear":
        linear = layouts.linear()
        if not linear:
            raise ValueError(f"`{name}`='all-linear': lrtt.discover found no linear kernel besides the head:\n{layouts}")
        return exact_patterns(linear)
    return patterns


def dead_patterns(paths: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The patterns of ``patterns`` that match none of ``paths``, in order.

    A preset name stands for all its regexes (dead when none of them matches); an exact-path
    pattern (:func:`lrtt._paths.exact_patterns`) is a set lookup, any other regex is searched.
    """
    if preset_of(patterns):
        return [] if any(matches(p, patterns) for p in paths) else list(patterns)
    present = set(paths)
    dead = []
    for pattern in patterns:
        path = exact_path(pattern)
        if path is not None:
            found = path in present
        else:
            regex = re.compile(pattern)
            found = any(regex.search(p) for p in paths)
        if not found:
            dead.append(pattern)
    return dead


def leaf_examples(paths: Sequence[str], n: int = 12) -> str:
    """Up to ``n`` leaf paths, one per indented line (for error messages)."""
    return "\n  ".join(paths[:n]) + ("\n  ..." if len(paths) > n else "")


def dead_pattern_message(name: str, dead: Sequence[str], paths: Sequence[str], consequence: str) -> str:
    """The error for patterns of a user-given list that match no leaf: which, why it matters, the fix."""
    presets = [p for p in dead if p in TARGET_PRESETS]
    preset_hint = (
        f" {', '.join(map(repr, presets))} {'is a preset name' if len(presets) == 1 else 'are preset names'}, "
        f"and a preset is used alone (`{name}`={presets[0]!r}), not inside a list of regexes."
        if presets
        else ""
    )
    shown = repr(dead[0]) if len(dead) == 1 else str(list(dead))
    return (
        f"`{name}` pattern{'s' if len(dead) > 1 else ''} {shown} matched no leaf of the params, "
        f"so {consequence}. Every pattern of `{name}` must match a leaf: one that matches nothing is "
        f"a typo or was written for another model.{preset_hint} Fix or drop "
        f"{'them' if len(dead) > 1 else 'it'}; patterns are regexes searched in each leaf's "
        f"'/'-joined path. The params have {len(paths)} leaves, e.g.:\n  {leaf_examples(paths)}"
    )


def _no_match_message(name: str, patterns, paths: list[str]) -> str:
    shown = leaf_examples(paths)
    return (
        f"`{name}` {list(patterns)} matched no leaf of the params. Patterns are regexes searched in "
        f"each leaf's '/'-joined path; presets are {sorted(TARGET_PRESETS)} (for the families "
        f"{[f.name for f in _families.FAMILIES]}). The params have "
        f"{len(paths)} leaves, e.g.:\n  {shown}\nPass a regex that matches the kernels to adapt, "
        "e.g. targets=r'attn/.*/kernel$'."
    )


def select(
    params: Any,
    targets: "str | Sequence[str]",
    *,
    layouts: "Mapping[str, str] | Sequence[tuple[str, str]] | Discovery" = (),
    name: str = "targets",
    require: bool = True,
) -> list[Target]:
    """The leaves of ``params`` whose paths match ``targets``, with their layouts.

    Args:
      params: any pytree of arrays (or ``jax.ShapeDtypeStruct``).
      targets: preset name, regex or list of regexes.
      layouts: ``(regex, layout)`` pairs that override the family presets and the 2-D default.
      name: the argument name used in error messages.
      require: raise when nothing matches, or when one regex of a list (not a preset: a
        preset is resolved and checked per family) matches no leaf. Internal callers that pass
        exact paths of another tree use ``require=False``.

    Raises:
      ValueError: nothing matched, or (``require``) a pattern of a list matched nothing (the
        message lists leaf paths); a matched leaf has no layout (not 2-D and none declared), or
        a layout does not fit the leaf's rank.
    """
    patterns = normalize_patterns(targets, name=name)
    layouts = as_pairs(layouts)
    leaves = named_leaves(params)
    paths = [p for p, _ in leaves]
    family = _families.detect(paths)
    preset = preset_of(patterns)
    if preset and family is not None:
        patterns = _families.resolve_preset(preset, family, paths)
    shapes = {p: tuple(leaf.shape) for p, leaf in leaves}
    selected = []
    for path, leaf in leaves:
        if not matches(path, patterns):
            continue
        shape = tuple(leaf.shape)
        spec = first_match(path, layouts)
        if isinstance(spec, Conflict):
            raise spec.error(name)
        if spec is None and family is not None:
            spec = family.layout_of(path, shape, shapes)
        if spec is None:
            if len(shape) < 2:
                raise ValueError(
                    f"`{name}` matched {path!r} of shape {shape}: a {len(shape)}-D leaf (a bias or "
                    f"a norm scale?) is not a kernel and cannot take a low-rank adapter. Narrow the "
                    f"pattern, e.g. end it with 'kernel$', or train such leaves in full with "
                    f"`trainable=`."
                )
            if len(shape) != 2:
                raise ValueError(
                    f"`{name}` matched {path!r} of shape {shape}, which is not 2-D, and no layout "
                    f"says which of its axes are in/out/stacked. Let lrtt read them off the model: "
                    f"layouts = lrtt.discover(apply_fn, params, *example_inputs), then pass "
                    f"layouts=layouts to the method (print(layouts) shows what each kernel is); or "
                    f"declare it, layouts={{{path!r}: '...'}} ({LAYOUT_HELP}); or exclude the leaf "
                    f"from `{name}`."
                )
            spec = "in out"
        layout = Layout.parse(spec)
        if layout.ndim != len(shape):
            raise ValueError(
                f"layout {str(layout)!r} has {layout.ndim} axes but leaf {path!r} has shape "
                f"{shape}; give a layout with one word per axis ({LAYOUT_HELP})."
            )
        selected.append(Target(path, shape, leaf.dtype, layout))
    if require and not selected:
        raise ValueError(_no_match_message(name, patterns, paths))
    if require and preset is None and len(patterns) > 1:
        dead = dead_patterns(paths, patterns)
        if dead:
            consequence = (
                "the leaves it was meant for would silently stay unadapted (the other patterns "
                f"matched {len(selected)} leaves)"
            )
            raise ValueError(dead_pattern_message(name, dead, paths, consequence))
    return selected


def as_pairs(mapping: "Mapping[str, Any] | Sequence[tuple[str, Any]] | None") -> tuple[tuple[str, Any], ...]:
    """Freeze a ``{regex: value}`` mapping into a hashable tuple of pairs (order kept).

    A :class:`lrtt.Discovery` (``path -> layout``) gives one anchored regex per path.
    """
    if mapping is None:
        return ()
    if isinstance(mapping, Discovery):
        conflicts = {"^" + re.escape(i.path) + "$": Conflict(i.path, tuple(f"{u.primitive} {u.layout or ''} at {u.where}"
                                                                          for u in i.uses))
                     for i in mapping.conflicts()}
        mapping = {**mapping.as_layouts(), **conflicts}
    items = mapping.items() if isinstance(mapping, Mapping) else mapping
    return tuple((str(k), v) for k, v in items)
