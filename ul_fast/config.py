"""Run configuration: dataclasses, loaded from YAML (shipped presets or a user's file) with
``a.b=value`` overrides, strictly validated (unknown keys and bad values are errors that name the key).

A YAML file may start from a preset or another file with a top-level ``extends`` key, and set only what
differs::

    extends: tiny            # a preset name, or a YAML path relative to this file
    train: {stage1_steps: 500}

The file it names is read first (itself possibly extending another; a cycle is an error), then this
file's keys are merged over it: sections merge key by key, any other value (lists too) replaces the
inherited one. Without ``extends`` the unset keys keep the dataclass defaults below, which are the paper's
ImageNet-512 networks (720 M parameters). A run folder's ``config.yaml`` is saved fully resolved.

Everything the configuration alone decides is checked by :func:`validate` when it is loaded; what needs the
data or the machine (labels, image size, CUDA) is checked by ``ul_fast.train.preflight`` before training.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ul_fast.diffusion import PREDICTIONS, SCHEDULE_KINDS
from ul_fast.files import write_atomically
from ul_fast.sampling import SAMPLERS, SPACINGS

TWO_STAGE, SINGLE_STAGE = "two_stage", "single_stage"
MODES = (TWO_STAGE, SINGLE_STAGE)
"""``model.mode``: two_stage (prior in stage 1, base model in stage 2) or single_stage (paper App. B: the
base model trains with encoder and decoder in stage 1, and there is no stage 2)."""
LATENT_PRIORS = ("diffusion", "normal")
"""``model.latent_prior``: the diffusion prior of the method, or N(0, I) (a VAE; paper Tab. 5 row 3)."""
DECODER_LOSSES = ("diffusion", "mse")
"""``model.decoder_loss``: the diffusion decoder of the method, or a deterministic Gaussian decoder (Tab. 5
row 2)."""
CROPS = ("center", "random")
"""``data.crop``: how a streamed image is cut to a square before it is resized (``ul_fast.data.augment``)."""
BAD_IMAGE_POLICIES = ("skip", "fail")
"""``data.on_bad_image``: what a streamed image whose bytes do not decode does (``ul_fast.data.loader``)."""
CAPTION_POLICIES = ("skip", "empty", "fail")
"""``data.caption_policy``: what an image without a caption (none given, or only empty ones) does in a text model's
data (``ul_fast.data.caption_data``): left out, trained with the empty caption, or an error before training."""
NULL_CAPTIONS = ("empty", "zeros")
"""``model.null_caption``: the unconditional text input of classifier-free guidance: the text encoder's embedding
of the empty caption "", or all-zero token states and pooled vector."""
MINILM = "minilm"
"""``model.text_encoder`` of the bundled all-MiniLM-L6-v2 (384-dimensional)."""


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


@dataclass
class EncoderConfig:
    channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    blocks_per_stage: list[int] = field(default_factory=lambda: [2, 2, 2, 3])
    patch: int = 2


@dataclass
class ViTConfig:
    widths: list[int] = field(default_factory=lambda: [1024])
    depths: list[int] = field(default_factory=lambda: [8])
    head_dim: int = 64
    patch: int = 1
    mlp_ratio: float = 4.0
    dropout: float = 0.0


@dataclass
class DecoderConfig:
    patch: int = 2
    conv_channels: list[int] = field(default_factory=lambda: [128, 256, 512])
    blocks_per_stage: int = 2
    width: int = 1024
    depth: int = 8
    head_dim: int = 64
    mlp_ratio: float = 4.0
    dropout: float = 0.1


@dataclass
class LossWeighting:
    """Sigmoid loss weighting ``w(λ) = factor · sigmoid(bias − λ)`` (``c_lf`` and ``b`` in the paper)."""

    factor: float = 1.5
    bias: float = 0.0


@dataclass
class ModelConfig:
    image_size: int = 32
    image_channels: int = 1
    latent_channels: int = 4
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    prior: ViTConfig = field(default_factory=ViTConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    base: ViTConfig = field(default_factory=lambda: ViTConfig(widths=[512, 1024], depths=[6, 16], dropout=0.1))
    # The single λ_z(0): encoder noise level and the prior's (and base model's) maximum log-SNR.
    latent_logsnr_0: float = 5.0
    latent_logsnr_min: float = -15.0
    pixel_logsnr_min: float = -15.0
    pixel_logsnr_max: float = 15.0
    latent_schedule: str = "cosine"
    pixel_schedule: str = "shifted_cosine"
    pixel_base_resolution: int = 64
    pixel_low_snr_base_resolution: int = 32
    prediction: str = "v"
    # The decoder's loss weighting: a larger factor c_lf buys a latent with more bits (formerly the keys
    # model.loss_factor and model.bias, still read: see DEPRECATED_KEYS).
    decoder_weighting: LossWeighting = field(default_factory=LossWeighting)
    # b_base: the base model's stage-2 loss is weighted by sigmoid(base_bias − λ) (factor 1); in single_stage
    # mode it is the location of each example's maximum latent log-SNR (see mode).
    base_bias: float = 0.0
    num_classes: int = 0
    label_dropout: float = 0.1
    # Text conditioning (base model): the text encoder's width (384 for all-MiniLM-L6-v2); None = no text.
    context_dim: int | None = None
    text_max_tokens: int = 16  # T: captions are padded or truncated to T tokens (special tokens included)
    # minilm (all-MiniLM-L6-v2, extra ul-fast[text]) or the path of a local Hugging Face text encoder folder
    # (BERT-like, T5 or CLIP text tower; its hidden size must be context_dim), loaded offline.
    text_encoder: str = MINILM
    # Probability that a training example's caption is replaced by the null caption (classifier-free guidance);
    # null = label_dropout. Labels and captions are dropped by the same uniform draw.
    caption_dropout: float | None = None
    # One of NULL_CAPTIONS. zeros: what text runs did before this key (so their config.yaml reads unchanged).
    null_caption: str = "zeros"
    # One of MODES. single_stage trains the base model with encoder and decoder, each example up to a
    # maximum log-SNR ~ Logistic(base_bias, 1) clamped at latent_logsnr_0 (the mass above sits at it).
    mode: str = TWO_STAGE
    # single_stage only: the latent log-SNR the decoder receives at sampling (reconstructions add the latent
    # noise of that level, the base model samples down to it); null = latent_logsnr_0.
    single_stage_sample_logsnr: float | None = None
    # The paper's ablations, each off by default (see ul_fast.model.UnifiedLatents):
    # latent_prior (one of LATENT_PRIORS): normal = the latent's rate is KL[q(z_0|x) ‖ N(0, I)], no prior network.
    latent_prior: str = "diffusion"
    # decoder_loss (one of DECODER_LOSSES): mse = a deterministic decoder (one forward pass) trained with the
    # Gaussian negative log-likelihood −log N(x; x̂, mse_decoder_scale²·I) in nats per image (pixels in [−1, 1]).
    decoder_loss: str = "diffusion"
    mse_decoder_scale: float = 0.1
    # true: the latent's rate term does not train the encoder (the decoder's term still does; Tab. 6 A).
    prior_stop_grad: bool = False
    # Weight of the latent's rate in the stage-1 loss: 1 = the method. A small weight with latent_prior normal
    # and decoder_loss mse is the classic VAE of two-stage latent diffusion (preset vae-ldm).
    kl_weight: float = 1.0


@dataclass
class TrainConfig:
    seed: int = 0
    # auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps.
    device: str = "auto"
    batch_size: int = 64
    stage1_steps: int = 2000
    stage2_steps: int = 1000
    lr: float = 5e-4
    base_lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    # Maximum global gradient norm (> 0); .inf turns clipping off.
    grad_clip: float = 1.0
    grad_accumulation: int = 1
    ema_decay: float = 0.999
    precision: str = "auto"
    # torch.compile of each stage's whole loss (networks, ops and losses) as one graph (fullgraph=True).
    compile: bool = False
    # CUDA: capture each stage's whole step (forward, backward, clipping, AdamW, EMA) once per input shape and
    # replay it; one process only. A capture that fails warns once and the step runs eagerly.
    cuda_graph: bool = False
    # Recompute each transformer and residual block's activations in the backward pass instead of storing them:
    # the same values and gradients, less memory for one more forward pass (a larger batch fits).
    activation_checkpointing: bool = False
    # Dense bf16 peak TFLOP/s of one device, for the logged mfu; 0: from ul_fast.train.flops.PEAK_TFLOPS.
    peak_tflops: float = 0.0
    log_every: int = 50
    eval_every: int = 500
    eval_images: int = 16
    checkpoint_every: int = 500
    keep_last: int = 2
    max_bad_steps: int = 10
    progress: bool = True
    # A finished run whose EMA weights initialise this one (e.g. stage 2 alone: stage1_steps: 0).
    init_from: str | None = None
    # Under torchrun: ddp (replicated weights) or fsdp (FSDP2 fully_shard, for configs too large to replicate).
    parallel: str = "ddp"


@dataclass
class DataConfig:
    # A spec string (ul_fast.data.spec): in memory (fmnist-embedded, fmnist[:DIR], folder:DIR, array:FILE) or
    # streamed from disk (folder-stream:DIR, shards:DIR, latents:DIR).
    dataset: str = "fmnist-embedded"
    # Streamed images only (in-memory data is already center-cropped and resized when it is loaded):
    # crop (one of CROPS): the square of the shorter side at the center, or at a random position per example.
    crop: str = "center"
    flip: bool = False  # horizontal flip of each training example with probability 1/2
    # Streamed data only: decoding processes per rank (0: in the training process) and batches each prepares
    # ahead. Neither changes the batches.
    num_workers: int = 0
    prefetch_factor: int = 2
    # An image whose bytes do not decode (one of BAD_IMAGE_POLICIES): skip = replace it by the next one that
    # does, with a warning and a count in the metrics (bad_images); fail = stop the run, naming the file.
    on_bad_image: str = "skip"
    # A text model's image without a caption (one of CAPTION_POLICIES): skip = leave it out, empty = train it
    # with the empty caption, fail = stop before training, naming such images. Counted and named either way.
    caption_policy: str = "fail"


@dataclass
class SampleConfig:
    sampler: str = "ddim"  # ddim | ancestral | dpmpp_2m | heun (heun: two network evaluations per step)
    # The decoder's sampler; null = sampler. A distilled decoder (ul-fast distill) records ddim here.
    decoder_sampler: str | None = None
    latent_steps: int = 32
    decoder_steps: int = 32
    spacing: str = "time"  # step grid: time (uniform in the schedule's t) | logsnr (uniform in λ)
    cuda_graph: bool = False  # on CUDA, replay one captured network call per step (ul_fast.sampling.cuda_graph)
    # Classifier-free guidance scale w >= 0: 1 = none, 0 = unconditional.
    guidance: float = 1.0
    guidance_interval: list[float] = field(default_factory=lambda: [-15.0, 15.0])
    grid_images: int = 64


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> Config:
        """Check value ranges and cross-field consistency; returns self."""
        validate(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value to the dataclass field's type, or raise naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(annotation, value, key + ".")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        is_integer_text = isinstance(value, str) and value.lstrip("-").isdigit()
        if isinstance(value, bool) or not (isinstance(value, int) or is_integer_text):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if annotation is float:
        try:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"{prefix.rstrip('.') or 'top level'} accepts: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def preset_names() -> list[str]:
    """Names of the YAML presets shipped in ``ul_fast/configs``."""
    return sorted(p.name[:-5] for p in resources.files("ul_fast.configs").iterdir() if p.name.endswith(".yaml"))


DEPRECATED_KEYS = {"model.loss_factor": "model.decoder_weighting.factor", "model.bias": "model.decoder_weighting.bias"}
"""Old key → new key. Old keys are still read, with a FutureWarning, in YAML files and dicts (run folders
saved before the rename) and in overrides (where an old key sets its new key). A file or dict that gives
both, with different values, is an error."""


def _warn_deprecated(old: str) -> str:
    """The new name of the deprecated key ``old``, after a FutureWarning that names it."""
    new = DEPRECATED_KEYS[old]
    warnings.warn(f"{old} is deprecated: use {new}", FutureWarning, stacklevel=4)
    return new


def _section(data: dict[str, Any], parts: list[str], where: str) -> dict[str, Any]:
    """The nested dict of ``data`` at ``parts``, created where missing; ``where`` starts the error message."""
    node = data
    for part in parts:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {part} is not a section")
    return node


def _rename_deprecated_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with each old key of :data:`DEPRECATED_KEYS` moved to its new key."""
    data = copy.deepcopy(data)
    for old, new in DEPRECATED_KEYS.items():
        *old_parents, old_name = old.split(".")
        holder = data
        for part in old_parents:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if not isinstance(holder, dict) or old_name not in holder:
            continue
        _warn_deprecated(old)
        value = holder.pop(old_name)
        *parents, name = new.split(".")
        section = _section(data, parents, new)
        if name in section and section[name] != value:
            raise ConfigError(f"{old} ({value!r}) and {new} ({section[name]!r}) are both given and differ: "
                              f"keep only {new}")
        section[name] = value
    return data


