"""pytest-benchmark: the compiled C++ kernels (ul_fast._C) against the pure-torch reference on CPU.

Small sizes so it runs anywhere:  pytest benchmarks/bench_ops_cpu.py --benchmark-columns=median,iqr
(the GPU benchmark at training shapes is benchmarks/gpu_bench_ops.py).
"""

from __future__ import annotations

import pytest
import torch

from ul_fast.kernels import extension_ops
from ul_fast.ops import draw_seed, reference

pytestmark = pytest.mark.skipif(not extension_ops.available(), reason="ul_fast._C not built")

IMPLS = {"compiled": extension_ops, "reference": reference}
SHAPE = (8, 4, 32, 32)  # 32768 elements
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_noise_inject(benchmark, impl, dtype):
    torch.manual_seed(0)
    x = torch.randn(SHAPE).to(DTYPES[dtype])
    logsnr, seed = torch.randn(SHAPE[0]) * 4, draw_seed("cpu")
    benchmark.group = f"noise_inject {'x'.join(map(str, SHAPE))} {dtype}"
    z, eps = benchmark(IMPLS[impl].noise_inject, x, logsnr, seed, True)
    assert z.shape == eps.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_diffusion_loss_forward_backward(benchmark, impl, dtype):
    torch.manual_seed(0)
    pred = torch.randn(SHAPE).to(DTYPES[dtype]).requires_grad_(True)
    x = torch.randn(SHAPE).to(DTYPES[dtype]).requires_grad_(True)
    logsnr, ndl, seed = torch.randn(SHAPE[0]) * 4, torch.rand(SHAPE[0]) + 0.5, draw_seed("cpu")

    def step():
        loss = IMPLS[impl].diffusion_loss(pred, x, logsnr, ndl, seed, "v")
        return torch.autograd.grad(loss.sum(), [pred, x])

    benchmark.group = f"diffusion_loss fwd+bwd {'x'.join(map(str, SHAPE))} {dtype}"
    grads = benchmark(step)
    assert grads[0].shape == SHAPE


@pytest.mark.parametrize("impl", IMPLS)
def test_logsnr_embed_forward_backward(benchmark, impl):
    torch.manual_seed(0)
    batch, n_freq, n_out = 64, 64, 256
    logsnr, frequencies = torch.randn(batch) * 5, torch.exp(torch.linspace(0, 4, n_freq))
    weight = (torch.randn(n_out, 2 * n_freq) * 0.05).requires_grad_(True)
    bias = torch.zeros(n_out, requires_grad=True)
    grad = torch.randn(batch, n_out)

    def step():
        out = IMPLS[impl].logsnr_embed(logsnr, frequencies, weight, bias)
        return torch.autograd.grad(out, [weight, bias], grad)

    benchmark.group = f"logsnr_embed fwd+bwd B={batch} 2F={2 * n_freq} N={n_out} fp32"
    grads = benchmark(step)
    assert grads[0].shape == weight.shape
