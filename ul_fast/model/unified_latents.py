"""The Unified Latents model: encoder, fixed-noise latent, diffusion prior, diffusion decoder, base model.

Shapes: images ``x [B, C, H, W]`` in [−1, 1]; latents ``[B, C_z, h, w]`` with ``h = H / f``. Losses are
nats per example (summed over the example's dimensions), averaged over the batch only at the end, so the
prior's and the decoder's terms are on one scale (the meaning of ``c_lf``, ``decoder_weighting.factor``,
depends on it).

The paper's ablations are config switches, each off by default: ``latent_prior: normal`` (a VAE's N(0, I)
prior instead of the diffusion prior), ``decoder_loss: mse`` (a deterministic Gaussian decoder instead of the
diffusion decoder), ``prior_stop_grad`` (the rate term does not train the encoder) and ``kl_weight`` (the rate
term's weight); together the first two and a small ``kl_weight`` give the classic "VAE, then latent diffusion"
baseline (preset ``vae-ldm``).
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from ul_fast import ops
from ul_fast.config import SINGLE_STAGE, ModelConfig
from ul_fast.diffusion import (
    LogSNRSchedule,
    antithetic_times_from,
    clamped_logistic_from,
    make_schedule,
    prior_kl,
    x_from_eps,
    x_from_v,
)
from ul_fast.model.draws import LossDraws, TermDraws, draw_term
from ul_fast.nets import ResNetEncoder, UViTDecoder, ViTDenoiser
from ul_fast.sampling import GraphedCall, graphed_module, logsnr_grid, sample

LN2 = math.log(2.0)
MSE_DECODER_LOGSNR = 0.0
"""The fixed log-SNR at which the deterministic (``decoder_loss: mse``) decoder reads its all-zero ``x_t``: a
constant input, chosen where ``x̂`` is well scaled for both predictions (``x̂ = −v̂/√2`` or ``−ε̂``)."""


class UnifiedLatents(nn.Module):
    """Stage 1 trains encoder, prior and decoder together; stage 2 trains the base model on frozen latents.
    (``mode: single_stage``: stage 1 trains the base model in the prior's place, and there is no stage 2.)

    One number, ``latent_logsnr_0`` (λ_z(0)), sets both the encoder's output noise and the top of the
    prior's and base model's schedules; it is read from the config in one place and cannot drift.
    ``latent_prior: normal`` builds no prior network (``prior`` is None): the latent's rate is then
    ``KL[q(z_0|x) ‖ N(0, I)]``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.single_stage = c.mode == SINGLE_STAGE
        self.encoder = ResNetEncoder(c.encoder, image_channels=c.image_channels, latent_channels=c.latent_channels)
        self.latent_size = c.image_size // self.encoder.downsample_factor
        self.normal_prior = c.latent_prior == "normal"
        self.mse_decoder = c.decoder_loss == "mse"
        # No prior network in single-stage mode (the base model is trained in its place) or with a normal prior.
        self.prior = None
        if not self.single_stage and not self.normal_prior:
            self.prior = ViTDenoiser(c.prior, channels=c.latent_channels, grid=self.latent_size)
        self.base = ViTDenoiser(c.base, channels=c.latent_channels, grid=self.latent_size,
                                num_classes=c.num_classes, context_dim=c.context_dim)
        self.decoder = UViTDecoder(c.decoder, image_channels=c.image_channels, image_size=c.image_size,
                                   latent_channels=c.latent_channels, latent_logsnr_conditioning=self.single_stage)
        self.latent_logsnr_0 = c.latent_logsnr_0
        self.latent_schedule = make_schedule(c.latent_schedule, c.latent_logsnr_min, self.latent_logsnr_0,
                                             self.latent_size, c.pixel_base_resolution,
                                             c.pixel_low_snr_base_resolution)
        self.pixel_schedule = make_schedule(c.pixel_schedule, c.pixel_logsnr_min, c.pixel_logsnr_max,
                                            c.image_size, c.pixel_base_resolution, c.pixel_low_snr_base_resolution)
        # The latent's log-SNR at sampling: λ_z(0), or single_stage_sample_logsnr; the base model (or prior)
        # samples down to it, and the decoder receives the latent at it.
        self.sample_logsnr = c.latent_logsnr_0
        self.sample_schedule = self.latent_schedule
        if c.single_stage_sample_logsnr is not None and c.single_stage_sample_logsnr < c.latent_logsnr_0:
            self.sample_logsnr = c.single_stage_sample_logsnr
            self.sample_schedule = make_schedule(c.latent_schedule, c.latent_logsnr_min, self.sample_logsnr,
                                                 self.latent_size, c.pixel_base_resolution,
                                                 c.pixel_low_snr_base_resolution)

    # ----------------------------------------------------------------------------- networks per stage
    NETWORKS = ("encoder", "prior", "decoder", "base")
    """Attribute names of every network the model may hold (``prior`` is None in single-stage mode and with
    ``latent_prior: normal``)."""

    def trained_networks(self, stage: int) -> tuple[str, ...]:
        """Names of the networks that ``stage`` (1 or 2) trains; the others stay frozen.

        Two-stage: stage 1 trains encoder, prior and decoder (encoder and decoder alone with a normal prior);
        stage 2 the base model alone. Single-stage: stage 1 trains encoder, base model and decoder together,
        and there is no stage 2.
        """
        if stage == 1:
            if self.single_stage:
                return ("encoder", "base", "decoder")
            return ("encoder", "decoder") if self.normal_prior else ("encoder", "prior", "decoder")
        if stage == 2 and not self.single_stage:
            return ("base",)
        raise ValueError(f"stage must be 1 or 2 (single-stage models have stage 1 only), got {stage}")

    # ----------------------------------------------------------------------------- shapes and checks
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.image_channels, self.config.image_size, self.config.image_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.config.latent_channels, self.latent_size, self.latent_size)

    def check_images(self, x: torch.Tensor, values: bool = True) -> None:
        """Raise a clear error for images of the wrong shape or (``values``) with non-finite pixels.

        The value check reads the device; the training losses skip it (``values=False``) so that a step never
        waits for the GPU: the trainer's data are checked where they are loaded, and a non-finite loss skips
        the step."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"images must be a [B, C, H, W] tensor, got {getattr(x, 'shape', type(x))}")
        if tuple(x.shape[1:]) != self.image_shape:
            c, h, w = self.image_shape
            raise ValueError(f"images must have {c} channel(s) and size {h}x{w} (shape [B, {c}, {h}, {w}]), "
                             f"got {tuple(x.shape)}")
        if values and not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
            raise ValueError("images contain non-finite pixels (NaN or inf)")

    def check_latents(self, z_clean: torch.Tensor, values: bool = True) -> None:
        """Raise a clear error for given clean latents (e.g. from a latent cache) of the wrong shape or
        (``values``, see :meth:`check_images`) with non-finite values."""
        if not isinstance(z_clean, torch.Tensor) or z_clean.dim() != 4:
            raise ValueError(f"z_clean must be a [B, C_z, h, w] tensor, got {getattr(z_clean, 'shape', type(z_clean))}")
        if tuple(z_clean.shape[1:]) != self.latent_shape:
            raise ValueError(f"z_clean must have shape [B, {', '.join(map(str, self.latent_shape))}] (this model's "
                             f"latents), got {tuple(z_clean.shape)}")
        if values and not torch.compiler.is_compiling() and not bool(torch.isfinite(z_clean).all()):
            raise ValueError("z_clean contains non-finite values (NaN or inf)")

    def _clean_latents(self, x: torch.Tensor | None, z_clean: torch.Tensor | None, values: bool = True,
                       ) -> torch.Tensor:
        """``z_clean``: ``E(x)``, or the given latents (checked; ``values``: see :meth:`check_images`); exactly
        one of the two must be given. Nothing is drawn here, so the random draws that follow are the same either
        way."""
        if (x is None) == (z_clean is None):
            raise ValueError("give exactly one of x (images, encoded here) and z_clean (given clean latents)")
        if z_clean is None:
            return self.encode(x, values)
        self.check_latents(z_clean, values)
        return z_clean

    # ----------------------------------------------------------------------------- conditioning
    def drop_conditioning(self, labels: torch.Tensor | None, context: torch.Tensor | None,
                          pooled: torch.Tensor | None, keep_uniforms: torch.Tensor, *,
                          null_context: torch.Tensor | None = None, null_pooled: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Classifier-free guidance training (the base model's loss): replace each example's condition by the
        null one, its label with probability ``label_dropout`` (null label = ``num_classes``) and its caption with
        probability ``caption_dropout`` (default ``label_dropout``): null text = ``null_context [T, E]`` and
        ``null_pooled [E]`` (e.g. the text encoder's embedding of the empty caption), zeros when not given.
        ``keep_uniforms`` (fp32 ``[B]``, :attr:`LossDraws.keep`) decides both: an example keeps its label where
        ``keep_uniforms >= label_dropout`` and its caption where ``keep_uniforms >= caption_dropout`` (a label is
        dropped whenever a caption is, at equal rates)."""
        c = self.config
        keep = keep_uniforms >= c.label_dropout
        keep_text = keep if c.caption_dropout is None else keep_uniforms >= c.caption_dropout
        if labels is not None:
            labels = torch.where(keep, labels, torch.full_like(labels, c.num_classes))
        if context is not None:
            context = context * keep_text[:, None, None].to(context.dtype) if null_context is None else \
                torch.where(keep_text[:, None, None], context, null_context.to(context.dtype))
        if pooled is not None:
            pooled = pooled * keep_text[:, None].to(pooled.dtype) if null_pooled is None else \
                torch.where(keep_text[:, None], pooled, null_pooled.to(pooled.dtype))
        return labels, context, pooled

    # ----------------------------------------------------------------------------- stage 1
    def encode(self, x: torch.Tensor, check_values: bool = True) -> torch.Tensor:
        """Deterministic ``z_clean = E(x)``: ``[B, C, H, W]`` → ``[B, C_z, h, w]``. ``check_values``: reject
        non-finite pixels (a read of the device; see :meth:`check_images`)."""
        self.check_images(x, check_values)
        return self.encoder(x)

    def noisy_latent(self, z_clean: torch.Tensor, seed: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, logsnr: float | None = None) -> torch.Tensor:
        """``z_0 = α_0·z_clean + σ_0·ε`` at ``λ_z(0)`` (or at ``logsnr``)."""
        if seed is None:
            seed = ops.draw_seed(z_clean.device, generator)
        level = self.latent_logsnr_0 if logsnr is None else logsnr
        logsnrs = torch.full((z_clean.shape[0],), level, device=z_clean.device)
        return ops.noise_inject(z_clean, logsnrs, seed)[0]

    def _diffusion_term(self, net: nn.Module, clean: torch.Tensor, schedule: LogSNRSchedule, draws: TermDraws,
                        *, loss_factor: float = 1.0, bias: float | None = None,
                        max_logsnr: torch.Tensor | None = None, **net_inputs) -> torch.Tensor:
        """Per-example ``½·(−dλ/dt)·w(λ)·‖ε − ε̂‖²`` (nats, ``[B]``) at antithetic times for one diffusion model.

        ``w(λ) = loss_factor·sigmoid(bias − λ)``; ``bias=None``: ``w = 1``, the unweighted ELBO.
        ``max_logsnr [B]`` truncates each example's ELBO to ``λ ≤ max_logsnr`` (single-stage training).
        ``draws``: the times' offset and the noise seed (:func:`~ul_fast.model.draws.draw_term`).
        ``net_inputs`` go to ``net`` after ``(x_t, logsnr)``.
        """
        t = antithetic_times_from(draws.u, clean.shape[0])
        logsnr = schedule.logsnr(t)
        rate = schedule.neg_dlogsnr_dt(t)
        if max_logsnr is not None:
            rate = rate * (logsnr <= max_logsnr).to(rate.dtype)
        seed = draws.seed
        noisy, _ = ops.noise_inject(clean, logsnr, seed)
        pred = net(noisy, logsnr, **net_inputs)
        return ops.diffusion_loss(pred.to(clean.dtype), clean, logsnr, rate, seed, self.config.prediction,
                                  loss_factor=loss_factor, bias=bias)

    def latent_nats(self, x: torch.Tensor | None, network: str = "prior", labels: torch.Tensor | None = None,
                    context: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, *, z_clean: torch.Tensor | None = None,
                    ) -> torch.Tensor:
        """The latent's rate, per example in nats (fp32 ``[B]``): how many nats ``z_0`` of ``z_clean = E(x)``
        costs under the prior (``network="prior"``) or the base model (``"base"``).

        A diffusion model's rate is its **unweighted** ELBO of ``z_clean`` on ``[λ_z(1), λ_z(0)]`` plus the
        t = 1 KL: an upper bound on ``KL[q(z_0|x) ‖ p(z_0)]``. ``"prior"`` is exactly the ``L_z`` of
        :meth:`stage1_loss` (with a normal prior the closed-form ``KL[q(z_0|x) ‖ N(0, I)]``, nothing drawn).
        ``"base"`` is the paper's Tab. 5 "bits under the base model", with the conditioning given (none
        dropped; none given = the null condition); in single-stage mode it is the rate of the latent the decoder
        receives at sampling (at ``λ_z(0)``, or truncated at ``single_stage_sample_logsnr``), comparable with a
        two-stage run's prior rate. bits/pixel = ``latent_nats / ln 2 / (H·W)``.

        ``z_clean``: the frozen encoder's latents ``[B, C_z, h, w]`` given instead of ``x`` (a latent cache's),
        for the same result without the encoder forward (``x=None``).
        """
        if network not in ("prior", "base"):
            raise ValueError(f"network must be 'prior' or 'base', got {network!r}")
        if network == "prior" and self.single_stage:
            raise ValueError("single-stage models have no separate prior: use network='base'")
        conditioning = {"labels": labels, "context": context, "pooled": pooled} if network == "base" else {}
        z_clean = self._clean_latents(x, z_clean)
        max_logsnr = None
        if network == "base" and self.sample_logsnr < self.latent_logsnr_0:
            max_logsnr = torch.full((z_clean.shape[0],), self.sample_logsnr, device=z_clean.device)
        kl = self._rate_kl(z_clean, network)
        draws = None if self._rate_is_closed_form(network) else draw_term(z_clean.device, generator)
        return self._latent_rate(z_clean, kl, network, draws, max_logsnr, **conditioning)

    def _rate_is_closed_form(self, network: str) -> bool:
        """True where the latent's rate is its KL alone (a normal prior): no diffusion term, nothing drawn."""
        return network == "prior" and self.normal_prior

    def _rate_kl(self, z_clean: torch.Tensor, network: str) -> torch.Tensor:
        """The closed-form part of the latent's rate, per example in nats ``[B]``: all of it for a normal prior,
        ``KL[q(z_0|x) ‖ N(0, I)]`` at ``λ_z(0)``; else the diffusion ELBO's t = 1 KL at ``λ_z(1)``."""
        if self._rate_is_closed_form(network):
            return prior_kl(z_clean, self.latent_logsnr_0)
        return prior_kl(z_clean, self.config.latent_logsnr_min)

    def _latent_rate(self, z_clean: torch.Tensor, kl: torch.Tensor, network: str, draws: TermDraws | None,
                     max_logsnr: torch.Tensor | None = None, **conditioning) -> torch.Tensor:
        """The latent's rate per example in nats ``[B]`` (see :meth:`latent_nats`) given its :meth:`_rate_kl`
        ``kl``: ``kl`` plus, for a diffusion model, its ELBO's integral at ``draws`` (``max_logsnr [B]``
        truncates it; a normal prior's rate is ``kl`` alone and takes ``draws=None``)."""
        if self._rate_is_closed_form(network):
            return kl
        net = self.prior if network == "prior" else self.base
        return self._diffusion_term(net, z_clean, self.latent_schedule, draws, max_logsnr=max_logsnr,
                                    **conditioning) + kl

    def _decoder_loss(self, x: torch.Tensor, z_0: torch.Tensor, draws: TermDraws | None,
                      latent_logsnr: torch.Tensor | None) -> torch.Tensor:
        """The decoder's loss ``L_x`` per example in nats ``[B]``: the ``decoder_weighting``-weighted diffusion
        loss, or (``decoder_loss: mse``) the Gaussian negative log-likelihood ``−log N(x; x̂, s²·I)
        = ½·‖x − x̂‖²/s² + D·log(s·√(2π))`` of the one-pass mean ``x̂`` with ``s = mse_decoder_scale``."""
        if self.mse_decoder:
            scale = self.config.mse_decoder_scale
            squared = (x.float() - self._decoder_mean(z_0, latent_logsnr)).square().flatten(1).sum(1)
            return 0.5 * squared / scale**2 + x[0].numel() * math.log(scale * math.sqrt(2.0 * math.pi))
        weighting = self.config.decoder_weighting
        latent_inputs = {} if latent_logsnr is None else {"latent_logsnr": latent_logsnr}
        return self._diffusion_term(self.decoder, x, self.pixel_schedule, draws, loss_factor=weighting.factor,
                                    bias=weighting.bias, z_0=z_0, **latent_inputs)

    def _decoder_mean(self, z_0: torch.Tensor, latent_logsnr: torch.Tensor | None) -> torch.Tensor:
        """The deterministic decoder's ``x̂ [B, C, H, W]`` (fp32): one pass with ``x_t = 0`` at the fixed log-SNR
        :data:`MSE_DECODER_LOGSNR`, read as the config's ``prediction``."""
        x_t = torch.zeros((z_0.shape[0], *self.image_shape), device=z_0.device)
        logsnr = torch.full((z_0.shape[0],), MSE_DECODER_LOGSNR, device=z_0.device)
        return self._to_denoised(x_t, self.decoder(x_t, logsnr, z_0, latent_logsnr), logsnr)

    # ----------------------------------------------------------------------------- random draws
    def draw_loss_randomness(self, stage: int, batch: int, device: torch.device | str,
                             generator: torch.Generator | None = None, conditional: bool = False) -> LossDraws:
        """Every random number that :meth:`stage1_loss` (``stage`` 1) or :meth:`stage2_loss` (2) uses on a batch
        of ``batch`` examples, drawn from ``generator`` in the order the losses consume them (see
        :mod:`ul_fast.model.draws`). ``conditional``: a condition is given (its dropout is drawn)."""
        if stage == 1:
            level = None
            if self.single_stage:
                level = torch.rand(batch, device=device, generator=generator, dtype=torch.float64)
            latent_seed = ops.draw_seed(device, generator)
            keep = None
            if self.single_stage and conditional:
                keep = torch.rand(batch, device=device, generator=generator)
            rate = None if self._rate_is_closed_form("prior") else draw_term(device, generator)
            decoder = None if self.mse_decoder else draw_term(device, generator)
            return LossDraws(latent_seed=latent_seed, latent_level=level, keep=keep, rate=rate, decoder=decoder)
        if stage == 2:
            keep = torch.rand(batch, device=device, generator=generator) if conditional else None
            return LossDraws(keep=keep, rate=draw_term(device, generator))
        raise ValueError(f"stage must be 1 or 2, got {stage}")

    # ----------------------------------------------------------------------------- stage 1
    def stage1_loss(self, x: torch.Tensor, labels: torch.Tensor | None = None, context: torch.Tensor | None = None,
                    pooled: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    draws: LossDraws | None = None, *, null_context: torch.Tensor | None = None,
                    null_pooled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Stage-1 loss: the joint ``L = kl_weight·L_z + L_x`` of encoder, prior (or base model) and decoder.

        x: images ``[B, C, H, W]`` in [−1, 1]; labels ``[B]``, text ``context [B, T, E]`` and ``pooled
        [B, E]``: optional conditioning, read in single-stage mode only (dropped per example with probability
        ``label_dropout`` for guidance; ``null_context``, ``null_pooled``: the null text, see
        :meth:`drop_conditioning`); generator: drives every random draw, unless ``draws`` gives them
        (:meth:`draw_loss_randomness`; then nothing is drawn here: the loss compiles into one graph).
        Pixels are checked for shape only (the values: where the data are loaded).

        Returns scalars (batch means): ``loss``; ``prior_nats`` (``L_z`` per image, :meth:`latent_nats`
        ``"prior"``: the unweighted prior ELBO on ``[λ_z(1), λ_z(0)]`` plus the t = 1 KL, an upper bound on the
        latent's information; with a normal prior ``KL[q(z_0|x) ‖ N(0, I)]``); ``prior_kl`` (the t = 1 KL;
        with a normal prior all of ``L_z``); ``decoder_loss`` (``L_x``: weighted by ``decoder_weighting``, or
        the mse decoder's Gaussian NLL); ``bits_per_pixel`` (``L_z / ln 2 / (H·W)``); ``bits_per_latent_dim``.
        ``prior_stop_grad``: ``L_z`` sees ``z_clean`` detached, so only the decoder's term trains the encoder.

        Single-stage mode (paper App. B): each example's latent noise level is drawn,
        ``λ_max ~ Logistic(b_base, 1)`` (``b_base`` = ``base_bias``) clamped at ``λ_z(0)`` (the mass above sits
        at ``λ_z(0)``); the decoder sees the latent at that level (and the level itself), and ``L_z`` is the base
        model's unweighted ELBO of it, truncated at ``λ_max``. As ``P(λ_max ≥ λ) = sigmoid(b_base − λ)`` for
        every ``λ ≤ λ_z(0)``, its expectation over ``λ_max`` is exactly the base model's sigmoid-weighted loss.
        ``bits_per_pixel`` is then that truncated ELBO's, not the rate of the latent decoded at sampling
        (``λ_z(0)``): that one is :meth:`latent_nats` ``"base"``, which the trainer's evaluation reports.
        """
        self.check_images(x, values=False)
        conditional = any(c is not None for c in (labels, context, pooled))
        if draws is None:
            draws = self.draw_loss_randomness(1, x.shape[0], x.device, generator, conditional)
        z_clean = self.encoder(x)
        rate_input = z_clean.detach() if self.config.prior_stop_grad else z_clean
        rate_network = "base" if self.single_stage else "prior"
        # The KL before z_0: this fixes the order in which gradients reach z_clean (and so their rounding).
        latent_kl = self._rate_kl(rate_input, rate_network)
        latent_logsnr, conditioning = None, {}
        if self.single_stage:
            latent_logsnr = clamped_logistic_from(draws.latent_level, self.config.base_bias, self.latent_logsnr_0)
            z_0 = ops.noise_inject(z_clean, latent_logsnr, draws.latent_seed)[0]
            if conditional:
                labels, context, pooled = self.drop_conditioning(labels, context, pooled, draws.keep,
                                                                 null_context=null_context, null_pooled=null_pooled)
            conditioning = {"labels": labels, "context": context, "pooled": pooled}
        else:
            z_0 = self.noisy_latent(z_clean, seed=draws.latent_seed)
        prior_nats = self._latent_rate(rate_input, latent_kl, rate_network, draws.rate, latent_logsnr,
                                       **conditioning)
        decoder_loss = self._decoder_loss(x, z_0, draws.decoder, latent_logsnr)
        prior_mean = prior_nats.mean()
        pixels = self.config.image_size * self.config.image_size
        return {
            "loss": self.config.kl_weight * prior_mean + decoder_loss.mean(),
            "prior_nats": prior_mean.detach(),
            "prior_kl": latent_kl.mean().detach(),
            "decoder_loss": decoder_loss.mean().detach(),
            "bits_per_pixel": prior_mean.detach() / LN2 / pixels,
            "bits_per_latent_dim": prior_mean.detach() / LN2 / z_clean[0].numel(),
        }

    # ----------------------------------------------------------------------------- stage 2
    def stage2_loss(self, x: torch.Tensor | None, labels: torch.Tensor | None = None,
                    context: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, *, z_clean: torch.Tensor | None = None,
                    draws: LossDraws | None = None, null_context: torch.Tensor | None = None,
                    null_pooled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Stage-2 loss: the base model on frozen ``z_clean = E(x)``.

        Arguments as for :meth:`stage1_loss`; the conditioning given is dropped per example for classifier-free
        guidance (:meth:`drop_conditioning`). Weighting ``sigmoid(b_base − λ)`` (not
        the ELBO), on the latent schedule topped at ``λ_z(0)``. Returns scalars: ``loss``, ``base_loss``.

        ``z_clean``: the frozen encoder's latents ``[B, C_z, h, w]`` given instead of ``x`` (``x=None``), e.g.
        from a latent cache: no encoder forward. The generator's draws are the same, so given ``z_clean``
        equal to ``E(x)`` the loss is bit for bit the one from ``x``.
        """
        with torch.no_grad():
            z_clean = self._clean_latents(x, z_clean, values=False)
        conditional = any(t is not None for t in (labels, context, pooled))
        if draws is None:
            draws = self.draw_loss_randomness(2, z_clean.shape[0], z_clean.device, generator, conditional)
        if conditional:
            labels, context, pooled = self.drop_conditioning(labels, context, pooled, draws.keep,
                                                             null_context=null_context, null_pooled=null_pooled)
        loss = self._diffusion_term(self.base, z_clean, self.latent_schedule, draws.rate, bias=self.config.base_bias,
                                    labels=labels, context=context, pooled=pooled)
        return {"loss": loss.mean(), "base_loss": loss.mean().detach()}

    # ----------------------------------------------------------------------------- training entry point
    def forward(self, x: torch.Tensor | None, labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                generator: torch.Generator | None = None, stage: int = 1, *, z_clean: torch.Tensor | None = None,
                draws: LossDraws | None = None, null_context: torch.Tensor | None = None,
                null_pooled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """:meth:`stage1_loss` or :meth:`stage2_loss` (``stage`` 1 or 2) with the same arguments; a forward
        so that DDP and FSDP can wrap the model. Stage 2 takes given latents as ``z_clean`` (with ``x=None``)."""
        null = {"null_context": null_context, "null_pooled": null_pooled}
        if stage == 1:
            if z_clean is not None:
                raise ValueError("stage 1 trains the encoder: it takes images x, not given latents z_clean")
            return self.stage1_loss(x, labels, context, pooled, generator, draws, **null)
        if stage == 2:
            return self.stage2_loss(x, labels, context, pooled, generator, z_clean=z_clean, draws=draws, **null)
        raise ValueError(f"stage must be 1 or 2, got {stage}")

    # ----------------------------------------------------------------------------- sampling
    def _to_denoised(self, x_t: torch.Tensor, pred: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """``x̂`` from a network's output, read as the config's ``prediction`` (``v̂`` or ``ε̂``)."""
        pred = pred.to(x_t.dtype)
        return x_from_v(x_t, pred, logsnr) if self.config.prediction == "v" else x_from_eps(x_t, pred, logsnr)

    @torch.no_grad()
    def decode(self, z_0: torch.Tensor, steps: int = 32, sampler: str = "ddim",
               generator: torch.Generator | None = None, progress: bool = False, spacing: str = "time",
               cuda_graph: bool = False, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample images given noisy latents ``z_0``: from ``N(0, I)`` to ``λ_x`` max over a ``steps``-step grid
        of ``spacing`` (see :func:`~ul_fast.sampling.logsnr_grid`), then one final denoising step; clamped to
        [−1, 1]. The mse decoder: its one-pass mean (``steps``, ``sampler``, ``spacing``, ``generator`` and
        ``noise`` unused). A single-stage decoder is told the latent's log-SNR ``sample_logsnr``. ``cuda_graph``:
        replay captured decoder calls on CUDA (:func:`~ul_fast.sampling.graphed_module`; the first chain
        captures). ``noise``: the starting state ``[B, C, H, W]`` (default: drawn from ``generator``)."""
        latent_logsnr = None
        if self.single_stage:  # sampled latents stop at sample_logsnr (λ_z(0) unless configured)
            latent_logsnr = torch.full((z_0.shape[0],), self.sample_logsnr, device=z_0.device)
        if self.mse_decoder:
            return self._decoder_mean(z_0, latent_logsnr).clamp(-1.0, 1.0)

        decoder = graphed_module(self.decoder) if cuda_graph else self.decoder

        def denoise(x_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
            return self._to_denoised(x_t, decoder(x_t, logsnr, z_0, latent_logsnr), logsnr)

        if noise is None:
            noise = torch.randn((z_0.shape[0], *self.image_shape), device=z_0.device, generator=generator)
        grid = logsnr_grid(self.pixel_schedule, steps, spacing)
        x = sample(sampler, denoise, noise, grid, generator, disable=not progress)
        final = torch.full((x.shape[0],), float(grid[-1]), device=x.device)  # filled, not copied from the host
        return denoise(x, final).clamp(-1.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, steps: int = 32, sampler: str = "ddim",
                    generator: torch.Generator | None = None, progress: bool = False, spacing: str = "time",
                    cuda_graph: bool = False) -> torch.Tensor:
        """Encode, add the latent noise of ``sample_logsnr`` (λ_z(0) unless configured), decode."""
        z_0 = self.noisy_latent(self.encode(x), generator=generator, logsnr=self.sample_logsnr)
        return self.decode(z_0, steps, sampler, generator, progress, spacing, cuda_graph)

    @torch.no_grad()
    def sample_latents(self, n: int, steps: int = 32, sampler: str = "ddim", labels: torch.Tensor | None = None,
                       context: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                       guidance: float = 1.0, guidance_interval: tuple[float, float] = (-math.inf, math.inf),
                       use_prior: bool = False, generator: torch.Generator | None = None,
                       progress: bool = False, spacing: str = "time", cuda_graph: bool = False,
                       noise: torch.Tensor | None = None, null_context: torch.Tensor | None = None,
                       null_pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Noisy latents ``z_0`` from the base model (or the stage-1 prior), stopping at ``λ_z(0)`` (single-stage:
        at ``sample_logsnr``). A normal prior (``latent_prior: normal``) draws ``z_0 ~ N(0, I)``.

        Classifier-free guidance ``x̂ = x̂_u + w·(x̂_c − x̂_u)`` applies where ``λ`` lies in
        ``guidance_interval`` and a condition is given; there the conditional and unconditional predictions
        come from one network call on a batch of ``2n`` (outside it, one call on ``n``). Where the interval holds
        every level of the grid or none, that is decided once, on the host; otherwise each call reads its level.
        The unconditional text is ``null_context [T, E]`` / ``null_pooled [E]`` (or ``[n, …]``: the empty
        caption's embedding the model was trained with, or a negative prompt's), zeros when not given.
        ``cuda_graph``: replay a captured network call per step on CUDA (one graph per batch size).
        ``noise``: the starting state ``[n, C_z, h, w]`` (default: drawn from ``generator``).
        """
        device = next(self.parameters()).device
        conditional = any(t is not None for t in (labels, context, pooled))
        if use_prior and self.single_stage:
            raise ValueError("single-stage models have no separate prior: sample the base model")
        z = noise if noise is not None else torch.randn((n, *self.latent_shape), device=device, generator=generator)
        if use_prior and self.normal_prior:
            return z

        network = self.prior if use_prior else self.base
        if cuda_graph:
            network = graphed_module(network)
        uncond_context = None if context is None else _null_like(context, null_context)
        uncond_pooled = None if pooled is None else _null_like(pooled, null_pooled)
        grid = logsnr_grid(self.sample_schedule, steps, spacing)
        guided_everywhere = _inside_everywhere(grid, guidance_interval)

        def denoise(z_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
            if use_prior:
                return self._to_denoised(z_t, network(z_t, logsnr), logsnr)
            guided = conditional and guidance != 1.0 and (
                guided_everywhere if guided_everywhere is not None
                else guidance_interval[0] <= float(logsnr[0]) <= guidance_interval[1])
            if not guided:
                return self._to_denoised(z_t, network(z_t, logsnr, labels, context, pooled), logsnr)
            null_labels = None if labels is None else torch.full_like(labels, self.config.num_classes)
            pred = network(torch.cat([z_t, z_t]), torch.cat([logsnr, logsnr]), _stack(labels, null_labels),
                           _stack(context, uncond_context), _stack(pooled, uncond_pooled))
            cond, uncond = self._to_denoised(torch.cat([z_t, z_t]), pred, torch.cat([logsnr, logsnr])).chunk(2)
            return uncond + guidance * (cond - uncond)

        return sample(sampler, denoise, z, grid, generator, disable=not progress)

    @torch.no_grad()
    def sample(self, n: int, latent_steps: int = 32, decoder_steps: int = 32, sampler: str = "ddim",
               generator: torch.Generator | None = None, progress: bool = False, spacing: str = "time",
               cuda_graph: bool = False, decoder_sampler: str | None = None, **conditioning) -> torch.Tensor:
        """Generate ``n`` images: base model → noisy ``z_0`` → decoder, both on ``spacing``; the base model with
        ``sampler``, the decoder with ``decoder_sampler`` (None: ``sampler``).

        ``cuda_graph`` on CUDA: with deterministic samplers (:data:`WHOLE_CHAIN_SAMPLERS`) and guidance decided
        once for the whole grid (see :meth:`sample_latents`), the whole chain (both samplers and the final
        denoising) is captured once per batch size and settings and replayed; its starting noise is drawn from
        ``generator`` as the eager chain draws it, so the images are the same. Otherwise one network call per step
        is replayed."""
        decoder_sampler = decoder_sampler or sampler
        if cuda_graph and self._whole_chain_capturable(latent_steps, (sampler, decoder_sampler), spacing,
                                                       conditioning):
            device = next(self.parameters()).device
            z = torch.randn((n, *self.latent_shape), device=device, generator=generator)
            x = None if self.mse_decoder else torch.randn((n, *self.image_shape), device=device, generator=generator)
            chain = _graphed_chain(self, latent_steps, decoder_steps, (sampler, decoder_sampler), spacing,
                                   conditioning)
            return chain(z, x, *(conditioning.get(key) for key in CHAIN_TENSORS))
        z_0 = self.sample_latents(n, latent_steps, sampler, generator=generator, progress=progress, spacing=spacing,
                                  cuda_graph=cuda_graph, **conditioning)
        return self.decode(z_0, decoder_steps, decoder_sampler, generator, progress, spacing, cuda_graph)

    def _whole_chain_capturable(self, latent_steps: int, samplers: tuple[str, str], spacing: str,
                                conditioning: dict) -> bool:
        """Whether :meth:`sample`'s chain (with the base model's and the decoder's ``samplers``) reads nothing on
        the host between its start and its end."""
        if not set(samplers) <= set(WHOLE_CHAIN_SAMPLERS):
            return False
        guided = any(conditioning.get(key) is not None for key in ("labels", "context", "pooled")) and \
            conditioning.get("guidance", 1.0) != 1.0 and not conditioning.get("use_prior", False)
        interval = conditioning.get("guidance_interval", (-math.inf, math.inf))
        return not guided or _inside_everywhere(logsnr_grid(self.sample_schedule, latent_steps, spacing),
                                                interval) is not None


CHAIN_TENSORS = ("labels", "context", "pooled", "null_context", "null_pooled")
"""The conditioning of :meth:`UnifiedLatents.sample` that a captured chain takes as inputs (the rest: settings)."""

WHOLE_CHAIN_SAMPLERS = ("ddim", "dpmpp_2m", "heun")
"""The samplers that draw nothing after the starting noise: a chain of theirs can be captured as one graph."""


_GRAPHED_CHAINS: weakref.WeakKeyDictionary[UnifiedLatents, dict[tuple, GraphedCall]] = weakref.WeakKeyDictionary()


def _graphed_chain(model: UnifiedLatents, latent_steps: int, decoder_steps: int, samplers: tuple[str, str],
                   spacing: str, conditioning: dict) -> GraphedCall:
    """The :class:`GraphedCall` of a whole sampling chain ``(z_T, x_T, *CHAIN_TENSORS) → images`` for these
    settings, kept (weakly) for the model's life so that later chains replay the first one's graphs."""
    guidance = conditioning.get("guidance", 1.0)
    interval = tuple(conditioning.get("guidance_interval", (-math.inf, math.inf)))
    use_prior = conditioning.get("use_prior", False)
    key = (latent_steps, decoder_steps, samplers, spacing, guidance, interval, use_prior)
    chains = _GRAPHED_CHAINS.setdefault(model, {})
    if key not in chains:
        owner = weakref.ref(model)  # the graphs must not keep the model alive

        def chain(z_start: torch.Tensor, x_start: torch.Tensor | None, labels: torch.Tensor | None,
                  context: torch.Tensor | None, pooled: torch.Tensor | None, null_context: torch.Tensor | None,
                  null_pooled: torch.Tensor | None) -> torch.Tensor:
            m = owner()
            z_0 = m.sample_latents(z_start.shape[0], latent_steps, samplers[0], labels, context, pooled, guidance,
                                   interval, use_prior, spacing=spacing, noise=z_start, null_context=null_context,
                                   null_pooled=null_pooled)
            return m.decode(z_0, decoder_steps, samplers[1], spacing=spacing, noise=x_start)

        chains[key] = GraphedCall(chain, module=model)
    return chains[key]


def _inside_everywhere(grid: torch.Tensor, interval: tuple[float, float]) -> bool | None:
    """True (False) where every level of the (host) ``grid`` lies inside (outside) ``interval``; None when some do
    and some do not. A sampler evaluates its network at the grid's levels only."""
    inside = {interval[0] <= level <= interval[1] for level in grid.tolist()}
    return inside.pop() if len(inside) == 1 else None


def _null_like(condition: torch.Tensor, null: torch.Tensor | None) -> torch.Tensor:
    """The unconditional input for ``condition [n, ...]``: ``null`` (one row ``[...]`` or ``[n, ...]``) broadcast
    to its shape, or zeros."""
    if null is None:
        return torch.zeros_like(condition)
    return null.to(condition.device, condition.dtype).expand_as(condition)


def _stack(condition: torch.Tensor | None, null: torch.Tensor | None) -> torch.Tensor | None:
    """A condition and its null stacked along the batch (guidance's batch of 2n), or None without one."""
    return None if condition is None else torch.cat([condition, null])


__all__ = ["UnifiedLatents"]
