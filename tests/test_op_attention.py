"""``attention``: the Triton flash attention (``ul_fast.kernels.triton_attention``) against the fp64 reference:
forward, every gradient, lse, custom-op checks, which inputs the kernels support, torch.compile tracing (with
the Triton adaLN in one block). On CPU the kernels run in the Triton interpreter (tiny shapes).

Tolerance rule (the project's): the kernel's max-abs error against an fp64 reference may be at most 2×
the error of same-dtype PyTorch (``reference.attention`` = SDPA on the same inputs) against that
reference, plus a floor of a few fp32 ulps of the largest reference value (the kernels compute in fp32,
and PyTorch may happen to be exact), and for bf16 in the interpreter one extra half-ulp of the largest
value, because the interpreter converts fp32 → bf16 by truncation where a GPU rounds to nearest.
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

from spies import record_kernel_runs  # noqa: E402

# The interpreter's scalar conversions trip a NumPy deprecation on every loop bound.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = ta.INTERPRET


def _tolerance(err_torch: float, ref: torch.Tensor, dtype: torch.dtype) -> float:
    floor = 4 * torch.finfo(torch.float32).eps * ref.abs().max().item()
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


def _assert_within_torch_error(name: str, mine: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor) -> None:
    """The tolerance rule for an fp32 result: ``mine`` and ``same_dtype`` (PyTorch in fp32) against fp64."""
    mine, same_dtype = mine.double(), same_dtype.double()
    err, err_torch = (mine - exact).abs().max().item(), (same_dtype - exact).abs().max().item()
    tol = _tolerance(err_torch, exact, torch.float32)
    assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g} (PyTorch {err_torch:.3g})"


def test_expanded_gradient_and_single_token():
    """``out.sum()`` back-propagates a zero-stride gradient (copied once); S = 1 is a lone masked block."""
    for S in (1, 18):
        qkv = torch.randn(1, S, 3, 2, 16, device=DEVICE, dtype=torch.float64)
        grads = []
        for fn, dtype in ((ta.flash_attention, torch.float32), (reference.attention, torch.float32),
                          (reference.attention, torch.float64)):
            leaf = qkv.to(dtype).requires_grad_()
            fn(*leaf.unbind(2)).sum().backward()
            grads.append(leaf.grad)
        _assert_within_torch_error(f"dqkv S={S}", *grads)


def _lse_and_grads(q, k, v, weights, kernel: bool) -> list[torch.Tensor]:
    """lse and d(q, k, v) of ``Σ weights·lse + Σ out²``, by the Triton op or by PyTorch in q's dtype."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if kernel:
        out, lse = torch.ops.ul_fast.flash_attention(q, k, v)
    else:
        lse = (torch.einsum("bshd,bthd->bhst", q, k) * q.shape[-1] ** -0.5).logsumexp(-1)
        out = reference.attention(q, k, v)
    ((lse.double() * weights).sum() + out.double().square().sum()).backward()
    return [lse.detach(), q.grad, k.grad, v.grad]


def test_logsumexp_and_its_gradient():
    """The saved lse is log Σ_j exp(q·k_j/√D) per (b, h, row); gradients through it follow the rule too."""
    B, S, H, D = 1, 21, 2, 32
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(3))
    weights = torch.randn(B, H, S, dtype=torch.float64)
    fp32 = [t.float() for t in (q, k, v)]
    ours, same_dtype = _lse_and_grads(*fp32, weights, kernel=True), _lse_and_grads(*fp32, weights, kernel=False)
    exact = _lse_and_grads(q, k, v, weights, kernel=False)
    for name, *results in zip(("lse", "dq", "dk", "dv"), ours, same_dtype, exact):
        _assert_within_torch_error(name, *results)


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


def test_backward_op_checks_the_sizes_it_reads():
    """Called directly, the backward op raises instead of reading past a short lse or gradient."""
    q, k, v = (torch.randn(1, 8, 2, 16, device=DEVICE) for _ in range(3))
    out, lse = torch.ops.ul_fast.flash_attention(q, k, v)
    with pytest.raises(ValueError, match="lse must have shape"):
        torch.ops.ul_fast.flash_attention_backward(torch.randn_like(out), q, k, v, out, lse[:, :, :4], None)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        torch.ops.ul_fast.flash_attention_backward(out[:, :4], q, k, v, out, lse, None)
    with pytest.raises(ValueError, match="grad_lse must have shape"):
        torch.ops.ul_fast.flash_attention_backward(torch.randn_like(out), q, k, v, out, lse, lse[:, :1])


def test_supports_self_attention_at_its_head_dims():
    """The dispatch predicate: one sequence length, a head dim in HEAD_DIMS, one fp32/fp16/bf16 dtype;
    cross-attention (S_k ≠ S_q) and anything else takes the reference."""
    q = torch.randn(1, 8, 2, 32, device=DEVICE)
    assert ta.supports(q, q, q) == (ta.faster_than_reference(8, 32, q.dtype) if q.is_cuda else True)
    assert not ta.supports(q, q[:, :5], q[:, :5])  # cross-attention
    assert not ta.supports(q[..., :24], q[..., :24], q[..., :24])  # head dim 24
    assert not ta.supports(q, q.half(), q)
    assert not ta.supports(q.double(), q.double(), q.double())


