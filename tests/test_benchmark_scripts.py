"""The GPU benchmark scripts run end to end in their CPU smoke modes (so a lent GPU's minutes are not
spent discovering a broken script). The claims study's rules are tested in tests/test_paper_claims.py."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_smoke(tmp_path):
    """Every phase runs: the eager ablation (one row per op with a CPU kernel), the measured-best dispatch, and
    the compiled stage 1 (aot_eager: the same code path as inductor, without its CPU codegen time)."""
    from ul_fast.ops import dispatch

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench_train_step.py"), "--smoke",
                           "--compile-backend", "aot_eager", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_train_step.json").read_text())
    rows = result["rows"]
    with_kernel = [op for op in dispatch.OPS if (op, "cpu") in dispatch.KERNELS]
    ablation = {"reference", "ul_fast", *(f"all kernels - {op}" for op in with_kernel)}
    if any((op, "cpu") in dispatch.REFERENCE_IS_FASTER for op in with_kernel):
        ablation.add("all kernels")
    for stage in (1, 2):
        names = [r["variant"] for r in rows if r["stage"] == stage]
        assert ablation <= set(names), names
        assert sum(name.startswith("best: all kernels") for name in names) == 1, names
        assert ("reference+compile" in names, "ul_fast+compile" in names) == (stage == 1, stage == 1), names
    for row in rows:
        assert row["ms"] > 0 and row["speedup"] > 0 and row["rounds"] == 2, row
        assert row["baseline"] == ("reference+compile" if "compile" in row["variant"] else "reference"), row
    assert all(len(v["round_ms"]) == 2 for phase in result["phases"] for v in phase["variants"])
    assert "| 1 | ul_fast |" in done.stdout and "stage 1 measured-best dispatch: UL_FAST_BACKEND=fast" in done.stdout


def test_attention_benchmark_smoke(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench_attention.py"), "--smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "triton_attention_adaln.json").read_text())
