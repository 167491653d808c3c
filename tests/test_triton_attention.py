"""Triton flash attention against the fp64 reference: forward, every gradient, lse, custom-op checks,
torch.compile tracing, dispatch. On CPU the kernels run in the Triton interpreter (tiny shapes).

Tolerance rule (the project's): the kernel's max-abs error against an fp64 reference may be at most 2×
the error of same-dtype PyTorch (``reference.attention`` = SDPA on the same inputs) against that
reference, plus a floor: 1e-6 absolute for fp32 rounding noise, and for bf16 in the interpreter one
extra half-ulp of the largest value, because the interpreter converts fp32 → bf16 by truncation where
a GPU rounds to nearest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch

pytest.importorskip("triton")

from ul_fast.kernels import triton_adaln as tn  # noqa: E402
from ul_fast.kernels import triton_attention as ta  # noqa: E402
from ul_fast.ops import dispatch, reference  # noqa: E402

# The interpreter's scalar conversions trip a NumPy deprecation on every loop bound.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = ta.INTERPRET


def _tolerance(err_torch: float, ref: torch.Tensor, dtype: torch.dtype) -> float:
    floor = 1e-6
    if dtype == torch.bfloat16 and INTERPRET:
        floor += 2.0**-8 * ref.abs().max().item()
    return 2.0 * err_torch + floor


def _run(fn, qkv: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and d(qkv) of ``fn`` applied to the q, k, v views of a fused ``[B, S, 3, H, D]`` tensor."""
    qkv = qkv.detach().requires_grad_()
    out = fn(*qkv.unbind(2))
    out.backward(grad.to(out.dtype))
    return out.detach().double(), qkv.grad.double()


def _check_against_reference(shape: tuple[int, int, int, int], dtype: torch.dtype, device: str) -> None:
    B, S, H, D = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype)).encode()))
    qkv = torch.randn(B, S, 3, H, D, generator=gen)
    grad = torch.randn(B, S, H, D, generator=gen)
    exact = _run(reference.attention, qkv.to(device, torch.float64), grad.to(device, torch.float64))
    same_dtype = _run(reference.attention, qkv.to(device, dtype), grad.to(device))
    ours = _run(ta.flash_attention, qkv.to(device, dtype), grad.to(device))
    for name, mine, theirs, ref in zip(("out", "dqkv"), ours, same_dtype, exact):
        ref = ref.to(mine.device)
        err = (mine - ref).abs().max().item()
        err_torch = (theirs - ref).abs().max().item()
        tol = _tolerance(err_torch, ref, dtype)
        assert err <= tol, f"{name} {shape} {dtype}: error {err:.3g} > {tol:.3g} (PyTorch {err_torch:.3g})"


# ---------------------------------------------------------------- CPU (interpreter) tests


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 33, 2, 32), (1, 17, 1, 64), (1, 9, 2, 128)])
def test_matches_reference_each_head_dim(shape, dtype):
    """Odd sequence lengths (masked tail block, and S < one block) at every head dim."""
    _check_against_reference(shape, dtype, DEVICE)


@pytest.mark.parametrize("shape", [(1, 20, 2, 32), (2, 16, 1, 64)])
def test_matches_reference_bf16(shape):
    """bf16: loaded, then computed in fp32 in the interpreter (its bf16 arithmetic is wrong)."""
    _check_against_reference(shape, torch.bfloat16, DEVICE)


def test_strided_views_read_in_place():
    """q, k, v as views of a fused qkv give bitwise the same result as contiguous copies."""
    qkv = torch.randn(2, 19, 3, 2, 32, device=DEVICE)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    out_views = ta.flash_attention(q, k, v)
    out_copies = ta.flash_attention(q.contiguous(), k.contiguous(), v.contiguous())
    torch.testing.assert_close(out_views, out_copies, rtol=0, atol=0)
    assert out_views.is_contiguous() and out_views.shape == q.shape


