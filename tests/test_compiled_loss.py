"""Fused diffusion loss (ul_fast._C) against the reference: forward, gradients, ε regeneration.

Both compute in fp32 from the same inputs; they differ by the few-ulp ε differences (see
test_compiled_noise.py) and summation order (the kernel sums in fp64 per chunk), so the fp32 loss agrees
to ~1e-5 relative; 16-bit gradients may differ by one rounding step of their dtype.
"""

from __future__ import annotations

import pytest
import torch

from ul_fast.ops import reference

compiled = pytest.importorskip("ul_fast.kernels.compiled")
pytestmark = pytest.mark.skipif(not compiled.available(), reason="ul_fast._C not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (3, 5, 7), (4, 2, 17, 19), (2, 9001)]
OPTIONS = [("v", 1.0, None), ("v", 1.5, 2.0), ("eps", 1.0, None), ("eps", 0.7, -1.0)]


def _inputs(shape, pred_dtype, x_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=gen).to(pred_dtype)
    x = torch.randn(shape, generator=gen).to(x_dtype)
    logsnr = torch.randn(shape[0], generator=gen) * 5
    neg_dlogsnr_dt = torch.rand(shape[0], generator=gen) * 10 + 0.1
    noise_seed = torch.randint(0, 2**62, (1,), generator=gen, dtype=torch.int64)
    return pred, x, logsnr, neg_dlogsnr_dt, noise_seed


def _grad_tol(dtype):
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5)
    return dict(rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)


def _compare(shape, pred_dtype, x_dtype, options, seed, device="cpu"):
    pred, x, logsnr, ndl, noise_seed = (t.to(device) for t in _inputs(shape, pred_dtype, x_dtype, seed))
    pred.requires_grad_(True)
    x.requires_grad_(True)
    pred_ref = pred.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    loss = compiled.diffusion_loss(pred, x, logsnr, ndl, noise_seed, *options)
    loss_ref = reference.diffusion_loss(pred_ref, x_ref, logsnr, ndl, noise_seed, *options)
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-5, atol=1e-5)
    grad = torch.rand(shape[0], device=device) + 0.5
    grads = torch.autograd.grad(loss, [pred, x], grad, allow_unused=True)
    grads_ref = torch.autograd.grad(loss_ref, [pred_ref, x_ref], grad, allow_unused=True)
    torch.testing.assert_close(grads[0], grads_ref[0], **_grad_tol(pred_dtype))
    if options[0] == "v":
        torch.testing.assert_close(grads[1], grads_ref[1], **_grad_tol(x_dtype))
    else:  # ε-prediction: the loss does not depend on x
        assert grads[1] is None and grads_ref[1] is None


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_matches_reference(shape, dtype, options):
    _compare(shape, dtype, dtype, options, seed=hash((shape, str(dtype), options)) % 2**31)


@pytest.mark.parametrize("pred_dtype,x_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_mixed_dtypes(pred_dtype, x_dtype):
    _compare((3, 4, 33), pred_dtype, x_dtype, ("v", 1.0, 1.0), seed=77)


def test_eps_is_regenerated_from_the_seed():
    """With ε-prediction and ε̂ = the ε that noise_inject drew, the loss is exactly zero; with v-prediction
    and the true v = α·ε − σ·x it is zero up to rounding."""
    _, x, logsnr, ndl, seed = _inputs((4, 3, 17), torch.float32, torch.float32, 31)
    _, eps = compiled.noise_inject(x, logsnr, seed, True)
    assert torch.equal(compiled.diffusion_loss(eps, x, logsnr, ndl, seed, "eps"), torch.zeros(4))
    alpha, sigma = (t[:, None, None] for t in compiled.alpha_sigma(logsnr))
    v = alpha * eps - sigma * x
    loss = compiled.diffusion_loss(v, x, logsnr, ndl, seed, "v")
    assert loss.abs().max() < 1e-9 * ndl.max() * x.numel()
    wrong_seed = compiled.diffusion_loss(eps, x, logsnr, ndl, seed + 1, "eps")
    assert (wrong_seed > 1).all()


def test_weighting():
    pred, x, logsnr, ndl, seed = _inputs((5, 40), torch.float32, torch.float32, 5)
    elbo = compiled.diffusion_loss(pred, x, logsnr, ndl, seed, "v", 1.0, None)
    weighted = compiled.diffusion_loss(pred, x, logsnr, ndl, seed, "v", 2.5, 1.0)
    torch.testing.assert_close(weighted, elbo * 2.5 * torch.sigmoid(1.0 - logsnr), rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradcheck():
    pred, x, logsnr, ndl, seed = _inputs((3, 2, 5), torch.float32, torch.float32, 6)
    ndl = ndl / 10
    pred.requires_grad_(True)
    x.requires_grad_(True)
    for options in OPTIONS:
        fn = lambda p, xx: compiled.diffusion_loss(p, xx, logsnr, ndl, seed, *options)  # noqa: E731,B023
        assert torch.autograd.gradcheck(fn, (pred, x), eps=1e-2, atol=2e-3, rtol=2e-3)


def test_determinism_across_thread_counts():
    pred, x, logsnr, ndl, seed = _inputs((3, 50_001), torch.float32, torch.float32, 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compiled.diffusion_loss(pred, x, logsnr, ndl, seed)
        torch.set_num_threads(max(2, threads))
        two = compiled.diffusion_loss(pred, x, logsnr, ndl, seed)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_bad_input_errors():
    pred, x, logsnr, ndl, seed = _inputs((2, 3), torch.float32, torch.float32, 1)
    with pytest.raises(ValueError, match="prediction must be"):
        compiled.diffusion_loss(pred, x, logsnr, ndl, seed, "x0")
    with pytest.raises(ValueError, match="same shape"):
        compiled.diffusion_loss(pred[:, :2], x, logsnr, ndl, seed)
    with pytest.raises(TypeError, match="pred must be float32"):
        compiled.diffusion_loss(pred.double(), x, logsnr, ndl, seed)


# ---- GPU -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(8, 16, 64, 64)])
def test_cuda_loss_matches_reference(shape, dtype, options):
    _compare(shape, dtype, dtype, options, seed=3, device="cuda")


@pytest.mark.gpu
def test_cuda_loss_matches_cpu_kernel_and_graph_replay():
    pred, x, logsnr, ndl, seed = _inputs((8, 3, 64, 64), torch.bfloat16, torch.bfloat16, 12)
    cpu = compiled.diffusion_loss(pred, x, logsnr, ndl, seed)
    args = [t.cuda() for t in (pred, x, logsnr, ndl, seed)]
    torch.testing.assert_close(compiled.diffusion_loss(*args).cpu(), cpu, rtol=2e-5, atol=1e-5)
    first = compiled.diffusion_loss(*args)
    assert torch.equal(first, compiled.diffusion_loss(*args))  # deterministic reduction
    graph = torch.cuda.CUDAGraph()
    compiled.diffusion_loss(*args)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = compiled.diffusion_loss(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, first)
