"""Checks of a run's inputs that need the loaded data: done before the first step, so a mismatch between
data and model is one error naming the key, not a crash in stage 2 after stage 1 has trained.

What the configuration alone decides is checked by :func:`ul_fast.config.validate` when it is loaded; this
module checks what it cannot know: the data's image size, channels, labels and size, the device, the run that
``train.init_from`` names (and, as the config module cannot import the data's spec kinds, that augmentation is
asked only of streamed data).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import torch

from ul_fast.config import MINILM, TWO_STAGE, Config, ConfigError
from ul_fast.data import FASHION_MNIST_CLASSES, ImageArrayDataset, LatentCache, is_streaming, spec_kind, splits_apart
from ul_fast.data.caption_data import mentions_left_or_right
from ul_fast.model import UnifiedLatents
from ul_fast.text import bundled_model_dir, check_text_encoder
from ul_fast.train.checkpoint import load_run_config

__all__ = ["INIT_FROM_KEYS", "LARGE_MODEL_PARAMETERS", "SMALL_DATA_IMAGES", "check_device", "check_init_from",
           "check_run_inputs", "check_text_model", "parameter_count"]

LARGE_MODEL_PARAMETERS = 100_000_000
"""Networks above this many parameters (all four together) are "paper-size" for the warning below: the
paper's ImageNet-512 networks (the dataclass defaults) have 720 M; the shipped fmnist preset has 58 M."""
SMALL_DATA_IMAGES = 100_000
"""A training set with fewer images than this (or images of at most 64 pixels) is a small data set."""


