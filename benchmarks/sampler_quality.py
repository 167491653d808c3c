"""Quality against steps, per sampler, for a trained run: reconstruction PSNR and rFD against decoder steps, gFD
against base-model steps. Writes a markdown table and a plot (default docs/sampler_quality.md and .png).

Reconstructions: the first N held-out images, encoded, noised at λ_z(0) and decoded with K steps of each
sampler (K in ``--decoder-steps``); PSNR in dB and FD against those images. Generation: N samples (class-
balanced for class-conditional runs, the run's guidance) with K base-model steps of each sampler (K in
``--latent-steps``) and the decoder at ``--fixed-decoder-steps`` DDIM steps, FD against the training set. FD uses
the run's feature network (``--features``, as ``ul-fast eval``). Every chain is seeded the same way, so rows
differ only by the sampler and its steps. Resumable: finished rows are kept in ``OUT.json`` and skipped.

Usage: python benchmarks/sampler_quality.py --run runs/tiny [--samples 500] [--out docs/sampler_quality]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ul_fast.data import STREAMED_IMAGES_IN_MEMORY, Conditioning, load_images
from ul_fast.eval import feature_statistics, frechet_distance, psnr
from ul_fast.eval.evaluate import check_features, in_batches, load_feature_network
from ul_fast.sampling import EVALUATIONS_PER_STEP, SAMPLERS
from ul_fast.train import load_trained_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--decoder-steps", default="2,4,8,16,32,64")
    parser.add_argument("--latent-steps", default="4,8,16,32,64")
    parser.add_argument("--fixed-decoder-steps", type=int, default=32)
    parser.add_argument("--spacing", default="time")
    parser.add_argument("--features", default="fmnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/sampler_quality")
    args = parser.parse_args()

    config, model = load_trained_model(args.run, "cpu")
    model.eval()
    m, s = config.model, config.sample
    check_features(args.features, m.image_channels)
    features_net = load_feature_network(args.features, torch.device("cpu"))
    test, train = (load_images(config.data.dataset, split, m.image_size, m.image_channels,
                               stream_limit=STREAMED_IMAGES_IN_MEMORY) for split in ("test", "train"))
    originals = test.images[:args.samples]

    def embed(images: torch.Tensor) -> torch.Tensor:
        return in_batches(lambda a, b: features_net.features(images[a:b]).double(), len(images), 250, "features",
                          progress=False)

    original_stats = feature_statistics(embed(originals))
    train_stats = feature_statistics(embed(train.images))
    inputs, _ = Conditioning(m, torch.device("cpu"), train, seed=args.seed).for_grid(args.samples)

    results_path = Path(args.out + ".json")
    rows = json.loads(results_path.read_text())["rows"] if results_path.exists() else []
    done = {(r["kind"], r["sampler"], r["steps"]) for r in rows}

    def record(row: dict) -> None:
        rows.append(row)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps({"run": args.run, "samples": args.samples, "spacing": args.spacing,
                                            "features": args.features, "rows": rows}, indent=1))
        print(json.dumps(row), flush=True)

    @torch.no_grad()
    def reconstruction_row(sampler: str, steps: int) -> dict:
        generator = torch.Generator().manual_seed(args.seed)
        recon = in_batches(lambda a, b: model.reconstruct(originals[a:b], steps, sampler, generator,
                                                           spacing=args.spacing).float(), args.samples, 250,
                           "reconstructing", progress=False)
        return {"kind": "reconstruction", "sampler": sampler, "steps": steps,
                "evaluations": steps * EVALUATIONS_PER_STEP[sampler] + 1,  # + the final denoising step
                "psnr": float(psnr(recon, originals).mean()),
                "fd": frechet_distance(*original_stats, *feature_statistics(embed(recon)))}

    @torch.no_grad()
    def generation_row(sampler: str, steps: int) -> dict:
        generator = torch.Generator().manual_seed(args.seed + 1)

        def generate(a: int, b: int) -> torch.Tensor:
            batch = {k: None if v is None else v[a:b] for k, v in inputs.items()}
            z_0 = model.sample_latents(b - a, steps, sampler, generator=generator, spacing=args.spacing,
                                       guidance=s.guidance, guidance_interval=tuple(s.guidance_interval), **batch)
            return model.decode(z_0, args.fixed_decoder_steps, "ddim", generator).float()

        samples = in_batches(generate, args.samples, 250, "sampling", progress=False)
        return {"kind": "generation", "sampler": sampler, "steps": steps,
                "evaluations": steps * EVALUATIONS_PER_STEP[sampler],
                "fd": frechet_distance(*train_stats, *feature_statistics(embed(samples)))}

    for sampler in args.samplers.split(","):
        plan = [(reconstruction_row, "reconstruction", int(k)) for k in args.decoder_steps.split(",")]
        plan += [(generation_row, "generation", int(k)) for k in args.latent_steps.split(",")]
        for measure, kind, steps in plan:
            if (kind, sampler, steps) not in done:
                start = time.perf_counter()
                record({**measure(sampler, steps), "seconds": time.perf_counter() - start})
    write_report(args, rows)


def write_report(args: argparse.Namespace, rows: list[dict]) -> None:
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))

    def table(kind: str, metric: str, fmt: str) -> list[str]:
        steps = sorted({r["steps"] for r in rows if r["kind"] == kind})
        lines = ["| sampler | " + " | ".join(f"{k} steps" for k in steps) + " |",
                 "| --- |" + " --- |" * len(steps)]
        for sampler in samplers:
            by_steps = {r["steps"]: r for r in rows if r["kind"] == kind and r["sampler"] == sampler}
            lines.append(f"| {sampler} | " + " | ".join(format(by_steps[k][metric], fmt) if k in by_steps else "–"
                                                         for k in steps) + " |")
        return lines

    text = [f"Run `{args.run}`, {args.samples} images, {args.spacing} spacing, {args.features} features, seed "
            f"{args.seed}. Heun makes two network evaluations per step, the others one.", "",
            "Reconstruction PSNR (dB) against decoder steps:", "", *table("reconstruction", "psnr", ".2f"), "",
            "rFD against decoder steps:", "", *table("reconstruction", "fd", ".3f"), "",
            f"gFD against base-model steps (decoder: {args.fixed_decoder_steps} DDIM steps):", "",
            *table("generation", "fd", ".3f"), ""]
    Path(args.out + ".md").write_text("\n".join(text))
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    figure = Figure(figsize=(15, 4))
    FigureCanvasAgg(figure)
    for axis, (kind, metric, label) in zip(figure.subplots(1, 3), [("reconstruction", "psnr", "PSNR (dB)"),
                                                                   ("reconstruction", "fd", "rFD"),
                                                                   ("generation", "fd", "gFD")]):
        for sampler in samplers:
            points = sorted((r["evaluations"], r[metric]) for r in rows
                            if r["kind"] == kind and r["sampler"] == sampler)
            axis.plot(*zip(*points), marker="o", label=sampler)
        axis.set_xscale("log", base=2)
        axis.set_xlabel(f"network evaluations ({'decoder' if kind == 'reconstruction' else 'base model'})")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(args.out + ".png", dpi=90)


if __name__ == "__main__":
    main()
