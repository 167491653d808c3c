"""A diffusers autoencoder whose latents are Unified Latents' (the extra ``ul-fast[diffusers]``).

:class:`AutoencoderUL` speaks the interface latent-diffusion code written for diffusers' ``AutoencoderKL`` uses,
so a diffusers training or sampling script swaps its VAE for UL's::

    vae = AutoencoderUL.from_ul("fmnist-tiny")                 # or a run / exported folder; or from_pretrained(DIR)
    latents = vae.encode(images).latent_dist.sample(generator) * vae.config.scaling_factor
    images = vae.decode(latents / vae.config.scaling_factor).sample

* ``encode(x).latent_dist`` is UL's actual posterior, the noisy latent the decoder was trained on:
  ``z_0 ~ N(α_0·z_clean, σ_0²·I)`` at ``λ_z(0)`` (``α_0² = sigmoid(λ_z(0))``, ``σ_0² = sigmoid(−λ_z(0))``; a
  single-stage model's sampling level instead), as a diffusers ``DiagonalGaussianDistribution``: ``.sample()``
  draws ``z_0``, ``.mode()`` and ``.mean`` are ``α_0·z_clean``, ``.std`` is ``σ_0``, ``.kl()`` is its KL to
  N(0, I). ``z_clean`` itself is ``latent_dist.z_clean``.
* ``decode(z).sample`` runs UL's diffusion decoder (``config.decoder_steps`` steps of ``config.sampler``, or
  ``num_inference_steps``), noise from ``generator``: the images are samples, not a deterministic function of z.
* ``config.scaling_factor`` defaults to 1: the latents as ul_fast's own base model trains on them, unscaled (its
  schedule reaches λ = −15, where their scale no longer matters). UL does not make them unit-variance (the
  shipped fmnist-tiny's ``z_0`` has std 0.24): for a scheduler built for unit-variance data, set it to
  :meth:`AutoencoderUL.estimate_scaling_factor` of your training images, as Stable Diffusion's VAE does.
* ``save_pretrained(DIR)`` / ``from_pretrained(DIR)`` are diffusers' own (config.json and
  diffusion_pytorch_model.safetensors); the folder holds the encoder and decoder only. Weights in bf16 or fp16
  (``torch_dtype=``, ``.to(dtype)``) compute under autocast and return images in that dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import torch

try:
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
except ImportError as error:  # an optional extra: say which
    raise ImportError(f"ul_fast.api.diffusers_vae needs diffusers: pip install 'ul-fast[diffusers]' ({error})"
                      ) from None

from ul_fast.api.sources import open_model
from ul_fast.config import ConfigError, config_from_dict
from ul_fast.diffusion import alpha_sigma
from ul_fast.model import UnifiedLatents
from ul_fast.sampling import SAMPLERS, SPACINGS

__all__ = ["AutoencoderUL", "UnifiedLatentDistribution"]


class UnifiedLatentDistribution(DiagonalGaussianDistribution):
    """UL's posterior ``q(z_0 | x) = N(α·z_clean, σ²·I)`` at log-SNR ``logsnr`` (``λ_z(0)``), as diffusers'
    diagonal Gaussian: ``mean = α·z_clean``, ``std = σ`` exactly as UL's noise injection computes them
    (``logvar = log σ²``), ``sample(generator) = mean + std·ε``. ``z_clean [B, C_z, h, w]``: the encoder's output."""

    def __init__(self, z_clean: torch.Tensor, logsnr: float):
        alpha, sigma = alpha_sigma(torch.tensor(logsnr))
        mean = alpha.to(z_clean) * z_clean
        logvar = torch.full_like(mean, 2.0 * math.log(float(sigma)))
        super().__init__(torch.cat([mean, logvar], dim=1))
        self.std = torch.full_like(mean, float(sigma))
        self.var = self.std.square()
        self.z_clean, self.logsnr = z_clean, logsnr


