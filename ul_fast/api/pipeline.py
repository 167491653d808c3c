"""``ul_fast.load``: a trained Unified Latents model behind one object, for use from Python.

    import ul_fast
    model = ul_fast.load("fmnist-tiny")              # a run folder, an exported folder or a shipped name
    z = model.encode(images)                         # z_clean [B, C_z, h, w]
    z_0 = model.encode(images, noisy=True, seed=0)   # the noisy latent the decoder reads
    x = model.decode(z_0, steps=32, seed=0)          # images in [-1, 1]
    x = model.sample(10, labels=7, guidance=2.0, seed=0, output="pil")
    bpp = model.bits_per_pixel(images)               # per image, under the prior

Every method runs without gradients, in batches of ``batch_size`` images, under autocast when ``dtype`` is
bf16 or fp16, and draws its randomness from a generator seeded by ``seed`` (default 0): the same call with the
same seed returns the same result (for a given batch size and device). It calls the model's own methods
(:class:`~ul_fast.model.UnifiedLatents` ``encode``, ``noisy_latent``, ``decode``, ``reconstruct``, ``sample``,
``latent_nats``). Images in and out: see :mod:`ul_fast.api.images`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ul_fast.api.images import ImagesIn, ImagesOut, check_output, from_model_images, to_model_images
from ul_fast.api.sources import OpenedModel, open_model
from ul_fast.config import DEVICE_PATTERN, Config
from ul_fast.devices import resolve_device
from ul_fast.eval.evaluate import in_batches
from ul_fast.model import UnifiedLatents
from ul_fast.sampling import SAMPLERS, SPACINGS
from ul_fast.train.preflight import check_device

__all__ = ["COMPUTE_DTYPES", "UnifiedLatentsPipeline", "load"]

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``dtype`` of :func:`load`: the precision the networks compute in (weights stay fp32; bf16 and fp16 run
under ``torch.autocast``, as training does on a GPU)."""

Labels = int | Sequence[int] | torch.Tensor | None
Prompts = str | Sequence[str] | None


def load(source: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32, *,
         batch_size: int = 256, progress: bool = False) -> UnifiedLatentsPipeline:
    """Load a model for use from Python.

    source: a run folder (``ul-fast train``; its newest readable checkpoint's EMA weights), an exported folder
        (``ul-fast export``; every file SHA-256 checked), or the name of a shipped model (``"fmnist-tiny"``).
    device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, ``"auto"`` (CUDA when available) or a torch device.
    dtype: compute precision, ``torch.float32`` / ``"fp32"`` (default), ``torch.bfloat16`` / ``"bf16"`` or
        ``torch.float16`` / ``"fp16"`` (autocast; the weights stay fp32).
    batch_size: images per network batch; progress: show progress bars.
    """
    if isinstance(device, str):
        if DEVICE_PATTERN.fullmatch(device) is None:
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps (or a torch.device), got {device!r}")
        check_device(device, "device")
        device = resolve_device(device)
    return UnifiedLatentsPipeline(open_model(source, device), dtype=dtype, batch_size=batch_size, progress=progress)


