"""``ul-fast`` command line: train, sample, eval, distill, export, prepare-shards, encode, plot, info.

A user error (a bad option, config, data file or run folder) is one line on stderr, ``ul-fast: error: …``,
and exit status 2; ``--debug`` (or the environment variable ``UL_FAST_DEBUG=1``) shows its traceback
instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import torch
import yaml
from PIL import Image

from ul_fast.api.export import DTYPES, PARTS
from ul_fast.config import DEVICE_PATTERN, Config, preset_names
from ul_fast.sampling import SAMPLERS, SPACINGS


def _train(args: argparse.Namespace) -> None:
    from ul_fast.config import load_config
    from ul_fast.train import Trainer, TrainingAborted, TrainingInterrupted
    from ul_fast.train.checkpoint import load_run_config
    from ul_fast.train.resume_policy import check_resume_changes, config_changes
    from ul_fast.train.run_folder import check_new_run

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
        if args.overwrite:
            raise ValueError("ul-fast train: --overwrite replaces a run with a new one; it does not go with --resume")
        if args.out:
            raise ValueError(f"ul-fast train: --resume {args.resume} continues that run in its own folder: drop --out "
                             f"{args.out} (a run is not continued into another folder)")
        if args.config:
            raise ValueError(f"ul-fast train: --resume {args.resume} continues that run with its own config.yaml: drop "
                             f"--config {args.config} (--set KEY=VALUE changes what a resume may change)")
        run_dir = Path(args.resume)
        config = load_run_config(run_dir, args.set)
        # Refused before any work; the trainer checks again against the checkpoint's own config.
        check_resume_changes(config_changes(load_run_config(run_dir).to_dict(), config.to_dict()))
    else:
        if not args.out:
            raise ValueError("ul-fast train: give --out RUN (a new run) or --resume RUN")
        run_dir = Path(args.out)
        check_new_run(run_dir, args.overwrite)
        config = load_config(args.config or "tiny", args.set)
    if distributed and torch.cuda.is_available() and config.train.device == "auto":
        config.train.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if args.no_progress:
        config.train.progress = False
    try:
        trainer = Trainer(config, run_dir, rank, world_size)
        trainer.fit(resume=bool(args.resume), overwrite=args.overwrite)
        if distributed:  # every rank is done before any closes its connections (a rank torn down while a peer
            torch.distributed.barrier()  # still reads from it can abort in gloo's threads: seen once in CI)
    except (TrainingInterrupted, TrainingAborted) as stop:  # exit status 128 + signal: 130 SIGINT, 143 SIGTERM
        if rank == 0:
            print(f"ul-fast: {stop}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"run written to {run_dir}")


def _samplers(args: argparse.Namespace, config: Config) -> tuple[str, str]:
    """``(base model's sampler, decoder's sampler)`` of ``ul-fast sample`` / ``eval``: ``--sampler`` sets both, and
    ``--decoder-sampler`` the decoder's; by default the run's ``sample.sampler`` and ``sample.decoder_sampler``
    (null: the same). A distilled decoder (:func:`~ul_fast.train.distill.distilled_decoder`) takes its own sampler
    only (ValueError naming the options otherwise) and warns at other steps or another grid than its own."""
    from ul_fast.train.distill import distilled_decoder

    s = config.sample
    latent = args.sampler or s.sampler
    decoder = args.decoder_sampler or args.sampler or s.decoder_sampler or s.sampler
    distilled = distilled_decoder(args.run)
    if distilled is None:
        return latent, decoder
    where = (f"the decoder of {args.run}" + ("" if distilled["run"] == str(args.run) else
                                             f" (from {distilled['run']})") +
             f" is distilled for {distilled['steps']} {distilled['sampler']} steps on the {distilled['spacing']} grid")
    if decoder != distilled["sampler"]:
        if args.decoder_sampler:
            raise ValueError(f"{where}: it samples right with {distilled['sampler']} only; drop --decoder-sampler "
                             f"{args.decoder_sampler}")
        option = f"--sampler {args.sampler}" if args.sampler else f"the run's sample.sampler {s.sampler}"
        raise ValueError(f"{where}: it samples right with {distilled['sampler']} only, and {option} would apply to "
                         f"it too; add --decoder-sampler {distilled['sampler']} to sample the base model with "
                         f"{latent} and the decoder with {distilled['sampler']}")
    steps, spacing = args.decoder_steps or s.decoder_steps, args.spacing or s.spacing
    if (steps, spacing) != (distilled["steps"], distilled["spacing"]):
        warnings.warn(f"{where}; at {steps} steps on the {spacing} grid its quality is unknown", UserWarning,
                      stacklevel=2)
    return latent, decoder


def _sample(args: argparse.Namespace) -> None:
    from ul_fast.api import open_model
    from ul_fast.data import Conditioning
    from ul_fast.devices import resolve_device
    from ul_fast.eval import save_grid
    from ul_fast.eval.adherence import negatives, read_prompts
    from ul_fast.train.preflight import check_device, check_text_model

    check_device(args.device, "--device")
    if args.prompts is not None and (args.prompt is not None or args.label is not None):
        raise ValueError("--prompts gives every image its prompt: it does not go with --prompt or --label")
    prompts = None if args.prompts is None else read_prompts(args.prompts)
    n = args.n or (1 if prompts is not None else 64)  # with --prompts: images per prompt
    device = resolve_device(args.device)
    opened = open_model(args.run, device)  # a run folder, an exported folder or a shipped model's name
    config, model = opened.config, opened.model
    m, s = config.model, config.sample
    check_text_model(config)  # the text encoder is there and fits, before any sampling
    if opened.base_model_trained:
        if args.label is not None and m.context_dim:
            raise ValueError(f"{args.run} is text-conditioned: it takes --prompt or --prompts, not --label")
        if args.label is not None and not m.num_classes:
            raise ValueError(f"{args.run} is unconditional (model.num_classes: 0): drop --label")
        if (args.prompt is not None or prompts is not None or args.negative_prompt is not None) and not m.context_dim:
            raise ValueError(f"--prompt, --prompts and --negative-prompt need a text-conditioned run; {args.run} has "
                             f"model.context_dim: null")
        if args.prompt is None and prompts is None and m.context_dim:
            raise ValueError(f"{args.run} is text-conditioned: give --prompt, e.g. --prompt 'a photo of a sneaker', "
                             f"or --prompts FILE")
        if args.label is not None and not 0 <= args.label < m.num_classes:
            raise ValueError(f"--label must be in [0, {m.num_classes}), got {args.label}")
        if prompts is not None:
            each = [p for p in prompts for _ in range(n)]
            conditioning = Conditioning(m, device).for_captions([p.text for p in each],
                                                                negatives(each, args.negative_prompt))
            columns = n if n > 1 else None
        else:
            conditioning, columns = Conditioning(m, device).for_request(n, args.prompt, args.label,
                                                                        args.negative_prompt)
    else:  # the latents of the stage-1 prior decode to images too: better than the noise of an untrained base
        if model.prior is None and not model.normal_prior:
            raise ValueError(f"{args.run} has no base model and no prior (networks: {', '.join(opened.networks)}): "
                             f"nothing to sample; export the run with --part all")
        if args.prompt is not None or args.label is not None or prompts is not None:
            raise ValueError(f"{args.run} has no trained base model (stage 2 has not run), and its stage-1 prior is "
                             f"unconditional: drop --label and --prompt(s) to sample from the prior")
        print(f"ul-fast: note: {args.run} has no trained base model (stage 2 has not run): sampling from its "
              f"stage-1 prior, unconditionally", file=sys.stderr)
        conditioning, columns = {"use_prior": True}, None
    latent_sampler, decoder_sampler = _samplers(args, config)
    generator = torch.Generator(device).manual_seed(args.seed)
    images = model.sample(n * len(prompts) if prompts is not None else n, args.latent_steps or s.latent_steps,
                          args.decoder_steps or s.decoder_steps,
                          latent_sampler, generator, progress=not args.no_progress, decoder_sampler=decoder_sampler,
                          spacing=args.spacing or s.spacing, cuda_graph=args.cuda_graph or s.cuda_graph,
                          guidance=s.guidance if args.guidance is None else args.guidance,
                          guidance_interval=tuple(s.guidance_interval), **conditioning).float()
    save_grid(images, args.out, columns=columns)
    if prompts is not None:
        folder = _write_prompt_images(images, [p.text for p in prompts], n, Path(args.out))
        print(f"wrote {len(prompts)} prompt(s) x {n} image(s) to {folder}/ (one file per prompt, index.json) and "
              f"their grid to {args.out}")
    else:
        print(f"wrote {n} samples to {args.out}")


def _write_prompt_images(images: torch.Tensor, prompts: list[str], n: int, grid: Path) -> Path:
    """One image file per prompt (its ``n`` samples side by side) in the folder named after the grid
    (``grid.png`` → ``grid/0001.png``, …), and ``index.json`` naming each file's prompt; returns the folder."""
    from ul_fast.eval import save_grid
    from ul_fast.files import write_json_atomically

    folder = grid.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for k, prompt in enumerate(prompts):
        name = f"{k + 1:04d}{grid.suffix}"
        save_grid(images[k * n:(k + 1) * n], folder / name, columns=n)
        index.append({"file": name, "prompt": prompt})
    write_json_atomically(folder / "index.json", index)
    return folder


