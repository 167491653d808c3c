"""``adaln_layernorm``: the Triton kernels (``ul_fast.kernels.triton_adaln``) against the fp64 reference: forward
and the gradients of x, scale and shift, strided inputs, the chunked per-example reduction, custom-op checks,
which inputs the kernels support. On CPU the kernels run in the Triton interpreter.

Tolerance rule: max-abs error against fp64 at most 2× that of same-dtype eager PyTorch
(``layer_norm(x)·(1 + scale) + shift`` computed in the input dtype), plus a floor of a few fp32 ulps of the
largest reference value (the kernels compute in fp32, and PyTorch may happen to be exact), and for bf16 in
the interpreter one half-ulp of the largest value (the interpreter truncates fp32 → bf16 where a GPU
rounds to nearest).
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from ul_fast import ops  # noqa: E402
from ul_fast.kernels import triton_adaln as tn  # noqa: E402
from ul_fast.ops import dispatch, reference  # noqa: E402

from spies import record_kernel_runs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6


def _same_dtype_torch(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """What eager PyTorch computes without upcasting."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None, :]) + shift[:, None, :]


def _run(fn, x, mod, grad):
    """Output and grads of x and of the ``[B, 2C]`` modulation whose two halves are scale and shift."""
    x = x.detach().requires_grad_()
    mod = mod.detach().requires_grad_()
    scale, shift = mod.chunk(2, dim=1)  # strided [B, C] views, as the networks produce them
    out = fn(x, scale, shift, EPS)
    out.backward(grad.to(out.dtype))
    return out.detach().double(), x.grad.double(), mod.grad.double()


def _check(shape: tuple[int, int, int], dtype: torch.dtype, device: str, x_strided: bool = False) -> None:
    B, S, C = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, x_strided)).encode()))
    x = torch.randn(B, 2 * S if x_strided else S, C, generator=gen) * 3 + 1
    mod = torch.randn(B, 2 * C, generator=gen) * 0.5
    grad = torch.randn(B, S, C, generator=gen)
    x, mod, grad = x.to(device), mod.to(device), grad.to(device)

    def take(t):  # every other row: a non-contiguous x with a contiguous channel dim
        return t[:, ::2] if x_strided else t

    # fp64 throughout (the reference itself computes in fp32)
    exact = _run(lambda x_, *a: _same_dtype_torch(take(x_), *a), x.double(), mod.double(), grad.double())
    same = _run(lambda x_, *a: _same_dtype_torch(take(x_), *a), x.to(dtype), mod.to(dtype), grad)
    ours = _run(lambda x_, *a: tn.adaln_layernorm(take(x_), *a), x.to(dtype), mod.to(dtype), grad)
    for name, mine, theirs, ref in zip(("y", "dx", "dscale|dshift"), ours, same, exact):
        _assert_within_torch_error(f"{name} {shape} {dtype}", mine, theirs, ref, dtype)


def _assert_within_torch_error(name: str, mine: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor,
                               dtype: torch.dtype) -> None:
    """The tolerance rule (module docstring): ``mine`` and PyTorch's ``theirs`` against the fp64 ``ref``."""
    err = (mine - ref).abs().max().item()
    err_torch = (theirs - ref).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    if dtype == torch.bfloat16 and tn.INTERPRET:
        floor += 2.0**-8 * ref.abs().max().item()
    tol = 2 * err_torch + floor
    assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g} (PyTorch {err_torch:.3g})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 48), (1, 5, 100), (2, 21, 32)])
def test_matches_reference(shape, dtype):
    """Odd S, non-power-of-two C (masked lanes), and (2, 21, 32): six row chunks per example of two
    tiles each, the last one ragged, so dscale/dshift are sums of partial sums."""
    _check(shape, dtype, DEVICE)


def test_chunking_covers_every_row():
    """The backward grid splits each example into chunks of whole tiles that cover S exactly."""
    for B, S in ((2, 21), (1, 5), (3, 1), (256, 256)):
        _, rows, _ = tn._launch_shape(32, backward=True)
        n, per_chunk = tn._chunking(B, S, rows, torch.device("cpu"))
        assert per_chunk % rows == 0 and (n - 1) * per_chunk < S <= n * per_chunk


def test_strided_x():
    _check((2, 9, 64), torch.float32, DEVICE, x_strided=True)


def test_mixed_dtypes_as_under_autocast():
    """fp32 residual stream x with bf16 scale/shift (a Linear under autocast): y in fp32, each gradient
    in its input's dtype, matching the reference in the same dtypes."""
    x = torch.randn(2, 9, 40, device=DEVICE)
    mod = torch.randn(2, 80, device=DEVICE).bfloat16()
    grad = torch.randn(2, 9, 40, device=DEVICE)
    ours = _run(tn.adaln_layernorm, x, mod, grad)
    ref = _run(reference.adaln_layernorm, x, mod, grad)
    exact = _run(_same_dtype_torch, x.double(), mod.double(), grad.double())  # the bf16 values, exactly
    out = tn.adaln_layernorm(x, *mod.chunk(2, dim=1), EPS)
    assert out.dtype == torch.float32
    # y and dx are fp32: the tolerance rule, with the reference (fp32 arithmetic) as same-dtype PyTorch.
    for name, mine, theirs, gold in zip(("y", "dx"), ours, ref, exact):
        _assert_within_torch_error(name, mine, theirs, gold, torch.float32)
    torch.testing.assert_close(ours[2], ref[2], rtol=2**-7, atol=1e-5)  # bf16 grads: one rounding each


