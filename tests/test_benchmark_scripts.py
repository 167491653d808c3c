"""The GPU benchmark scripts run end to end in their CPU smoke modes (so a lent GPU's minutes are not
spent discovering a broken script). The claims study's rules are tested in tests/test_paper_claims.py."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_smoke(tmp_path):
    """The table and paper phases run on the CPU (the graph variants run eagerly there; the compiled ones are left
    out: inductor's CPU codegen takes minutes, and tests/test_training.py covers train.compile)."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench_train_step.py"), "--smoke",
                           "--compile-stages", "none", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_train_step.json").read_text())
    rows = result["rows"]
    for stage in (1, 2):
        table = [r["variant"] for r in rows if r["stage"] == stage and r["phase"] == "table"]
        assert table == ["reference", "ul_fast", "ul_fast+graph"], table
        paper = [r["variant"] for r in rows if r["stage"] == stage and r["phase"] == "paper"]
        assert paper == ["ul_fast", "ul_fast+graph", "ul_fast ckpt", "ul_fast+graph ckpt"], paper
        assert [r["activation_checkpointing"] for r in rows if r["stage"] == stage and r["phase"] == "paper"] == [
            False, False, True, True]
    for row in rows:
        assert row["ms"] > 0 and row["tflops"] > 0 and row["mfu"] is None and row["rounds"] == 2, row
        assert row["phase"] == "paper" or row["speedup_vs_reference"] > 0, row
    assert all(len(v["round_ms"]) == 2 for phase in result["phases"] for v in phase["variants"])
    assert "| table | 1 | ul_fast |" in done.stdout


def test_profile_script_smoke(tmp_path):
    """benchmarks/profile_train_step.py on the CPU: aten ops per step, host and wall time, the top ops."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_train_step.py"), "--smoke", "--stages",
                           "1", "--variants", "reference,ul_fast", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "profile_train_step.json").read_text())["results"]
    assert [r["variant"] for r in results] == ["reference", "ul_fast"]
    for r in results:
        assert r["aten_ops_per_step"] > 100 and 0 < r["host_ms_per_step"] <= r["wall_ms_per_step"], r
        assert r["gpu_busy"] is None and len(r["top"]) == 5, r
    assert "## Where the step's time goes" in done.stdout and "| 1 | ul_fast |" in done.stdout


def test_attention_benchmark_smoke(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench_attention.py"), "--smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "triton_attention_adaln.json").read_text())