def _eval(args: argparse.Namespace) -> None:
    from ul_fast.api import open_model
    from ul_fast.data import STREAMED_IMAGES_IN_MEMORY, load_images, spec_kind, splits_apart
    from ul_fast.devices import resolve_device
    from ul_fast.eval.adherence import read_prompts
    from ul_fast.eval.evaluate import EVAL_FILE, check_features, evaluate_model, format_table
    from ul_fast.files import write_json_atomically
    from ul_fast.train.preflight import check_device, check_text_model

    check_device(args.device, "--device")
    prompts = None if args.prompts is None else read_prompts(args.prompts)  # before any work
    device = resolve_device(args.device)
    opened = open_model(args.run, device)  # a run folder, an exported folder or a shipped model's name
    config, model = opened.config, opened.model
    m, s = config.model, config.sample
    check_features(args.features, m.image_channels)  # before the data is read
    check_text_model(config)
    if (prompts is not None or args.negative_prompt is not None) and not m.context_dim:
        raise ValueError(f"--prompts and --negative-prompt need a text-conditioned run; {args.run} has "
                         f"model.context_dim: null")
    latent_sampler, decoder_sampler = _samplers(args, config)
    dataset = args.data or config.data.dataset
    if spec_kind(dataset) == "latents":
        raise ValueError(f"--data must name images (their reconstructions and samples are scored), got {dataset!r}")
    train_data, test_data = (load_images(dataset, split, m.image_size, m.image_channels,
                                         stream_limit=STREAMED_IMAGES_IN_MEMORY) for split in ("train", "test"))
    result = evaluate_model(model, train_data, test_data, samples=args.samples, sampler=latent_sampler,
                            decoder_sampler=decoder_sampler,
                            spacing=args.spacing or s.spacing, cuda_graph=args.cuda_graph or s.cuda_graph,
                            latent_steps=args.latent_steps or s.latent_steps,
                            decoder_steps=args.decoder_steps or s.decoder_steps,
                            guidance=s.guidance if args.guidance is None else args.guidance,
                            guidance_interval=tuple(s.guidance_interval), seed=args.seed,
                            base_trained=opened.base_model_trained, features=args.features,
                            held_out=splits_apart(dataset), progress=not args.no_progress,
                            prompts=prompts, negative_prompt=args.negative_prompt)
    for note in result["notes"]:
        print(f"ul-fast: note: {args.run}: {note}", file=sys.stderr)
    record = {"run": str(args.run), "dataset": dataset, **result,
              **({"prompts_file": str(args.prompts)} if args.prompts else {})}
    print(format_table(result))
    if opened.kind == "shipped":  # its folder is part of the installed package: left as installed
        print(f"ul-fast: note: {args.run} is a shipped model: {EVAL_FILE} not written", file=sys.stderr)
        return
    path = write_json_atomically(opened.path / EVAL_FILE, record)
    print(f"wrote {path}")


