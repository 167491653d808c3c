"""UL training-step benchmark: which dispatch of the ops makes a whole optimiser step fastest, measured as
ratios in one run.

For a preset (default ``fmnist``: 32×32, latent 8×8×4, batch 256) it times one optimiser step of stage 1
(encoder + prior + decoder, three noise injections, two diffusion losses) and of stage 2 (base model) under
these dispatches (``ul_fast.ops.dispatch``), in phases:

1. eager, per stage: ``reference`` (``UL_FAST_BACKEND=reference``: pure PyTorch, SDPA attention); ``ul_fast``
   (the default, ``auto``: every kernel but those ``dispatch.REFERENCE_IS_FASTER`` lists); ``all kernels``
   (``fast``; only where it differs from ``ul_fast``); and the per-op ablation ``all kernels - OP``
   (``UL_FAST_REFERENCE_OPS=OP``) for each op with a kernel on this device type. An ablation row faster than
   ``all kernels`` names a kernel that slows the step.
2. eager, per stage: ``best`` = all kernels minus every op whose ablation row was faster (the measured-best
   dispatch), interleaved with ``reference`` again, so that its speed-up is a ratio within one run too.
3. compiled, for the stages in ``--compile-stages`` (default 1; compiling the four networks took over 60 s
   per variant on an H200): ``reference+compile`` and ``ul_fast+compile``, networks under ``torch.compile``.

The variants of a phase share one model and run interleaved, round by round (``--rounds``, each variant
``--steps`` timed steps per round), so drift and other processes' load hit them alike; the dispatch is
chosen by setting both environment variables before each variant's steps (dynamo guards on the values of
variables set while it traced, so a compiled network keeps one graph per dispatch). A row's time is the
median over rounds of the round's median step; its speed-up is the median over rounds of (baseline's time /
its time) in the same round; the table shows the quartiles over rounds of both as their spread (the JSON also
has min and max). bf16 autocast and fused AdamW on CUDA, as the trainer does; CUDA events on GPU,
``perf_counter`` (or with ``--clock cpu`` the process's CPU time) on CPU; warm-up steps (which include
autotuning and compilation) are not timed.

Each phase prints its rows as soon as it ends, and the JSON (with every round's times) is rewritten after
every round, so a run cut short keeps what it measured.

Usage: python benchmarks/gpu_bench_train_step.py [--config fmnist] [--batch 256] [--rounds 3] [--steps 10]
           [--no-ablation] [--compile-stages 1|1,2|none] [--clock wall|cpu] [--out DIR]
       python benchmarks/gpu_bench_train_step.py --smoke   # CPU, micro sizes, a few steps: code paths only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ul_fast.config import load_config
from ul_fast.model import UnifiedLatents
from ul_fast.ops import dispatch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
SMOKE_OVERRIDES = ["model.image_size=16", "model.encoder.channels=[16,16]", "model.encoder.blocks_per_stage=[1,1]",
                   "model.prior.widths=[32]", "model.prior.depths=[1]", "model.prior.head_dim=16",
                   "model.decoder.conv_channels=[16]", "model.decoder.width=32", "model.decoder.depth=1",
                   "model.decoder.head_dim=16", "model.base.widths=[32]", "model.base.depths=[1]",
                   "model.base.head_dim=16"]


@dataclass
class Variant:
    """One dispatch of the ops, timed as one table row."""

    name: str
    backend: str  # UL_FAST_BACKEND
    reference_ops: tuple[str, ...] = ()  # UL_FAST_REFERENCE_OPS
    round_ms: list[float] = field(default_factory=list)  # per round: the median step, ms

    def select(self) -> None:
        os.environ["UL_FAST_BACKEND"] = self.backend
        os.environ["UL_FAST_REFERENCE_OPS"] = ",".join(self.reference_ops)


def make_step(config, batch: int, stage: int, compiled: bool, compile_backend: str,
              device: torch.device) -> Callable[[], None]:
    """One optimiser step of ``stage`` on a fixed random batch, for a fresh model (seed 0)."""
    torch.manual_seed(0)
    model = UnifiedLatents(config.model).to(device)
    prefixes = tuple(f"{name}." for name in model.trained_networks(stage))
    params = [p for n, p in model.named_parameters() if n.startswith(prefixes)]
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(prefixes))
    if compiled:
        for name in model.NETWORKS:
            if getattr(model, name) is not None:
                getattr(model, name).compile(backend=compile_backend)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    m = config.model
    x = torch.rand(batch, m.image_channels, m.image_size, m.image_size, device=device) * 2 - 1
    labels = torch.randint(0, max(m.num_classes, 1), (batch,), device=device) if m.num_classes else None
    generator = torch.Generator(device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss = model.stage1_loss if stage == 1 else model.stage2_loss

    def step() -> None:
        with autocast:
            out = loss(x, labels if stage == 2 else None, generator=generator)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def median_step_ms(step: Callable[[], None], steps: int, device: torch.device, clock: Callable[[], float]) -> float:
    """The median of ``steps`` steps in ms: CUDA events on GPU, else ``clock`` (seconds)."""
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
            start_s = clock()
            step()
            times.append((clock() - start_s) * 1e3)
    return statistics.median(times)


def run_interleaved(variants: list[Variant], step: Callable[[], None], warmup: int, rounds: int, steps: int,
                    device: torch.device, clock: Callable[[], float], after_round: Callable[[], None]) -> None:
    """Warm every variant up, then time them round by round, rotating which goes first."""
    for variant in variants:
        variant.select()
        for _ in range(warmup):
            step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    for r in range(rounds):
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            variant.select()
            variant.round_ms.append(median_step_ms(step, steps, device, clock))
        after_round()


def quartiles(values: list[float]) -> tuple[float, float]:
    """The first and third quartiles (the spread the table shows; the JSON also has min and max)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def speedups(variant: Variant, baseline: Variant) -> list[float]:
    """Per round, baseline's time over the variant's (the variants of a phase run the same rounds)."""
    return [b / v for b, v in zip(baseline.round_ms, variant.round_ms)]