class UnifiedLatentsPipeline:
    """A loaded model (see the module docstring); build it with :func:`load`.

    Attributes: ``model`` (the :class:`~ul_fast.model.UnifiedLatents`, eval mode), ``config`` (its
    :class:`~ul_fast.config.Config`: the model, the sampling defaults used when an argument is None),
    ``kind`` and ``path`` (where it came from), ``device``, ``dtype``, ``batch_size``.
    """

    def __init__(self, opened: OpenedModel, *, dtype: str | torch.dtype = torch.float32, batch_size: int = 256,
                 progress: bool = False):
        if isinstance(dtype, str):
            if dtype not in COMPUTE_DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)} (or a torch dtype), got {dtype!r}")
            dtype = COMPUTE_DTYPES[dtype]
        if dtype not in COMPUTE_DTYPES.values():
            raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self._opened = opened
        self.model: UnifiedLatents = opened.model
        self.config: Config = opened.config
        self.kind, self.path = opened.kind, opened.path
        self.device = next(self.model.parameters()).device
        self.dtype, self.batch_size, self.progress = dtype, batch_size, progress

    def __repr__(self) -> str:
        return (f"UnifiedLatentsPipeline({self.kind} {str(self.path)!r}, networks={list(self.networks)}, "
                f"images={list(self.image_shape)}, latents={list(self.latent_shape)}, device={self.device}, "
                f"dtype={self.dtype})")

    # ------------------------------------------------------------------------------------------ description
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the model's images."""
        return self.model.image_shape

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C_z, h, w)`` of its latents."""
        return self.model.latent_shape

    @property
    def networks(self) -> tuple[str, ...]:
        """The networks loaded (an ``encoder-decoder`` export has no prior and no base model)."""
        return self._opened.networks

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional base model (0: none)."""
        return self.config.model.num_classes

    @property
    def card(self) -> str | None:
        """The model card of an exported or shipped model (Markdown), None for a run folder."""
        card = self._opened.card
        return card.read_text() if card is not None and card.is_file() else None

    # ------------------------------------------------------------------------------------------ the calls
    def encode(self, images: ImagesIn, *, noisy: bool = False, seed: int = 0) -> torch.Tensor:
        """Latents of ``images``: ``z_clean = E(x)`` (float32 ``[B, C_z, h, w]`` on the device), or with
        ``noisy=True`` the noisy latent ``z_0 = α_0·z_clean + σ_0·ε`` the decoder reads (at ``λ_z(0)``; a
        single-stage model's sampling level), ε drawn from ``seed``."""
        x = to_model_images(images, self.image_shape)
        generator = self._generator(seed)

        def encode(a: int, b: int) -> torch.Tensor:
            with self._autocast():
                z = self.model.encode(x[a:b].to(self.device)).float()
            if noisy:
                z = self.model.noisy_latent(z, generator=generator, logsnr=self.model.sample_logsnr)
            return z

        return self._batched(encode, len(x), "encoding")

    def decode(self, latents: torch.Tensor | np.ndarray, *, steps: int | None = None, sampler: str | None = None,
               spacing: str | None = None, seed: int = 0, output: str = "tensor") -> ImagesOut:
        """Images of noisy latents ``z_0`` ``[B, C_z, h, w]`` by the diffusion decoder: ``steps`` steps of
        ``sampler`` on ``spacing`` (defaults: the model's sampling config), noise from ``seed``."""
        check_output(output)
        z_0 = self._latents(latents)
        steps, sampler, spacing = self._settings(steps, sampler, spacing, "decoder_steps")
        generator = self._generator(seed)

        def decode(a: int, b: int) -> torch.Tensor:
            with self._autocast():
                return self.model.decode(z_0[a:b], steps, sampler, generator, spacing=spacing).float()

        return from_model_images(self._batched(decode, len(z_0), "decoding"), output)

    def reconstruct(self, images: ImagesIn, *, steps: int | None = None, sampler: str | None = None,
                    spacing: str | None = None, seed: int = 0, output: str = "tensor") -> ImagesOut:
        """Encode, add the latent noise, decode (one generator seeded by ``seed`` for both draws)."""
        check_output(output)
        x = to_model_images(images, self.image_shape)
        steps, sampler, spacing = self._settings(steps, sampler, spacing, "decoder_steps")
        generator = self._generator(seed)

        def reconstruct(a: int, b: int) -> torch.Tensor:
            with self._autocast():
                return self.model.reconstruct(x[a:b].to(self.device), steps, sampler, generator,
                                              spacing=spacing).float()

        return from_model_images(self._batched(reconstruct, len(x), "reconstructing"), output)

    def sample(self, n: int, *, labels: Labels = None, prompts: Prompts = None, guidance: float | None = None,
               steps: int | None = None, latent_steps: int | None = None, decoder_steps: int | None = None,
               sampler: str | None = None, spacing: str | None = None, seed: int = 0,
               output: str = "tensor") -> ImagesOut:
        """Generate ``n`` images: base model → noisy latent → decoder.

        labels (class-conditional models): one class for all, one per image, or None for every class in turn;
        prompts (text models): one caption for all or one per image; guidance: classifier-free guidance scale
        (1: none); steps: both chains' steps, unless ``latent_steps`` / ``decoder_steps`` say otherwise. A model
        whose base model has not trained (stage 2 never ran) samples its stage-1 prior, unconditionally, with a
        warning.
        """
        check_output(output)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        s = self.config.sample
        latent_steps, sampler, spacing = self._settings(steps if latent_steps is None else latent_steps, sampler,
                                                        spacing, "latent_steps")
        decoder_steps, _, _ = self._settings(steps if decoder_steps is None else decoder_steps, sampler, spacing,
                                             "decoder_steps")
        guidance = s.guidance if guidance is None else guidance
        if not isinstance(guidance, (int, float)) or not guidance >= 0:
            raise ValueError(f"guidance must be a number >= 0 (1: no guidance), got {guidance!r}")
        conditioning = self._sampling_conditioning(n, labels, prompts)
        generator = self._generator(seed)

        def generate(a: int, b: int) -> torch.Tensor:
            batch = {k: v[a:b] if isinstance(v, torch.Tensor) else v for k, v in conditioning.items()}
            with self._autocast():
                return self.model.sample(b - a, latent_steps, decoder_steps, sampler, generator, spacing=spacing,
                                         guidance=float(guidance), guidance_interval=tuple(s.guidance_interval),
                                         **batch).float()

        return from_model_images(self._batched(generate, n, "sampling"), output)

    def bits_per_pixel(self, images: ImagesIn, *, network: str | None = None, labels: Labels = None,
                       prompts: Prompts = None, seed: int = 0, repeats: int = 1) -> torch.Tensor:
        """Bits per pixel of each image's noisy latent ``z_0``: its rate ``latent_nats / ln 2 / (H·W)`` under
        the prior (``network="prior"``, the default; the stage-1 loss's ``L_z``) or the base model (``"base"``,
        the default of single-stage models; conditioned on ``labels`` / ``prompts``, else the null condition).

        Returns float64 ``[B]`` on the CPU. Each value is a one-sample Monte-Carlo estimate of the ELBO's integral
        (plus its exact KL term), unbiased but noisy per image: ``repeats`` averages that many draws, and the mean
        over many images is the held-out figure ``ul-fast eval`` reports.
        """
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        network = network or ("base" if self.model.single_stage else "prior")
        if network not in ("prior", "base"):
            raise ValueError(f"network must be 'prior' or 'base', got {network!r}")
        if network == "prior" and self.model.prior is None and not self.model.normal_prior:
            missing = "is single-stage (use network='base')" if self.model.single_stage else "has no prior network " \
                f"(networks: {', '.join(self.networks)}; export with --part all)"
            raise ValueError(f"bits_per_pixel under the prior: this model {missing}")
        if network == "base":
            self._require_base("bits_per_pixel(network='base')")
        x = to_model_images(images, self.image_shape)
        conditioning = self._conditioning(len(x), labels, prompts, default_labels=False) if network == "base" else {}
        generator = self._generator(seed)

        def nats(a: int, b: int) -> torch.Tensor:
            batch = {k: v[a:b] for k, v in conditioning.items()}
            with self._autocast():
                return self.model.latent_nats(x[a:b].to(self.device), network, generator=generator,
                                              **batch).double().cpu()

        total = sum(self._batched(nats, len(x), f"bits/pixel ({network})") for _ in range(repeats))
        return total / repeats / (math.log(2) * self.image_shape[1] * self.image_shape[2])

    # ------------------------------------------------------------------------------------------ helpers
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _generator(self, seed: int) -> torch.Generator:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        return torch.Generator(self.device).manual_seed(seed)

    def _batched(self, function: Callable[[int, int], torch.Tensor], total: int, description: str) -> torch.Tensor:
        with torch.no_grad():
            return in_batches(function, total, self.batch_size, description, self.progress)

    def _settings(self, steps: int | None, sampler: str | None, spacing: str | None,
                  steps_key: str) -> tuple[int, str, str]:
        """Steps, sampler and spacing, each the given one (checked) or the model's sampling default."""
        s = self.config.sample
        steps = getattr(s, steps_key) if steps is None else steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        sampler = s.sampler if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        spacing = s.spacing if spacing is None else spacing
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
        return steps, sampler, spacing

    def _latents(self, latents: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Given latents as float32 ``[B, C_z, h, w]`` on the device, checked."""
        if isinstance(latents, np.ndarray):
            latents = torch.from_numpy(latents)
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError(f"latents must be a float tensor or array [B, C_z, h, w], got "
                            f"{getattr(latents, 'dtype', type(latents).__name__)}")
        z = latents.unsqueeze(0) if latents.dim() == 3 else latents
        if z.dim() != 4 or tuple(z.shape[1:]) != self.latent_shape or z.shape[0] == 0:
            raise ValueError(f"latents must have shape [B, {', '.join(map(str, self.latent_shape))}] (this model's "
                             f"latents), got {tuple(latents.shape)}")
        if not bool(torch.isfinite(z).all()):
            raise ValueError("latents contain non-finite values (NaN or inf)")
        return z.to(self.device, torch.float32)

    def _require_base(self, what: str) -> None:
        if self.model.base is None:
            raise ValueError(f"{what} needs the base model, which this model does not have (networks: "
                             f"{', '.join(self.networks)}); export the run with --part all")

    def _sampling_conditioning(self, n: int, labels: Labels, prompts: Prompts) -> dict:
        """The keyword arguments of ``UnifiedLatents.sample`` for ``n`` images."""
        if self.model.base is not None and self._opened.base_model_trained:
            return self._conditioning(n, labels, prompts, default_labels=True)
        if labels is not None or prompts is not None:
            raise ValueError(f"{self.path} has no trained base model (stage 2 has not run, or it was not exported), "
                             f"and its stage-1 prior is unconditional: drop labels and prompts to sample the prior")
        if self.model.prior is None and not self.model.normal_prior:
            raise ValueError(f"sample needs a base model or a prior; this model has only {', '.join(self.networks)} "
                             f"(export the run with --part all)")
        warnings.warn(f"{self.path} has no trained base model (stage 2 has not run): sampling its stage-1 prior, "
                      f"unconditionally", stacklevel=3)
        return {"use_prior": True}

    def _conditioning(self, n: int, labels: Labels, prompts: Prompts, default_labels: bool) -> dict:
        """``labels`` / ``context`` / ``pooled`` tensors for ``n`` images, checked against the model."""
        m = self.config.model
        inputs: dict[str, torch.Tensor] = {}
        if labels is not None:
            if not m.num_classes:
                raise ValueError("labels: this model is not class-conditional (model.num_classes is 0)")
            tensor = torch.as_tensor(labels)
            if tensor.is_floating_point() or tensor.dtype == torch.bool or tensor.dim() > 1:
                raise ValueError(f"labels must be an integer or a sequence of integers, got {labels!r}")
            tensor = tensor.expand(n) if tensor.dim() == 0 else tensor
            if tensor.shape != (n,):
                raise ValueError(f"labels must be one integer or {n} of them (one per image), got {tensor.shape[0]}")
            if bool(((tensor < 0) | (tensor >= m.num_classes)).any()):
                raise ValueError(f"labels must lie in [0, {m.num_classes}), got {tensor.tolist()}")
            inputs["labels"] = tensor.to(self.device, torch.long)
        elif m.num_classes and default_labels:
            inputs["labels"] = torch.arange(n, device=self.device) % m.num_classes
        if prompts is not None:
            if not m.context_dim:
                raise ValueError("prompts: this model is not text-conditioned (model.context_dim is null)")
            captions = [prompts] * n if isinstance(prompts, str) else list(prompts)
            if len(captions) != n or not all(isinstance(c, str) for c in captions):
                raise ValueError(f"prompts must be one string or {n} strings (one per image)")
            from ul_fast.text import TextEncoder  # the text extra, needed by text models only

            text = TextEncoder(self.device, max_tokens=m.text_max_tokens).encode(captions)
            inputs.update(context=text.tokens, pooled=text.pooled)
        elif m.context_dim and default_labels:
            raise ValueError("this model is text-conditioned: give prompts, e.g. prompts='a photo of a sneaker'")
        return inputs