def test_opcheck():
    x = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    scale = torch.randn(2, 24, device=DEVICE, requires_grad=True)
    shift = torch.randn(2, 24, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.ul_fast.adaln_layernorm.default, (x, scale, shift, EPS))
    args = (torch.randn(2, 5, 24, device=DEVICE), x.detach(), scale.detach(), EPS)
    torch.library.opcheck(torch.ops.ul_fast.adaln_layernorm_backward.default, args)


def test_eps_is_honoured():
    """A constant row has zero variance: the output is shift exactly, whatever eps (no NaN); and a
    large eps changes the result the way the reference says."""
    x = torch.randn(2, 3, 16, device=DEVICE)
    scale, shift = torch.randn(2, 16, device=DEVICE), torch.randn(2, 16, device=DEVICE)
    flat = torch.full_like(x, 2.5)
    torch.testing.assert_close(tn.adaln_layernorm(flat, scale, shift, EPS), shift[:, None].expand_as(x))
    torch.testing.assert_close(tn.adaln_layernorm(x, scale, shift, 0.5),
                               reference.adaln_layernorm(x, scale, shift, 0.5), rtol=1e-5, atol=1e-5)


def test_bad_input_errors_name_the_argument():
    """The custom op refuses shapes and dtypes the kernels cannot read; eps is the public op's contract."""
    x = torch.randn(2, 3, 16, device=DEVICE)
    s = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"x \[B, S, C\] and scale, shift \[B, C\]"):
        tn.adaln_layernorm(x, s[:1], s, EPS)
    with pytest.raises(TypeError, match="shift must be float32"):
        tn.adaln_layernorm(x, s, s.long(), EPS)
    with pytest.raises(ValueError, match="eps must be > 0"):
        ops.adaln_layernorm(x, s, s, 0.0)


def test_backward_op_checks_the_sizes_it_reads():
    """Called directly, the backward op raises instead of reading past a short gradient or scale."""
    x, grad = torch.randn(2, 3, 16, device=DEVICE), torch.randn(2, 3, 16, device=DEVICE)
    s = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="grad_y must match x"):
        torch.ops.ul_fast.adaln_layernorm_backward(grad[:, :2], x, s, EPS)
    with pytest.raises(ValueError, match=r"scale, shift \[B, C\]"):
        torch.ops.ul_fast.adaln_layernorm_backward(grad, x, s[:, :8], EPS)


def test_supports_what_the_kernels_handle():
    """The dispatch predicate: 3-D x with 1..MAX_CHANNELS channels in fp32/fp16/bf16, on CUDA or the
    interpreter; anything else takes the reference."""
    x, s = torch.randn(2, 3, 16, device=DEVICE), torch.randn(2, 16, device=DEVICE)
    assert tn.supports(x, s, s, EPS)
    assert not tn.supports(x.double(), s, s, EPS)
    assert not tn.supports(x[:, :0], s, s, EPS)
    wide = torch.randn(1, 1, tn.MAX_CHANNELS + 1, device=DEVICE)
    assert not tn.supports(wide, wide[:, 0], wide[:, 0], EPS)


def _check_dispatch(monkeypatch, device: str) -> None:
    """``ops.adaln_layernorm`` launches the Triton kernels for inputs ``supports`` accepts and the reference for
    the others (here more than MAX_CHANNELS channels) — seen by which code runs, not by results differing. On
    CPU (interpreter) the kernel table gets a cpu entry. ``fast``: on CUDA the default runs the reference, measured
    faster inside a training step (``dispatch.REFERENCE_IS_FASTER``)."""
    monkeypatch.setenv("UL_FAST_BACKEND", "fast")
    if device == "cpu":
        monkeypatch.setitem(dispatch.KERNELS, ("adaln_layernorm", "cpu"), tn.KERNELS[("adaln_layernorm", "cuda")])
    calls = record_kernel_runs(monkeypatch, tn)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, mod = torch.randn(4, 9, 768, device=device, dtype=dtype), torch.randn(4, 1536, device=device, dtype=dtype)
    assert tn.supports(x, *mod.chunk(2, dim=1), EPS)
    ops.adaln_layernorm(x, *mod.chunk(2, dim=1), EPS)
    assert calls == [(4, 9, 768)]
    wide = torch.randn(1, 1, tn.MAX_CHANNELS + 1, device=device, dtype=dtype)
    assert not tn.supports(wide, wide[:, 0], wide[:, 0], EPS)
    ops.adaln_layernorm(wide, wide[:, 0], wide[:, 0], EPS)
    assert calls == [(4, 9, 768)]


@pytest.mark.skipif(not tn.INTERPRET, reason="CPU tensors run the kernels only in the interpreter")
def test_public_op_runs_the_kernel_exactly_where_supports_accepts(monkeypatch):
    _check_dispatch(monkeypatch, "cpu")


@pytest.mark.gpu
def test_gpu_public_op_runs_the_kernel_exactly_where_supports_accepts(monkeypatch):
    _check_dispatch(monkeypatch, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 256, 768), (3, 77, 1024), (2, 100, 384), (1, 33, 1000), (2, 5, 6000)])
def test_gpu_matches_reference(shape, dtype):
    """(2, 5, 6000): a row wider than 4096 channels, the backward's 32-warp configuration."""
    _check(shape, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_more_than_65535_examples(dtype):
    """70,000 examples of one row: forward and backward grids beyond 65,535 programs."""
    _check((70000, 1, 16), dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_tensors_on_a_non_current_device():
    """Tensors on cuda:1 while cuda:0 is current: right results, and the current device is unchanged."""
    with torch.cuda.device(0):
        _check((3, 77, 1024), torch.bfloat16, "cuda:1")
        assert torch.cuda.current_device() == 0