def _distill(args: argparse.Namespace) -> None:
    from ul_fast.devices import resolve_device
    from ul_fast.train.checkpoint import load_run_config
    from ul_fast.train.distill import Distiller, DistillSettings
    from ul_fast.train.preflight import check_device

    if args.resume and args.overwrite:
        raise ValueError("ul-fast distill: --overwrite replaces a distillation with a new one; it does not go with "
                         "--resume")
    check_device(args.device, "--device")
    teacher = load_run_config(args.run)
    settings = DistillSettings(
        teacher=str(args.run), from_steps=args.from_steps, to_steps=args.to_steps,
        steps_per_round=args.steps_per_round, batch_size=args.batch or teacher.train.batch_size, lr=args.lr,
        seed=args.seed, ema_decay=teacher.train.ema_decay, spacing=teacher.sample.spacing)
    out = Distiller(settings, args.out, resolve_device(args.device), progress=not args.no_progress).run(
        resume=args.resume, overwrite=args.overwrite)
    print(f"distilled decoder ({args.from_steps} → {args.to_steps} steps) written to {out}")


def _export(args: argparse.Namespace) -> None:
    from ul_fast.api import export_run

    out = export_run(args.run, args.out, part=args.part, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported {args.run} ({args.part}, {args.dtype}) to {out}; load it with ul_fast.load({str(out)!r}) or "
          f"ul-fast sample --run {out}")


