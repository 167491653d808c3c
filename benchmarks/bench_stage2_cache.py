"""Stage-2 step time from a latent cache against from pixels: the same run, the same preset, a ratio in one process.

Two trainers of stage 2 start from one stage-1 run (``--run``): one reads the run's images (in memory, or decoded
by the streaming loader) and encodes each batch with the frozen encoder, the other reads ``z_clean`` from a latent
cache of the same run (``--cache``, written by ``ul-fast encode``; encoded here first when missing). Their full
``Trainer.train_step()`` calls (data, forward, backward, optimiser, EMA) run interleaved, round by round, so load
from other processes hits both alike; a round's ratio is pixels time / cache time, and the result is the median
over rounds with its quartiles. ``--clock cpu`` times the process's CPU time (on a shared CPU), ``wall`` wall time
(on CUDA the trainers synchronise per step).

The encoder's share of a step is also counted in FLOPs (``torch.utils.flop_counter``) for ``--flops-preset`` at
batch 1: the encoder's forward against the base model's forward and backward, the saving's floor at that scale.

Usage: python benchmarks/bench_stage2_cache.py --run runs/tiny [--cache DIR] [--rounds 7] [--steps 5]
           [--clock cpu|wall] [--flops-preset imagenet512-paper] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ul_fast.config import load_config
from ul_fast.model import UnifiedLatents
from ul_fast.train import Trainer
from ul_fast.train.encode import encode_dataset


def stage2_trainer(run: Path, dataset: str, folder: Path, device: str) -> Trainer:
    """A trainer at the start of stage 2 of ``run``'s config, reading ``dataset``."""
    config = load_config(str(run / "config.yaml"), [
        f"data.dataset={dataset}", f"train.init_from={run}", "train.stage1_steps=0", "train.device=" + device,
        "train.progress=false"])
    trainer = Trainer(config, folder)
    trainer._start_stage(2)  # what fit() does first for a run without stage 1
    return trainer


def timed_steps(trainer: Trainer, steps: int, clock: str) -> float:
    """Seconds per step over ``steps`` optimiser steps."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    start = now()
    for _ in range(steps):
        trainer.train_step()
    sync()
    return (now() - start) / steps


def flop_shares(preset: str) -> dict[str, float]:
    """GFLOPs per example of the encoder forward and of the base model's forward + backward (batch 1, CPU)."""
    config = load_config(preset)
    model = UnifiedLatents(config.model)
    x = torch.randn(1, *model.image_shape)
    labels = torch.zeros(1, dtype=torch.int64) if config.model.num_classes else None
    with FlopCounterMode(display=False) as encoder_flops, torch.no_grad():
        z = model.encode(x)
    with FlopCounterMode(display=False) as base_flops:
        model.stage2_loss(None, labels, z_clean=z)["loss"].backward()
    return {"encoder_forward_gflops": encoder_flops.get_total_flops() / 1e9,
            "base_forward_backward_gflops": base_flops.get_total_flops() / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="a run whose stage 1 is trained")
    parser.add_argument("--cache", type=Path, help="its latent cache (default: encoded into a temporary folder)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--flops-preset", default="imagenet512-paper")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench_stage2_"))
    pixels_spec = load_config(str(args.run / "config.yaml")).data.dataset
    cache = args.cache or scratch / "cache"
    if args.cache is None:
        encode_dataset(args.run, pixels_spec, cache, device=args.device, progress=False)
    trainers = {"pixels": stage2_trainer(args.run, pixels_spec, scratch / "pixels", args.device),
                "cache": stage2_trainer(args.run, f"latents:{cache}", scratch / "cache_run", args.device)}
    for trainer in trainers.values():
        timed_steps(trainer, args.warmup, args.clock)
    rounds = []
    for _ in range(args.rounds):
        rounds.append({name: timed_steps(trainer, args.steps, args.clock) for name, trainer in trainers.items()})
        print({k: f"{v * 1e3:.1f} ms" for k, v in rounds[-1].items()}, flush=True)
    ratios = sorted(r["pixels"] / r["cache"] for r in rounds)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    result = {
        "run": str(args.run), "batch_size": trainers["cache"].config.train.batch_size, "clock": args.clock,
        "device": args.device, "torch": torch.__version__, "rounds": rounds,
        "pixels_ms": 1e3 * statistics.median(r["pixels"] for r in rounds),
        "cache_ms": 1e3 * statistics.median(r["cache"] for r in rounds),
        "speedup_median": statistics.median(ratios), "speedup_quartiles": [quartiles[0], quartiles[2]],
        "flops": {args.flops_preset: flop_shares(args.flops_preset)},
    }
    print(f"stage-2 step: pixels {result['pixels_ms']:.1f} ms, cache {result['cache_ms']:.1f} ms, "
          f"speed-up {result['speedup_median']:.2f}x (quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f})")
    print(f"{args.flops_preset}, per example: {json.dumps(result['flops'][args.flops_preset])}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
