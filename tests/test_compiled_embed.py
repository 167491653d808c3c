"""Fused log-SNR embedding ``SiLU(W·[sin λf, cos λf] + b)`` (ul_fast._C) against the reference.

fp32: agreement to ~1e-5 (sin/cos ulp differences and summation order). 16-bit: the reference rounds the
matmul output before SiLU and its backward works in 16-bit; the kernel accumulates in fp32 and rounds
once, so its error against an fp32 computation must be at most twice the same-dtype reference's.
"""

from __future__ import annotations

import pytest
import torch

from ul_fast.ops import reference

compiled = pytest.importorskip("ul_fast.kernels.compiled")
pytestmark = pytest.mark.skipif(not compiled.available(), reason="ul_fast._C not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [(1, 1, 1), (5, 3, 7), (37, 16, 70), (256, 128, 96)]  # (B, F, N)


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


def _check(sizes, dtype, device="cpu"):
    logsnr, frequencies, weight, bias, grad = _inputs(*sizes, dtype, seed=sum(sizes), device=device)
    fast = _run(compiled.logsnr_embed, logsnr, frequencies, weight, bias, grad)
    same_dtype = _run(reference.logsnr_embed, logsnr, frequencies, weight, bias, grad)
    exact = _run(reference.logsnr_embed, logsnr, frequencies, weight.float(), bias.float(), grad.float())
    for name, got, ref, gold in zip(("out", "dweight", "dbias"), fast, same_dtype, exact):
        assert got.dtype == dtype and got.shape == ref.shape, name
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5, msg=name)
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
def test_gradcheck():
    logsnr, frequencies, weight, bias, _ = _inputs(3, 4, 5, torch.float32, seed=1)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    fn = lambda w, b: compiled.logsnr_embed(logsnr, frequencies, w, b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (weight, bias), eps=1e-2, atol=2e-3, rtol=2e-3)


def test_no_grad_for_logsnr_and_frequencies():
    logsnr, frequencies, weight, bias, _ = _inputs(4, 3, 5, torch.float32, seed=2)
    logsnr.requires_grad_(True)
    weight.requires_grad_(True)
    out = compiled.logsnr_embed(logsnr, frequencies, weight, bias)
    (dlogsnr, dweight) = torch.autograd.grad(out.sum(), [logsnr, weight], allow_unused=True)
    assert dlogsnr is None and dweight is not None


def test_bad_input_errors():
    logsnr, frequencies, weight, bias, _ = _inputs(4, 3, 5, torch.float32, seed=2)
    with pytest.raises(ValueError, match="weight must have shape"):
        compiled.logsnr_embed(logsnr, frequencies, weight[:, :5], bias)
    with pytest.raises(ValueError, match="bias must have shape"):
        compiled.logsnr_embed(logsnr, frequencies, weight, bias.half())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES + [(1024, 128, 768)])
def test_cuda_embed_matches_reference(sizes, dtype):
    _check(sizes, dtype, device="cuda")
