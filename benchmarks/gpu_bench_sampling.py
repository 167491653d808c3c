"""Sampling throughput with and without CUDA-graph replay, in one run on one card (a ratio), per sampler.

Images/s of ``model.sample`` for each batch size in ``--n`` (base model → noisy latent → decoder, ``--steps``
each, class-conditional with
guidance inside the preset's interval, so guided (2n) and unguided (n) calls both occur) for a randomly
initialised model of ``--config`` (speed does not depend on the weights), eager against
``cuda_graph=True``. Each variant runs one chain first (capture, autotuning, cuDNN/cuBLAS warm-up), then the
median wall time of ``--repeats`` chains, each ended by ``torch.cuda.synchronize``. The graphed samples are
checked equal to the eager ones.

Small batches are where graphs should pay: a chain's calls then take less GPU time than their launches.

Usage: python benchmarks/gpu_bench_sampling.py [--config fmnist] [--n 16,256] [--steps 32] [--out DIR]
       python benchmarks/gpu_bench_sampling.py --smoke   (CPU, micro model: code paths only)
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
from ul_fast.sampling import graphed_module

SMOKE_OVERRIDES = ["model.image_size=16", "model.encoder.channels=[16,16]", "model.encoder.blocks_per_stage=[1,1]",
                   "model.prior.widths=[32]", "model.prior.depths=[1]", "model.prior.head_dim=16",
                   "model.decoder.conv_channels=[16]", "model.decoder.width=32", "model.decoder.depth=1",
                   "model.decoder.head_dim=16", "model.base.widths=[32]", "model.base.depths=[1]",
                   "model.base.head_dim=16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="fmnist")
    parser.add_argument("--n", default="16,256", help="images per chain: one or more batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=32, help="steps of each of the two chains")
    parser.add_argument("--samplers", default="ddim,dpmpp_2m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    batch_sizes = [int(n) for n in args.n.split(",")]
    if args.smoke:
        batch_sizes, args.steps, args.repeats = [2, 4], 2, 1
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_bench_sampling.py needs a CUDA device (or --smoke)")
    device = torch.device("cpu" if args.smoke else "cuda")
    config = load_config(args.config, SMOKE_OVERRIDES if args.smoke else [])
    torch.manual_seed(0)
    model = UnifiedLatents(config.model).to(device).eval()
    m, s = config.model, config.sample

    def chain(n: int, sampler: str, cuda_graph: bool) -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(0)
        labels = (torch.arange(n, device=device) % m.num_classes) if m.num_classes else None
        return model.sample(n, args.steps, args.steps, sampler, generator, cuda_graph=cuda_graph, labels=labels,
                            guidance=max(s.guidance, 2.0), guidance_interval=tuple(s.guidance_interval))

    def seconds(n: int, sampler: str, cuda_graph: bool) -> float:
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            chain(n, sampler, cuda_graph)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    rows = []
    for n in batch_sizes:
        for sampler in args.samplers.split(","):
            eager, graphed = chain(n, sampler, False), chain(n, sampler, True)  # warm-up; the second captures
            equal = bool(torch.equal(eager, graphed))
            eager_s, graph_s = seconds(n, sampler, False), seconds(n, sampler, True)
            failure = graphed_module(model.base).failure or graphed_module(model.decoder).failure
            rows.append({"n": n, "sampler": sampler, "eager_images_per_s": n / eager_s,
                         "graph_images_per_s": n / graph_s, "speedup": eager_s / graph_s, "bit_identical": equal,
                         "capture_failure": failure})
            print(f"n={n:<5} {sampler:>9}: eager {n / eager_s:8.1f} img/s, graphs {n / graph_s:8.1f} img/s, "
                  f"x{eager_s / graph_s:.2f}, identical={equal}" + (f", capture failed: {failure}" if failure else ""),
                  flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    lines = [f"## Sampling, preset {args.config}, {args.steps} + {args.steps} steps "
             f"({name}, torch {torch.__version__})", "",
             "| images | sampler | eager img/s | CUDA graphs img/s | speed-up | bit-identical |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['n']} | {r['sampler']} | {r['eager_images_per_s']:.1f} | {r['graph_images_per_s']:.1f} | "
              f"{r['speedup']:.2f}x | {r['bit_identical']} |" for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_sampling.json").write_text(json.dumps({"device": name, "config": args.config, "steps": args.steps,
                                                         "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
