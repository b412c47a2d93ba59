"""Single device vs pmap vs Mesh on 8 simulated CPU devices, LoRA and LorettaRep, tiny GPT-2.

``tests/multidevice_check.py`` runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before JAX starts there), so the flag
never reaches the other tests. One process runs every configuration; the tests below read its
JSON report.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 3
LOSS_TOL = 1e-5  # float32 reductions in another order
ADAPTER_TOL = 5e-5  # after 3 Adam steps of lr 1e-2, which move the factors by ~3e-2


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "multidevice_check.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CONFIGS = [
    ("LoRA", "pmap"),
    ("LoRA", "mesh_tensor"),
    ("LoRA", "mesh_fsdp"),
    ("LorettaRep", "pmap"),
    ("LorettaRep", "mesh_tensor"),
    ("LorettaRep", "mesh_tensor_make_mesh"),
]


@pytest.mark.parametrize("method,config", CONFIGS, ids=[f"{m}-{c}" for m, c in CONFIGS])
def test_same_loss_and_adapter_as_one_device(report, method, config):
    assert report["devices"] == 8
    result = report["methods"][method][config]
    assert len(result["losses"]) == STEPS
    assert result["loss_diff"] < LOSS_TOL, result
    assert result["adapter_diff"] < ADAPTER_TOL, result
    assert result["adapter_moved"] > 1e-2  # the comparison is between adapters that trained


def test_tensor_parallel_weights_are_sharded_and_lora_factors_follow_them(report):
    result = report["methods"]["LoRA"]["mesh_tensor"]
    params, adapter = result["param_specs"], result["adapter_specs"]
    layer = "transformer/h/0/attn"
    assert params[f"{layer}/c_attn/kernel"] == "P('model', None)"  # Conv1D (out, in): out split
    assert params[f"{layer}/c_proj/kernel"] == "P(None, 'model')"  # row-parallel: in split
    assert adapter[f"{layer}/c_attn/kernel/a"] == "P(None, None)"
    assert adapter[f"{layer}/c_attn/kernel/b"] == "P(None, 'model')"  # B follows the out axis
    assert adapter[f"{layer}/c_proj/kernel/a"] == "P('model', None)"  # A follows the in axis
    assert adapter[f"{layer}/c_proj/kernel/b"] == "P(None, None)"
    rep = report["methods"]["LorettaRep"]["mesh_tensor"]["adapter_specs"]
    assert set(rep.values()) == {"P()"}  # TT cores replicated


def test_fsdp_shards_every_kernel_over_data(report):
    result = report["methods"]["LoRA"]["mesh_fsdp"]
    assert result["param_specs"]["transformer/h/0/mlp/c_fc/kernel"] == "P('data', None)"
    assert result["param_specs"]["transformer/h/0/mlp/c_proj/kernel"] == "P(None, 'data')"
    assert result["adapter_specs"]["transformer/h/0/attn/c_attn/kernel/b"] == "P(None, 'data')"


def test_checkpoints_restore_onto_another_sharding(report):
    ck = report["checkpoint"]
    assert ck["to_single_equal"] and len(ck["to_single_devices"]) == 1  # Mesh -> one device
    assert ck["to_fsdp_equal"] and ck["to_fsdp_specs"] == ck["to_fsdp_expected_specs"]
    assert ck["single_to_tensor_equal"]
    assert ck["single_to_tensor_specs"]["transformer/h/1/attn/c_attn/kernel/b"] == "P(None, 'model')"
    assert ck["single_to_tensor_specs"]["transformer/h/1/attn/c_proj/kernel/a"] == "P('model', None)"


def test_mesh_step_with_adapter_dropout_equals_one_device(report):
    result = report["dropout_mesh"]
    assert result["effect"] > 1e-3  # dropout does change the run...
    assert result["loss_diff"] < LOSS_TOL, result  # ...and the Mesh step draws the same masks
    assert result["adapter_diff"] < ADAPTER_TOL, result

