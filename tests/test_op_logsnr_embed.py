"""``logsnr_embed`` ``SiLU(W·[sin λf, cos λf] + b)``: the C++/CUDA extension (``ul_fast.kernels.extension_ops``)
against the reference; the size checks of ``torch.ops.ul_fast.logsnr_embed`` and its backward.

fp32: the kernel's error against an fp64 computation (from the reference's fp32 features) is at most twice
the fp32 reference's, plus a floor for what the reference does not share: the kernel's sin/cos (libm) differ
from PyTorch's by ≤ 2 ulp (see ``_fp32_floors``). 16-bit: the reference rounds the
matmul output before SiLU and its backward works in 16-bit; the kernel accumulates in fp32 and rounds
once, so its error against an fp32 computation must be at most twice the same-dtype reference's.
"""

from __future__ import annotations

import pytest
import torch

from ul_fast import ops
from ul_fast.kernels import extension_ops as extension
from ul_fast.ops import reference

pytestmark = pytest.mark.skipif(not extension.available(), reason="ul_fast._C not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [(1, 1, 1), (5, 3, 7), (37, 16, 70), (256, 128, 96)]  # (B, F, N)
U = torch.finfo(torch.float32).eps


def _inputs(batch, n_freq, n_out, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    logsnr = torch.randn(batch, generator=gen) * 8
    frequencies = torch.exp(torch.linspace(0, 4, n_freq)) / 8
    weight = (torch.randn(n_out, 2 * n_freq, generator=gen) / (2 * n_freq) ** 0.5).to(dtype)
    bias = (torch.randn(n_out, generator=gen) * 0.1).to(dtype)
    grad = torch.randn(batch, n_out, generator=gen).to(dtype)
    return [t.to(device) for t in (logsnr, frequencies, weight, bias, grad)]


def _run(fn, logsnr, frequencies, weight, bias, grad):
    weight = weight.detach().clone().requires_grad_(True)
    bias = bias.detach().clone().requires_grad_(True)
    out = fn(logsnr, frequencies, weight, bias)
    dweight, dbias = torch.autograd.grad(out, [weight, bias], grad)
    return out, dweight, dbias


def _fp32_floors(logsnr, frequencies, weight, bias, grad) -> list[float]:
    """Floors for out, dweight, dbias: 4·u·max of the magnitude the feature differences act on. With
    |Δf| ≤ 2·u·|f| (u = fp32 eps), |Δh| ≤ 2·u·A where A = |f|·|W|ᵀ + |b|, and |SiLU'| ≤ 1.1, |SiLU''| ≤ 0.5,
    so out moves by ≤ 2.2·u·A and d(pre-activation) by ≤ u·D, D = |grad|·(1.1 + A); the weight gradient
    Σ_b dpre·f moves by ≤ 2·u·Dᵀ·|f|, the bias gradient by ≤ u·Σ_b D. The extra ulps are the kernel's own."""
    f = reference.fourier_features(logsnr, frequencies).double().abs()
    a = f @ weight.double().abs().T + bias.double().abs()
    d = grad.double().abs() * (1.1 + a)
    return [4 * U * m.max().item() if m.numel() else 0.0 for m in (a, d.T @ f, d.sum(0))]


def _check(sizes, dtype, device="cpu"):
    logsnr, frequencies, weight, bias, grad = _inputs(*sizes, dtype, seed=sum(sizes), device=device)
    fast = _run(extension.logsnr_embed, logsnr, frequencies, weight, bias, grad)
    same_dtype = _run(reference.logsnr_embed, logsnr, frequencies, weight, bias, grad)
    exact = _run(reference.logsnr_embed, logsnr, frequencies, weight.float(), bias.float(), grad.float())
    fp64 = _run(reference.logsnr_embed, logsnr, frequencies, weight.double(), bias.double(), grad.double())
    floors = _fp32_floors(logsnr, frequencies, weight, bias, grad)
    for name, got, ref, gold, gold64, floor in zip(("out", "dweight", "dbias"), fast, same_dtype, exact, fp64,
                                                   floors):
        assert got.dtype == dtype and got.shape == ref.shape, name
        if dtype == torch.float32:
            err = (got.double() - gold64).abs().max().item()
            err_ref = (ref.double() - gold64).abs().max().item()
            assert err <= 2 * err_ref + floor, f"{name}: {err} vs reference {err_ref} (floor {floor})"
        else:
            err = (got.float() - gold).abs().max().item()
            err_ref = (ref.float() - gold).abs().max().item()
            scale = gold.abs().max().item()
            assert err <= 2 * err_ref + 1e-6 * scale, f"{name}: {err} vs reference {err_ref}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
def test_embed_matches_reference(sizes, dtype):
    _check(sizes, dtype)


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
@pytest.mark.parametrize("logsnr_embed", [pytest.param(reference.logsnr_embed, id="reference"),
                                          pytest.param(extension.logsnr_embed, id="extension")])
def test_gradcheck(logsnr_embed):
    logsnr, frequencies, weight, bias, _ = _inputs(3, 4, 5, torch.float32, seed=1)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    fn = lambda w, b: logsnr_embed(logsnr, frequencies, w, b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (weight, bias), eps=1e-2, atol=2e-3, rtol=2e-3)


def test_no_grad_for_logsnr_and_frequencies():
    logsnr, frequencies, weight, bias, _ = _inputs(4, 3, 5, torch.float32, seed=2)
    logsnr.requires_grad_(True)
    weight.requires_grad_(True)
    out = extension.logsnr_embed(logsnr, frequencies, weight, bias)
    (dlogsnr, dweight) = torch.autograd.grad(out.sum(), [logsnr, weight], allow_unused=True)
    assert dlogsnr is None and dweight is not None


@pytest.mark.parametrize("backend", ["auto", "fast"])
def test_public_op_gives_the_gradients_asked_for(backend, monkeypatch):
    """The kernel cannot differentiate λ: where λ requires a gradient the public op runs the reference."""
    monkeypatch.setenv("UL_FAST_BACKEND", backend)
    logsnr, frequencies, weight, bias, _ = _inputs(4, 3, 5, torch.float32, seed=2)
    assert extension.embed_supports(logsnr, frequencies, weight, bias)
    logsnr.requires_grad_(True)
    out = ops.logsnr_embed(logsnr, frequencies, weight, bias)
    (dlogsnr,) = torch.autograd.grad(out.sum(), [logsnr])
    (expected,) = torch.autograd.grad(reference.logsnr_embed(logsnr, frequencies, weight, bias).sum(), [logsnr])
    torch.testing.assert_close(dlogsnr, expected)


def test_bad_input_errors():
    logsnr, frequencies, weight, bias, _ = _inputs(4, 3, 5, torch.float32, seed=2)
    with pytest.raises(ValueError, match="weight must have shape"):
        extension.logsnr_embed(logsnr, frequencies, weight[:, :5], bias)
    with pytest.raises(ValueError, match="bias must have shape"):
        extension.logsnr_embed(logsnr, frequencies, weight, bias.half())
    with pytest.raises(ValueError, match="weight must have shape"):  # the public op checks it too
        ops.logsnr_embed(logsnr, frequencies, weight[:, :5], bias)


@pytest.mark.parametrize("case", ["short bias", "bias dtype", "narrow weight", "2-D logsnr",
                                  "backward: short grad", "backward: fp16 pre", "backward: short feats",
                                  "backward: odd weight"])
def test_custom_op_checks_the_sizes_it_reads(case):
    """Called directly (no ul_fast.ops checks in front), the custom ops raise instead of reading out of bounds."""
    logsnr, frequencies, weight, bias, grad = _inputs(4, 3, 5, torch.float32, seed=3)
    _, pre, feats = torch.ops.ul_fast.logsnr_embed(logsnr, frequencies, weight, bias)
    embed, backward = torch.ops.ul_fast.logsnr_embed, torch.ops.ul_fast.logsnr_embed_backward
    calls = {
        "short bias": lambda: embed(logsnr, frequencies, weight, bias[:3]),
        "bias dtype": lambda: embed(logsnr, frequencies, weight, bias.half()),
        "narrow weight": lambda: embed(logsnr, frequencies, weight[:, :4], bias),
        "2-D logsnr": lambda: embed(logsnr[:, None], frequencies, weight, bias),
        "backward: short grad": lambda: backward(grad[:2], pre, feats, weight),
        "backward: fp16 pre": lambda: backward(grad, pre.half(), feats, weight),
        "backward: short feats": lambda: backward(grad, pre, feats[:, :4], weight),
        "backward: odd weight": lambda: backward(grad, pre, feats, weight[:, :5]),
    }
    with pytest.raises(ValueError, match="must have shape|must be 1-D"):
        calls[case]()


def test_opcheck_embed():
    weight = torch.randn(6, 8, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    args = (torch.randn(5), torch.rand(4), weight, bias)
    torch.library.opcheck(torch.ops.ul_fast.logsnr_embed.default, args)
    out, pre, feats = torch.ops.ul_fast.logsnr_embed(*args)
    torch.library.opcheck(torch.ops.ul_fast.logsnr_embed_backward.default,
                          (torch.randn(5, 6), pre.detach(), feats.detach(), weight.detach()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES + [(1024, 128, 768)])
def test_cuda_embed_matches_reference(sizes, dtype):
    _check(sizes, dtype, device="cuda")
