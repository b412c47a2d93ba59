"""benchmarks/device.py, the one command for an accelerator, as a CPU smoke test (tiny shapes):
every method's step compiles and runs, and the table has what the docs say it has."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_benchmark_runs_every_method_and_prints_its_table():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "device.py"), "--tiny", "--models", "llama-1b"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| llama-1b |")]
    steps = {r[1].strip(): r for r in rows if len(r) == 9}
    assert set(steps) == {"full FT", "LoRA", "LorettaRep", "QLoRA-NF4"}
    for name, row in steps.items():
        step_ms, tokens_per_s, loss = float(row[3]), float(row[4].replace(",", "")), float(row[8])
        assert step_ms > 0 and tokens_per_s > 0, name
        assert 5.0 < loss < 7.5, (name, loss)  # ~log(512) at random weights
        assert row[7].strip() == "-"  # no MFU where the device's peak is unknown (CPU)
    inference = [r for r in rows if len(r) == 4]
    assert len(inference) == 1 and float(inference[0][3]) > 0
    assert "not run" not in proc.stdout
