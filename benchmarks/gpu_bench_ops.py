"""GPU benchmark of the compiled ops against eager PyTorch and torch.compile, in one run on one card.

Shapes are the issue's training shapes: noise and loss on 256x16x64x64 and 256x3x128x128 (fp32, bf16);
log-SNR embedding (256 Fourier features -> 768, SiLU) at batch 256 and 1024. Times are CUDA-event
medians; "TB/s" is the op's minimal traffic (benchmarks/FLOORS.md) divided by the time, and "x floor"
the time over that traffic at the copy bandwidth measured in the same run.

Baselines (what the fused ops replace):
- noise: ``ε = randn_like(x); z = (α·x + σ·ε)`` in fp32 then cast, returning z and ε;
- loss: forward + backward of the v-loss from a *stored* ε (as eager training does), grads for pred, x;
- embedding: ``ul_fast.ops.reference.logsnr_embed`` forward + backward (weight, bias grads).
Each baseline is also run under ``torch.compile`` (inductor). The fused op runs eagerly (it is one kernel).

Usage: python benchmarks/gpu_bench_ops.py [--out results.json] [--md table.md] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

import ul_fast
from ul_fast.kernels import extension_ops as fused
from ul_fast.ops import reference


def cuda_time_ms(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


def copy_bandwidth(warmup: int, iters: int) -> float:
    """Device copy bandwidth in bytes/s (read + write of a 1 GiB buffer)."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup, iters)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def _view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def noise_eager(x: torch.Tensor, logsnr: torch.Tensor):
    eps = torch.randn_like(x)
    alpha, sigma = reference.alpha_sigma(logsnr)
    z = _view(alpha, x) * x.float() + _view(sigma, x) * eps.float()
    return z.to(x.dtype), eps


def loss_eager(pred, x, eps, logsnr, neg_dlogsnr_dt):
    alpha, sigma = (_view(t, x) for t in reference.alpha_sigma(logsnr))
    x_t = alpha * x.float() + sigma * eps.float()
    eps_hat = sigma * x_t + alpha * pred.float()
    squared = (eps.float() - eps_hat).square().flatten(1).sum(1)
    return 0.5 * neg_dlogsnr_dt * squared


class Recorder:
    """Collects rows; each row's traffic is compared with the fused op's byte floor at copy bandwidth."""

    def __init__(self, bandwidth: float, warmup: int, iters: int, use_compile: bool):
        self.bandwidth, self.warmup, self.iters, self.use_compile = bandwidth, warmup, iters, use_compile
        self.rows: list[dict] = []

    def time(self, op: str, shape: tuple, dtype: torch.dtype, impl: str, fn, floor_bytes: int) -> None:
        ms = cuda_time_ms(fn, self.warmup, self.iters)
        row = dict(op=op, shape=shape, dtype=str(dtype).replace("torch.", ""), impl=impl, ms=ms,
                   floor_bytes=floor_bytes, tb_per_s=floor_bytes / (ms * 1e-3) / 1e12,
                   x_floor=ms / (floor_bytes / self.bandwidth * 1e3))
        self.rows.append(row)
        print(f"{op:14s} {str(shape):22s} {row['dtype']:9s} {impl:26s} {ms:8.4f} ms "
              f"{row['tb_per_s']:6.2f} TB/s  x{row['x_floor']:.2f} floor", flush=True)

    def compile(self, fn):
        return torch.compile(fn, fullgraph=True, dynamic=False) if self.use_compile else None


def bench_noise(rec: Recorder, shape: tuple, dtype: torch.dtype) -> None:
    x = torch.randn(shape, device="cuda").to(dtype)
    logsnr = torch.randn(shape[0], device="cuda") * 4
    seed = ul_fast.ops.draw_seed("cuda")
    floor = 3 * x.numel() * x.element_size()  # read x, write z and ε
    rec.time("noise_inject", shape, dtype, "ul_fast", lambda: fused.noise_inject(x, logsnr, seed, True), floor)
    rec.time("noise_inject", shape, dtype, "eager", lambda: noise_eager(x, logsnr), floor)
    compiled_noise = rec.compile(noise_eager)
    if compiled_noise is not None:
        rec.time("noise_inject", shape, dtype, "torch.compile", lambda: compiled_noise(x, logsnr), floor)