def check_device(name: str, key: str = "train.device") -> None:
    """Raise :class:`ConfigError` naming ``key`` when device ``name`` asks for CUDA on a machine without it.

    (The spelling of ``name`` is checked with the configuration; availability depends on the machine, so a
    run folder trained on a GPU still loads, e.g. to sample on a CPU.)"""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key} is {name!r} but CUDA is not available here: use auto or cpu")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"{key} is {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")


def parameter_count(config: Config) -> int:
    """Parameters of the four networks ``config.model`` describes, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = UnifiedLatents(config.model)
    return sum(p.numel() for p in model.parameters())


def _labels(data: ImageArrayDataset | Any) -> tuple[bool, int, int]:
    """``(labelled, largest label, number of classes)`` of in-memory data, of a latent cache (from its manifest)
    or of a streaming image source (labelled when it names its classes; its labels are then below their count)."""
    if isinstance(data, ImageArrayDataset):
        labelled = data.labels is not None
        return labelled, int(data.labels.max()) if labelled else -1, data.num_classes
    if isinstance(data, LatentCache):
        return data.labeled, data.max_label, data.num_classes
    names = data.class_names
    return names is not None, len(names or []) - 1, len(names or [])


def _check_images(config: Config, data: ImageArrayDataset, split: str) -> None:
    m = config.model
    where = f"data.dataset {config.data.dataset!r} ({split} split)"
    if data.image_size != m.image_size:
        raise ConfigError(f"model.image_size is {m.image_size} but {where} has {data.image_size}x{data.image_size} "
                          f"images")
    if data.channels != m.image_channels:
        raise ConfigError(f"model.image_channels is {m.image_channels} but {where} has {data.channels}-channel "
                          f"images")


def _check_labels(config: Config, data: ImageArrayDataset | Any, split: str) -> None:
    m = config.model
    where = f"data.dataset {config.data.dataset!r} ({split} split)"
    labelled, largest, classes = _labels(data)
    if m.num_classes and not labelled:
        raise ConfigError(f"model.num_classes is {m.num_classes} (class-conditional) but {where} has no labels: "
                          f"set model.num_classes: 0 for an unconditional model, or use labelled data "
                          f"(class sub-folders, or labels in the .npz)")
    if m.num_classes and largest >= m.num_classes:
        raise ConfigError(f"model.num_classes is {m.num_classes} but {where} has label {largest} "
                          f"({classes} classes): set model.num_classes: {classes}")
    fashion_mnist = labelled and classes == len(FASHION_MNIST_CLASSES) and isinstance(data, ImageArrayDataset)
    captioned = getattr(data, "captions", None) is not None
    if m.context_dim and split == "train" and not (captioned or fashion_mnist):
        raise ConfigError(f"model.context_dim is set (a text model) but {where} has no captions and is not labelled "
                          f"Fashion-MNIST: give the images captions (a metadata.jsonl with file_name and text, .txt "
                          f"side files, or txt members in shards), train on fmnist data (captions per class), or "
                          f"set model.context_dim: null")


def check_text_model(config: Config) -> None:
    """A text model's encoder is there and fits: the bundled all-MiniLM-L6-v2 is installed, or the folder of
    ``model.text_encoder`` is a text encoder of width ``model.context_dim`` with ``model.text_max_tokens``
    positions (read from its config.json; the weights load when stage 2 starts). ConfigError otherwise."""
    m = config.model
    if not m.context_dim:
        return
    try:
        if m.text_encoder == MINILM:
            bundled_model_dir()
        else:
            check_text_encoder(m.text_encoder, m.context_dim, m.text_max_tokens)
            if importlib.util.find_spec("transformers") is None:
                raise ImportError(f"model.text_encoder {m.text_encoder!r} is loaded with the package transformers; "
                                  f"install it with: pip install 'ul-fast[text]'")
    except (ImportError, ValueError) as error:
        raise ConfigError(str(error)) from None


def check_latent_training(config: Config) -> None:
    """A latent cache (``data.dataset: latents:DIR``) holds stage 2's inputs only: the run must skip stage 1 and
    start from the stage-1 run whose encoder wrote the cache."""
    t = config.train
    where = f"data.dataset {config.data.dataset!r} is a latent cache (stage 2 only)"
    if t.stage1_steps != 0 or not t.init_from:
        raise ConfigError(f"{where}: set train.stage1_steps: 0 and train.init_from: RUN, the stage-1 run whose "
                          f"encoder wrote the cache (got stage1_steps {t.stage1_steps}, init_from {t.init_from!r})")
    if t.stage2_steps < 1:
        raise ConfigError(f"{where}: set train.stage2_steps > 0 (got {t.stage2_steps})")
    if config.model.mode != TWO_STAGE:
        raise ConfigError(f"{where}: model.mode must be two_stage (got {config.model.mode!r})")


def _check_augmentation(config: Config) -> None:
    d = config.data
    if spec_kind(d.dataset) == "latents" and (d.crop != "center" or d.flip):
        raise ConfigError(f"data.crop {d.crop!r} / data.flip {d.flip} do not apply to a latent cache "
                          f"({d.dataset!r}): flipped latents are encoded ahead (ul-fast encode --flip)")
    if not is_streaming(d.dataset) and (d.crop != "center" or d.flip):
        raise ConfigError(f"data.crop {d.crop!r} / data.flip {d.flip} augment streamed images, but data.dataset "
                          f"{d.dataset!r} is loaded into memory already cropped and resized: use data.crop: "
                          f"center and data.flip: false, or a streaming spec (folder-stream:DIR, shards:DIR)")


INIT_FROM_KEYS = ("image_size", "image_channels", "latent_channels", "latent_logsnr_0", "prediction", "mode",
                  "latent_prior", "decoder_loss")
"""``model.*`` keys a run must share with its ``train.init_from`` run: what the loaded networks were trained on and
for. Several leave every weight's shape as it is (a ResNet encoder reads images of any size), so the weights
would load and silently mean something else."""


def check_init_from(config: Config) -> None:
    """Raise :class:`ConfigError` when ``train.init_from`` names a run trained with other :data:`INIT_FROM_KEYS`."""
    run = config.train.init_from
    if not run:
        return
    source = load_run_config(run).model
    for key in INIT_FROM_KEYS:
        theirs, ours = getattr(source, key), getattr(config.model, key)
        if theirs != ours:
            raise ConfigError(f"train.init_from {run} was trained with model.{key} {theirs!r}, but this config has "
                              f"{ours!r}: its networks would be used for what they were not trained on; set "
                              f"model.{key}: {theirs!r}, or train stage 1 anew")


def check_run_inputs(config: Config, train_data: ImageArrayDataset | Any, test_data: ImageArrayDataset) -> None:
    """Check the loaded data fits ``config`` and the device exists; raise :class:`ConfigError` naming the key.

    ``train_data``: in memory, or a streaming source (decoded-image source: its images are cropped and resized
    to ``model.image_size`` as they are read, so only its labels are checked).

    Also warns (``UserWarning``, one line) when a small data set is about to train paper-size networks,
    usually a user YAML that sets a few keys and inherits the ImageNet-512 defaults (see ``extends``), and when
    the data has no test split of its own (its "held-out" evaluations are then on training images)."""
    check_device(config.train.device)
    _check_augmentation(config)
    check_text_model(config)
    check_init_from(config)
    for split, data in (("train", train_data), ("test", test_data)):
        if isinstance(data, ImageArrayDataset):
            _check_images(config, data, split)
        _check_labels(config, data, split)
    if config.data.flip and mentions_left_or_right(getattr(train_data, "captions", None)):
        warnings.warn(f"data.flip mirrors the images of {config.data.dataset!r}, whose captions speak of left and "
                      f"right: a flipped image contradicts its caption; set data.flip: false", UserWarning,
                      stacklevel=2)
    small = len(train_data) < SMALL_DATA_IMAGES or config.model.image_size <= 64
    if small and (count := parameter_count(config)) > LARGE_MODEL_PARAMETERS:
        warnings.warn(f"{count / 1e6:.0f} M parameters for {len(train_data)} training images of "
                      f"{config.model.image_size}x{config.model.image_size}: these are paper-size networks "
                      f"(the defaults); start the YAML with 'extends: tiny' (or fmnist) for small ones",
                      UserWarning, stacklevel=2)
    if not splits_apart(config.data.dataset):
        warnings.warn(f"data.dataset {config.data.dataset!r} serves the same images as its training and test splits: "
                      f"the held-out bits/pixel and PSNR of the evaluations are measured on training images (give "
                      f"the data train/ and test/ folders, or train_images and test_images in the .npz)",
                      UserWarning, stacklevel=2)