class AutoencoderUL(ModelMixin, ConfigMixin):
    """UL's encoder and diffusion decoder behind diffusers' ``AutoencoderKL`` interface (module docstring).

    Config: ``ul_model_config`` (ul_fast's ``model:`` config, as in an export's config.json), ``scaling_factor``,
    ``shift_factor`` (None: no shift), ``decoder_steps``, ``sampler``, ``spacing`` (the decoder's sampling), and
    what pipelines read, derived from the model: ``in_channels``, ``out_channels``, ``latent_channels``,
    ``sample_size``, ``force_upcast`` (True: a pipeline running in fp16 keeps this model in fp32).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, ul_model_config: dict | None = None, scaling_factor: float = 1.0,
                 shift_factor: float | None = None, decoder_steps: int = 32, sampler: str = "ddim",
                 spacing: str = "time", in_channels: int | None = None, out_channels: int | None = None,
                 latent_channels: int | None = None, sample_size: int | None = None, force_upcast: bool = True):
        super().__init__()
        if not isinstance(ul_model_config, dict):
            raise ValueError("ul_model_config must be ul_fast's model config as a dict (use AutoencoderUL.from_ul or "
                             "from_pretrained)")
        try:
            model_config = config_from_dict({"model": ul_model_config}).model
        except ConfigError as error:
            raise ValueError(f"ul_model_config: {error}") from None
        if sampler not in SAMPLERS or spacing not in SPACINGS or decoder_steps < 1:
            raise ValueError(f"sampler must be one of {SAMPLERS}, spacing one of {SPACINGS}, decoder_steps >= 1; got "
                             f"{sampler!r}, {spacing!r}, {decoder_steps}")
        self.ul = UnifiedLatents(model_config)
        self.ul.prior = self.ul.base = None  # an autoencoder: encoder and decoder only
        derived = {"in_channels": model_config.image_channels, "out_channels": model_config.image_channels,
                   "latent_channels": model_config.latent_channels, "sample_size": model_config.image_size}
        for key, value in derived.items():
            given = {"in_channels": in_channels, "out_channels": out_channels, "latent_channels": latent_channels,
                     "sample_size": sample_size}[key]
            if given is not None and given != value:
                raise ValueError(f"{key} is {given}, but ul_model_config gives {value}")
        self.register_to_config(**derived)

    @classmethod
    def from_ul(cls, source: str | Path, scaling_factor: float = 1.0, **config) -> AutoencoderUL:
        """The encoder and decoder of ``source`` (a run folder, an exported folder or a shipped model's name, as
        for ``ul_fast.load``); the decoder samples with the source's defaults unless ``config`` says otherwise."""
        opened = open_model(source)
        s = opened.config.sample
        settings = {"decoder_steps": s.decoder_steps, "sampler": s.sampler, "spacing": s.spacing, **config}
        vae = cls(ul_model_config=dataclasses.asdict(opened.config.model), scaling_factor=scaling_factor, **settings)
        vae.ul.encoder.load_state_dict(opened.model.encoder.state_dict())
        vae.ul.decoder.load_state_dict(opened.model.decoder.state_dict())
        return vae.eval()

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> AutoencoderUL:
        """diffusers' ``from_pretrained``; with ``torch_dtype`` the networks' non-persistent buffers (position
        tables, Fourier frequencies), which diffusers leaves in fp32, are cast too, as ``.to(dtype)`` casts them."""
        model = super().from_pretrained(*args, **kwargs)
        return torch.nn.Module.to(model, model.dtype)  # nn.Module's: ModelMixin.to warns about fp32 modules

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """``x [B, C, H, W]`` in [−1, 1] → UL's posterior over ``z_0`` (:class:`UnifiedLatentDistribution`)."""
        with self._autocast():
            z_clean = self.ul.encode(x.to(self.dtype)).to(self.dtype)
        posterior = UnifiedLatentDistribution(z_clean, self.ul.sample_logsnr)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None,
               num_inference_steps: int | None = None) -> DecoderOutput | tuple:
        """Noisy latents ``z_0 [B, C_z, h, w]`` → images in [−1, 1] by UL's diffusion decoder. ``generator``: one
        for the batch, or a list of one per image (diffusers' convention)."""
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or tuple(z.shape[1:]) != self.ul.latent_shape:
            raise ValueError(f"z must be latents of shape [B, {', '.join(map(str, self.ul.latent_shape))}], got "
                             f"{tuple(getattr(z, 'shape', ())) or type(z).__name__}")
        steps = num_inference_steps or self.config.decoder_steps
        z = z.to(self.dtype)
        if isinstance(generator, list) and len(generator) != z.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {z.shape[0]} latents")
        with self._autocast():
            if isinstance(generator, list):
                images = torch.cat([self.ul.decode(z[i:i + 1], steps, self.config.sampler, g,
                                                   spacing=self.config.spacing) for i, g in enumerate(generator)])
            else:
                images = self.ul.decode(z, steps, self.config.sampler, generator, spacing=self.config.spacing)
        images = images.to(self.dtype)
        return DecoderOutput(sample=images) if return_dict else (images,)

    @torch.no_grad()
    def estimate_scaling_factor(self, images: torch.Tensor, generator: torch.Generator | None = None,
                                batch_size: int = 256) -> float:
        """``1 / std`` of posterior samples ``z_0`` of ``images`` (all elements pooled): the ``scaling_factor`` that
        gives the scaled latents unit variance (Rombach et al. 2022, §4.3.2). Set it with
        ``vae.register_to_config(scaling_factor=vae.estimate_scaling_factor(images))``."""
        samples = torch.cat([self.encode(images[a:a + batch_size]).latent_dist.sample(generator).float()
                             for a in range(0, len(images), batch_size)])
        return float(1.0 / samples.std())

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Weights cast to bf16/fp16 (``.to(dtype)``, ``torch_dtype=``) compute under autocast: UL's samplers keep
        their state in fp32, which the networks then read in the weights' precision."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None) -> DecoderOutput | tuple:
        """Encode, take ``z_0`` (a posterior sample, or its mode), decode: a reconstruction."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict, generator=generator)
