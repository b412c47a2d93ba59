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


def _checkpointed(tmp_path, rank):
    import jax
    import jax.numpy as jnp

    params = {"q": {"kernel": jnp.ones((8, 8))}}
    method = lrtt.LoRA(rank=rank, targets="q")
    return method, method.init(jax.random.key(0), params)


def test_a_checkpoint_mismatch_carries_the_step_and_every_difference(tmp_path):
    method, adapter = _checkpointed(tmp_path, rank=4)
    with lrtt.CheckpointManager(str(tmp_path / "c"), method, async_save=False) as manager:
        manager.save(3, adapter)
    other, other_adapter = _checkpointed(tmp_path, rank=2)
    with lrtt.CheckpointManager(str(tmp_path / "c"), other, create=False) as manager:
        with pytest.raises(lrtt.CheckpointMismatchError) as err:
            manager.restore(3, adapter_like=other_adapter)
    assert err.value.step == 3
    kinds = {kind for kind, _ in err.value.differences}
    assert "method field" in kinds and any("rank" in line for _, line in err.value.differences)


def test_a_non_finite_refusal_names_the_arrays_as_a_field(tmp_path):
    import jax.numpy as jnp

    method, adapter = _checkpointed(tmp_path, rank=2)
    bad = {"q": {"kernel": lrtt.LoraFactors(adapter["q"]["kernel"].a.at[0, 0].set(jnp.nan),
                                            adapter["q"]["kernel"].b, scale=1.0)}}
    with lrtt.CheckpointManager(str(tmp_path / "c"), method, async_save=False) as manager:
        with pytest.raises(lrtt.NonFiniteError) as err:
            manager.save(1, bad)
    assert err.value.names == ("adapter q/kernel/a",)


def test_a_distributed_setting_error_names_the_setting_and_renders_with_other_names(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(lrtt.train.DistributedSettingError) as err:
        lrtt.train.initialize_distributed("10.0.0.2:8476", 2)
    assert err.value.setting == "process_id" and "`process_id` is not set" in str(err.value)
    assert err.value.render({"process_id": "--process-id"}).startswith("--process-id is not set")
    assert isinstance(err.value, ValueError)