def test_expanded_gradient_and_single_token():
    """``out.sum()`` back-propagates a zero-stride gradient (copied once); S = 1 is a lone masked block."""
    for S in (1, 18):
        qkv = torch.randn(1, S, 3, 2, 16, device=DEVICE, dtype=torch.float64)
        mine, ref = qkv.float().requires_grad_(), qkv.clone().requires_grad_()
        ta.flash_attention(*mine.unbind(2)).sum().backward()
        reference.attention(*ref.unbind(2)).sum().backward()
        torch.testing.assert_close(mine.grad.double(), ref.grad, rtol=0, atol=1e-5)


def test_logsumexp_and_its_gradient():
    """The saved lse is log Σ_j exp(q·k_j/√D) per (b, h, row); gradients through it are exact too."""
    B, S, H, D = 1, 21, 2, 32
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(3))
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.ul_fast.flash_attention(qf, kf, vf)
    weights = torch.randn(B, H, S, dtype=torch.float64)
    loss = (lse.double() * weights).sum() + out.double().square().sum()
    loss.backward()

    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    scores = torch.einsum("bshd,bthd->bhst", qd, kd) * D**-0.5
    lse_ref = scores.logsumexp(-1)
    out_ref = reference.attention(qd, kd, vd)
    ((lse_ref * weights).sum() + out_ref.square().sum()).backward()
    torch.testing.assert_close(lse.double(), lse_ref.detach(), rtol=0, atol=2e-6)
    for mine, ref in ((qf.grad, qd.grad), (kf.grad, kd.grad), (vf.grad, vd.grad)):
        torch.testing.assert_close(mine.double(), ref, rtol=0, atol=2e-5)


def test_opcheck():
    qkv = torch.randn(1, 17, 3, 1, 16, device=DEVICE, requires_grad=True)
    q, k, v = qkv.unbind(2)
    torch.library.opcheck(torch.ops.ul_fast.flash_attention.default, (q, k, v))
    out, lse = torch.ops.ul_fast.flash_attention(q.detach(), k.detach(), v.detach())
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, torch.randn_like(lse))
    torch.library.opcheck(torch.ops.ul_fast.flash_attention_backward.default, args)


