"""The extension builds from a clean clone (CPU part; the CUDA compile is covered by the main install,
which test_compiled_ops.test_build_info_reports_the_build checks) and the wheel's module works."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_builds_from_clean_clone(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{REPO}", str(clone)], check=True)
    env = dict(os.environ, UL_FAST_CUDA="0")
    # Without build isolation when this environment has the build requirements (fast, offline); a CI venv
    # that installed the package with isolation may lack pybind11/setuptools, so pip fetches them then.
    have_build_deps = all(importlib.util.find_spec(name) for name in ("pybind11", "setuptools"))
    isolation = ["--no-build-isolation"] if have_build_deps else []
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", *isolation, "--no-deps", "-q", "-w", str(tmp_path / "wheels"),
         str(clone)],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("ul_fast-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (library,) = [n for n in archive.namelist() if n.startswith("ul_fast/_C") and n.endswith(".so")]
        archive.extract(library, tmp_path / "unpacked")
    # Load the built module by path in a fresh interpreter and run a kernel through numpy buffers.
    script = textwrap.dedent(f"""
        import importlib.util, numpy as np
        spec = importlib.util.spec_from_file_location("ul_fast._C", {str(tmp_path / "unpacked" / library)!r})
        ext = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ext)
        assert ext.WITH_CUDA is False and ext.API_VERSION == 1, (ext.WITH_CUDA, ext.API_VERSION)
        words = np.zeros(8, dtype=np.uint32)
        ext.philox_words_cpu(7, 0, 2, words.ctypes.data)
        print(" ".join(str(int(w)) for w in words))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    import torch

    from ul_fast.ops.philox import philox4x32

    zero = torch.zeros(2, dtype=torch.int64)
    spec = torch.stack(philox4x32((torch.arange(2), zero, zero, zero), (7, 0)), dim=1).reshape(-1)
    assert [int(w) for w in run.stdout.split()] == spec.tolist()
