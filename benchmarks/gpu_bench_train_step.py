"""UL training-step benchmark: the reference ops against ul_fast's kernels, eager and torch.compile, in one run.

For a preset (default ``fmnist``: 32×32, latent 8×8×4, batch 256) it times one optimiser step of stage 1
(encoder + prior + decoder, three noise injections, two diffusion losses) and of stage 2 (base model) under

- ``reference``: ``UL_FAST_BACKEND=reference`` (pure PyTorch ops, SDPA attention), eager;
- ``reference+compile``: the same with the four networks under ``torch.compile`` (inductor);
- ``ul_fast``: the fused kernels (compiled C++/CUDA, Triton attention and adaLN), eager;
- ``ul_fast+compile``: the fused kernels inside compiled networks.

bf16 autocast and fused AdamW on CUDA, as the trainer does. Times are medians (CUDA events on GPU,
``perf_counter`` on CPU) after warm-up steps that include compilation.

Usage: python benchmarks/gpu_bench_train_step.py [--config fmnist] [--batch 256] [--steps 20] [--out DIR]
       python benchmarks/gpu_bench_train_step.py --smoke [--no-compile]   # CPU, micro sizes: code paths only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ul_fast.config import load_config
from ul_fast.model import UnifiedLatents

VARIANTS = (("reference", False), ("reference", True), ("auto", False), ("auto", True))


def variant_name(backend: str, compiled: bool) -> str:
    return ("reference" if backend == "reference" else "ul_fast") + ("+compile" if compiled else "")


def median_step_ms(step, warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            step()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


def time_variant(config, batch: int, stage: int, backend: str, compiled: bool, warmup: int, steps: int,
                 device: torch.device) -> float:
    os.environ["UL_FAST_BACKEND"] = backend
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = UnifiedLatents(config.model).to(device)
    prefixes = tuple(f"{name}." for name in model.trained_networks(stage))
    params = [p for n, p in model.named_parameters() if n.startswith(prefixes)]
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(prefixes))
    if compiled:
        for name in model.NETWORKS:
            if getattr(model, name) is not None:
                getattr(model, name).compile()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    m = config.model
    x = torch.rand(batch, m.image_channels, m.image_size, m.image_size, device=device) * 2 - 1
    labels = torch.randint(0, max(m.num_classes, 1), (batch,), device=device) if m.num_classes else None
    generator = torch.Generator(device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = model.stage1_loss if stage == 1 else model.stage2_loss
            out = loss(x, labels if stage == 2 else None, generator=generator)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_step_ms(step, warmup, steps, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="fmnist")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true", help="CPU, micro model, 2 steps: check the code runs")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = parser.parse_args()
    overrides = []
    if args.smoke:
        overrides = ["model.image_size=16", "model.encoder.channels=[16,16]", "model.encoder.blocks_per_stage=[1,1]",
                     "model.prior.widths=[32]", "model.prior.depths=[1]", "model.prior.head_dim=16",
                     "model.decoder.conv_channels=[16]", "model.decoder.width=32", "model.decoder.depth=1",
                     "model.decoder.head_dim=16", "model.base.widths=[32]", "model.base.depths=[1]",
                     "model.base.head_dim=16"]
        args.batch, args.steps, args.warmup = 4, 2, 1
    config = load_config(args.config, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    rows = []
    for stage in (1, 2):
        for backend, compiled in VARIANTS:
            if compiled and args.no_compile:
                continue
            ms = time_variant(config, args.batch, stage, backend, compiled, args.warmup, args.steps, device)
            rows.append({"stage": stage, "variant": variant_name(backend, compiled), "ms": ms,
                         "images_per_s": args.batch / (ms * 1e-3)})
            print(f"stage {stage} {rows[-1]['variant']:>18}: {ms:9.2f} ms/step", flush=True)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    title = f"## UL training step, preset {args.config}, batch {args.batch} ({device_name}, torch {torch.__version__})"
    lines = [title,
             "", "| stage | variant | ms/step | images/s | vs reference | vs reference+compile |",
             "| --- | --- | --- | --- | --- | --- |"]
    def ratio(row: dict, baseline: str) -> str:
        base = [r["ms"] for r in rows if r["stage"] == row["stage"] and r["variant"] == baseline]
        return f"{base[0] / row['ms']:.2f}x" if base else "–"

    for row in rows:
        lines.append(f"| {row['stage']} | {row['variant']} | {row['ms']:.2f} | {row['images_per_s']:.0f} | "
                     f"{ratio(row, 'reference')} | {ratio(row, 'reference+compile')} |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train_step.json").write_text(json.dumps({"device": device_name, "rows": rows}, indent=1))
    print(table)


if __name__ == "__main__":
    main()
