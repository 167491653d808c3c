"""The GPU benchmark scripts run end to end in their CPU smoke modes (so a lent GPU's minutes are not
spent discovering a broken script)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_smoke(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench_train_step.py"), "--smoke",
                           "--no-compile", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_train_step.json").read_text())["rows"]
    assert {(r["stage"], r["variant"]) for r in rows} == {(s, v) for s in (1, 2) for v in ("reference", "ul_fast")}
    assert all(r["ms"] > 0 for r in rows)
    assert "| 1 | ul_fast |" in done.stdout


def test_attention_benchmark_smoke(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench_attention.py"), "--smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "triton_attention_adaln.json").read_text())
