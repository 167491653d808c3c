"""Distilled decoders against their teacher and against plain few-step DDIM: rFD, PSNR, fidelity to the
teacher's chain and gFD, per decoder and step count. Writes a markdown table (default docs/distill_quality.md).

``--teacher RUN``: the trained run (its EMA decoder is the teacher). ``--students RUN,RUN,…``: run folders made
from it by ``ul-fast distill`` (each row uses the student's ``sample.decoder_steps``). Every decoder samples with
DDIM on the teacher's step grid (``sample.spacing``), as ``decode`` does.

Rows: the teacher at ``--teacher-steps`` (the reference, default 32), the teacher undistilled at each ``--steps``,
each student at its own steps. Per row, over the first N held-out images (``--samples``):

* **rFD / PSNR**: as ``ul-fast eval`` computes them (same seeds and batches: the teacher row's rFD and PSNR equal
  ``ul-fast eval``'s at the same steps);
* **fidelity**: PSNR (dB) between the row's reconstructions and the teacher's reference reconstructions from the
  same noisy latents ``z_0`` and the same starting noise — how exactly the few-step decoder reproduces the
  teacher's chain;
* **gFD**: N latents sampled once from the base model (``--latent-sampler``, ``--latent-steps``, the run's guidance,
  class-balanced), decoded by the row's decoder from the same starting noise, against the training set. The base
  model's chain is shared by every row, so gFD rows differ by the decoder alone.

FD uses the run's feature network (``--features``, as ``ul-fast eval``). Resumable: finished rows are kept in
``OUT.json`` and skipped.

Usage: python benchmarks/distill_quality.py --teacher runs/tiny --students runs/tiny-8,runs/tiny-4 --steps 8,4,2
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
from ul_fast.files import write_json_atomically
from ul_fast.train import load_trained_model
from ul_fast.train.checkpoint import CheckpointError

BATCH = 250  # ul-fast eval's batch: the same batches draw the same noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the trained run whose EMA decoder was distilled")
    parser.add_argument("--students", default="", help="comma-separated run folders made by ul-fast distill")
    parser.add_argument("--steps", default="8,4,2,1", help="decoder steps of the undistilled teacher rows")
    parser.add_argument("--teacher-steps", type=int, default=32, help="the reference chain's decoder steps")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--latent-sampler", default="ddim")
    parser.add_argument("--latent-steps", type=int, default=32)
    parser.add_argument("--features", default="fmnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/distill_quality")
    args = parser.parse_args()

    config, teacher = load_trained_model(args.teacher, "cpu")
    m, s = config.model, config.sample
    check_features(args.features, m.image_channels)
    decoders = {("teacher", steps): teacher for steps in
                [args.teacher_steps, *(int(k) for k in args.steps.split(",") if k)]}
    for run in filter(None, args.students.split(",")):
        student_config, student = load_trained_model(run, "cpu")
        if student_config.sample.spacing != s.spacing:
            raise ValueError(f"--students {run} was distilled on the {student_config.sample.spacing!r} grid, the "
                             f"teacher samples on {s.spacing!r}")
        decoders[("distilled", student_config.sample.decoder_steps)] = student

    features_net = load_feature_network(args.features, torch.device("cpu"))
    test, train = (load_images(config.data.dataset, split, m.image_size, m.image_channels,
                               stream_limit=STREAMED_IMAGES_IN_MEMORY) for split in ("test", "train"))
    originals = test.images[:args.samples]

    def embed(images: torch.Tensor) -> torch.Tensor:
        return in_batches(lambda a, b: features_net.features(images[a:b]).double(), len(images), BATCH, "features",
                          progress=False)

    @torch.no_grad()
    def reconstruct(model: torch.nn.Module, steps: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(args.seed)  # ul-fast eval's reconstruction generator
        return in_batches(lambda a, b: model.reconstruct(originals[a:b], steps, "ddim", generator,
                                                         spacing=s.spacing).float(), args.samples, BATCH,
                          "reconstructing", progress=False)

    @torch.no_grad()
    def decode(model: torch.nn.Module, latents: torch.Tensor, steps: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(args.seed + 4)
        return in_batches(lambda a, b: model.decode(latents[a:b], steps, "ddim", generator,
                                                    spacing=s.spacing).float(), args.samples, BATCH, "decoding",
                          progress=False)

    @torch.no_grad()
    def sample_latents() -> torch.Tensor:
        inputs, _ = Conditioning(m, torch.device("cpu"), train, seed=args.seed).for_grid(args.samples)
        generator = torch.Generator().manual_seed(args.seed + 3)

        def draw(a: int, b: int) -> torch.Tensor:
            batch = {k: None if v is None else v[a:b] for k, v in inputs.items()}
            return teacher.sample_latents(b - a, args.latent_steps, args.latent_sampler, generator=generator,
                                          spacing=s.spacing, guidance=s.guidance,
                                          guidance_interval=tuple(s.guidance_interval), **batch)

        return in_batches(draw, args.samples, BATCH, "latents", progress=False)

    results_path = Path(args.out + ".json")
    rows = json.loads(results_path.read_text())["rows"] if results_path.exists() else []
    done = {(r["decoder"], r["steps"]) for r in rows}
    settings = {"teacher": args.teacher, "students": args.students, "samples": args.samples,
                "spacing": s.spacing, "latent_sampler": args.latent_sampler, "latent_steps": args.latent_steps,
                "guidance": s.guidance, "features": args.features, "seed": args.seed}

    pending = {key: model for key, model in decoders.items() if key not in done}
    if pending:  # what every new row needs, computed once (and not at all when every row is done)
        reference = reconstruct(teacher, args.teacher_steps)
        original_stats = feature_statistics(embed(originals))
        train_stats = feature_statistics(embed(train.images))
        latents = sample_latents()
    for (kind, steps), model in pending.items():
        start = time.perf_counter()
        recon = reference if (kind, steps) == ("teacher", args.teacher_steps) else reconstruct(model, steps)
        generated = decode(model, latents, steps)
        rows.append({"decoder": kind, "steps": steps, "psnr": float(psnr(recon, originals).mean()),
                     "rfd": frechet_distance(*original_stats, *feature_statistics(embed(recon))),
                     "fidelity_psnr": float(psnr(recon, reference).mean()),
                     "gfd": frechet_distance(*train_stats, *feature_statistics(embed(generated))),
                     "seconds": time.perf_counter() - start})
        write_json_atomically(results_path, {**settings, "rows": rows}, indent=1)
        print(json.dumps(rows[-1]), flush=True)
    write_report(args, settings, rows)


def write_report(args: argparse.Namespace, settings: dict, rows: list[dict]) -> None:
    """``OUT.md``: one table, the reference first, then by decreasing steps, undistilled before distilled."""
    rows = sorted(rows, key=lambda r: (r["decoder"] != "teacher" or r["steps"] != args.teacher_steps,
                                       -r["steps"], r["decoder"] == "distilled"))
    lines = [f"Teacher `{settings['teacher']}`, {settings['samples']} images, DDIM on the {settings['spacing']} grid, "
             f"{settings['features']} features, seed {settings['seed']}; gFD: latents from the base model with "
             f"{settings['latent_steps']} {settings['latent_sampler']} steps, guidance {settings['guidance']}, "
             f"shared by every row.", "",
             "| decoder | decoder steps | rFD | PSNR (dB) | gFD | fidelity to the teacher's chain (dB) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        reference = r["decoder"] == "teacher" and r["steps"] == args.teacher_steps
        name = "teacher (reference)" if reference else {"teacher": "undistilled"}.get(r["decoder"], r["decoder"])
        fidelity = "—" if reference else f"{r['fidelity_psnr']:.1f}"
        lines.append(f"| {name} | {r['steps']} | {r['rfd']:.3f} | {r['psnr']:.2f} | {r['gfd']:.3f} | {fidelity} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, CheckpointError) as error:  # a wrong argument: one line, before any work
        raise SystemExit(f"distill_quality.py: error: {error}") from None
