"""benchmarks/collectives.py: the HLO collective parser, and the bytes a tiny GPT-2 step moves.

The parser tests read hand-written HLO (tuple results, async pairs, the replica-group spellings,
while loops). The step test runs the benchmark script itself on a tiny GPT-2 (2 layers, 32 wide)
in a subprocess, where the script sets ``--xla_force_host_platform_device_count=8`` before JAX
starts (the flag never reaches this process), and checks the counts it prints as JSON.
"""

import collections
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "collectives.py")
LOSS_SCALAR = 4  # the f32[] mean loss, all-reduced with the gradients


def _module():
    spec = importlib.util.spec_from_file_location("collectives_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # not __main__: sets no XLA flag
    return module


C = _module()

HLO = """HloModule jit_step, entry_computation_layout={(f32[8,32]{1,0})->f32[]}

%add.clone (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add = f32[] add(%x, %y)
}

%body (p: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p = (s32[], f32[16]{0}) parameter(0)
  %v = f32[16]{0} get-tuple-element(%p), index=1
  %all-reduce.9 = f32[16]{0} all-reduce(%v), channel_id=9, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add.clone
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[16]{0}) tuple(%i, %all-reduce.9)
}

%cond (p: (s32[], f32[16])) -> pred[] {
  %p = (s32[], f32[16]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main.1_spmd (param: f32[8,32], param.1: bf16[4,96]) -> f32[] {
  %param = f32[8,32]{1,0} parameter(0), sharding={replicated}
  %param.1 = bf16[4,96]{1,0} parameter(1)
  %all-reduce.5 = (f32[8,32]{1,0}, f32[8,96]{1,0}, /*index=2*/f32[]) all-reduce(%param, %b, %c), channel_id=1, replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, use_global_device_ids=true, to_apply=%add.clone, metadata={op_name="jit(step)/transpose(jvp())/dot_general"}
  %all-gather-start = (bf16[4,96]{1,0}, bf16[32,96]{1,0}) all-gather-start(%param.1), channel_id=2, replica_groups=[1,8]<=[8], dimensions={0}
  %all-gather-done = bf16[32,96]{1,0} all-gather-done(%all-gather-start)
  %reduce-scatter = f32[1,32]{1,0} reduce-scatter(%param), channel_id=3, replica_groups={}, dimensions={0}, to_apply=%add.clone
  %collective-permute-start = (f32[8,32]{1,0}, f32[8,32]{1,0}, u32[], u32[]) collective-permute-start(%param), source_target_pairs={{0,1},{1,2}}
  %collective-permute-done = f32[8,32]{1,0} collective-permute-done(%collective-permute-start)
  %all-to-all = (f32[1,4]{1,0}, f32[1,4]{1,0}) all-to-all(%x, %y), replica_groups=mesh['data'=8] {'data'}
  %w = (s32[], f32[16]{0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[] constant(0)
}
"""


def test_parser_counts_results_tuples_and_async_pairs_once():
    found = {c.name: c for c in C.parse_collectives(HLO, 8)}
    assert set(found) == {"all-reduce.5", "all-gather-done", "reduce-scatter", "collective-permute-done",
                          "all-to-all", "all-reduce.9"}  # no -start: each async pair counts once
    ar = found["all-reduce.5"]
    assert ar.element_bytes == (8 * 32 * 4, 8 * 96 * 4, 4) and ar.group_size == 8
    assert ar.op_name == "jit(step)/transpose(jvp())/dot_general"
    assert found["all-gather-done"].kind == "all-gather" and found["all-gather-done"].bytes == 32 * 96 * 2
    assert found["all-gather-done"].group_size == 8  # iota replica groups [1,8]<=[8]
    assert found["reduce-scatter"].bytes == 32 * 4 and found["reduce-scatter"].group_size == 8  # {} = all
    assert found["collective-permute-done"].bytes == 8 * 32 * 4
    assert found["all-to-all"].bytes == 2 * 4 * 4 and found["all-to-all"].group_size == 8
    assert found["all-reduce.9"].group_size == 4  # explicit {{0,1,2,3},{4,5,6,7}}


def test_parser_flags_collectives_inside_while_loops():
    looped = C.in_loops(HLO, C.parse_collectives(HLO, 8))
    assert [c.name for c in looped] == ["all-reduce.9"]


def test_ring_estimate():
    ar = C.Collective("all-reduce", "a", "ENTRY", (800,), ("f32[200]",), 8)
    ag = C.Collective("all-gather", "g", "ENTRY", (800,), ("f32[200]",), 8)
    rs = C.Collective("reduce-scatter", "r", "ENTRY", (100,), ("f32[25]",), 8)
    assert (ar.ring_bytes, ag.ring_bytes, rs.ring_bytes) == (1400.0, 700.0, 700.0)


@pytest.fixture(scope="module")
def tiny_report():
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", USE_TORCH="0", USE_TF="0")
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--models", "tiny", "--methods", "lora,rep,full", "--rules", "dp,dp-compiler,fsdp", "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["models"]["tiny"]


def test_data_parallel_lora_all_reduces_exactly_the_adapter_gradients(tiny_report):
    case = tiny_report["LoRA r=8 qv | dp"]
    totals = case["totals"]
    assert totals["all-reduce"]["bytes"] == case["grad_bytes"] + LOSS_SCALAR
    # element by element: each adapter gradient leaf once, and the loss scalar
    assert case["all_reduce_elements"] == sorted(case["grad_leaf_bytes"] + [LOSS_SCALAR])
    assert all(totals[k]["bytes"] == 0 for k in C.KINDS if k != "all-reduce")  # nothing else moves
    assert case["in_loops"] == []


def test_data_parallel_loretta_rep_all_reduces_its_tt_cores_not_the_dense_factors(tiny_report):
    case = tiny_report["LorettaRep r=8 tt5 qv | dp"]
    assert case["totals"]["all-reduce"]["bytes"] == case["grad_bytes"] + LOSS_SCALAR
    assert case["all_reduce_elements"] == sorted(case["grad_leaf_bytes"] + [LOSS_SCALAR])
    # the compiler's placement reduces the dense A/B gradients the cores form: more bytes
    compiler = tiny_report["LorettaRep r=8 tt5 qv | dp-compiler"]["totals"]["all-reduce"]["bytes"]
    assert compiler > case["totals"]["all-reduce"]["bytes"]


def test_fsdp_gathers_the_sharded_weights_at_use_and_moves_no_activations(tiny_report):
    case = tiny_report["LorettaRep r=8 tt5 qv | fsdp"]
    assert case["frozen_sharded_bytes"] > 0
    assert case["totals"]["all-gather"]["bytes"] == case["frozen_sharded_bytes"]
    assert case["totals"]["all-to-all"]["bytes"] == 0 and case["totals"]["reduce-scatter"]["bytes"] == 0


def test_data_parallel_full_fine_tuning_all_reduces_every_weight(tiny_report):
    case = tiny_report["full FT | dp"]
    assert case["grad_bytes"] == case["frozen_bytes"]  # every weight trains
    assert case["totals"]["all-reduce"]["bytes"] >= case["frozen_bytes"]
    # every weight's gradient is among the all-reduced arrays
    assert not collections.Counter(case["grad_leaf_bytes"]) - collections.Counter(case["all_reduce_elements"])
    lora = tiny_report["LoRA r=8 qv | dp"]
    assert case["totals"]["all-reduce"]["bytes"] > 10 * lora["totals"]["all-reduce"]["bytes"]
