"""The compiled C++ kernels (ul_fast._C) against the pure-torch reference on CPU.

Two ways to run it, on the same cases (small sizes, so it runs anywhere):

- pytest-benchmark, absolute times:  pytest benchmarks/bench_ops_cpu.py --benchmark-columns=median,iqr
- interleaved ratios, the figures ``ul_fast.ops.dispatch.REFERENCE_IS_FASTER`` cites:
  OMP_NUM_THREADS=1 python benchmarks/bench_ops_cpu.py --ratios [--rounds 15]
  (each round times every case's kernel and reference back to back, alternating which goes first, so load
  from other processes hits both; it prints the median of the per-round speed-ups and their range)

The GPU benchmark at training shapes is benchmarks/gpu_bench_ops.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pytest
import torch

from ul_fast.kernels import extension_ops
from ul_fast.ops import draw_seed, reference

pytestmark = pytest.mark.skipif(not extension_ops.available(), reason="ul_fast._C not built")

IMPLS = {"compiled": extension_ops, "reference": reference}
SHAPE = (8, 4, 32, 32)  # 32768 elements
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EMBED_SIZES = (64, 64, 256)  # batch, frequencies F (the weight is [N, 2F]), outputs N


def noise_inject_step(impl: str, dtype: str) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """One noise injection (returning ε too) on ``SHAPE``."""
    torch.manual_seed(0)
    x = torch.randn(SHAPE).to(DTYPES[dtype])
    logsnr, seed = torch.randn(SHAPE[0]) * 4, draw_seed("cpu")
    return lambda: IMPLS[impl].noise_inject(x, logsnr, seed, True)


def diffusion_loss_step(impl: str, dtype: str) -> Callable[[], tuple[torch.Tensor, ...]]:
    """The v-prediction loss forward and its gradients for pred and x, on ``SHAPE``."""
    torch.manual_seed(0)
    pred = torch.randn(SHAPE).to(DTYPES[dtype]).requires_grad_(True)
    x = torch.randn(SHAPE).to(DTYPES[dtype]).requires_grad_(True)
    logsnr, ndl, seed = torch.randn(SHAPE[0]) * 4, torch.rand(SHAPE[0]) + 0.5, draw_seed("cpu")

    def step():
        loss = IMPLS[impl].diffusion_loss(pred, x, logsnr, ndl, seed, "v")
        return torch.autograd.grad(loss.sum(), [pred, x])

    return step


def logsnr_embed_step(impl: str) -> Callable[[], tuple[torch.Tensor, ...]]:
    """The embedding forward and its gradients for weight and bias, fp32, ``EMBED_SIZES``."""
    torch.manual_seed(0)
    batch, n_freq, n_out = EMBED_SIZES
    logsnr, frequencies = torch.randn(batch) * 5, torch.exp(torch.linspace(0, 4, n_freq))
    weight = (torch.randn(n_out, 2 * n_freq) * 0.05).requires_grad_(True)
    bias = torch.zeros(n_out, requires_grad=True)
    grad = torch.randn(batch, n_out)

    def step():
        out = IMPLS[impl].logsnr_embed(logsnr, frequencies, weight, bias)
        return torch.autograd.grad(out, [weight, bias], grad)

    return step


CASE_NAME = "x".join(map(str, SHAPE))
CASES: dict[str, Callable[[str], Callable[[], object]]] = {
    **{f"noise_inject {CASE_NAME} {d}": (lambda impl, d=d: noise_inject_step(impl, d)) for d in DTYPES},
    **{f"diffusion_loss fwd+bwd {CASE_NAME} {d}": (lambda impl, d=d: diffusion_loss_step(impl, d)) for d in DTYPES},
    f"logsnr_embed fwd+bwd B={EMBED_SIZES[0]} 2F={2 * EMBED_SIZES[1]} N={EMBED_SIZES[2]} fp32":
        logsnr_embed_step,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_noise_inject(benchmark, impl, dtype):
    benchmark.group = f"noise_inject {CASE_NAME} {dtype}"
    z, eps = benchmark(noise_inject_step(impl, dtype))
    assert z.shape == eps.shape == SHAPE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_diffusion_loss_forward_backward(benchmark, impl, dtype):
    benchmark.group = f"diffusion_loss fwd+bwd {CASE_NAME} {dtype}"
    grads = benchmark(diffusion_loss_step(impl, dtype))
    assert grads[0].shape == SHAPE


@pytest.mark.parametrize("impl", IMPLS)
def test_logsnr_embed_forward_backward(benchmark, impl):
    benchmark.group = f"logsnr_embed fwd+bwd B={EMBED_SIZES[0]} 2F={2 * EMBED_SIZES[1]} N={EMBED_SIZES[2]} fp32"
    grads = benchmark(logsnr_embed_step(impl))
    assert grads[0].shape == (EMBED_SIZES[2], 2 * EMBED_SIZES[1])


def _ms_per_call(step: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) * 1e3 / calls


def interleaved_speedups(rounds: int, seconds_per_round: float = 0.05) -> dict[str, list[float]]:
    """Per case, the per-round speed-ups of the compiled kernel (reference time / kernel time), each round
    timing both back to back for about ``seconds_per_round`` each, alternating which runs first."""
    speedups = {}
    for name, make in CASES.items():
        steps = {impl: make(impl) for impl in IMPLS}
        calls = {}
        for impl, step in steps.items():  # warm up, and size the batch of calls to the time per round
            step()
            calls[impl] = max(1, round(seconds_per_round * 1e3 / _ms_per_call(step, 3)))
        ratios = []
        for r in range(rounds):
            order = list(IMPLS) if r % 2 == 0 else list(reversed(IMPLS))
            ms = {impl: _ms_per_call(steps[impl], calls[impl]) for impl in order}
            ratios.append(ms["reference"] / ms["compiled"])
        speedups[name] = ratios
    return speedups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", action="store_true", help="print interleaved kernel/reference speed-ups")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if not args.ratios:
        parser.error("run the absolute timings with pytest (see the module docstring), or pass --ratios")
    if not extension_ops.available():
        raise SystemExit("ul_fast._C not built")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.rounds} interleaved rounds")
    print("| case | kernel speed-up over the reference: median (min-max) |\n| --- | --- |")
    for name, ratios in interleaved_speedups(args.rounds).items():
        print(f"| {name} | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
