"""Evaluating a trained model: rFD, gFD, KID, PSNR and held-out bits/pixel, as one JSON-ready record.

:func:`evaluate_model` takes a loaded model and its data sets, so it stays below the training layer; the
command line (``ul-fast eval``) loads a run's newest checkpoint, calls it, prints :func:`format_table` and
writes ``RUN/eval.json``.

The measures (N = ``samples``; the first N held-out images, so every evaluation of a data set sees the same):

* **rFD / rKID**: Fréchet distance and KID between the features of the N images and of their
  reconstructions (encode → noisy latent at λ_z(0) → decoder sampling); **PSNR**: their mean PSNR in dB.
* **gFD / gKID**: N base-model samples against the whole training set (class-balanced for class-conditional
  runs: image i gets class ``i % num_classes``; text runs each class's first caption in turn, or the captions of
  the training data's first images, or, given ``prompts``, prompt ``i % P``).
* **adherence** (given ``prompts`` that name Fashion-MNIST pairs' classes): the share of those samples whose two
  halves the Fashion-MNIST classifier reads as the prompt's classes, for seen and held-out orders
  (:mod:`ul_fast.eval.adherence`).
* **bits/pixel** of the N images' latents: under the stage-1 prior (its ``L_z``, as the trainer reports) and
  under the base model (the same unweighted latent ELBO with the base model as the prior: the paper's Tab. 5
  column); ``nats / ln 2 / (H·W)``, averaged over the images.

Every random draw comes from a generator seeded by ``seed``, one per measure, so the numbers are reproducible
and one measure's draws do not depend on whether another ran.
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ul_fast.data import Conditioning, ImageArrayDataset
from ul_fast.data.conditioning import slice_inputs
from ul_fast.eval.adherence import Prompt, negatives, pair_adherence
from ul_fast.eval.feature_net import load_fmnist_classifier
from ul_fast.eval.frechet import feature_statistics, frechet_distance, kernel_inception_distance, kid_subset_sizes
from ul_fast.eval.images import psnr
from ul_fast.eval.inception import WEIGHTS_FILE_NAME as INCEPTION_WEIGHTS
from ul_fast.eval.inception import check_fid_inception_file, load_fid_inception

if TYPE_CHECKING:  # a type only: the model is passed in, loaded by the caller
    from ul_fast.model import UnifiedLatents

__all__ = ["EVAL_FILE", "FEATURES", "check_features", "evaluate_model", "format_table", "in_batches",
           "load_feature_network"]

EVAL_FILE = "eval.json"
FEATURES = ("fmnist", "inception:PATH")
"""Feature networks :func:`evaluate_model` accepts: ``fmnist``, the Fashion-MNIST classifier shipped with
ul-fast (grayscale data), and ``inception:PATH``, the FID Inception-v3 with the user's copy of
``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's conventions; any data, grayscale repeated to RGB)."""
NO_BASE_MODEL_NOTE = ("no trained base model (stage 2 has not run): gFD, gKID and base-model bits/pixel are left "
                      "out; rFD, rKID, PSNR and prior bits/pixel are given")
SINGLE_STAGE_NOTE = ("single-stage run: there is no separate prior, so bits/pixel is given under the base model "
                     "only")
NO_ADHERENCE_NOTE = ("the prompts name no Fashion-MNIST pair (left and right classes): adherence is left out; gFD, "
                     "gKID are those of the prompted samples")
COLOUR_ADHERENCE_NOTE = "adherence reads grayscale Fashion-MNIST pairs; this run's images have 3 channels: left out"
NOT_HELD_OUT_NOTE = ("{data} serves the same images as its training and test splits, so none of these numbers is "
                     "held-out: rFD, rKID, PSNR and bits/pixel are measured on training images, and gFD, gKID compare "
                     "samples with those same images; for held-out numbers give the data train/ and test/ folders (or "
                     "train_images and test_images in the .npz)")
GRAYSCALE_INCEPTION_NOTE = ("grayscale images are repeated to RGB for the Inception features, as pytorch-fid's "
                            "PIL convert('RGB') does; the Fashion-MNIST network (--features fmnist) was trained on "
                            "this kind of data and separates its classes better")


def check_features(features: str, image_channels: int) -> list[str]:
    """Raise ValueError (FileNotFoundError for a missing Inception file) unless ``features`` names a feature
    network usable on images with ``image_channels``; return the notes to report with the result."""
    if features.startswith("inception:"):
        check_fid_inception_file(features.removeprefix("inception:"))
        return [GRAYSCALE_INCEPTION_NOTE] if image_channels == 1 else []
    if features == "inception":
        raise ValueError(f"--features inception needs the weights' path: --features inception:PATH, PATH being "
                         f"your copy of {INCEPTION_WEIGHTS} (nothing is downloaded)")
    if features != "fmnist":
        raise ValueError(f"unknown --features {features!r}; available: {', '.join(FEATURES)}")
    if image_channels != 1:
        raise ValueError(f"--features fmnist is a grayscale (Fashion-MNIST) network, but this run's images have "
                         f"{image_channels} channels; use --features inception:PATH (Inception-v3, RGB)")
    return []