class _Block(torch.nn.Module):
    """A small adaLN transformer block calling the Triton ops directly (not through dispatch)."""

    def __init__(self, width: int = 64, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.mod = torch.nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B, S, C = x.shape
        scale, shift = self.mod(cond).chunk(2, dim=1)
        h = tn.adaln_layernorm(x, scale, shift, 1e-6)
        q, k, v = self.qkv(h).reshape(B, S, 3, self.heads, C // self.heads).unbind(2)
        return x + self.proj(ta.flash_attention(q, k, v).reshape(B, S, C))


def _block_grads(block: torch.nn.Module, x: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    block.zero_grad()
    out = block(x, cond)
    out.square().mean().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in block.parameters()]


def test_block_traces_under_torch_compile_fullgraph():
    """The custom ops trace with their fake impls (fullgraph, no graph breaks) and the compiled block
    (aot_eager: real kernels, AOT-traced forward and backward graphs) matches eager."""
    torch._dynamo.reset()
    block = _Block().to(DEVICE)
    x = torch.randn(2, 13, 64, device=DEVICE)
    cond = torch.randn(2, 64, device=DEVICE)
    eager = _block_grads(block, x, cond)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for mine, ref in zip(_block_grads(compiled, x, cond), eager):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)


def test_bad_input_errors_name_the_argument():
    q = torch.randn(1, 8, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"\[B, S, H, D\]"):
        ta.flash_attention(q, q[:, :4], q)
    with pytest.raises(ValueError, match="head dim"):
        x = torch.randn(1, 8, 2, 48, device=DEVICE)
        ta.flash_attention(x, x, x)
    with pytest.raises(TypeError, match="dtype"):
        ta.flash_attention(q, q.half(), q)


def test_dispatch_picks_triton_on_cuda_and_reference_otherwise(monkeypatch):
    monkeypatch.delenv("UL_FAST_BACKEND", raising=False)
    assert dispatch.implementation("attention", "cuda") is ta.attention_cuda
    assert dispatch.implementation("adaln_layernorm", "cuda") is tn.adaln_layernorm_cuda
    assert dispatch.implementation("attention", "cpu") is reference.attention
    monkeypatch.setenv("UL_FAST_BACKEND", "reference")
    assert dispatch.implementation("attention", "cuda") is reference.attention
    assert dispatch.implementation("adaln_layernorm", "cuda") is reference.adaln_layernorm


def test_modules_import_without_triton():
    """With triton absent the kernel modules import cleanly and register nothing."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import ul_fast.kernels.triton_attention as a, ul_fast.kernels.triton_adaln as n\n"
            "from ul_fast.ops import dispatch\n"
            "assert a.triton is None and n.triton is None and not dispatch._FAST, dispatch._FAST\n"
            "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


_SM90_COMPILE = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ul_fast.kernels import triton_adaln as tn, triton_attention as ta

def build(fn, ptrs, consts, config_warps, config_stages):
    sig = {n: "constexpr" if fn.params[i].is_constexpr else ptrs.get(n, "fp32" if "scale" in n or n == "eps"
           else "i32") for i, n in enumerate(fn.arg_names)}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": config_warps, "num_stages": config_stages})
    assert kernel.metadata.shared <= 232448, (fn.__name__, consts, kernel.metadata.shared)  # H100: 227 KB

for dt, D in (("fp16", 64), ("bf16", 128)):
    for kern, names in ((ta._attn_fwd, "Q K V O"), (ta._attn_bwd_dkdv, "Q K V DO DK DV"),
                        (ta._attn_bwd_dq, "Q K V DO DQ")):
        ptrs = {n: "*" + dt for n in names.split()} | {"LSE": "*fp32", "DELTA": "*fp32"}
        c = kern.configs[0]
        build(kern.fn, ptrs, {"HEAD_DIM": D, "UPCAST": False, **c.kwargs}, c.num_warps, c.num_stages)
block_c, rows, warps = tn._launch_shape(768)
for kern, names in ((tn._adaln_fwd, "X SCALE SHIFT Y"), (tn._adaln_bwd, "X SCALE DY DX")):
    ptrs = {n: "*bf16" for n in names.split()} | {"DSCALE_PART": "*fp32", "DSHIFT_PART": "*fp32"}
    build(kern, ptrs, {"BLOCK_C": block_c, "ROWS": rows}, warps, 3)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """Compile the GPU configurations for Hopper (sm_90) with triton's bundled ptxas — no GPU needed.
    Catches what the interpreter cannot: type errors in tl.dot operands, unsupported layouts, and
    shared-memory use beyond the H100's 227 KB."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    result = subprocess.run([sys.executable, "-c", _SM90_COMPILE], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------- GPU tests


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 77, 3, 32), (4, 256, 4, 64), (2, 1000, 2, 64), (1, 333, 2, 128),
                                   (3, 64, 6, 64), (1, 1024, 2, 128)])
def test_gpu_matches_reference(shape, dtype):
    _check_against_reference(shape, dtype, "cuda")


@pytest.mark.gpu
def test_gpu_fp32_is_full_precision():
    _check_against_reference((2, 100, 2, 64), torch.float32, "cuda")


@pytest.mark.gpu
def test_gpu_public_op_uses_triton_and_compiles_with_inductor(monkeypatch):
    from ul_fast import ops

    monkeypatch.delenv("UL_FAST_BACKEND", raising=False)
    qkv = torch.randn(2, 130, 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    torch.testing.assert_close(ops.attention(q, k, v), ta.flash_attention(q, k, v), rtol=0, atol=0)

    torch._dynamo.reset()
    block = _Block(width=256, heads=4).cuda()
    x = torch.randn(4, 77, 256, device="cuda")
    cond = torch.randn(4, 256, device="cuda")
    eager = _block_grads(block, x, cond)
    compiled = torch.compile(block, fullgraph=True)
    for mine, ref in zip(_block_grads(compiled, x, cond), eager):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)
