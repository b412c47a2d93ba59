"""Factored execution: the interpreter (:func:`factored`), its rule table (:data:`RULES`), the
adapted leaves it consumes (:func:`wrap`) and the low-rank kernels the rules call."""

from lrtt._factored._wrap import wrap
from lrtt._leaves import AdaptedLeaf, AdapterLeaf, LowRankLeaf
from lrtt._factored._interpreter import factored
from lrtt._factored._rules import RULES
from lrtt._jaxpr import scan_counts

__all__ = ["AdaptedLeaf", "AdapterLeaf", "LowRankLeaf", "RULES", "factored", "scan_counts", "wrap"]
