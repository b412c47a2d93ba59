"""Target selection: which leaves a method adapts, and how each leaf's axes are read.

``targets`` is a regular expression, a list of them, or a preset name (``"qv"``,
``"attention"``, ``"all-linear"``), matched with ``re.search`` against each leaf's ``/``-joined
path. Every selected leaf is read as a matrix ``(in, out)`` through its :class:`Layout`:

* ``"in out"``: a Flax ``Dense`` kernel (the default for a 2-D leaf).
* ``"out in"``: a transformers Flax GPT-2 ``Conv1D`` kernel (preset for GPT-2).
* ``"layer in out"``: a kernel stacked over layers by ``nn.scan``; factors get the same
  leading axis.
* ``"in out out"``: a ``DenseGeneral`` kernel ``(embed, heads, head_dim)``; the out group is
  flattened to ``heads*head_dim`` for the factors.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

from lrtt._paths import named_leaves

_AXIS_WORDS = ("layer", "in", "out")

LAYOUT_HELP = (
    "a layout is a space-separated list of the words 'layer', 'in', 'out', one per axis, with "
    "the layer axes first and the in axes and the out axes each contiguous: e.g. 'in out' (Flax "
    "Dense), 'out in' (GPT-2 Conv1D), 'layer in out' (nn.scan-stacked Dense), 'in out out' "
    "(DenseGeneral with features=(heads, head_dim))"
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the axes of a kernel map onto ``(*stack, in, out)``.

    Attributes:
      n_stack: number of leading stacked (layer) axes.
      n_in: number of axes forming the input dimension.
      n_out: number of axes forming the output dimension.
      out_first: True when the out axes come before the in axes (GPT-2 ``Conv1D``).
    """

    n_stack: int
    n_in: int
    n_out: int
    out_first: bool = False

    @classmethod
    def parse(cls, spec: "str | Layout") -> "Layout":
        if isinstance(spec, Layout):
            return spec
        words = spec.split()
        bad = [w for w in words if w not in _AXIS_WORDS]
        if bad or "in" not in words or "out" not in words:
            raise ValueError(f"invalid layout {spec!r}: {LAYOUT_HELP}.")
        n_stack = 0
        while n_stack < len(words) and words[n_stack] == "layer":
            n_stack += 1
        body = words[n_stack:]
        first = body[0]
        n_first = 0
        while n_first < len(body) and body[n_first] == first:
            n_first += 1
        rest = body[n_first:]
        if "layer" in body or not rest or any(w != rest[0] for w in rest):
            raise ValueError(f"invalid layout {spec!r}: {LAYOUT_HELP}.")
        if first == "in":
            return cls(n_stack, n_first, len(rest), out_first=False)
        return cls(n_stack, len(rest), n_first, out_first=True)

    @property
    def ndim(self) -> int:
        return self.n_stack + self.n_in + self.n_out

    def __str__(self) -> str:
        groups = ["in"] * self.n_in, ["out"] * self.n_out
        body = groups[1] + groups[0] if self.out_first else groups[0] + groups[1]
        return " ".join(["layer"] * self.n_stack + body)

    def split(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``shape`` → ``(stack_shape, in_shape, out_shape)``."""
        stack, body = tuple(shape[: self.n_stack]), tuple(shape[self.n_stack :])
        if self.out_first:
            return stack, body[self.n_out :], body[: self.n_out]
        return stack, body[: self.n_in], body[self.n_in :]

    def to_matrix(self, w):
        """A kernel of this layout → ``(*stack, in, out)``."""
        stack, ins, outs = self.split(w.shape)
        if self.out_first:
            w = w.reshape(*stack, math.prod(outs), math.prod(ins))
            return w.swapaxes(-1, -2)
        return w.reshape(*stack, math.prod(ins), math.prod(outs))

    def from_matrix(self, m, shape: Sequence[int]):
        """``(*stack, in, out)`` → a kernel of this layout with the given ``shape``."""
        if self.out_first:
            m = m.swapaxes(-1, -2)
        return m.reshape(tuple(shape))


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
# One regex per family and concept; paths are those of transformers' Flax models (GPT-2, Llama,
# BERT, RoBERTa) and of linen/NNX models that use the same module names.
_BERT_LAYER = r"(^|/)encoder/layer/(\d+/)?"
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "qv": (
        r"(^|/)attn/c_attn/kernel$",  # GPT-2: q, k and v share one fused kernel
        r"(^|/)self_attn/(q_proj|v_proj)/kernel$",  # Llama
        _BERT_LAYER + r"attention/self/(query|value)/kernel$",  # BERT, RoBERTa
    ),
    "attention": (
        r"(^|/)attn/(c_attn|c_proj)/kernel$",
        r"(^|/)self_attn/(q_proj|k_proj|v_proj|o_proj)/kernel$",
        _BERT_LAYER + r"attention/(self/(query|key|value)|output/dense)/kernel$",
    ),
    "all-linear": (
        r"(^|/)(attn/(c_attn|c_proj)|mlp/(c_fc|c_proj))/kernel$",
        r"(^|/)(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel$",
        _BERT_LAYER + r"(attention/(self/(query|key|value)|output/dense)|intermediate/dense|output/dense)/kernel$",
    ),
}

# Layouts that differ from the 2-D default, per family. GPT-2's Conv1D stores (out, in).
LAYOUT_PRESETS: dict[str, dict[str, str]] = {
    "gpt2": {r"(^|/)(attn/(c_attn|c_proj)|mlp/(c_fc|c_proj))/kernel$": "out in"},
}

_FAMILY_SIGNATURES = {
    "gpt2": r"(^|/)h/\d+/attn/c_attn/kernel$",
    "llama": r"(^|/)layers/\d+/self_attn/q_proj/kernel$",
    "bert": r"(^|/)encoder/layer/\d+/attention/self/query/kernel$",
}


def detect_family(paths: Sequence[str]) -> str | None:
    """``"gpt2"``, ``"llama"``, ``"bert"`` (BERT and RoBERTa share names) or None."""
    for family, signature in _FAMILY_SIGNATURES.items():
        if any(re.search(signature, p) for p in paths):
            return family
    return None


def normalize_patterns(targets: "str | Sequence[str] | None", *, name: str = "targets") -> tuple[str, ...]:
    """A preset name, a regex or a list of regexes → a tuple of compiled-checked regexes."""
    if targets is None:
        return ()
    if isinstance(targets, str):
        if targets in TARGET_PRESETS:
            return TARGET_PRESETS[targets]
        targets = (targets,)
    patterns = tuple(targets)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"`{name}` must hold regex strings, got {pattern!r} ({type(pattern).__name__}).")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"`{name}` pattern {pattern!r} is not a valid regex: {err}.") from None
    return patterns


def matches(path: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, path) for p in patterns)


def first_match(path: str, mapping: Sequence[tuple[str, Any]]) -> Any | None:
    """The value of the first ``(regex, value)`` pair whose regex finds ``path``."""
    for pattern, value in mapping:
        if re.search(pattern, path):
            return value
    return None


def _no_match_message(name: str, patterns, paths: list[str]) -> str:
    shown = "\n  ".join(paths[:12]) + ("\n  ..." if len(paths) > 12 else "")
    return (
        f"`{name}` {list(patterns)} matched no leaf of the params. Patterns are regexes searched in "
        f"each leaf's '/'-joined path; presets are {sorted(TARGET_PRESETS)}. The params have "
        f"{len(paths)} leaves, e.g.:\n  {shown}\nPass a regex that matches the kernels to adapt, "
        "e.g. targets=r'attn/.*/kernel$'."
    )


def select(
    params: Any,
    targets: "str | Sequence[str]",
    *,
    layouts: Sequence[tuple[str, str]] = (),
    name: str = "targets",
    require: bool = True,
) -> list[Target]:
    """The leaves of ``params`` whose paths match ``targets``, with their layouts.

    Args:
      params: any pytree of arrays (or ``jax.ShapeDtypeStruct``).
      targets: preset name, regex or list of regexes.
      layouts: ``(regex, layout)`` pairs that override the family presets and the 2-D default.
      name: the argument name used in error messages.
      require: raise when nothing matches.

    Raises:
      ValueError: nothing matched (the message lists leaf paths), a matched leaf has no
        layout (not 2-D and none declared), or a layout does not fit the leaf's rank.
    """
    patterns = normalize_patterns(targets, name=name)
    leaves = named_leaves(params)
    paths = [p for p, _ in leaves]
    family = detect_family(paths)
    layout_rules = list(layouts) + list(LAYOUT_PRESETS.get(family or "", {}).items())
    selected = []
    for path, leaf in leaves:
        if not matches(path, patterns):
            continue
        shape = tuple(leaf.shape)
        spec = first_match(path, layout_rules)
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
                    f"says which of its axes are in/out/stacked. Pass layouts={{{path!r}: "
                    f"'layer in out'}} (or another layout: {LAYOUT_HELP}), or exclude the leaf "
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
    return selected


def as_pairs(mapping: "Mapping[str, Any] | Sequence[tuple[str, Any]] | None") -> tuple[tuple[str, Any], ...]:
    """Freeze a ``{regex: value}`` mapping into a hashable tuple of pairs (order kept)."""
    if mapping is None:
        return ()
    items = mapping.items() if isinstance(mapping, Mapping) else mapping
    return tuple((str(k), v) for k, v in items)
