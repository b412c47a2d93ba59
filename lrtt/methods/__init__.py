"""Adaptation methods: frozen dataclasses that say which leaves are adapted and how.

Every method is an :class:`Method`: ``targets``, ``layouts``, ``dropout``, ``mergeable``,
``init(key, params)``, ``to_config()`` / ``Method.from_config(config)`` and a ``label`` for tables.
Adding a method is one new module here with a subclass of :class:`Method`.
"""

from lrtt.methods._base import Method
from lrtt.methods._full import FullFineTune
from lrtt.methods._lora import LoRA
from lrtt.methods._loretta_adp import LorettaAdp
from lrtt.methods._loretta_rep import LorettaRep

__all__ = ["FullFineTune", "LoRA", "LorettaAdp", "LorettaRep", "Method"]