def ablation_variants(device_type: str) -> list[Variant]:
    """Phase 1: reference, the default dispatch, all kernels (where different), all kernels minus each op."""
    with_kernel = [op for op in dispatch.OPS if (op, device_type) in dispatch.KERNELS]
    variants = [Variant("reference", "reference"), Variant("ul_fast", "auto")]
    if any((op, device_type) in dispatch.REFERENCE_IS_FASTER for op in with_kernel):
        variants.append(Variant("all kernels", "fast"))
    variants += [Variant(f"all kernels - {op}", "fast", (op,)) for op in with_kernel]
    return variants


def best_variant(ablation: list[Variant]) -> Variant:
    """All kernels minus every op whose ablation row (median over rounds) beat the all-kernels row."""
    rows = {v.name: statistics.median(v.round_ms) for v in ablation}
    all_kernels = rows.get("all kernels", rows["ul_fast"])  # ul_fast *is* all kernels when that row is absent
    slower = tuple(v.reference_ops[0] for v in ablation if v.reference_ops and rows[v.name] < all_kernels)
    return Variant("best: all kernels" + "".join(f" - {op}" for op in slower), "fast", slower)


class Report:
    """The table on stdout, row by row, and the JSON file, rewritten whenever it changes."""

    def __init__(self, path: Path, header: dict, batch: int):
        self.path, self.header, self.batch = path, header, batch
        self.rows: list[dict] = []
        self.phases: list[dict] = []  # the phase running and those done, with their variants' round times

    def start_phase(self, stage: int, mode: str, variants: list[Variant]) -> None:
        self.phases.append({"stage": stage, "mode": mode, "variants": variants})

    def save(self) -> None:
        phases = [{"stage": p["stage"], "mode": p["mode"],
                   "variants": [{"name": v.name, "UL_FAST_BACKEND": v.backend,
                                 "UL_FAST_REFERENCE_OPS": ",".join(v.reference_ops), "round_ms": v.round_ms}
                                for v in p["variants"]]} for p in self.phases]
        self.path.write_text(json.dumps({**self.header, "rows": self.rows, "phases": phases}, indent=1))

    def add_rows(self, stage: int, variants: list[Variant], baseline: Variant) -> None:
        for variant in variants:
            times, ratios = variant.round_ms, speedups(variant, baseline)
            ms, speedup = statistics.median(times), statistics.median(ratios)
            (ms_q1, ms_q3), (speedup_q1, speedup_q3) = quartiles(times), quartiles(ratios)
            row = {"stage": stage, "variant": variant.name, "ms": ms, "ms_q1": ms_q1, "ms_q3": ms_q3,
                   "ms_min": min(times), "ms_max": max(times), "images_per_s": self.batch / (ms * 1e-3),
                   "speedup": speedup, "speedup_q1": speedup_q1, "speedup_q3": speedup_q3,
                   "speedup_min": min(ratios), "speedup_max": max(ratios), "baseline": baseline.name,
                   "rounds": len(ratios), "UL_FAST_BACKEND": variant.backend,
                   "UL_FAST_REFERENCE_OPS": ",".join(variant.reference_ops)}
            self.rows.append(row)
            print(f"| {stage} | {variant.name} | {ms:.2f} ({ms_q1:.2f}-{ms_q3:.2f}) | {row['images_per_s']:.0f} | "
                  f"{speedup:.3f}x ({speedup_q1:.3f}-{speedup_q3:.3f}) | {baseline.name} |", flush=True)
        self.save()