def load_feature_network(features: str, device: torch.device) -> torch.nn.Module:
    """The network named by ``features`` (already checked by :func:`check_features`), with a
    ``features(images [B, C, H, W] in [-1, 1]) -> [B, D]`` method."""
    if features.startswith("inception:"):
        return load_fid_inception(features.removeprefix("inception:"), device)
    return load_fmnist_classifier(device)


def in_batches(function: Callable[[int, int], torch.Tensor], total: int, batch_size: int, description: str,
                progress: bool) -> torch.Tensor:
    """``function(start, stop)`` over ``[0, total)`` in batches, concatenated along dim 0, with a progress bar."""
    parts = []
    with tqdm(total=total, desc=description, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            parts.append(function(start, stop))
            bar.update(stop - start)
    return torch.cat(parts)


def _fd_and_kid(reference: torch.Tensor, features: torch.Tensor, kid_subsets: int, kid_max_subset_size: int,
                seed: int) -> dict[str, Any]:
    """``{"fd", "kid", "kid_se", "kid_subsets"}`` of two feature sets ``[N, D]``, KID's subsets shuffled by a
    CPU generator; ``kid_subsets`` = ``[count, rows of each reference subset, rows of each other subset]``."""
    fd = frechet_distance(*feature_statistics(reference), *feature_statistics(features))
    kid, kid_se = kernel_inception_distance(reference, features, kid_subsets, kid_max_subset_size,
                                            torch.Generator().manual_seed(seed))
    subsets = kid_subset_sizes(len(reference), len(features), kid_subsets, kid_max_subset_size)
    return {"fd": fd, "kid": kid, "kid_se": kid_se, "kid_subsets": list(subsets)}


def _software_versions() -> dict[str, str]:
    try:
        ul_fast_version = importlib.metadata.version("ul-fast")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        ul_fast_version = "unknown"
    return {"ul_fast": ul_fast_version, "torch": torch.__version__, "python": platform.python_version()}


@torch.no_grad()
def evaluate_model(model: UnifiedLatents, train_data: ImageArrayDataset, test_data: ImageArrayDataset, *,
                   samples: int = 1000, sampler: str = "ddim", decoder_sampler: str | None = None,
                   latent_steps: int = 32, decoder_steps: int = 32,
                   spacing: str = "time", cuda_graph: bool = False,
                   guidance: float = 1.0, guidance_interval: tuple[float, float] = (-math.inf, math.inf),
                   seed: int = 0, base_trained: bool = True, features: str = "fmnist", batch_size: int = 250,
                   kid_subsets: int = 10, kid_max_subset_size: int = 1000, held_out: bool = True,
                   progress: bool = True, prompts: list[Prompt] | None = None, negative_prompt: str | None = None,
                   ) -> dict[str, Any]:
    """Evaluate ``model`` (in eval mode, on its device) on ``samples`` held-out images; see the module docstring.

    train_data / test_data: the run's data at the model's image size. base_trained: whether the base model
    has trained (False for a two-stage run whose stage 2 never ran: then no gFD, gKID or base-model bits/pixel,
    and ``notes`` says so). held_out: whether ``test_data`` is held out from ``train_data``
    (:func:`~ul_fast.data.splits_apart` of the run's data spec); False records ``held_out: false`` and a note
    saying that every number is measured on training images. Images are reconstructed, sampled and embedded
    ``batch_size`` at a time; the numbers are a function of ``seed``, ``batch_size`` and the device.

    sampler: the base model's sampler; decoder_sampler: the decoder's (None: ``sampler``), for reconstructions and
    samples.

    Returns a JSON-ready dict: ``samples``, ``sampler``, ``decoder_sampler``, ``latent_steps``, ``decoder_steps``,
    ``spacing``,
    ``guidance``,
    ``seed``, ``features``, ``feature_dim``, ``reference_images`` (training images behind gFD), ``rfd``,
    ``rkid``, ``rkid_se``, ``psnr`` (dB), ``gfd``, ``gkid``, ``gkid_se``, ``bits_per_pixel_prior``,
    ``bits_per_pixel_base``, ``base_model_trained``, ``held_out``, ``notes`` (list of strings), ``versions``,
    ``elapsed_s``, ``rkid_subsets``, ``gkid_subsets``, ``prompts`` (how many; None without), ``negative_prompt``
    and ``adherence`` (:func:`~ul_fast.eval.adherence.pair_adherence`). A measure that does not apply is None. FD
    and KID are in squared feature units. KID is the mean over ``kid_subsets`` disjoint subsets of each set (of at
    most ``kid_max_subset_size`` rows: :func:`~ul_fast.eval.frechet.kid_subset_sizes`), ``rkid_se`` / ``gkid_se``
    its standard error over independent draws
    (:func:`~ul_fast.eval.frechet.kernel_inception_distance`); ``rkid_subsets`` / ``gkid_subsets`` record
    ``[subsets, rows of each subset of the reference set, rows of each subset of the other]``.

    prompts: a text model's samples take prompt ``i % len(prompts)`` (guided away from the prompt's own negative, or
    ``negative_prompt``, or the null caption); with classes named, their adherence is measured.
    """
    start_time = time.perf_counter()
    config = model.config
    decoder_sampler = decoder_sampler or sampler
    feature_notes = check_features(features, config.image_channels)
    if samples < 4:
        raise ValueError(f"--samples must be at least 4 (KID's standard error needs 2 disjoint subsets of 2 images), "
                         f"got {samples}")
    if samples > len(test_data):
        raise ValueError(f"--samples {samples} is more than the {len(test_data)} held-out images of "
                         f"{test_data.source or 'the test split'}; use --samples {len(test_data)} or fewer")
    if (prompts is not None or negative_prompt is not None) and not config.context_dim:
        raise ValueError("--prompts and --negative-prompt need a text-conditioned run (model.context_dim is null)")
    if prompts is not None and not prompts:
        raise ValueError("prompts: the list is empty")
    device = next(model.parameters()).device
    feature_net = load_feature_network(features, device)

    def embed(images: torch.Tensor, description: str) -> torch.Tensor:
        return in_batches(lambda a, b: feature_net.features(images[a:b].to(device)).double().cpu(), len(images),
                           batch_size, description, progress)

    def generator(offset: int) -> torch.Generator:
        return torch.Generator(device).manual_seed(seed + offset)

    notes = ([] if base_trained else [NO_BASE_MODEL_NOTE]) + feature_notes
    if not held_out:
        notes.insert(0, NOT_HELD_OUT_NOTE.format(data=test_data.source or "the data"))
    if model.single_stage:
        notes.append(SINGLE_STAGE_NOTE)
    originals = test_data.images[:samples]
    pixels = config.image_size * config.image_size

    # 1. Reconstructions: rFD, rKID, PSNR.
    recon_generator = generator(0)
    reconstructions = in_batches(
        lambda a, b: model.reconstruct(originals[a:b].to(device), decoder_steps, decoder_sampler, recon_generator,
                                     spacing=spacing, cuda_graph=cuda_graph).float()
        .cpu(), samples, batch_size, "reconstructing", progress)
    original_features = embed(originals, "features (held-out)")
    reconstruction = _fd_and_kid(original_features, embed(reconstructions, "features (reconstructions)"),
                                 kid_subsets, kid_max_subset_size, seed)
    mean_psnr = float(psnr(reconstructions, originals).mean())

    # 2. Held-out bits/pixel of the same images' latents, under the prior and under the base model.
    conditioning = Conditioning(config, device, train_data, seed=seed)
    labels = test_data.labels[:samples] if test_data.labels is not None else None
    test_captions = test_data.captions if config.context_dim else None  # each held-out image's first caption

    def bits_per_pixel(network: str, offset: int) -> float:
        nats_generator = generator(offset)

        def nats(a: int, b: int) -> torch.Tensor:
            inputs = {}
            if network == "base" and test_captions is not None:
                inputs = conditioning.for_captions([(test_captions.options(i) or ("",))[0] for i in range(a, b)])
            elif network == "base" and labels is not None and conditioning.grid_classes:
                inputs = conditioning.for_batch(labels[a:b].to(device), null=False)
            inputs = {k: v for k, v in inputs.items() if k in ("labels", "context", "pooled")}
            return model.latent_nats(originals[a:b].to(device), network=network, generator=nats_generator,
                                     **inputs).double().cpu()

        return float(in_batches(nats, samples, batch_size, f"bits/pixel ({network})", progress).mean()) / (
            math.log(2) * pixels)

    # No prior: a single-stage model, or an encoder-decoder export (a normal prior needs no network).
    has_prior = not model.single_stage and (model.prior is not None or model.normal_prior)
    bpp_prior = bits_per_pixel("prior", 1) if has_prior else None
    bpp_base = bits_per_pixel("base", 2) if base_trained else None

    # 3. Samples of the base model against the training set: gFD, gKID.
    generation = {"fd": None, "kid": None, "kid_se": None, "kid_subsets": None}
    adherence = None
    if base_trained:
        per_sample = None if prompts is None else [prompts[i % len(prompts)] for i in range(samples)]
        if per_sample is not None:
            inputs = conditioning.for_captions([p.text for p in per_sample], negatives(per_sample, negative_prompt))
        elif negative_prompt is not None:
            inputs = {**conditioning.for_grid(samples)[0], **conditioning.null(negative_prompt)}
        else:
            inputs = conditioning.for_grid(samples)[0]
        sample_generator = generator(3)

        def generate(a: int, b: int) -> torch.Tensor:
            return model.sample(b - a, latent_steps, decoder_steps, sampler, sample_generator, spacing=spacing,
                                cuda_graph=cuda_graph, guidance=guidance, guidance_interval=tuple(guidance_interval),
                                decoder_sampler=decoder_sampler, **slice_inputs(inputs, a, b)).float().cpu()

        generated = in_batches(generate, samples, batch_size, "sampling", progress)
        generation = _fd_and_kid(embed(train_data.images, "features (training set)"),
                                 embed(generated, "features (samples)"), kid_subsets, kid_max_subset_size,
                                 seed + 1)
        if per_sample is not None and config.image_channels != 1:
            notes.append(COLOUR_ADHERENCE_NOTE)
        elif per_sample is not None:
            adherence = pair_adherence(generated, per_sample, load_fmnist_classifier(device), batch_size)
            if adherence is None:
                notes.append(NO_ADHERENCE_NOTE)

    return {
        "samples": samples, "sampler": sampler, "decoder_sampler": decoder_sampler, "latent_steps": latent_steps,
        "decoder_steps": decoder_steps,
        "spacing": spacing,
        "guidance": guidance, "seed": seed, "features": features, "feature_dim": int(original_features.shape[1]),
        "reference_images": len(train_data),
        "rkid_subsets": reconstruction["kid_subsets"], "gkid_subsets": generation["kid_subsets"],
        "rfd": reconstruction["fd"], "rkid": reconstruction["kid"], "rkid_se": reconstruction["kid_se"],
        "psnr": mean_psnr,
        "gfd": generation["fd"], "gkid": generation["kid"], "gkid_se": generation["kid_se"],
        "bits_per_pixel_prior": bpp_prior, "bits_per_pixel_base": bpp_base,
        "prompts": None if prompts is None else len(prompts), "negative_prompt": negative_prompt,
        "adherence": adherence,
        "base_model_trained": base_trained, "held_out": held_out, "notes": notes, "versions": _software_versions(),
        "elapsed_s": time.perf_counter() - start_time,
    }


def format_table(result: dict[str, Any]) -> str:
    """The metrics of an :func:`evaluate_model` record as an aligned text table (KID ± its standard error)."""

    def number(value: float | None, error: float | None = None) -> str:
        if value is None:
            return "n/a"
        return f"{value:.4g}" + ("" if error is None else f" ± {error:.2g}")

    rows = [
        ("rFD", number(result["rfd"])),
        ("rKID", number(result["rkid"], result["rkid_se"])),
        ("PSNR (dB)", number(result["psnr"])),
        ("gFD", number(result["gfd"])),
        ("gKID", number(result["gkid"], result["gkid_se"])),
        ("bits/pixel (prior)", number(result["bits_per_pixel_prior"])),
        ("bits/pixel (base model)", number(result["bits_per_pixel_base"])),
    ]
    adherence = result.get("adherence")
    for group, label in (("seen", "seen orders"), ("held_out", "held-out orders"), ("all", "all prompts")):
        if adherence and group in adherence:
            both = adherence[group]["both"]
            rows.append((f"adherence, {label}", f"{100 * both['share']:.1f} % ± {100 * both['se']:.1f} "
                                                 f"({adherence[group]['samples']} samples; chance "
                                                 f"{100 * adherence['chance']:.0f} %; reversed "
                                                 f"{100 * adherence[group]['reversed']['share']:.1f} %)"))
    width = max(len(name) for name, _ in rows)
    samplers = (result["sampler"] if result.get("decoder_sampler", result["sampler"]) == result["sampler"] else
                f"{result['sampler']} (latent) and {result['decoder_sampler']} (decoder)")
    header = (f"{result['samples']} images, {result['features']} features, {samplers} sampler "
              f"({result['latent_steps']} latent + {result['decoder_steps']} decoder steps, "
              f"{result['spacing']} spacing), guidance {result['guidance']}, seed {result['seed']}, "
              f"{result['elapsed_s']:.1f} s")
    if not result.get("held_out", True):
        header += "\nNOT HELD-OUT: the test split is the training data (see the note): every number is on training data"
    return "\n".join([header, *(f"  {name:<{width}}  {value}" for name, value in rows)])


