"""UL training-step benchmark: the trainer's real step (data, loss, backward, clipping, AdamW, EMA) under each way
of running it, as step times, ratios and MFU measured in one run.

Phases (``--phases``, in this order by default):

``table``
    Per stage of a preset (default ``fmnist``, batch 256), one :class:`~ul_fast.train.Trainer` per variant, timed
    round by round, interleaved: ``reference`` (``UL_FAST_BACKEND=reference``: pure PyTorch, SDPA attention,
    eager), ``reference+compile`` (``train.compile``: the whole loss under ``torch.compile``), ``ul_fast`` (the
    default dispatch, eager), ``ul_fast+compile``, ``ul_fast+graph`` (``train.cuda_graph``: the whole step
    captured once and replayed) and ``ul_fast+compile+graph``. Each row reports ms/step, images/s, achieved
    TFLOP/s and MFU (FLOPs per example from :mod:`ul_fast.train.flops`), and its speed-up over ``reference`` and
    over ``reference+compile`` in the same rounds. The issue's goals: ≥ 3× the first and ≥ 1.5× the second.
``ablation``
    Per stage, inside the graph-captured step (where launch overhead no longer hides a kernel): ``all kernels``
    (``UL_FAST_BACKEND=fast``) and ``all kernels - OP`` per op with a kernel on this device. A row faster than
    ``all kernels`` names a kernel that slows the captured step (for ``dispatch.REFERENCE_IS_FASTER``).
``paper``
    ``imagenet512-paper`` on this one device, per stage, without and with ``train.activation_checkpointing``
    (``ckpt``): the largest power-of-two batch that trains (random 512×512 images), its peak memory, and the step
    time and MFU of ``ul_fast+graph`` (and ``ul_fast``) there.

Timing: each variant runs ``--steps`` consecutive ``train_step`` calls per round between two device
synchronisations (the host queues steps ahead of the GPU as in training; the metric window is read once per block,
as a log record would), after untimed warm-up steps (compilation, capture). A row's time is the median over rounds;
its speed-up the median over rounds of the baseline's time over its own in the same round. The JSON (every
round's times) is rewritten after every round, so a run cut short keeps what it measured.

Usage: python benchmarks/gpu_bench_train_step.py [--config fmnist] [--batch 256] [--rounds 3] [--steps 20]
           [--phases table,ablation,paper] [--stages 1,2] [--compile-stages 1,2] [--out DIR]
       python benchmarks/gpu_bench_train_step.py --smoke   # CPU, micro sizes, a few steps: code paths only
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ul_fast.config import Config, load_config
from ul_fast.ops import dispatch
from ul_fast.train import Trainer
from ul_fast.train.flops import flops_per_example, peak_tflops

SMOKE_OVERRIDES = ["model.image_size=16", "model.encoder.channels=[16,16]", "model.encoder.blocks_per_stage=[1,1]",
                   "model.prior.widths=[32]", "model.prior.depths=[1]", "model.prior.head_dim=16",
                   "model.decoder.conv_channels=[16]", "model.decoder.width=32", "model.decoder.depth=1",
                   "model.decoder.head_dim=16", "model.base.widths=[32]", "model.base.depths=[1]",
                   "model.base.head_dim=16"]
PHASES = ("table", "ablation", "paper")


@dataclass
class Variant:
    """One way of running the trainer's step: a dispatch of the ops, compiled or not, graph-captured or not."""

    name: str
    backend: str = "auto"  # UL_FAST_BACKEND
    reference_ops: tuple[str, ...] = ()  # UL_FAST_REFERENCE_OPS
    compile: bool = False  # train.compile
    graph: bool = False  # train.cuda_graph
    round_ms: list[float] = field(default_factory=list)  # per round: ms per step
    trainer: Trainer | None = None

    def select(self) -> None:
        os.environ["UL_FAST_BACKEND"] = self.backend
        os.environ["UL_FAST_REFERENCE_OPS"] = ",".join(self.reference_ops)


def table_variants(compiled: bool) -> list[Variant]:
    variants = [Variant("reference", "reference"), Variant("ul_fast"), Variant("ul_fast+graph", graph=True)]
    if compiled:
        variants[1:1] = [Variant("reference+compile", "reference", compile=True)]
        variants += [Variant("ul_fast+compile", compile=True), Variant("ul_fast+compile+graph", compile=True,
                                                                       graph=True)]
    return variants


def ablation_variants(device_type: str) -> list[Variant]:
    ops = [op for op in dispatch.OPS if (op, device_type) in dispatch.KERNELS]
    return [Variant("graph: all kernels", "fast", graph=True),
            *(Variant(f"graph: all kernels - {op}", "fast", (op,), graph=True) for op in ops)]