def _yaml_mapping(text: str, where: str) -> dict[str, Any]:
    """Parse YAML ``text`` whose top level must be a mapping; a syntax error names ``where`` and the line."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: {_yaml_problem(error)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping")
    return data


def _yaml_problem(error: yaml.YAMLError) -> str:
    """``invalid YAML at line L, column C: <problem>`` (1-based), from a PyYAML error."""
    mark = getattr(error, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"invalid YAML{at}: {getattr(error, 'problem', None) or error}"


def _find_yaml(name_or_path: str, folder: Path | None) -> tuple[str, Path | None, str]:
    """``(source, its folder, text)`` of a YAML path (relative to ``folder`` when given, else to the working
    directory) or a preset name; ``source`` is the resolved path or ``preset NAME``."""
    path = Path(name_or_path)
    if folder is not None and not path.is_absolute():
        path = folder / path
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return str(path.resolve()), path.resolve().parent, path.read_text()
    resource = resources.files("ul_fast.configs") / f"{name_or_path}.yaml"
    if not resource.is_file():
        raise ConfigError(f"unknown config {name_or_path!r}: not a file, and not a preset "
                          f"({', '.join(preset_names())})")
    return f"preset {name_or_path}", None, resource.read_text()


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: sections (mappings) key by key, any other value replaced."""
    merged = dict(base)
    for key, value in over.items():
        inherited = merged.get(key)
        merged[key] = _merge(inherited, value) if isinstance(value, dict) and isinstance(inherited, dict) else value
    return merged


