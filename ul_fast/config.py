"""Run configuration: dataclasses, loaded from YAML (shipped presets or a user's file) with
``a.b=value`` overrides, strictly validated (unknown keys and bad values are errors that name the key).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ul_fast.diffusion import PREDICTIONS, SCHEDULE_KINDS
from ul_fast.sampling import SAMPLERS

TWO_STAGE, SINGLE_STAGE = "two_stage", "single_stage"
MODES = (TWO_STAGE, SINGLE_STAGE)
"""``model.mode``: two_stage (prior in stage 1, base model in stage 2) or single_stage (paper App. B: the
base model trains with encoder and decoder in stage 1, and there is no stage 2)."""


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
    # Text conditioning (base model): 384 = all-MiniLM-L6-v2 (extra ul-fast[text]); None = no text.
    context_dim: int | None = None
    text_max_tokens: int = 16
    # One of MODES. single_stage trains the base model with encoder and decoder, each example up to a
    # maximum log-SNR ~ Logistic(base_bias, 1) truncated at latent_logsnr_0.
    mode: str = TWO_STAGE


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"
    batch_size: int = 64
    stage1_steps: int = 2000
    stage2_steps: int = 1000
    lr: float = 5e-4
    base_lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    grad_accumulation: int = 1
    ema_decay: float = 0.999
    precision: str = "auto"
    compile: bool = False
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
    dataset: str = "fmnist-embedded"


@dataclass
class SampleConfig:
    sampler: str = "ddim"
    latent_steps: int = 32
    decoder_steps: int = 32
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


def _read_yaml(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
    else:
        resource = resources.files("ul_fast.configs") / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise ConfigError(f"unknown config {name_or_path!r}: not a file, and not a preset "
                              f"({', '.join(preset_names())})")
        text = resource.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {name_or_path}: the top level must be a mapping")
    return data


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


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict in place; an old key sets its new key."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.sub=value")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if key in DEPRECATED_KEYS:
        key = _warn_deprecated(key)
    *parents, name = key.split(".")
    _section(data, parents, f"override {key}")[name] = yaml.safe_load(raw)


def load_config(name_or_path: str = "tiny", overrides: list[str] | None = None) -> Config:
    """A preset name (``tiny``, ``fmnist``, …) or a YAML path, then ``overrides``; validated."""
    data = _rename_deprecated_keys(_read_yaml(name_or_path))
    for assignment in overrides or []:
        apply_override(data, assignment)
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> Config:
    """A validated :class:`Config` from nested dicts (as read from YAML); reads deprecated keys too."""
    return _from_dict(Config, _rename_deprecated_keys(data)).validate()


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: Config) -> None:
    m, t, s = config.model, config.train, config.sample
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
    _require(m.context_dim in (None, 384),
             f"model.context_dim must be null or 384 (all-MiniLM-L6-v2), got {m.context_dim}")
    _require(m.text_max_tokens > 0, "model.text_max_tokens must be > 0")
    _require(m.mode in MODES, f"model.mode must be one of {MODES}, got {m.mode!r}")
    _require(m.mode == TWO_STAGE or t.stage2_steps == 0,
             "model.mode single_stage trains the base model in stage 1: set train.stage2_steps to 0")
    for name in ("encoder", "prior", "decoder", "base"):
        _require(getattr(m, name).patch >= 1, f"model.{name}.patch must be >= 1, got {getattr(m, name).patch}")
    for name in ("prior", "decoder", "base"):
        _require(getattr(m, name).head_dim >= 1, f"model.{name}.head_dim must be >= 1")
    _require(len(m.encoder.channels) == len(m.encoder.blocks_per_stage) and len(m.encoder.channels) > 0,
             "model.encoder.channels and blocks_per_stage must be non-empty and of the same length")
    factor = m.encoder.patch * 2 ** (len(m.encoder.channels) - 1)
    _require(m.image_size % factor == 0,
             f"model.image_size {m.image_size} must be divisible by the encoder's downsampling factor {factor}")
    for name in ("prior", "base"):
        vit = getattr(m, name)
        _require(len(vit.widths) == len(vit.depths) and len(vit.widths) > 0,
                 f"model.{name}.widths and depths must be non-empty and of the same length")
        _require(all(w % vit.head_dim == 0 for w in vit.widths),
                 f"model.{name}.widths must be multiples of head_dim {vit.head_dim}")
    _require(len(m.decoder.conv_channels) > 0, "model.decoder.conv_channels must be non-empty")
    _require(m.decoder.width % m.decoder.head_dim == 0,
             f"model.decoder.width {m.decoder.width} must be a multiple of head_dim {m.decoder.head_dim}")
    dec_factor = m.decoder.patch * 2 ** len(m.decoder.conv_channels)
    _require(m.image_size % dec_factor == 0,
             f"model.image_size {m.image_size} must be divisible by the decoder's patch·2^stages = {dec_factor}")
    _require(t.batch_size > 0 and t.grad_accumulation > 0, "train.batch_size and grad_accumulation must be > 0")
    _require(t.stage1_steps >= 0 and t.stage2_steps >= 0, "train.stage1_steps and stage2_steps must be >= 0")
    _require(t.lr > 0 and t.base_lr > 0, "train.lr and train.base_lr must be > 0")
    _require(0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    _require(t.precision in ("auto", "fp32", "bf16"), "train.precision must be auto, fp32 or bf16")
    _require(t.keep_last >= 1, "train.keep_last must be >= 1")
    _require(t.parallel in ("ddp", "fsdp"), f"train.parallel must be ddp or fsdp, got {t.parallel!r}")
    _require(t.stage1_steps > 0 or not t.stage2_steps or t.init_from is not None,
             "train.stage1_steps is 0: stage 2 alone needs train.init_from (a run with a trained stage 1)")
    _require(t.log_every > 0 and t.eval_every > 0 and t.checkpoint_every > 0,
             "train.log_every, eval_every and checkpoint_every must be > 0")
    _require(s.sampler in SAMPLERS, f"sample.sampler must be one of {SAMPLERS}, got {s.sampler!r}")
    _require(s.latent_steps > 0 and s.decoder_steps > 0, "sample.latent_steps and decoder_steps must be > 0")
    _require(len(s.guidance_interval) == 2, "sample.guidance_interval must be [min_logsnr, max_logsnr]")