def make_trainer(config: Config, variant: Variant, stage: int, run_dir: Path) -> Trainer:
    """A trainer of ``config`` at the start of ``stage`` (stage 2: stage 1's fresh weights frozen), for ``variant``."""
    variant.select()
    torch.manual_seed(0)
    config.train.compile, config.train.cuda_graph = variant.compile, variant.graph
    trainer = Trainer(config, run_dir / variant.name.replace(" ", "_").replace(":", ""))
    if stage == 2:  # without the trainer's stage change, which evaluates (minutes at 512 px)
        trainer.stage, trainer.stage_step = 2, 0
        trainer._new_optimizer()
    return trainer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_block(trainer: Trainer, steps: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """ms per step of ``steps`` consecutive steps, the metric window read once at the end (as a log record)."""
    synchronize(trainer.device)
    start = clock()
    for _ in range(steps):
        trainer.train_step()
    trainer.step.window.read()
    synchronize(trainer.device)
    trainer.step.window.reset()
    return (clock() - start) * 1e3 / steps


def run_rounds(variants: list[Variant], make: Callable[[Variant], Trainer], warmup: int, rounds: int, steps: int,
               after_round: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> None:
    """Build and warm every variant up, then time them round by round, rotating which goes first."""
    for variant in variants:
        variant.trainer = make(variant)
        for _ in range(warmup):
            variant.trainer.train_step()
        variant.trainer.step.window.reset()
    for r in range(rounds):
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            variant.select()
            variant.round_ms.append(time_block(variant.trainer, steps, clock))
        after_round()


def ratios(variant: Variant, baseline: Variant) -> list[float]:
    return [b / v for b, v in zip(baseline.round_ms, variant.round_ms)]


class Report:
    """The tables on stdout as rows finish, and the JSON, rewritten whenever it changes."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header
        self.rows: list[dict] = []
        self.phases: list[dict] = []

    def save(self) -> None:
        phases = [{**p, "variants": [{"name": v.name, "round_ms": v.round_ms} for v in p["variants"]]}
                  for p in self.phases]
        self.path.write_text(json.dumps({**self.header, "rows": self.rows, "phases": phases}, indent=1))

    def add_rows(self, phase: str, stage: int, variants: list[Variant], baselines: list[Variant], batch: int,
                 flops: float, peak: float | None, extra: dict | None = None) -> None:
        for variant in variants:
            ms = statistics.median(variant.round_ms)
            tflops = flops * batch / (ms * 1e-3) / 1e12
            row = {"phase": phase, "stage": stage, "variant": variant.name, "batch": batch, "ms": ms,
                   "ms_min": min(variant.round_ms), "ms_max": max(variant.round_ms),
                   "images_per_s": batch / (ms * 1e-3), "tflops": tflops,
                   "mfu": None if peak is None else tflops / peak, "rounds": len(variant.round_ms),
                   "UL_FAST_BACKEND": variant.backend, "UL_FAST_REFERENCE_OPS": ",".join(variant.reference_ops),
                   "compile": variant.compile, "cuda_graph": variant.graph, **(extra or {})}
            if variant.trainer is not None and variant.trainer.step.graph_failure:
                row["graph_failure"] = variant.trainer.step.graph_failure
            cells = []
            for baseline in baselines:
                speedup = statistics.median(ratios(variant, baseline))
                row[f"speedup_vs_{baseline.name}"] = speedup
                cells.append(f"{speedup:.2f}x")
            self.rows.append(row)
            mfu = "–" if row["mfu"] is None else f"{100 * row['mfu']:.1f} %"
            print(f"| {phase} | {stage} | {variant.name} | {batch} | {ms:.2f} ({row['ms_min']:.2f}-{row['ms_max']:.2f})"
                  f" | {row['images_per_s']:.0f} | {tflops:.1f} | {mfu} | {' | '.join(cells)} |", flush=True)
        self.save()


def release(variants: list[Variant]) -> None:
    """Free the variants' trainers (and their graphs and compiled code) before the next phase (a trainer is part of
    reference cycles: its step's loss calls back into it, so only the cycle collector frees it)."""
    for variant in variants:
        variant.trainer = None
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_image_file(folder: Path, size: int, channels: int, classes: int, count: int) -> str:
    """An ``array:`` spec of ``count`` random uint8 images per split (train and test), random labels (a batch
    larger than ``count`` spans several epochs)."""
    rng = np.random.default_rng(0)
    path = folder / f"random-{size}.npz"
    arrays = {}
    for split in ("train", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, size, size, channels), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, max(classes, 1), count)
    np.savez(path, **arrays)
    return f"array:{path}"


def largest_batch(make: Callable[[int], Trainer], start: int, limit: int) -> tuple[int, float]:
    """The largest power-of-two batch (from ``start``, at most ``limit``) whose step runs; its peak GiB."""
    best, best_gib, batch = 0, 0.0, start
    while batch <= limit:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            trainer = make(batch)
            for _ in range(2):
                trainer.train_step()
            synchronize(trainer.device)
        except torch.OutOfMemoryError:
            break
        finally:
            trainer = None
        best, best_gib = batch, torch.cuda.max_memory_allocated() / 2**30
        batch *= 2
    gc.collect()
    torch.cuda.empty_cache()
    return best, best_gib


def parse_list(text: str, allowed: tuple) -> tuple:
    items = tuple(t.strip() for t in text.split(",") if t.strip() and t.strip() != "none")
    items = tuple(int(t) if t.isdigit() else t for t in items)
    if not set(items) <= set(allowed):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {allowed}, got {text!r}")
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="fmnist")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per phase")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=6, help="untimed steps per variant (compile, capture)")
    parser.add_argument("--phases", type=lambda t: parse_list(t, PHASES), default=PHASES)
    parser.add_argument("--stages", type=lambda t: parse_list(t, (1, 2)), default=(1, 2))
    parser.add_argument("--compile-stages", type=lambda t: parse_list(t, (1, 2)), default=(1, 2),
                        help="the stages whose table has the compiled variants (compiling costs ~1 min each)")
    parser.add_argument("--paper-limit", type=int, default=256, help="the largest paper-config batch tried")
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="wall time, or (CPU runs) this process's CPU time: steadier where other processes share "
                             "the cores; with one thread it is the step's compute")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true", help="CPU, micro model, a few steps: check the code runs")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.rounds, args.steps, args.warmup = 4, 2, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_tflops(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="ul_fast_bench_"))
    overrides = [f"train.batch_size={args.batch}", "train.progress=false", f"train.device={device.type}",
                 "data.dataset=fmnist-embedded", "train.grad_accumulation=1", "train.log_every=1000000",
                 "train.eval_every=1000000", "train.checkpoint_every=1000000"]
    config_text = args.config
    report = Report(out / "bench_train_step.json", {
        "device": device_name, "torch": torch.__version__, "config": args.config, "batch": args.batch,
        "peak_tflops": peak, "rounds": args.rounds, "steps": args.steps, "threads": torch.get_num_threads(),
        "clock": "wall" if device.type == "cuda" else args.clock,
        "reference_is_faster": {f"{op}[{d}]": why for (op, d), why in dispatch.REFERENCE_IS_FASTER.items()}})
    print(f"## UL training step ({device_name}, torch {torch.__version__}, peak {peak} TFLOP/s; {args.rounds} "
          f"interleaved rounds x {args.steps} steps)")
    print("| phase | stage | variant | batch | ms/step (min-max) | images/s | TFLOP/s | MFU | speed-ups |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)

    def phase(name: str, stage: int, variants: list[Variant], config: Config, baselines: int,
              extra: dict | None = None) -> None:
        torch._dynamo.reset()
        report.phases.append({"phase": name, "stage": stage, "variants": variants})
        batch = config.train.batch_size
        run_rounds(variants, lambda v: make_trainer(config, v, stage, scratch), args.warmup, args.rounds, args.steps,
                   report.save, CLOCKS[args.clock])
        report.add_rows(name, stage, variants, variants[:baselines], batch, flops_per_example(config.model, stage),
                        peak, extra)
        release(variants)

    smoke = SMOKE_OVERRIDES if args.smoke else []
    if "table" in args.phases:
        for stage in args.stages:
            config = load_config(config_text, overrides + smoke)
            compiled = stage in args.compile_stages
            phase("table", stage, table_variants(compiled), config, baselines=2 if compiled else 1)
    if "ablation" in args.phases and device.type == "cuda":
        for stage in args.stages:
            config = load_config(config_text, overrides + smoke)
            phase("ablation", stage, ablation_variants(device.type), config, baselines=1)
    if "paper" in args.phases:
        paper = "tiny" if args.smoke else "imagenet512-paper"
        base = load_config(paper, smoke)
        m = base.model
        spec = random_image_file(scratch, m.image_size, m.image_channels, m.num_classes, 8 if args.smoke else 64)
        for stage in args.stages:
            for checkpointed in (False, True):  # train.activation_checkpointing: a larger batch for more compute
                def with_batch(batch: int, _checkpointed: bool = checkpointed) -> Config:
                    return load_config(paper, [*overrides, *smoke, f"train.batch_size={batch}",
                                               f"data.dataset={spec}",
                                               f"train.activation_checkpointing={str(_checkpointed).lower()}"])

                suffix = " ckpt" if checkpointed else ""
                if device.type == "cuda":
                    batch, gib = largest_batch(lambda b, s=stage: make_trainer(with_batch(b), Variant("ul_fast"), s,
                                                                               scratch), 1, args.paper_limit)
                    total = torch.cuda.get_device_properties(device).total_memory / 2**30
                    print(f"paper config, stage {stage}{', activation checkpointing' if checkpointed else ''}: "
                          f"largest power-of-two batch {batch} (peak {gib:.1f} GiB of {total:.0f})", flush=True)
                else:
                    batch, gib = 2, 0.0
                variants = (Variant("ul_fast" + suffix), Variant("ul_fast+graph" + suffix, graph=True))
                for variant in variants if batch else ():
                    # one variant at a time: two trainers of 720 M parameters (with EMA and AdamW state) and the
                    # activations of the largest batch do not fit together
                    with contextlib.suppress(torch.OutOfMemoryError):
                        phase("paper", stage, [variant], with_batch(batch), baselines=0,
                              extra={"peak_gib_eager": gib, "activation_checkpointing": checkpointed})


if __name__ == "__main__":
    main()