def _read_yaml(name_or_path: str, folder: Path | None = None, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The mapping of a preset or YAML file, its ``extends`` chain resolved (see the module docstring) and
    deprecated keys renamed in every file of it. ``chain``: the files that led here, for the cycle check."""
    source, own_folder, text = _find_yaml(name_or_path, folder)
    if source in chain:
        raise ConfigError(f"config {chain[0]}: extends makes a cycle: {' -> '.join((*chain, source))}")
    data = _rename_deprecated_keys(_yaml_mapping(text, f"config {source}"))
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"config {source}: extends must be a preset name or a YAML path, got {parent!r}")
    return _merge(_read_yaml(parent, own_folder, (*chain, source)), data)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict in place; an old key sets its new key."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.sub=value")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if key in DEPRECATED_KEYS:
        key = _warn_deprecated(key)
    *parents, name = key.split(".")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {assignment!r}: the value of {key} is {_yaml_problem(error)}") from None
    _section(data, parents, f"override {key}")[name] = value


def load_config(name_or_path: str = "tiny", overrides: list[str] | None = None) -> Config:
    """A preset name (``tiny``, ``fmnist``, …) or a YAML path (its ``extends`` chain resolved), then
    ``overrides``; validated."""
    data = _read_yaml(name_or_path)
    for assignment in overrides or []:
        apply_override(data, assignment)
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> Config:
    """A validated :class:`Config` from nested dicts (as read from YAML); reads deprecated keys too."""
    return _from_dict(Config, _rename_deprecated_keys(data)).validate()


def missing_keys(data: dict[str, Any], cls: type = Config, prefix: str = "") -> list[str]:
    """The dotted keys of the config dataclasses that ``data`` (nested dicts, as read from YAML, deprecated keys
    renamed) leaves out, in the dataclasses' order; a section left out counts as all of its keys."""
    missing = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            section = data.get(f.name) if isinstance(data, dict) else None
            missing += missing_keys(section if isinstance(section, dict) else {}, hint, f"{prefix}{f.name}.")
        elif not isinstance(data, dict) or f.name not in data:
            missing.append(prefix + f.name)
    return missing


def read_config_mapping(path: str | Path) -> dict[str, Any]:
    """The nested dicts of a config YAML file as written (no ``extends`` resolved, no defaults filled in), deprecated
    keys renamed; ConfigError naming the file for invalid YAML."""
    return _rename_deprecated_keys(_yaml_mapping(Path(path).read_text(), f"config {path}"))


def save_config(config: Config, path: str | Path) -> None:
    """Write ``config`` fully resolved as YAML, atomically (a kill leaves the old file or the new one)."""
    write_atomically(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


INFINITY_ALLOWED = {"train.grad_clip": (math.inf,), "sample.guidance_interval": (-math.inf, math.inf)}
"""The float keys that may be infinite, and which infinities: no gradient clipping (``.inf``), guidance at every
log-SNR (``[-.inf, .inf]``). Every other float must be finite, and none may be NaN."""


def _float_values(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """``(key, value)`` of every float in a config dataclass tree (each entry of a list of floats too)."""
    found = []
    for f in dataclasses.fields(node):
        key, value = prefix + f.name, getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            found += _float_values(value, key + ".")
        elif isinstance(value, float):
            found.append((key, value))
        elif isinstance(value, list):
            found += [(key, v) for v in value if isinstance(v, float)]
    return found


def _validate_finite(config: Config) -> None:
    """Every float is a number, and finite unless :data:`INFINITY_ALLOWED` says otherwise (e.g. ``train.lr=.inf``
    would turn every weight into NaN at the first step)."""
    for key, value in _float_values(config):
        if not (math.isfinite(value) or value in INFINITY_ALLOWED.get(key, ())):
            allowed = " or ".join(f"{v}" for v in INFINITY_ALLOWED.get(key, ()))
            _require(False, f"{key} must be a finite number{f' (or {allowed})' if allowed else ''}, got {value}")


def validate(config: Config) -> None:
    """Raise :class:`ConfigError`, naming the key, at the first value out of range or inconsistent."""
    _validate_finite(config)
    _validate_model(config.model, config.train)
    _validate_networks(config.model)
    _validate_train(config.train)
    _validate_sample(config.sample)
    _validate_data(config.data)


def _validate_model(m: ModelConfig, t: TrainConfig) -> None:
    _require(m.decoder_weighting.factor > 0,
             f"model.decoder_weighting.factor must be > 0, got {m.decoder_weighting.factor}")
    _require(m.image_channels in (1, 3), f"model.image_channels must be 1 or 3, got {m.image_channels}")
    _require(m.image_size > 0 and m.latent_channels > 0, "model.image_size and model.latent_channels must be > 0")
    _require(m.latent_logsnr_min < m.latent_logsnr_0,
             f"model.latent_logsnr_min ({m.latent_logsnr_min}) must be below latent_logsnr_0 ({m.latent_logsnr_0})")
    _require(m.pixel_logsnr_min < m.pixel_logsnr_max, "model.pixel_logsnr_min must be below pixel_logsnr_max")
    for key in ("latent_schedule", "pixel_schedule"):
        _require(getattr(m, key) in SCHEDULE_KINDS, f"model.{key} must be one of {SCHEDULE_KINDS}")
    _require(m.prediction in PREDICTIONS, f"model.prediction must be one of {PREDICTIONS}, got {m.prediction!r}")
    _require(0 <= m.label_dropout < 1, f"model.label_dropout must be in [0, 1), got {m.label_dropout}")
    _require(m.num_classes >= 0, "model.num_classes must be >= 0")
    _require(m.context_dim is None or m.context_dim > 0, f"model.context_dim must be null or > 0, got {m.context_dim}")
    _require(m.context_dim in (None, 384) or m.text_encoder != MINILM,
             f"model.context_dim must be 384 for model.text_encoder minilm (all-MiniLM-L6-v2), got {m.context_dim}")
    _require(m.text_max_tokens >= 3, f"model.text_max_tokens must be >= 3, got {m.text_max_tokens}")
    _require(bool(m.text_encoder), "model.text_encoder must be minilm or the path of a text encoder folder")
    _require(m.caption_dropout is None or 0 <= m.caption_dropout < 1,
             f"model.caption_dropout must be null or in [0, 1), got {m.caption_dropout}")
    _require(m.null_caption in NULL_CAPTIONS,
             f"model.null_caption must be one of {NULL_CAPTIONS}, got {m.null_caption!r}")
    _require(m.mode in MODES, f"model.mode must be one of {MODES}, got {m.mode!r}")
    _require(m.mode == TWO_STAGE or t.stage2_steps == 0,
             "model.mode single_stage trains the base model in stage 1: set train.stage2_steps to 0")
    _require(m.latent_prior in LATENT_PRIORS,
             f"model.latent_prior must be one of {LATENT_PRIORS}, got {m.latent_prior!r}")
    _require(m.decoder_loss in DECODER_LOSSES,
             f"model.decoder_loss must be one of {DECODER_LOSSES}, got {m.decoder_loss!r}")
    _require(m.mse_decoder_scale > 0 and math.isfinite(m.mse_decoder_scale),
             f"model.mse_decoder_scale must be a finite number > 0, got {m.mse_decoder_scale}")
    _require(m.kl_weight > 0 and math.isfinite(m.kl_weight),
             f"model.kl_weight must be a finite number > 0, got {m.kl_weight}")
    _require(m.latent_prior == "diffusion" or m.mode == TWO_STAGE,
             "model.latent_prior normal has no network to train with the decoder: model.mode single_stage needs "
             "model.latent_prior diffusion")
    _require(not m.prior_stop_grad or m.latent_prior == "diffusion",
             "model.prior_stop_grad needs model.latent_prior diffusion (a normal prior has no network: its rate "
             "term would train nothing)")
    level = m.single_stage_sample_logsnr
    if level is not None:
        _require(m.mode == SINGLE_STAGE,
                 f"model.single_stage_sample_logsnr applies to model.mode single_stage only (got mode {m.mode!r})")
        _require(m.latent_logsnr_min < level <= m.latent_logsnr_0,
                 f"model.single_stage_sample_logsnr ({level}) must be in (latent_logsnr_min, latent_logsnr_0] = "
                 f"({m.latent_logsnr_min}, {m.latent_logsnr_0}]")


def _validate_networks(m: ModelConfig) -> None:
    """The sizes the four networks check when built, with the config key in the message (patch and
    head_dim first, as later checks divide by them)."""
    for name in ("encoder", "prior", "decoder", "base"):
        _require(getattr(m, name).patch >= 1, f"model.{name}.patch must be >= 1, got {getattr(m, name).patch}")
    for name in ("prior", "decoder", "base"):
        net = getattr(m, name)
        _require(net.head_dim >= 1, f"model.{name}.head_dim must be >= 1")
        _require(net.mlp_ratio > 0, f"model.{name}.mlp_ratio must be > 0, got {net.mlp_ratio}")
        _require(0 <= net.dropout < 1, f"model.{name}.dropout must be in [0, 1), got {net.dropout}")
    _require(len(m.encoder.channels) == len(m.encoder.blocks_per_stage) and len(m.encoder.channels) > 0,
             "model.encoder.channels and blocks_per_stage must be non-empty and of the same length")
    _require(all(c > 0 for c in m.encoder.channels) and all(b >= 0 for b in m.encoder.blocks_per_stage),
             "model.encoder.channels must be > 0 and blocks_per_stage >= 0")
    factor = m.encoder.patch * 2 ** (len(m.encoder.channels) - 1)
    _require(m.image_size % factor == 0,
             f"model.image_size {m.image_size} must be divisible by the encoder's downsampling factor {factor}")
    latent_grid = m.image_size // factor
    for name in ("prior", "base"):
        vit = getattr(m, name)
        _require(len(vit.widths) == len(vit.depths) and len(vit.widths) > 0,
                 f"model.{name}.widths and depths must be non-empty and of the same length")
        _require(all(w > 0 for w in vit.widths) and all(d >= 0 for d in vit.depths),
                 f"model.{name}.widths must be > 0 and depths >= 0")
        _require(all(w % vit.head_dim == 0 for w in vit.widths),
                 f"model.{name}.widths must be multiples of head_dim {vit.head_dim}")
        _require(vit.widths[0] % 4 == 0, f"model.{name}.widths[0] must be a multiple of 4 (2-D sin-cos positions)")
        _require(all(d % 2 == 0 for d in vit.depths[:-1]),
                 f"model.{name}.depths must be even but for the last level (half down, half up)")
        _require(latent_grid % vit.patch == 0,
                 f"model.{name}.patch {vit.patch} must divide the latent grid {latent_grid} "
                 f"(model.image_size / the encoder's downsampling factor {factor})")
        levels = len(vit.widths)
        _require((latent_grid // vit.patch) % 2 ** (levels - 1) == 0,
                 f"model.{name}: its token grid {latent_grid // vit.patch} cannot be halved {levels - 1} time(s) "
                 f"for the {levels} levels of widths: use fewer levels or a smaller patch")
    d = m.decoder
    _require(len(d.conv_channels) > 0, "model.decoder.conv_channels must be non-empty")
    _require(all(c > 0 for c in d.conv_channels) and d.blocks_per_stage >= 0 and d.depth >= 0,
             "model.decoder.conv_channels must be > 0, blocks_per_stage and depth >= 0")
    _require(d.width > 0 and d.width % 4 == 0,
             f"model.decoder.width must be a positive multiple of 4, got {d.width}")
    _require(d.width % d.head_dim == 0, f"model.decoder.width {d.width} must be a multiple of head_dim {d.head_dim}")
    dec_factor = d.patch * 2 ** len(d.conv_channels)
    _require(m.image_size % dec_factor == 0,
             f"model.image_size {m.image_size} must be divisible by the decoder's patch·2^stages = {dec_factor}")


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
"""Accepted spellings of ``train.device`` (and ``ul-fast sample --device``)."""


def _validate_train(t: TrainConfig) -> None:
    _require(DEVICE_PATTERN.fullmatch(t.device) is not None,
             f"train.device must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}")
    _require(t.seed >= 0, f"train.seed must be >= 0, got {t.seed}")
    _require(t.batch_size > 0 and t.grad_accumulation > 0, "train.batch_size and grad_accumulation must be > 0")
    _require(t.stage1_steps >= 0 and t.stage2_steps >= 0, "train.stage1_steps and stage2_steps must be >= 0")
    _require(t.stage1_steps + t.stage2_steps > 0, "train.stage1_steps and stage2_steps are both 0: nothing to train")
    _require(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _require(t.base_lr > 0, f"train.base_lr must be > 0, got {t.base_lr}")
    _require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _require(t.grad_clip > 0, f"train.grad_clip must be > 0 (.inf: no clipping), got {t.grad_clip}")
    _require(0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    _require(t.precision in ("auto", "fp32", "bf16"), "train.precision must be auto, fp32 or bf16")
    _require(t.keep_last >= 1, "train.keep_last must be >= 1")
    _require(t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    _require(t.parallel in ("ddp", "fsdp"), f"train.parallel must be ddp or fsdp, got {t.parallel!r}")
    _require(math.isfinite(t.peak_tflops) and t.peak_tflops >= 0,
             f"train.peak_tflops must be >= 0 (0: the card's entry in the peak table), got {t.peak_tflops}")
    _require(t.stage1_steps > 0 or not t.stage2_steps or t.init_from is not None,
             "train.stage1_steps is 0: stage 2 alone needs train.init_from (a run with a trained stage 1)")
    _require(t.log_every > 0 and t.eval_every > 0 and t.checkpoint_every > 0,
             "train.log_every, eval_every and checkpoint_every must be > 0")
    _require(t.eval_images > 0, f"train.eval_images must be > 0, got {t.eval_images}")


def _validate_sample(s: SampleConfig) -> None:
    _require(s.sampler in SAMPLERS, f"sample.sampler must be one of {SAMPLERS}, got {s.sampler!r}")
    _require(s.decoder_sampler is None or s.decoder_sampler in SAMPLERS,
             f"sample.decoder_sampler must be null (sample.sampler) or one of {SAMPLERS}, got {s.decoder_sampler!r}")
    _require(s.latent_steps > 0 and s.decoder_steps > 0, "sample.latent_steps and decoder_steps must be > 0")
    _require(s.spacing in SPACINGS, f"sample.spacing must be one of {SPACINGS}, got {s.spacing!r}")
    _require(s.grid_images > 0, f"sample.grid_images must be > 0, got {s.grid_images}")
    _require(s.guidance >= 0, f"sample.guidance must be >= 0 (1: no guidance, 0: unconditional), got {s.guidance}")
    _require(len(s.guidance_interval) == 2 and s.guidance_interval[0] <= s.guidance_interval[1],
             "sample.guidance_interval must be [min_logsnr, max_logsnr]")


def _validate_data(d: DataConfig) -> None:
    _require(d.crop in CROPS, f"data.crop must be one of {CROPS}, got {d.crop!r}")
    _require(d.num_workers >= 0, f"data.num_workers must be >= 0 (0: decode in the training process), got "
                                 f"{d.num_workers}")
    _require(d.prefetch_factor >= 1, f"data.prefetch_factor must be >= 1, got {d.prefetch_factor}")
    _require(d.on_bad_image in BAD_IMAGE_POLICIES,
             f"data.on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {d.on_bad_image!r}")
    _require(d.caption_policy in CAPTION_POLICIES,
             f"data.caption_policy must be one of {CAPTION_POLICIES}, got {d.caption_policy!r}")