def test_cuda_takes_the_kernels_only_where_they_beat_sdpa():
    """On CUDA: fp16/bf16 at the long sequences where the H200 measurement has the kernels faster than SDPA
    forward and backward; fp32 (the correctness path) and short sequences take the reference."""
    for dtype in (torch.bfloat16, torch.float16):
        assert ta.faster_than_reference(4096, 64, dtype) and ta.faster_than_reference(8192, 128, dtype)
        assert not ta.faster_than_reference(1024, 64, dtype)  # 1.021 ms against SDPA's 0.804
        assert not ta.faster_than_reference(1024, 128, dtype)  # 1.130 ms against SDPA's 0.971 (GPU run 3)
        assert not ta.faster_than_reference(256, 128, dtype) and not ta.faster_than_reference(64, 64, dtype)
    assert not any(ta.faster_than_reference(S, D, torch.float32) for S in (64, 1024, 8192) for D in ta.HEAD_DIMS)


def test_row_offsets_past_two_to_the_31(tmp_path):
    """Rows of q, k, v whose element offset ``row·stride`` passes 2^31 (as a long sequence of a wide fused qkv
    would) are read at the right addresses: the kernels compute offsets in int64. The rows sit 150M elements
    apart in one 4.8 GB allocation of which only the 17 rows are ever touched; forward and backward must match
    compact copies exactly. (With int32 offsets the reads wrap to negative offsets: garbage or a crash, so the
    check runs in a subprocess.)"""
    script = tmp_path / "far_rows.py"
    script.write_text("""
import torch
from ul_fast.kernels import triton_attention as ta

S, D, stride = 17, 16, 150_000_000  # row 15 starts at 2.25e9 elements, past 2^31
buf = torch.empty(stride * (S - 1) + 3 * D, dtype=torch.float16)  # address space only: untouched pages
gen = torch.Generator().manual_seed(0)
buf.as_strided((S, 3 * D), (stride, 1)).copy_(torch.randn(S, 3 * D, generator=gen))
far = [buf.as_strided((1, S, 1, D), (stride * S, stride, D, 1), i * D) for i in range(3)]
near = [t.contiguous() for t in far]
grad = torch.randn(1, S, 1, D, generator=gen).half()
results = []
for q, k, v in (far, near):
    out, lse = torch.ops.ul_fast.flash_attention(q, k, v)
    results.append((out, lse, *torch.ops.ul_fast.flash_attention_backward(grad, q, k, v, out, lse, None)))
for a, b in zip(*results):
    assert torch.equal(a, b), (a - b).abs().max()
print("ok")
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stderr[-3000:])


def _check_dispatch(monkeypatch, device: str) -> None:
    """``ops.attention`` launches the Triton kernels for inputs ``supports`` accepts and the reference for the
    others — seen by which code runs, not by results differing. On CUDA: bf16 at S = 1024, D = 128 takes the
    kernels, fp32 and a short sequence do not; on CPU (interpreter) the table gets a cpu entry."""
    from ul_fast import ops

    monkeypatch.delenv("UL_FAST_BACKEND", raising=False)
    if device == "cpu":
        monkeypatch.setitem(dispatch.KERNELS, ("attention", "cpu"), ta.KERNELS[("attention", "cuda")])
        taken, refused = torch.randn(1, 17, 2, 16), [torch.randn(1, 17, 2, 24)]
    else:
        taken = torch.randn(1, 1024, 2, 128, device=device, dtype=torch.bfloat16)
        refused = [taken.float(), taken[:, :64]]
    calls = record_kernel_runs(monkeypatch, ta)
    assert ta.supports(taken, taken, taken)
    ops.attention(taken, taken, taken)
    assert calls == [tuple(taken.shape)]
    cross = taken[:, :5]
    for q, k in [(x, x) for x in refused] + [(taken, cross)]:
        assert not ta.supports(q, k, k)
        ops.attention(q, k, k)
    assert calls == [tuple(taken.shape)]


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors run the kernels only in the interpreter")
def test_public_op_runs_the_kernel_exactly_where_supports_accepts(monkeypatch):
    _check_dispatch(monkeypatch, "cpu")


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 128])
@pytest.mark.parametrize("seq_len", [8, 33, 77])
def test_gpu_short_and_ragged_sequences_at_the_extreme_head_dims(seq_len, head_dim, dtype):
    """S ≤ 32 (one partial block) and lengths that are no multiple of any block, at head dims 16 and 128."""
    _check_against_reference((2, seq_len, 3, head_dim), dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_more_than_65535_batch_heads(dtype):
    """B·H = 65,600 programs per sequence block (a sampling batch of 4,100 at 16 heads), forward and backward:
    on grid axis 1 this launch would fail."""
    _check_against_reference((4100, 8, 16, 16), dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_tensors_on_a_non_current_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on the tensors' device (right results) and
    the caller's current device is unchanged afterwards."""
    with torch.cuda.device(0):
        _check_against_reference((2, 77, 2, 64), torch.bfloat16, "cuda:1")
        assert torch.cuda.current_device() == 0


@pytest.mark.gpu
def test_gpu_public_op_runs_the_kernel_exactly_where_supports_accepts(monkeypatch):
    _check_dispatch(monkeypatch, "cuda")


@pytest.mark.gpu
def test_gpu_block_compiles_with_inductor():
    torch._dynamo.reset()
    block = _Block(width=256, heads=4).cuda()
    x = torch.randn(4, 77, 256, device="cuda")
    cond = torch.randn(4, 256, device="cuda")
    eager = _block_grads(block, x, cond)
    compiled = torch.compile(block, fullgraph=True)
    for mine, ref in zip(_block_grads(compiled, x, cond), eager):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)
