"""pytest-benchmark, CPU: the Triton attention and adaLN LayerNorm kernels through the Triton interpreter
against the PyTorch reference, forward+backward at tiny sizes. Interpreter timings measure Python
overhead, not kernel quality: this suite checks that the kernels run end to end in CI and tracks
regressions of the interpreter path; GPU numbers come from benchmarks/gpu_bench_attention.py.

Run: pytest benchmarks/bench_attention_cpu.py --benchmark-only
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported

pytest.importorskip("triton")

from ul_fast.kernels import triton_adaln, triton_attention  # noqa: E402
from ul_fast.ops import reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _attention_step(fn, qkv: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    qkv.grad = None
    fn(*qkv.unbind(2)).backward(grad)
    return qkv.grad


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_attention_fwd_bwd(benchmark, impl):
    """B1 H2 S33 D32 fp32 (an odd S, so the masked tail runs too)."""
    fn = triton_attention.flash_attention if impl == "triton" else reference.attention
    qkv = torch.randn(1, 33, 3, 2, 32, device=DEVICE, requires_grad=True)
    grad = torch.randn(1, 33, 2, 32, device=DEVICE)
    expected = _attention_step(reference.attention, qkv, grad).clone()
    result = benchmark.pedantic(_attention_step, args=(fn, qkv, grad), rounds=3, warmup_rounds=1)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5)


def _adaln_step(fn, x: torch.Tensor, mod: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x.grad = mod.grad = None
    fn(x, *mod.chunk(2, dim=1), 1e-6).backward(grad)
    return x.grad


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_adaln_fwd_bwd(benchmark, impl):
    """B2 S17 C96 fp32."""
    fn = triton_adaln.adaln_layernorm if impl == "triton" else reference.adaln_layernorm
    x = torch.randn(2, 17, 96, device=DEVICE, requires_grad=True)
    mod = torch.randn(2, 192, device=DEVICE, requires_grad=True)
    grad = torch.randn(2, 17, 96, device=DEVICE)
    expected = _adaln_step(reference.adaln_layernorm, x, mod, grad).clone()
    result = benchmark.pedantic(_adaln_step, args=(fn, x, mod, grad), rounds=3, warmup_rounds=1)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5)
