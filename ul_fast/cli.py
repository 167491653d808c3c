"""``ul-fast`` command line: train, sample, plot, info."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ul_fast.sampling import SAMPLERS


def _train(args: argparse.Namespace) -> None:
    from ul_fast.config import load_config
    from ul_fast.train import Trainer

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world_size = 0, 1
    if distributed:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if args.resume:
        run_dir = Path(args.resume)
        config = load_config(str(run_dir / "config.yaml"), args.set)
    else:
        if not args.out:
            raise ValueError("ul-fast train: give --out RUN (a new run) or --resume RUN")
        run_dir = Path(args.out)
        config = load_config(args.config, args.set)
    if distributed and torch.cuda.is_available() and config.train.device == "auto":
        config.train.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if args.no_progress:
        config.train.progress = False
    trainer = Trainer(config, run_dir, rank, world_size)
    trainer.fit(resume=bool(args.resume))
    if rank == 0:
        print(f"run written to {run_dir}")
    if distributed:
        torch.distributed.destroy_process_group()


def _sample(args: argparse.Namespace) -> None:
    from ul_fast.data import Conditioning
    from ul_fast.devices import resolve_device
    from ul_fast.eval import save_grid
    from ul_fast.train import load_trained_model

    device = resolve_device(args.device)
    config, model = load_trained_model(args.run, device)
    m, s = config.model, config.sample
    if args.prompt is not None and not m.context_dim:
        raise ValueError(f"--prompt needs a text-conditioned run; {args.run} has model.context_dim: null")
    if args.prompt is None and m.context_dim:
        raise ValueError(f"{args.run} is text-conditioned: give --prompt, e.g. --prompt 'a photo of a sneaker'")
    if args.label is not None and not 0 <= args.label < m.num_classes:
        raise ValueError(f"--label must be in [0, {m.num_classes}), got {args.label}")
    conditioning, columns = Conditioning(m, device).for_request(args.n, args.prompt, args.label)
    generator = torch.Generator(device).manual_seed(args.seed)
    images = model.sample(args.n, args.latent_steps or s.latent_steps, args.decoder_steps or s.decoder_steps,
                          args.sampler or s.sampler, generator, progress=not args.no_progress,
                          guidance=s.guidance if args.guidance is None else args.guidance,
                          guidance_interval=tuple(s.guidance_interval), **conditioning)
    save_grid(images.float(), args.out, columns=columns)
    print(f"wrote {args.n} samples to {args.out}")


def _plot(args: argparse.Namespace) -> None:
    from ul_fast.eval.plot import plot_run

    print(f"wrote {plot_run(args.run, args.out)}")


def _info(_: argparse.Namespace) -> None:
    import ul_fast
    from ul_fast.ops.dispatch import describe

    info = {"version": ul_fast.__version__, "torch": torch.__version__, "ops": describe()}
    build_info = getattr(ul_fast, "build_info", None)
    if build_info is not None:
        info["build"] = build_info()
    print(json.dumps(info, indent=2, default=str))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ul-fast", description="Unified Latents: train and sample.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train stage 1 then stage 2")
    train.add_argument("--config", default="tiny", help="preset name (tiny, fmnist, imagenet512-paper) or YAML path")
    train.add_argument("--out", help="run folder to create")
    train.add_argument("--resume", help="run folder to continue from its latest checkpoint")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.stage1_steps=100 (repeatable)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=_train)

    sample = sub.add_parser("sample", help="sample images from a trained run")
    sample.add_argument("--run", required=True)
    sample.add_argument("-n", type=int, default=64)
    sample.add_argument("--out", default="samples.png")
    sample.add_argument("--prompt", help="caption for a text-conditioned run, e.g. 'a photo of a sneaker'")
    sample.add_argument("--label", type=int, help="class label for every image (default: all classes in turn)")
    sample.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the run's)")
    sample.add_argument("--sampler", choices=SAMPLERS)
    sample.add_argument("--latent-steps", type=int)
    sample.add_argument("--decoder-steps", type=int)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="auto")
    sample.add_argument("--no-progress", action="store_true")
    sample.set_defaults(func=_sample)

    plot = sub.add_parser("plot", help="draw loss, bits/pixel and PSNR curves of a run to PNG")
    plot.add_argument("run")
    plot.add_argument("--out", help="PNG path (default RUN/curves.png)")
    plot.set_defaults(func=_plot)

    info = sub.add_parser("info", help="print the build and which kernel each op uses")
    info.set_defaults(func=_info)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, RuntimeError, ImportError) as error:  # configuration and checkpoint errors: a clear message
        if os.environ.get("UL_FAST_DEBUG"):
            raise
        print(f"ul-fast: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