def _prepare_shards(args: argparse.Namespace) -> None:
    from ul_fast.data.shard_writer import prepare_shards

    out = prepare_shards(args.data, args.out, image_size=args.image_size, channels=args.channels,
                         image_format=args.format, quality=args.quality, max_count=args.shard_size,
                         on_bad_image=args.on_bad_image, progress=not args.no_progress)
    print(f"shards written to {out}; train on them with --set data.dataset=shards:{out}")


def _encode(args: argparse.Namespace) -> None:
    from ul_fast.train.checkpoint import load_run_config
    from ul_fast.train.encode import encode_dataset

    run_data = load_run_config(args.run).data
    manifest = encode_dataset(args.run, args.data or run_data.dataset, args.out, dtype=args.dtype, flip=args.flip,
                              batch_size=args.batch, device=args.device, shard_size=args.shard_size,
                              num_workers=args.workers, overwrite=args.overwrite,
                              on_bad_image=args.on_bad_image or run_data.on_bad_image, progress=not args.no_progress)
    print(f"latent cache written to {manifest.parent}; train stage 2 on it with --set data.dataset=latents:"
          f"{manifest.parent} --set train.init_from={args.run} --set train.stage1_steps=0")


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


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other user error."""

    def error(self, message: str) -> NoReturn:
        print(f"ul-fast: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _int_at_least(low: int, text: str) -> int:
    kind = "a positive integer" if low == 1 else f"an integer >= {low}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {kind}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(1, text)


def _non_negative_int(text: str) -> int:
    return _int_at_least(0, text)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _image_path(text: str) -> str:
    """A path whose extension names an image format Pillow writes (as ``save_grid`` does)."""
    if Image.registered_extensions().get(Path(text).suffix.lower()) not in Image.SAVE:
        raise argparse.ArgumentTypeError(f"{text!r} does not end in an image extension (.png, .jpg, .jpeg, .webp, …)")
    return text


def _device(text: str) -> str:
    if DEVICE_PATTERN.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The ``ul-fast`` parser: one sub-command per job, every option with its help."""
    parser = _Parser(prog="ul-fast", description="Unified Latents: train latent diffusion models and sample them.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line (also: UL_FAST_DEBUG=1)")
    common = argparse.ArgumentParser(add_help=False)  # --debug after the command name too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of one line (also: UL_FAST_DEBUG=1)")
    # options several commands share, written once
    sampling = argparse.ArgumentParser(add_help=False)  # sample, eval
    sampling.add_argument("--sampler", choices=SAMPLERS,
                          help="diffusion sampler of the base model and the decoder (default: the run's "
                               "sample.sampler)")
    sampling.add_argument("--decoder-sampler", choices=SAMPLERS,
                          help="the decoder's sampler, when it differs from --sampler (default: the run's "
                               "sample.decoder_sampler, else --sampler); a distilled decoder takes ddim only")
    sampling.add_argument("--spacing", choices=SPACINGS,
                          help="step grid, uniform in time or in log-SNR (default: the run's sample.spacing)")
    sampling.add_argument("--cuda-graph", action="store_true",
                          help="on CUDA, replay a captured network call per step (default: the run's "
                               "sample.cuda_graph)")
    sampling.add_argument("--latent-steps", type=_positive_int, metavar="K",
                          help="sampling steps of the latent diffusion (default: the run's sample.latent_steps)")
    sampling.add_argument("--decoder-steps", type=_positive_int, metavar="K",
                          help="sampling steps of the decoder (default: the run's sample.decoder_steps)")
    running = argparse.ArgumentParser(add_help=False)  # sample, eval, distill
    running.add_argument("--device", type=_device, default="auto",
                         help="auto (CUDA when available), cpu, cuda, cuda:N or mps (default auto)")
    running.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train", parents=[common], help="train stage 1 then stage 2",
        description="Train a model into a new run folder (--out) or continue one (--resume). Stage 1 trains the "
                    "encoder, the latent prior and the decoder; stage 2 the base model on the frozen latents. Every "
                    "setting is checked before any work starts.")
    train.add_argument("--config",
                       help=f"a preset ({', '.join(preset_names())}; default tiny) or a YAML file, which may start "
                            f"with 'extends: PRESET' and set only the keys that differ")
    train.add_argument("--out", help="run folder to create (refused if it holds a run: see --resume, --overwrite)")
    train.add_argument("--overwrite", action="store_true",
                       help="with --out: replace the run already in that folder (its checkpoints, metrics, grids)")
    train.add_argument("--resume", help="run folder to continue from its newest intact checkpoint (--set may "
                       "change schedule lengths, cadences, learning rates and sample.*)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.stage1_steps=100 (repeatable)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=_train)

    sample = sub.add_parser(
        "sample", parents=[common, sampling, running], help="sample images from a trained run",
        description="Generate a grid of images with a run's newest checkpoint (EMA weights): the base model's "
                    "latents, decoded. A run whose stage 2 has not run samples its stage-1 prior instead.")
    sample.add_argument("--run", required=True, help="run folder written by ul-fast train, an exported model's folder "
                        "(ul-fast export) or a shipped model's name (fmnist-tiny)")
    sample.add_argument("-n", type=_positive_int,
                        help="number of images (default 64); with --prompts, images per prompt (default 1)")
    sample.add_argument("--out", type=_image_path, default="samples.png",
                        help="image file of the grid; its extension picks the format (default samples.png)")
    sample.add_argument("--prompt", help="caption for a text-conditioned run, e.g. 'a photo of a sneaker'")
    sample.add_argument("--prompts", metavar="FILE",
                        help="a text-conditioned run's prompts, one per line (UTF-8; or JSON Lines with \"text\" "
                             "and optionally its own \"negative\" prompt): "
                             "writes one image file per prompt into the folder named after --out (OUT.png → "
                             "OUT/0001.png, …, with index.json) and their grid to --out")
    sample.add_argument("--negative-prompt", metavar="TEXT",
                        help="guide away from this caption: it replaces the null caption in classifier-free guidance")
    sample.add_argument("--label", type=int, help="class label for every image (default: all classes in turn)")
    sample.add_argument("--guidance", type=_non_negative_float,
                        help="classifier-free guidance scale, 1 = none (default: the run's sample.guidance)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    sample.set_defaults(func=_sample)

    evaluate = sub.add_parser(
        "eval", parents=[common, sampling, running],
        help="measure a run: rFD, gFD, KID, PSNR, bits/pixel (writes RUN/eval.json)",
        description="Evaluate a run's newest checkpoint (EMA weights) on N held-out images: Fréchet distance and "
                    "KID of their reconstructions (rFD) and of N base-model samples against the training set (gFD), "
                    "the reconstructions' PSNR, and bits/pixel of their latents under the prior and under the base "
                    "model. Prints a table and writes RUN/eval.json.")
    evaluate.add_argument("--run", required=True, help="run folder written by ul-fast train, an exported model's "
                          "folder (ul-fast export) or a shipped model's name (fmnist-tiny; eval.json is not written)")
    evaluate.add_argument("--data", metavar="SPEC",
                          help="the images to evaluate on, a data spec as data.dataset takes (default: the run's "
                               "data.dataset), e.g. fmnist:DIR for fmnist-tiny where Fashion-MNIST is not at "
                               "Debian's path; read at the model's image size")
    evaluate.add_argument("--samples", type=_positive_int, default=1000, metavar="N",
                          help="N: held-out images to reconstruct and images to sample (default 1000; at most "
                               "the test split's size)")
    evaluate.add_argument("--guidance", type=_non_negative_float, metavar="W",
                          help="classifier-free guidance scale of the samples, 1 = none (default: the run's "
                               "sample.guidance)")
    evaluate.add_argument("--seed", type=int, default=0, metavar="S", help="seed of every random draw (default 0)")
    evaluate.add_argument("--prompts", metavar="FILE",
                          help="a text-conditioned run's samples take these prompts in turn (one per line, or JSON "
                               "Lines with \"text\" and optional \"left\", \"right\", \"held_out\", \"negative\", as "
                               "scripts/make_fmnist_pairs.py writes prompts.jsonl); for Fashion-MNIST pairs, the "
                               "share of samples whose two halves the classifier reads as the prompt's classes "
                               "(adherence) is reported for seen and held-out orders")
    evaluate.add_argument("--negative-prompt", metavar="TEXT",
                          help="guide the samples away from this caption (it replaces the null caption)")
    evaluate.add_argument("--features", default="fmnist", metavar="NAME",
                          help="feature network of FD and KID: fmnist, the Fashion-MNIST classifier shipped with "
                               "ul-fast, for grayscale data (default); inception:PATH, the FID Inception-v3 with "
                               "your copy of pt_inception-2015-12-05-6726825d.pth (pytorch-fid's conventions; "
                               "nothing is downloaded)")
    evaluate.set_defaults(func=_eval)

    distill = sub.add_parser(
        "distill", parents=[common, running],
        help="distil a run's decoder into fewer sampling steps (a new run folder)",
        description="Progressive distillation (Salimans & Ho 2022) of a run's decoder: each round a student learns "
                    "to take in one DDIM step what its teacher takes in two, halving the decoder's steps from "
                    "--from-steps to --to-steps. Writes a run folder (--out) that ul-fast sample and eval use as is, "
                    "with distill.json and metrics.jsonl.")
    distill.add_argument("--run", required=True, help="the teacher: a run folder written by ul-fast train")
    distill.add_argument("--out", required=True,
                         help="run folder to create (refused if it holds a run: see --resume, --overwrite)")
    distill.add_argument("--to-steps", type=_positive_int, required=True, metavar="K",
                         help="the distilled decoder's steps: --from-steps divided by a power of two")
    distill.add_argument("--from-steps", type=_positive_int, default=32, metavar="K",
                         help="the teacher's decoder steps (default 32)")
    distill.add_argument("--steps-per-round", type=_positive_int, default=200, metavar="N",
                         help="optimiser steps per halving (default 200)")
    distill.add_argument("--batch", type=_positive_int, metavar="B",
                         help="images per optimiser step (default: the run's train.batch_size)")
    distill.add_argument("--lr", type=_positive_float, default=1e-4, help="Adam's learning rate (default 1e-4)")
    distill.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    distill.add_argument("--resume", action="store_true",
                         help="continue the distillation in --out from its newest checkpoint (same options)")
    distill.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    distill.set_defaults(func=_distill)

    export = sub.add_parser(
        "export", parents=[common], help="write a run as a self-contained model folder (safetensors, model card)",
        description="Export the EMA weights of a run's newest checkpoint into a folder that loads without the run: "
                    "config.json (the model config), one safetensors file per network, manifest.json (SHA-256 of "
                    "every file, sampling defaults, data) and README.md (a model card with the run's eval.json "
                    "figures). No pickle. Load it with ul_fast.load(DIR) or --run DIR. Written under a temporary "
                    "name and renamed when complete.")
    export.add_argument("--run", required=True, help="run folder written by ul-fast train or ul-fast distill")
    export.add_argument("--out", required=True, help="folder to create (refused if it holds anything but an export)")
    export.add_argument("--part", choices=tuple(PARTS), default="all",
                        help="encoder-decoder: the tokenizer (encode, decode, reconstruct); all: also the prior and "
                             "the base model (bits/pixel, sampling) (default all)")
    export.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="storage precision of the weights; loaded back into fp32 (default fp32: bit-exact)")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    export.set_defaults(func=_export)

    shards = sub.add_parser(
        "prepare-shards", parents=[common], help="write a data set as WebDataset tar shards (data.dataset shards:DIR)",
        description="Write any data set ul-fast reads (--data, a data.dataset spec) as tar shards in the WebDataset "
                    "layout (<key>.png|jpg, <key>.cls, <key>.txt captions, classes.json, shards.json), train and "
                    "test splits in OUT/train and OUT/test when the data has both. PNG/JPEG files are copied as "
                    "stored unless --image-size asks for a resize. Written into OUT.partial and renamed when complete.")
    shards.add_argument("--data", required=True, metavar="SPEC",
                        help="a data.dataset spec: fmnist[:DIR], fmnist-embedded, folder:DIR, folder-stream:DIR, "
                             "array:FILE, shards:DIR")
    shards.add_argument("--out", required=True, help="folder to create (refused if it exists and is not empty)")
    shards.add_argument("--format", choices=("png", "jpg"), default="png",
                        help="encoding of images that are re-encoded (default png, lossless)")
    shards.add_argument("--quality", type=_positive_int, default=95, help="JPEG quality (default 95)")
    shards.add_argument("--shard-size", type=_positive_int, default=10_000, metavar="N",
                        help="examples per shard (default 10000)")
    shards.add_argument("--image-size", type=_positive_int, metavar="S",
                        help="center-crop and resize every image to S×S (default: keep the stored images)")
    shards.add_argument("--channels", type=int, choices=(1, 3),
                        help="1 (grayscale) or 3 (RGB) (default: the data's own)")
    shards.add_argument("--on-bad-image", choices=("skip", "fail"), default="skip",
                        help="an undecodable image: skip it with a counted warning (default), or stop")
    shards.add_argument("--no-progress", action="store_true", help="no progress bars")
    shards.set_defaults(func=_prepare_shards)

    encode = sub.add_parser(
        "encode", parents=[common, running], help="write a latent cache of a data set with a run's frozen encoder",
        description="Encode every image of a data set (train and test splits) with a run's EMA encoder, z_clean = "
                    "E(x) with no noise, into a latent cache: shards of .npy arrays with labels (and captions) and a "
                    "manifest that names the run and the encoder weights' hash. Stage 2 then trains from it "
                    "(data.dataset latents:DIR) with no pixel decoding and no encoder forward per step. An interrupted "
                    "encode resumes when run again with the same options.")
    encode.add_argument("--run", required=True, help="run folder whose stage 1 is trained")
    encode.add_argument("--out", required=True, help="folder of the cache")
    encode.add_argument("--data", metavar="SPEC", help="data.dataset spec to encode (default: the run's own)")
    encode.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="storage of the latents (default bf16: relative rounding error at most 2^-8)")
    encode.add_argument("--flip", action="store_true",
                        help="also encode the horizontally flipped train images (extra items of the cache)")
    encode.add_argument("--batch", type=_positive_int, default=256, help="images per encoder forward (default 256)")
    encode.add_argument("--shard-size", type=_positive_int, default=4096, metavar="N",
                        help="latents per shard file (default 4096)")
    encode.add_argument("--workers", type=_non_negative_int, default=0, metavar="W",
                        help="DataLoader workers decoding a streamed data set (default 0: in this process)")
    encode.add_argument("--overwrite", action="store_true", help="replace a cache already in --out")
    encode.add_argument("--on-bad-image", choices=("skip", "fail"),
                        help="an undecodable image: leave it out with a warning (named in the manifest), or stop "
                             "(default: the run's data.on_bad_image)")
    encode.set_defaults(func=_encode)

    plot = sub.add_parser("plot", parents=[common], help="draw loss, bits/pixel and PSNR curves of a run to PNG",
                          description="Draw a run's training curves from its metrics.jsonl (needs ul-fast[plot]).")
    plot.add_argument("run", help="run folder written by ul-fast train")
    plot.add_argument("--out", help="PNG path (default RUN/curves.png)")
    plot.set_defaults(func=_plot)

    info = sub.add_parser("info", parents=[common], help="print the build and which kernel each op uses",
                          description="Print versions, the extension's build and the kernel each op dispatches to, "
                                      "as JSON.")
    info.set_defaults(func=_info)
    return parser


USER_ERRORS = (ValueError, OSError, ImportError, yaml.YAMLError, torch.cuda.OutOfMemoryError)
"""Errors that describe the user's input or machine (ConfigError is a ValueError; a missing file an OSError; a
missing extra an ImportError). The exception classes ul_fast defines (CheckpointError, TrainingDiverged, …) are
user errors too; anything else, e.g. a RuntimeError from inside torch, is a bug and keeps its traceback."""


def _is_user_error(error: Exception) -> bool:
    return isinstance(error, USER_ERRORS) or type(error).__module__.startswith("ul_fast.")


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None,
                  line: str | None = None) -> None:
    """``warnings.showwarning`` of the command line: one line on stderr, no source location."""
    print(f"ul-fast: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Run ``ul-fast ARGV`` (default: ``sys.argv[1:]``). A user error prints one line and exits with status 2."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("UL_FAST_DEBUG", "") not in ("", "0")
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _show_warning
        try:
            args.func(args)
        except Exception as error:
            if debug or not _is_user_error(error):
                raise
            message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
            print(f"ul-fast: error: {message or type(error).__name__}", file=sys.stderr)
            raise SystemExit(2) from None


if __name__ == "__main__":
    main()
