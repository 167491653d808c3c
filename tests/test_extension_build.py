"""The C++/CUDA extension ``ul_fast._C``: it builds from a clean clone (CPU part; the CUDA compile is covered by
the main install, which test_build_info_reports_the_build checks) and the wheel's module works; the loader
refuses a stale or mismatched build; the source hash both setup.py and the loader use; ``build_info``; the
checked boundary (keyword arguments, Views checked in C++) refuses a wrong argument with a clear error."""

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

import ul_fast
from ul_fast.kernels import extension_loader, extension_ops, extension_version

REPO = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not extension_ops.available(), reason="ul_fast._C not built")


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
        api_version = {extension_version.API_VERSION}
        assert ext.WITH_CUDA is False and ext.API_VERSION == api_version, (ext.WITH_CUDA, ext.API_VERSION)
        words = np.zeros(8, dtype=np.uint32)
        ext.philox_words(seed=7, first=0, out=(words.ctypes.data, 8, 4, -1))
        print(" ".join(str(int(w)) for w in words))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    import torch

    from ul_fast.ops.philox import philox4x32

    zero = torch.zeros(2, dtype=torch.int64)
    spec = torch.stack(philox4x32((torch.arange(2), zero, zero, zero), (7, 0)), dim=1).reshape(-1)
    assert [int(w) for w in run.stdout.split()] == spec.tolist()


def test_stale_extension_is_refused(monkeypatch):
    monkeypatch.setattr(extension_loader, "source_hash", lambda *a: "0123456789abcdef")
    ext, reason = extension_loader.load()
    if ext is None and "stale" not in reason:
        pytest.skip(f"extension not built: {reason}")
    assert ext is None and "stale" in reason and "rebuild" in reason


def test_api_version_mismatch_is_refused(monkeypatch):
    monkeypatch.setattr(extension_loader, "API_VERSION", -1)
    ext, reason = extension_loader.load()
    assert ext is None and ("stale" in reason or "not built" in reason)


def test_source_hash_covers_the_sources_only(tmp_path):
    """The recipe setup.py stamps into the build and the loader checks: names and contents of .h/.cpp/.cu."""
    assert extension_version.source_hash(tmp_path / "absent") is None  # an installed wheel: never stale
    (tmp_path / "ops.h").write_text("int f();\n")
    (tmp_path / "ops.cpp").write_text("int f() { return 1; }\n")
    first = extension_version.source_hash(tmp_path)
    assert len(first) == 16
    (tmp_path / "notes.md").write_text("not a source")
    assert extension_version.source_hash(tmp_path) == first
    (tmp_path / "ops.cpp").write_text("int f() { return 2; }\n")
    assert extension_version.source_hash(tmp_path) != first


@needs_ext
def test_build_info_reports_the_build():
    info = ul_fast.build_info()
    assert info["extension"] and info["reason"] == ""
    assert info["cxx"] and info["openmp"] > 0 and len(info["source_hash"]) == 16
    if extension_version.source_hash() is not None:  # a checkout: setup.py and the loader share the recipe
        assert info["source_hash"] == extension_version.source_hash()
    assert info["ops"]["noise_inject[cpu]"] == "ul_fast.kernels.extension_ops.noise_inject"
    if shutil.which("nvcc") is None or os.environ.get("UL_FAST_CUDA") == "0":
        pytest.skip("nvcc absent (or UL_FAST_CUDA=0): the CUDA part is not built here")
    assert info["cuda"], "nvcc is on PATH but ul_fast._C was built without its CUDA kernels"
    assert "90a" in info["cuda_archs"] and "80" in info["cuda_archs"]
    assert "cuda" in info["nvcc"].lower()


# ---- the checked boundary (csrc/boundary.h) --------------------------------------------------------------

def _boundary_case(case: str):
    """A direct ``_C.noise_inject`` / ``_C.loss_forward`` call with one argument wrong, as a bug in the Python
    wrapper would pass it; every other argument is right."""
    import torch

    C, view = extension_ops._C, extension_ops._view
    x, z, logsnr, seed = torch.randn(4, 3), torch.empty(4, 3), torch.zeros(4), torch.tensor([1])
    noise = dict(x=view(x), z=view(z), eps=None, logsnr=view(logsnr), seed=view(seed), batch=4)
    if case == "swapped sizes":  # logsnr and x swapped: x's 12 values read as 4 log-SNRs, and vice versa
        noise.update(x=view(logsnr), logsnr=view(x))
    elif case == "short z":
        noise.update(z=view(z[:3]))
    elif case == "bfloat16 logsnr":
        noise.update(logsnr=view(logsnr.bfloat16()))
    elif case == "unknown dtype code":
        noise.update(seed=(seed.data_ptr(), 1, 9, -1))
    elif case == "misaligned x":
        noise.update(x=(x.data_ptr() + 1, 12, 0, -1))
    elif case == "x on another device":
        noise.update(x=(x.data_ptr(), 12, 0, 0))
    elif case == "batch does not divide x":
        noise.update(batch=5, logsnr=view(torch.zeros(5)))
    elif case == "short loss out":
        ndl = torch.ones(4)
        return lambda: C.loss_forward(pred=view(x), x=view(x), logsnr=view(logsnr), neg_dlogsnr_dt=view(ndl),
                                      seed=view(seed), batch=4, v_prediction=True, loss_factor=1.0, bias=None,
                                      out=view(torch.empty(3)))
    return lambda: C.noise_inject(**noise)


@needs_ext
@pytest.mark.parametrize("case,message", [
    ("swapped sizes", "z must hold 4 elements, got 12"),
    ("short z", "z must hold 12 elements, got 9"),
    ("bfloat16 logsnr", r"logsnr must be float32, got dtype code 2 \(bfloat16\)"),
    ("unknown dtype code", r"seed must be int64, got dtype code 9 \(unknown\)"),
    ("misaligned x", "x: address .* is not a valid 4-byte aligned float32 address"),
    ("x on another device", "logsnr is on cpu but x is on cuda:0|z is on cpu but x is on cuda:0"),
    ("batch does not divide x", "batch 5 does not divide the 12 elements of x"),
    ("short loss out", "out must hold 4 elements, got 3"),
])
def test_boundary_refuses_a_wrong_argument(case, message):
    with pytest.raises(ValueError, match=message):
        _boundary_case(case)()


@needs_ext
def test_boundary_takes_keyword_arguments_only():
    import torch

    x = extension_ops._view(torch.zeros(2))
    with pytest.raises(TypeError):
        extension_ops._C.noise_inject(x, x, None, x, x, 2)  # positional: refused, names are the contract
