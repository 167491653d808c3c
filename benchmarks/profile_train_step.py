"""Where a UL training step's time goes, per stage and variant: the share of the wall time the GPU is busy, kernels
per step, host time per step, and the kernels (or, on a CPU, the aten ops) that take the most time.

For each stage and each variant of ``benchmarks/gpu_bench_train_step.py`` named in ``--variants`` (default
``reference,ul_fast,ul_fast+graph``), after warm-up steps, ``--steps`` trainer steps run under
``torch.profiler``:

* **host ms/step**: the time the host takes to queue a step (the loop's wall time before the final
  synchronisation, per step); when it is close to the wall ms/step, the step is bound by the host;
* **wall ms/step**: the loop's wall time up to the device's end;
* **GPU busy**: the union of the kernels' intervals over the wall time (1.0: never idle);
* **kernels/step** and the top ``--top`` kernels by total time (CUDA), or aten ops by self CPU time (CPU).

A replayed CUDA graph's kernels appear in the trace as ordinary kernels. The profiler adds host overhead per op,
so the host times here are upper bounds; ``gpu_bench_train_step.py`` has the unprofiled step times.

Usage: python benchmarks/profile_train_step.py [--config fmnist] [--batch 256] [--stages 1,2]
           [--variants reference,ul_fast,ul_fast+graph] [--steps 10] [--out DIR]
       python benchmarks/profile_train_step.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench_train_step import SMOKE_OVERRIDES, Variant, make_trainer, parse_list, release  # noqa: E402

from ul_fast.config import load_config  # noqa: E402

VARIANTS = {v.name: v for v in (Variant("reference", "reference"), Variant("ul_fast"),
                                 Variant("ul_fast+graph", graph=True),
                                 Variant("reference+compile", "reference", compile=True),
                                 Variant("ul_fast+compile", compile=True),
                                 Variant("ul_fast+compile+graph", compile=True, graph=True))}


def busy_fraction(intervals: list[tuple[float, float]], wall_us: float) -> float:
    """The length of the union of ``intervals`` (µs) over ``wall_us``."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy / wall_us if wall_us > 0 else 0.0


def profile_variant(trainer, steps: int, top: int) -> dict:
    device = trainer.device
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        queued = time.perf_counter()
        trainer.step.window.read()  # the log record's one read: waits for the device
        end = time.perf_counter()
    wall_us = (end - start) * 1e6
    events = prof.events()
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        intervals = [(e.time_range.start, e.time_range.end) for e in kernels]
        busy = busy_fraction(intervals, wall_us)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=top)
        totals: dict[str, float] = {}
        for e in kernels:
            totals[e.name] = totals.get(e.name, 0.0) + e.time_range.elapsed_us()
        top_items = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
        count = len(kernels)
    else:
        ops = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
        busy = None
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
        totals = {}
        for e in prof.key_averages():
            if e.key.startswith("aten::"):
                totals[e.key] = e.self_cpu_time_total
        top_items = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
        count = len(ops)
    return {"host_ms_per_step": (queued - start) * 1e3 / steps, "wall_ms_per_step": wall_us / 1e3 / steps,
            "gpu_busy": busy, "kernels_per_step" if cuda else "aten_ops_per_step": count / steps,
            "top": [{"name": name[:120], "total_us": us, "share_of_wall": us / wall_us} for name, us in top_items],
            "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="fmnist")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--stages", type=lambda t: parse_list(t, (1, 2)), default=(1, 2))
    parser.add_argument("--variants", type=lambda t: parse_list(t, tuple(VARIANTS)),
                        default=("reference", "ul_fast", "ul_fast+graph"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true", help="CPU, micro model, a few steps: check the code runs")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.steps, args.warmup, args.top = 4, 2, 1, 5
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    overrides = [f"train.batch_size={args.batch}", "train.progress=false", f"train.device={device.type}",
                 "data.dataset=fmnist-embedded", "train.log_every=1000000", "train.eval_every=1000000",
                 "train.checkpoint_every=1000000", *(SMOKE_OVERRIDES if args.smoke else [])]
    scratch = Path(tempfile.mkdtemp(prefix="ul_fast_profile_"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    lines = ["| stage | variant | wall ms/step | host ms/step | GPU busy | kernels (or aten ops)/step | top item |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for stage in args.stages:
        for name in args.variants:
            variant = Variant(**{k: getattr(VARIANTS[name], k) for k in ("name", "backend", "reference_ops",
                                                                          "compile", "graph")})
            config = load_config(args.config, overrides)
            trainer = make_trainer(config, variant, stage, scratch)
            for _ in range(args.warmup):
                trainer.train_step()
            result = {"stage": stage, "variant": name, **profile_variant(trainer, args.steps, args.top)}
            results.append(result)
            print(f"### stage {stage}, {name}\n{result.pop('table')}", flush=True)
            count = result.get("kernels_per_step", result.get("aten_ops_per_step"))
            busy = "–" if result["gpu_busy"] is None else f"{100 * result['gpu_busy']:.0f} %"
            first = result["top"][0]["name"][:50] if result["top"] else "–"
            lines.append(f"| {stage} | {name} | {result['wall_ms_per_step']:.2f} | {result['host_ms_per_step']:.2f} "
                         f"| {busy} | {count:.0f} | {first} |")
            (out / "profile_train_step.json").write_text(json.dumps(
                {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "config": args.config, "batch": args.batch, "results": results},
                indent=1))
            del trainer
            release([variant])
    print("\n## Where the step's time goes\n" + "\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
