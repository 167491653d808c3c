"""``diffusion_loss``: the C++/CUDA extension (``ul_fast.kernels.extension_ops``) against the reference (forward,
gradients, ε regeneration); properties every backend shares; the checks of the public op and the size checks
of ``torch.ops.ul_fast.diffusion_loss``.

Both compute in fp32 from the same inputs; their residuals ``r = ε − ε̂`` differ through the few-ulp ε, α, σ
differences (see test_op_noise_inject.py) and their own roundings, bounded per element in ``_residual_bound``;
the loss is checked against its fp64 value from the reference's ε, α, σ (so PyTorch's fp32 summation, whose
order depends on the machine, is not part of the comparison); 16-bit gradients may differ by one rounding
step of their dtype.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from ul_fast import ops
from ul_fast.diffusion import per_example
from ul_fast.kernels import extension_ops as extension
from ul_fast.ops import reference

pytestmark = pytest.mark.skipif(not extension.available(), reason="ul_fast._C not built")
# Every implementation of the op (with the noise and α, σ it is consistent with): the reference (the
# specification) and the extension's kernels.
BACKENDS = [pytest.param(reference, id="reference"), pytest.param(extension, id="extension")]

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


U = torch.finfo(torch.float32).eps


def _residual_bound(pred, x, logsnr, seed, prediction):
    """fp64 ``r = ε − ε̂`` from the reference's fp32 ε, α, σ; ``∂r/∂pred``, ``∂r/∂x``; and δ, a bound on
    |r_kernel − r|. The kernel's ε is within 4 ulp of the reference's, its α, σ within 2 ulp, and it
    rounds ≤ 5 operations (u/2 each, u = fp32 eps, α, σ ≤ 1): for v-prediction, summing the terms gives
    δ ≤ 17·u·|ε| + 8·u·|x| + 5·u·|pred|; for ε-prediction, δ ≤ 5·u·(|ε| + |pred|)."""
    eps = reference.gaussian_noise(x.shape, seed).double()
    p, xx = pred.detach().double(), x.detach().double()
    if prediction == "eps":
        return eps - p, torch.ones_like(p), torch.zeros_like(p), 5 * U * (eps.abs() + p.abs())
    alpha, sigma = (per_example(t.double(), x) for t in reference.alpha_sigma(logsnr))
    r = eps - (sigma * (alpha * xx + sigma * eps) + alpha * p)
    delta = U * (17 * eps.abs() + 8 * xx.abs() + 5 * p.abs())
    return r, alpha.expand_as(p), (alpha * sigma).expand_as(p), delta


def _check_loss(loss, pred, x, logsnr, ndl, seed, options, device):
    """|L_kernel − L| per example, L = s·Σr² in fp64 (s = ½·(−dλ/dt)·w): the residuals contribute
    s·Σ(2|r|δ + δ²); the squares, the kernel's sum (fp64 on the CPU, n < 2^29: ≤ u·Σr²; fp32 on CUDA, any
    order: ≤ (n − 1)·u·Σr²), its weight (≤ 2 ulp from the reference's) and ≤ 4 roundings of the scale ≤ 8·u·L."""
    prediction, factor, bias = options
    r, _, _, delta = _residual_bound(pred, x, logsnr, seed, prediction)
    s = 0.5 * ndl.double() * reference.loss_weight(logsnr, factor, bias).double()
    sq = r.square().reshape(len(r), -1).sum(1)
    exact = s * sq
    summation = U if device == "cpu" else (r[0].numel() - 1) * U
    bound = s * (2 * r.abs() * delta + delta.square()).reshape(len(r), -1).sum(1) + (summation + 8 * U) * exact
    excess = (loss.double() - exact).abs() - bound
    assert excess.max() <= 0, f"loss exceeds its bound by {excess.max().item():.3g} (bound {bound.max().item():.3g})"


def _check_grad(got, ref, dr, delta, coef, dtype):
    """fp32: ∂L/∂t = 2·c·r·∂r/∂t (c = grad_out·s): the residual difference gives 2·|c·∂r/∂t|·δ; the two
    backends' own chains (≤ 6 roundings of u/2 each, and their ≤ 2-ulp weights) at most 8·u·|∂L/∂t|.
    16-bit: the fp32 values differ by that much, which can flip the final rounding by one step."""
    if dtype != torch.float32:
        torch.testing.assert_close(got, ref, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)
        return
    bound = 2 * (per_example(coef, dr) * dr).abs() * delta + 8 * U * ref.double().abs()
    excess = (got.double() - ref.double()).abs() - bound
    assert excess.max() <= 0, f"gradient exceeds its bound by {excess.max().item():.3g}"


def _compare(shape, pred_dtype, x_dtype, options, seed, device="cpu"):
    pred, x, logsnr, ndl, noise_seed = (t.to(device) for t in _inputs(shape, pred_dtype, x_dtype, seed))
    pred.requires_grad_(True)
    x.requires_grad_(True)
    pred_ref = pred.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    loss = extension.diffusion_loss(pred, x, logsnr, ndl, noise_seed, *options)
    loss_ref = reference.diffusion_loss(pred_ref, x_ref, logsnr, ndl, noise_seed, *options)
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    _check_loss(loss, pred, x, logsnr, ndl, noise_seed, options, device)
    grad = torch.rand(shape[0], device=device) + 0.5
    grads = torch.autograd.grad(loss, [pred, x], grad, allow_unused=True)
    grads_ref = torch.autograd.grad(loss_ref, [pred_ref, x_ref], grad, allow_unused=True)
    _, dr_dpred, dr_dx, delta = _residual_bound(pred, x, logsnr, noise_seed, options[0])
    coef = grad.double() * 0.5 * ndl.double() * reference.loss_weight(logsnr, *options[1:]).double()
    _check_grad(grads[0], grads_ref[0], dr_dpred, delta, coef, pred_dtype)
    if options[0] == "v":
        _check_grad(grads[1], grads_ref[1], dr_dx, delta, coef, x_dtype)
    else:  # ε-prediction: the loss does not depend on x
        assert grads[1] is None and grads_ref[1] is None


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_matches_reference(shape, dtype, options):
    _compare(shape, dtype, dtype, options, seed=hash((shape, str(dtype), options)) % 2**31)


@pytest.mark.parametrize("pred_dtype,x_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                                (torch.float16, torch.bfloat16)])
def test_mixed_dtypes(pred_dtype, x_dtype):
    _compare((3, 4, 33), pred_dtype, x_dtype, ("v", 1.0, 1.0), seed=77)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_is_regenerated_from_the_seed(backend: ModuleType):
    """With ε-prediction and ε̂ = the ε that noise_inject drew, the loss is exactly zero; with v-prediction
    and the true v = α·ε − σ·x it is zero up to rounding."""
    _, x, logsnr, ndl, seed = _inputs((4, 3, 17), torch.float32, torch.float32, 31)
    _, eps = backend.noise_inject(x, logsnr, seed, True)
    assert torch.equal(backend.diffusion_loss(eps, x, logsnr, ndl, seed, "eps"), torch.zeros(4))
    alpha, sigma = (t[:, None, None] for t in backend.alpha_sigma(logsnr))
    v = alpha * eps - sigma * x
    loss = backend.diffusion_loss(v, x, logsnr, ndl, seed, "v")
    assert loss.abs().max() < 1e-9 * ndl.max() * x.numel()
    wrong_seed = backend.diffusion_loss(eps, x, logsnr, ndl, seed + 1, "eps")
    assert (wrong_seed > 1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighting(backend: ModuleType):
    pred, x, logsnr, ndl, seed = _inputs((5, 40), torch.float32, torch.float32, 5)
    elbo = backend.diffusion_loss(pred, x, logsnr, ndl, seed, "v", 1.0, None)
    weighted = backend.diffusion_loss(pred, x, logsnr, ndl, seed, "v", 2.5, 1.0)
    torch.testing.assert_close(weighted, elbo * 2.5 * torch.sigmoid(1.0 - logsnr), rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend: ModuleType):
    pred, x, logsnr, ndl, seed = _inputs((3, 2, 5), torch.float32, torch.float32, 6)
    ndl = ndl / 10
    pred.requires_grad_(True)
    x.requires_grad_(True)
    for options in OPTIONS:
        fn = lambda p, xx: backend.diffusion_loss(p, xx, logsnr, ndl, seed, *options)  # noqa: E731,B023
        assert torch.autograd.gradcheck(fn, (pred, x), eps=1e-2, atol=2e-3, rtol=2e-3)


def test_determinism_across_thread_counts():
    pred, x, logsnr, ndl, seed = _inputs((3, 50_001), torch.float32, torch.float32, 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = extension.diffusion_loss(pred, x, logsnr, ndl, seed)
        torch.set_num_threads(max(2, threads))
        two = extension.diffusion_loss(pred, x, logsnr, ndl, seed)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("diffusion_loss", [pytest.param(ops.diffusion_loss, id="public"),
                                            pytest.param(extension.diffusion_loss, id="extension")])
def test_bad_input_errors(diffusion_loss):
    """The public op checks its arguments; the extension's op still refuses what it cannot read safely."""
    pred, x, logsnr, ndl, seed = _inputs((2, 3), torch.float32, torch.float32, 1)
    with pytest.raises(ValueError, match="same shape"):
        diffusion_loss(pred[:, :2], x, logsnr, ndl, seed)
    with pytest.raises(TypeError, match="pred must be float32"):
        diffusion_loss(pred.double(), x, logsnr, ndl, seed)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_public_op_checks_the_prediction_and_loss_factor(backend, monkeypatch):
    """The one home of these checks is ul_fast.ops (the kernels assume a valid prediction)."""
    monkeypatch.setenv("UL_FAST_BACKEND", backend)
    pred, x, logsnr, ndl, seed = _inputs((2, 3), torch.float32, torch.float32, 1)
    with pytest.raises(ValueError, match="prediction must be"):
        ops.diffusion_loss(pred, x, logsnr, ndl, seed, "x0")
    with pytest.raises(ValueError, match="loss_factor must be > 0"):
        ops.diffusion_loss(pred, x, logsnr, ndl, seed, "v", 0.0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_empty_batch_is_an_error_on_every_backend(backend, monkeypatch):
    """One meaning for B = 0 (the reference used to crash in a reshape, the kernel to return an empty loss):
    a ValueError from the public op, as noise_inject gives."""
    monkeypatch.setenv("UL_FAST_BACKEND", backend)
    pred, x, logsnr, ndl, seed = _inputs((0, 3), torch.float32, torch.float32, 1)
    with pytest.raises(ValueError, match="non-empty batch"):
        ops.diffusion_loss(pred, x, logsnr, ndl, seed)


@pytest.mark.parametrize("case", ["short logsnr", "short neg_dlogsnr_dt", "empty seed", "scalar x",
                                  "backward: short grad", "backward: short logsnr", "unknown prediction",
                                  "backward: unknown prediction"])
def test_custom_op_checks_the_sizes_it_reads(case):
    """Called directly (no ul_fast.ops checks in front), the custom ops raise instead of reading out of bounds
    (or, for a prediction type the kernel's v/ε flag cannot express, instead of silently computing ε)."""
    pred, x, logsnr, ndl, seed = _inputs((4, 3), torch.float32, torch.float32, 2)
    loss, loss_backward = torch.ops.ul_fast.diffusion_loss, torch.ops.ul_fast.diffusion_loss_backward
    calls = {
        "short logsnr": lambda: loss(pred, x, logsnr[:3], ndl, seed, "v", 1.0, None),
        "short neg_dlogsnr_dt": lambda: loss(pred, x, logsnr, ndl[:1], seed, "v", 1.0, None),
        "empty seed": lambda: loss(pred, x, logsnr, ndl, seed[:0], "eps", 1.0, 0.5),
        "scalar x": lambda: loss(pred[0, 0], x[0, 0], logsnr, ndl, seed, "v", 1.0, None),
        "backward: short grad": lambda: loss_backward(torch.ones(2), pred, x, logsnr, ndl, seed, "v", 1.0, None,
                                                      True),
        "backward: short logsnr": lambda: loss_backward(torch.ones(4), pred, x, logsnr[:2], ndl, seed, "v", 1.0,
                                                        None, True),
        "unknown prediction": lambda: loss(pred, x, logsnr, ndl, seed, "x0", 1.0, None),
        "backward: unknown prediction": lambda: loss_backward(torch.ones(4), pred, x, logsnr, ndl, seed, "x0", 1.0,
                                                              None, True),
    }
    with pytest.raises(ValueError, match="must have shape|seed must be an int64|leading batch|prediction must be"):
        calls[case]()


@pytest.mark.parametrize("prediction,bias", [("v", None), ("v", 1.0), ("eps", 2.0)])
def test_opcheck_loss(prediction, bias):
    pred = torch.randn(2, 3, 7, requires_grad=True)
    x = torch.randn(2, 3, 7, requires_grad=True)
    logsnr, ndl, seed = torch.randn(2), torch.rand(2) + 0.5, torch.tensor([3])
    torch.library.opcheck(torch.ops.ul_fast.diffusion_loss.default,
                          (pred, x, logsnr, ndl, seed, prediction, 1.5, bias))
    torch.library.opcheck(torch.ops.ul_fast.diffusion_loss_backward.default,
                          (torch.rand(2), pred.detach(), x.detach(), logsnr, ndl, seed, prediction, 1.5, bias,
                           True))


# ---- GPU -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(8, 16, 64, 64)])
def test_cuda_loss_matches_reference(shape, dtype, options):
    _compare(shape, dtype, dtype, options, seed=3, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("pred_dtype,x_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                                (torch.float16, torch.bfloat16)])
def test_cuda_mixed_dtypes(pred_dtype, x_dtype):
    _compare((3, 4, 33), pred_dtype, x_dtype, ("v", 1.0, 1.0), seed=77, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(70_000, 1), (1025, 3)])
def test_cuda_loss_many_small_examples(shape):
    """One block per example in the forward (70,000 blocks), 1024+ examples per block in the backward."""
    _compare(shape, torch.float32, torch.float32, ("v", 1.5, 2.0), seed=13, device="cuda")


@pytest.mark.gpu
def test_cuda_loss_matches_cpu_kernel_and_graph_replay():
    pred, x, logsnr, ndl, seed = _inputs((8, 3, 64, 64), torch.bfloat16, torch.bfloat16, 12)
    cpu = extension.diffusion_loss(pred, x, logsnr, ndl, seed)
    args = [t.cuda() for t in (pred, x, logsnr, ndl, seed)]
    torch.testing.assert_close(extension.diffusion_loss(*args).cpu(), cpu, rtol=2e-5, atol=1e-5)
    first = extension.diffusion_loss(*args)
    assert torch.equal(first, extension.diffusion_loss(*args))  # deterministic reduction
    graph = torch.cuda.CUDAGraph()
    extension.diffusion_loss(*args)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = extension.diffusion_loss(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, first)
