"""lrtt.Error: every error lrtt raises on purpose derives from it and keeps its builtin base."""

import inspect

import pytest

import lrtt
import lrtt.data
import lrtt.train
from lrtt.cli._cluster import PrimaryError
from lrtt.cli._rundir import RunDirectoryError, RunLockedError
from lrtt.cli._schema import ConfigError

PUBLIC = [obj for name, obj in vars(lrtt).items() if inspect.isclass(obj) and name.endswith("Error") and obj is not lrtt.Error] + [
    lrtt.train.DivergenceError, lrtt.data.BadRowError]
BUILTIN = {"CheckpointMismatchError": ValueError, "CheckpointCorruptError": ValueError, "NonFiniteError": ValueError,
           "CheckpointNotFoundError": FileNotFoundError, "CheckpointWriteError": OSError, "ExportError": OSError,
           "PeftFileError": ValueError, "DivergenceError": FloatingPointError, "BadRowError": ValueError}


@pytest.mark.parametrize("cls", PUBLIC + [ConfigError, RunLockedError, RunDirectoryError, PrimaryError],
                         ids=lambda c: c.__name__)
def test_every_error_is_an_lrtt_error_and_keeps_its_builtin_base(cls):
    assert issubclass(cls, lrtt.Error) and cls is not lrtt.Error
    builtin = BUILTIN.get(cls.__name__)
    if builtin is not None:
        assert issubclass(cls, builtin)


def test_the_public_errors_are_all_found():
    names = {c.__name__ for c in PUBLIC}
    assert {"CheckpointCorruptError", "ExportError", "PeftFileError", "DivergenceError"} <= names
    assert len(PUBLIC) >= 12


def test_an_error_carries_its_facts_as_attributes():
    err = lrtt.CheckpointCorruptError("step 7 is damaged", step=7, earlier=(3, 5))
    assert (err.step, err.earlier) == (7, (3, 5))
    with pytest.raises(lrtt.Error):
        raise err
