"""What :func:`lrtt.discover` reports: one :class:`LeafUse` per distinct use of a leaf, one
:class:`LeafInfo` per leaf (its role, decided from its uses by :func:`role`), and the
:class:`Discovery` mapping that holds them."""

from __future__ import annotations

import collections.abc
import dataclasses

from lrtt._paths import exact_patterns

DOTS = ("dot_general", "ragged_dot_general")
ROLES = ("linear", "embedding", "tied_head", "other", "conflict", "unused")


@dataclasses.dataclass(frozen=True)
class LeafUse:
    """One use of a parameter leaf in the traced function.

    Attributes:
      primitive: ``"dot_general"``, ``"ragged_dot_general"``, ``"gather"`` (an embedding
        lookup) or the name of the other primitive that consumed the leaf (``"mul"``,
        ``"add"``, ``"output"`` when ``fn`` returns the leaf itself, ...).
      layout: for a dot use, one word per leaf axis (``"layer"``/``"in"``/``"out"``); None
        otherwise, or when the dot mixes the roles of one leaf axis.
      where: the source line of the use (when JAX recorded one) and the primitive with its
        operand shapes.
    """

    primitive: str
    layout: str | None
    where: str


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """What :func:`discover` found about one leaf.

    Attributes:
      path: lrtt's name of the leaf (key path joined with ``/``).
      shape: the leaf's shape.
      role: ``"linear"`` (only ``dot_general`` kernels, all with one layout), ``"embedding"``
        (only gathered), ``"tied_head"`` (gathered and used as a dot kernel),
        ``"other"`` (norms, biases, ...), ``"conflict"`` (dot kernels of two layouts, or a dot
        kernel that is also used otherwise) or ``"unused"``.
      layout: the layout for ``linear`` and ``tied_head`` leaves, else None.
      head: the leaf is an output-head kernel (its ``dot_general`` output reaches an output of
        ``fn`` through no other ``dot_general``).
      uses: every distinct use, in trace order.
    """

    path: str
    shape: tuple[int, ...]
    role: str
    layout: str | None
    head: bool
    uses: tuple[LeafUse, ...]


class Discovery(collections.abc.Mapping):
    """The result of :func:`discover`: ``path -> layout`` for every leaf that has a layout.

    As a mapping it holds the ``linear`` and ``tied_head`` leaves (``"in out"``,
    ``"layer in out"``, ...); :attr:`leaves` holds a :class:`LeafInfo` for every array leaf of
    the params, in tree order. Immutable.
    """

    __slots__ = ("leaves", "_layouts")

    def __init__(self, leaves: dict[str, LeafInfo]):
        object.__setattr__(self, "leaves", dict(leaves))
        object.__setattr__(self, "_layouts", {
            p: i.layout for p, i in leaves.items() if i.role in ("linear", "tied_head") and i.layout})

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"Discovery is immutable (cannot set {name!r})")

    def __delattr__(self, name):
        raise dataclasses.FrozenInstanceError(f"Discovery is immutable (cannot delete {name!r})")

    def __reduce__(self):
        return (Discovery, (self.leaves,))

    def __getitem__(self, path: str) -> str:
        return self._layouts[path]

    def __iter__(self):
        return iter(self._layouts)

    def __len__(self) -> int:
        return len(self._layouts)

    def linear(self, *, include_head: bool = False) -> list[str]:
        """Paths of the ``linear`` kernels, in tree order, the output head left out.

        With ``include_head=True``: the ``linear`` kernels, the head included, and the
        ``tied_head`` leaves (an embedding reused as a kernel).
        """
        roles = ("linear", "tied_head") if include_head else ("linear",)
        return [p for p, i in self.leaves.items() if i.role in roles and (include_head or not i.head)]

    def conflicts(self) -> list[LeafInfo]:
        """The leaves used with two layouts, or as a dot kernel and in some other way."""
        return [i for i in self.leaves.values() if i.role == "conflict"]

    def as_layouts(self) -> dict[str, str]:
        """``{regex: layout}`` with one anchored, escaped regex per leaf of this mapping, ready
        for a method's ``layouts=`` argument."""
        return dict(zip(exact_patterns(self._layouts), self._layouts.values()))

    def __repr__(self) -> str:
        counts = collections.Counter(i.role for i in self.leaves.values())
        roles = ", ".join(f"{counts[r]} {r}" for r in ROLES if counts[r])
        heads = [p for p, i in self.leaves.items() if i.head]
        return f"<Discovery of {len(self.leaves)} leaves: {roles}; head: {heads or 'none'}>"

    def __str__(self) -> str:
        rows = [("path", "shape", "role", "layout", "head")]
        for p, i in self.leaves.items():
            rows.append((p, str(i.shape), i.role, i.layout or "-", "head" if i.head else ""))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        lines = []
        for r in rows:
            lines.append("  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4])
            info = self.leaves.get(r[0])
            if info is not None and info.role == "conflict":
                for u in info.uses:
                    what = f"{u.primitive} {u.layout!r}" if u.layout else u.primitive
                    lines.append(f"    - {what} at {u.where}")
        return "\n".join(line.rstrip() for line in lines)


def role_of(uses: list[LeafUse]) -> tuple[str, str | None]:
    """``(role, layout)`` of a leaf used as ``uses`` (see :attr:`LeafInfo.role`)."""
    if not uses:
        return "unused", None
    dots = [u for u in uses if u.primitive in DOTS]
    gathers = [u for u in uses if u.primitive == "gather" and u.layout is None]
    others = [u for u in uses if u not in dots and u not in gathers]
    layouts = {u.layout for u in dots}
    if dots and (others or len(layouts) != 1 or None in layouts):
        return "conflict", None
    if dots:
        return ("tied_head" if gathers else "linear"), layouts.pop()
    if gathers and not others:
        return "embedding", None
    return "other", None

