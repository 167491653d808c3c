"""Test set-up. TRITON_INTERPRET must be set before any Triton kernel module is imported, so the
Triton kernels run (slowly, on tiny shapes) in the interpreter on CPU-only machines."""

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same global RNG state; tests that need fresh inputs draw them."""
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


_SM90_PRELUDE = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def build(fn, ptrs, consts, config_warps, config_stages):
    sig = {n: "constexpr" if fn.params[i].is_constexpr else ptrs.get(n, "fp32" if "scale" in n or n == "eps"
           else "i32") for i, n in enumerate(fn.arg_names)}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": config_warps, "num_stages": config_stages})
    assert kernel.metadata.shared <= 232448, (fn.__name__, consts, kernel.metadata.shared)  # H100: 227 KB
"""


@pytest.fixture
def compile_for_sm90():
    """``run(script)``: run ``script`` in a fresh interpreter without TRITON_INTERPRET, after a prelude that
    defines ``build(fn, ptrs, consts, num_warps, num_stages)`` (compile a Triton kernel for sm_90 with
    triton's bundled ptxas and check its shared memory fits an H100); assert it succeeds."""
    def run(script: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(sys.path)
        result = subprocess.run([sys.executable, "-c", _SM90_PRELUDE + script + '\nprint("compiled")\n'],
                                capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]

    return run
