"""Launch resources of the CUDA kernels, checked without a GPU: every grid fits CUDA's limits for huge sizes
(the geometry in csrc/launch.h, exposed as ``_C.cuda_grids``), and csrc/cuda_ops.cu compiled for sm_90a
(ptxas, as setup.py finds nvcc) neither spills nor uses a stack frame beyond the bounds below."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

from ul_fast.kernels import extension_ops

REPO = Path(__file__).resolve().parents[1]
# Per kernel, per thread. The Philox kernels reserve a 32-byte stack frame for sincosf's Payne-Hanek
# reduction (an out-of-line subroutine once sincosf is called twice; it runs only for |θ| > ~1e5, and θ ≤ 2π,
# so the frame is never touched). The embedding backward spills 8 bytes (cause not found; the reference
# embedding is the default on CPU and CUDA, see dispatch.REFERENCE_IS_FASTER). Anything more is a regression.
MAX_STACK_BYTES = 32
MAX_SPILL_BYTES = 8


def _setup_module():
    spec = importlib.util.spec_from_file_location("ul_fast_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only as __main__
    return module


@pytest.mark.skipif(not extension_ops.available(), reason="ul_fast._C not built")
@pytest.mark.parametrize("numel,batch,nfreq,nout", [
    (70_000, 70_000, 128, 768),              # one element per example, large sampling batch
    (2**20 * 16 * 64 * 64, 2**20, 128, 768),  # a million 16x64x64 latents at once
    (2**31 - 1, 2**31 - 1, 0, 1),             # the most one-element examples the loss forward takes
    (10, 1, 2**19, 65_535 * 32),              # the widest embedding the y axes allow
])
def test_grids_fit_cuda_limits(numel, batch, nfreq, nout):
    C = extension_ops._C
    assert (C.MAX_GRID_X, C.MAX_GRID_YZ) == (2**31 - 1, 65_535)  # CUDA's limits (compute capability >= 3.0)
    grids = C.cuda_grids(numel=numel, batch=batch, nfreq=nfreq, nout=nout, check=True)
    assert set(grids) == {"elementwise", "loss_forward", "per_example", "embed_forward", "embed_backward"}
    for name, (x, y, z) in grids.items():
        assert 1 <= x <= C.MAX_GRID_X and 1 <= y <= C.MAX_GRID_YZ and 1 <= z <= C.MAX_GRID_YZ, (name, x, y, z)
    assert grids["loss_forward"][0] >= batch  # at least one block per example: no example shares a block


@pytest.mark.skipif(not extension_ops.available(), reason="ul_fast._C not built")
@pytest.mark.parametrize("numel,batch,nfreq,nout,kernel", [
    (2**31, 2**31, 1, 1, "loss_forward"),                 # one block per example: 2^31 blocks
    (1, 1, 1, 65_535 * 32 + 1, "embed_backward"),          # outputs on axis y
])
def test_a_grid_past_the_limits_is_refused_not_truncated(numel, batch, nfreq, nout, kernel):
    C = extension_ops._C
    grid = C.cuda_grids(numel=numel, batch=batch, nfreq=nfreq, nout=nout)[kernel]
    assert grid[0] > C.MAX_GRID_X or grid[1] > C.MAX_GRID_YZ
    with pytest.raises(ValueError, match=f"the {kernel} grid .* exceeds CUDA's limits"):
        C.cuda_grids(numel=numel, batch=batch, nfreq=nfreq, nout=nout, check=True)


def test_cuda_kernels_do_not_spill_for_sm90a(tmp_path):
    setup = _setup_module()
    nvcc = setup.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (as setup.py looks for it)")
    command = [nvcc, "-c", str(REPO / "csrc" / "cuda_ops.cu"), "-o", str(tmp_path / "cuda_ops.o"), "-O3",
               "-std=c++17", "-DUL_FAST_WITH_CUDA", f"-I{REPO / 'csrc'}", *setup.gencode_flags("90a"),
               "-Xptxas", "-v"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    kernels = re.findall(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads", log)
    names = " ".join(name for name, *_ in kernels)
    for kernel in ("noise_inject_kernel", "scale_kernel", "loss_forward_kernel", "loss_backward_kernel",
                   "embed_forward_kernel", "embed_backward_kernel", "philox_normal_kernel"):
        assert kernel in names, f"{kernel} missing from the ptxas report"
    for name, stack, stores, loads in kernels:
        assert int(stack) <= MAX_STACK_BYTES, f"{name}: {stack}-byte stack frame"
        assert max(int(stores), int(loads)) <= MAX_SPILL_BYTES, f"{name}: spills {stores}/{loads} bytes"
