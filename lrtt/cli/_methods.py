"""The methods a run config names: ``method.name`` is the ``NAME`` of a method class lrtt
registers (:meth:`lrtt.Method.registered`), so a method class defined anywhere is known here
without a list of its own; the config's other method keys are that class's fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lrtt.cli._schema import ConfigError, RunConfig
from lrtt.methods import Method


def method_names() -> tuple[str, ...]:
    """The names ``method.name`` takes: the ``NAME`` of every method class lrtt registers
    (:meth:`lrtt.Method.registered`), a new one included."""
    return tuple(Method.registered())


def build_method(config: RunConfig) -> Any:
    """The method of ``config.method``: the class registered under ``name``
    (:meth:`lrtt.Method.registered`) with the other keys as its keyword arguments."""
    options = {k: v for k, v in config.method.items() if k != "name"}
    cls = Method.registered()[config.method_name]
    allowed = [f.name for f in dataclasses.fields(cls) if f.name != "param_dtype"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {['method.' + k for k in unknown]} for method `{config.method_name}` "
            f"({cls.__name__}); allowed: {', '.join(allowed)}."
        )
    try:
        return cls(**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"method `{config.method_name}`: {err}") from None