def parse_stages(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    stages = tuple(int(s) for s in text.split(","))
    if not set(stages) <= {1, 2}:
        raise argparse.ArgumentTypeError(f"stages are 1 and 2, got {text!r}")
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="fmnist")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per phase")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the rounds")
    parser.add_argument("--no-ablation", action="store_true",
                        help="eager phases: reference and ul_fast only (no per-op rows, no best dispatch)")
    parser.add_argument("--compile-stages", type=parse_stages, default=(1,), metavar="1|1,2|none",
                        help="the stages whose compiled variants run (default 1)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (smoke: aot_eager)")
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="CPU only: wall time, or this process's CPU time (steadier where other processes "
                             "share the cores; with one thread it is the step's compute)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true", help="CPU, micro model, a few steps: check the code runs")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.rounds, args.steps, args.warmup = 4, 2, 1, 1
    config = load_config(args.config, SMOKE_OVERRIDES if args.smoke else [])
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out / "bench_train_step.json", {
        "device": device_name, "torch": torch.__version__, "config": args.config, "batch": args.batch,
        "threads": torch.get_num_threads(), "rounds": args.rounds, "steps": args.steps,
        "clock": "cuda events" if device.type == "cuda" else args.clock,
        "reference_is_faster": {f"{op}[{d}]": why for (op, d), why in dispatch.REFERENCE_IS_FASTER.items()}},
        args.batch)
    print(f"## UL training step, preset {args.config}, batch {args.batch} ({device_name}, torch {torch.__version__}, "
          f"{args.rounds} interleaved rounds x {args.steps} steps, {report.header['clock']} time)")
    print("| stage | variant | ms/step (quartiles over rounds) | images/s | speed-up over baseline (quartiles) | "
          "baseline |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)

    def run_phase(stage: int, mode: str, variants: list[Variant], compiled: bool, warmup: int) -> None:
        torch._dynamo.reset()
        step = make_step(config, args.batch, stage, compiled, args.compile_backend, device)
        report.start_phase(stage, mode, variants)
        run_interleaved(variants, step, warmup, args.rounds, args.steps, device, CLOCKS[args.clock], report.save)
        report.add_rows(stage, variants, variants[0])

    best = {}
    for stage in (1, 2):
        if args.no_ablation:
            run_phase(stage, "eager", [Variant("reference", "reference"), Variant("ul_fast", "auto")], False,
                      args.warmup)
            continue
        ablation = ablation_variants(device.type)
        run_phase(stage, "eager", ablation, compiled=False, warmup=args.warmup)
        best[stage] = best_variant(ablation)
        run_phase(stage, "eager best", [Variant("reference", "reference"), best[stage]], False, args.warmup)
    for stage in args.compile_stages:
        # the first step compiles; the second lets any recompilation (e.g. for grad mode) happen untimed
        run_phase(stage, "compile", [Variant("reference+compile", "reference"),
                                     Variant("ul_fast+compile", "auto")], compiled=True, warmup=2)
    print()
    for stage, variant in best.items():
        print(f"stage {stage} measured-best dispatch: UL_FAST_BACKEND=fast "
              f"UL_FAST_REFERENCE_OPS={','.join(variant.reference_ops)}")


if __name__ == "__main__":
    main()