def bench_loss(rec: Recorder, shape: tuple, dtype: torch.dtype) -> None:
    pred = torch.randn(shape, device="cuda").to(dtype).requires_grad_(True)
    x = torch.randn(shape, device="cuda").to(dtype).requires_grad_(True)
    eps = torch.randn(shape, device="cuda").to(dtype)
    logsnr = torch.randn(shape[0], device="cuda") * 4
    ndl = torch.rand(shape[0], device="cuda") + 0.5
    seed = ul_fast.ops.draw_seed("cuda")
    floor = 6 * x.numel() * x.element_size()  # forward reads pred, x; backward reads both, writes dpred, dx

    def fused_step():
        loss = fused.diffusion_loss(pred, x, logsnr, ndl, seed, "v")
        return torch.autograd.grad(loss.sum(), [pred, x])

    def stored_eps_step(fn=loss_eager):
        loss = fn(pred, x, eps, logsnr, ndl)
        return torch.autograd.grad(loss.sum(), [pred, x])

    rec.time("loss fwd+bwd", shape, dtype, "ul_fast", fused_step, floor)
    rec.time("loss fwd+bwd", shape, dtype, "eager (stored eps)", stored_eps_step, floor)
    compiled_loss = rec.compile(loss_eager)
    if compiled_loss is not None:
        rec.time("loss fwd+bwd", shape, dtype, "torch.compile (stored eps)",
                 lambda: stored_eps_step(compiled_loss), floor)


def bench_embed(rec: Recorder, batch: int, n_freq: int = 128, n_out: int = 768,
                dtype: torch.dtype = torch.bfloat16) -> None:
    logsnr = torch.randn(batch, device="cuda") * 5
    frequencies = torch.exp(torch.linspace(0, 5, n_freq, device="cuda"))
    weight = (torch.randn(n_out, 2 * n_freq, device="cuda") * 0.05).to(dtype).requires_grad_(True)
    bias = torch.zeros(n_out, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(batch, n_out, device="cuda").to(dtype)
    size = torch.finfo(dtype).bits // 8
    # forward reads W, b and writes out; backward reads grad and writes dW, db (fp32 saved tensors excluded)
    floor = size * (2 * weight.numel() + 2 * batch * n_out + 2 * n_out)
    shape = (batch, 2 * n_freq, n_out)

    def step(fn):
        out = fn(logsnr, frequencies, weight, bias)
        return torch.autograd.grad(out, [weight, bias], grad)

    rec.time("embed fwd+bwd", shape, dtype, "ul_fast", lambda: step(fused.logsnr_embed), floor)
    rec.time("embed fwd+bwd", shape, dtype, "eager", lambda: step(reference.logsnr_embed), floor)
    compiled_embed = rec.compile(reference.logsnr_embed)
    if compiled_embed is not None:
        rec.time("embed fwd+bwd", shape, dtype, "torch.compile", lambda: step(compiled_embed), floor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--md", default=None, help="write the markdown table here")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_bench_ops.py needs a CUDA device")
    if not fused.cuda_compiled():
        sys.exit("ul_fast._C has no CUDA kernels: build with nvcc available (see README)")
    warmup, iters = (3, 10) if args.quick else (10, 50)
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    bandwidth = copy_bandwidth(warmup, iters)
    rec = Recorder(bandwidth, warmup, iters, not args.no_compile)
    for shape in [(256, 16, 64, 64), (256, 3, 128, 128)]:
        for dtype in (torch.float32, torch.bfloat16):
            bench_noise(rec, shape, dtype)
            bench_loss(rec, shape, dtype)
            torch.cuda.empty_cache()
    for batch in (256, 1024):
        bench_embed(rec, batch)

    rows = rec.rows
    for row in rows:  # speed-up of the fused op over each row of its (op, shape, dtype) group
        fused_row = next(r for r in rows if r["impl"] == "ul_fast" and
                         (r["op"], r["shape"], r["dtype"]) == (row["op"], row["shape"], row["dtype"]))
        row["fused_speedup"] = row["ms"] / fused_row["ms"]
    meta = dict(card=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                python=platform.python_version(), copy_tb_per_s=bandwidth / 1e12, build=ul_fast.build_info(),
                iters=iters)
    lines = [f"{meta['card']}, {meta['date']}, torch {meta['torch']}, copy {meta['copy_tb_per_s']:.2f} TB/s, "
             f"CUDA-event median of {iters}; TB/s = fused byte floor / time", "",
             "| op | shape | dtype | impl | ms | TB/s | x floor | ul_fast speed-up |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['impl']} | "
                     f"{r['ms']:.4f} | {r['tb_per_s']:.2f} | {r['x_floor']:.2f} | {r['fused_speedup']:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
