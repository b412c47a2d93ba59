"""The examples in lrtt's docstrings run and print what they say (every module of the package)."""

import doctest
import importlib
import pkgutil

import pytest

import lrtt

MODULES = sorted(m.name for m in pkgutil.walk_packages(lrtt.__path__, "lrtt."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name}"


def test_the_examples_are_there():
    counts = [doctest.testmod(importlib.import_module(n), verbose=False, report=False).attempted for n in MODULES]
    assert sum(counts) >= 20, counts
