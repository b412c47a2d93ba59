"""The walk of a jaxpr for :func:`lrtt.discover`: each equation's operands' views and marks go
through the rule of its primitive (:data:`lrtt._discover._rules.RULES`, else the default rule);
the walker collects each leaf's distinct uses as the rules report them."""

from __future__ import annotations

from typing import Iterable

from jax.extend import core as jcore

from lrtt._discover._parts import NONE, Part
from lrtt._discover._report import LeafUse
from lrtt._discover._rules import RULES, default
from lrtt._jaxpr import describe, open_jaxpr


class Walker:
    """Walks the jaxprs of one traced function over leaves of ``ndims`` axes; ``uses[i]``: the
    distinct uses of leaf ``i``, in trace order."""

    def __init__(self, ndims: list[int]):
        self.ndims = ndims
        self.uses: list[list[LeafUse]] = [[] for _ in ndims]

    def use(self, view: Iterable[Part], primitive: str, layout: str | None, where: str) -> None:
        """Record a use of every leaf ``view`` holds (once per distinct use)."""
        for part in view:
            u = LeafUse(primitive, layout, where)
            if u not in self.uses[part.leaf]:
                self.uses[part.leaf].append(u)

    def other(self, view: Iterable[Part], eqn, primitive: str | None = None) -> None:
        """A use of kind other at ``eqn`` (named ``primitive``, default the equation's)."""
        self.use(view, primitive or eqn.primitive.name, None, describe(eqn))

    def walk(self, jaxpr, in_views: list, in_marks: list) -> tuple[list, list]:
        """The views and marks of ``jaxpr``'s outputs, given those of its inputs."""
        jaxpr = open_jaxpr(jaxpr)[0]
        views: dict = {}
        marks: dict = {}
        for var, v, m in zip(jaxpr.invars, in_views, in_marks):
            if v:
                views[var] = v
            if m:
                marks[var] = m

        def read_view(x):
            return None if isinstance(x, jcore.Literal) else views.get(x)

        def read_marks(x):
            return NONE if isinstance(x, jcore.Literal) else marks.get(x, NONE)

        for eqn in jaxpr.eqns:
            vin = [read_view(x) for x in eqn.invars]
            min_ = [read_marks(x) for x in eqn.invars]
            vout, mout = RULES.get(eqn.primitive.name, default)(self, eqn, vin, min_)
            for var, v, m in zip(eqn.outvars, vout, mout):
                if v:
                    views[var] = v
                if m:
                    marks[var] = m
        return [read_view(x) for x in jaxpr.outvars], [read_marks(x) for x in jaxpr.outvars]
