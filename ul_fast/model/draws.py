"""The random numbers of one loss evaluation, drawn before it.

A UL loss consumes a handful of random numbers per step: for each diffusion term an antithetic time offset
``u`` and a noise seed, the seed of the latent noise in ``z_0``, and, in conditional or single-stage
training, per-example uniforms. Drawing them ahead of the loss, as small tensors on the model's device,
keeps generators out of the loss: it then traces into one graph under ``torch.compile(fullgraph=True)``, and
a captured CUDA graph replays it with these tensors refilled in place. They are drawn in the order the losses
have always consumed their generator, so a seeded run gives the same numbers whichever way it runs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ul_fast import ops

__all__ = ["LossDraws", "TermDraws", "draw_term"]


class TermDraws(NamedTuple):
    """The random numbers of one diffusion term (:meth:`UnifiedLatents._diffusion_term`)."""

    u: torch.Tensor
    """fp32 ``[]`` in [0, 1): the offset of the term's antithetic times ``t_i = (u + i/B) mod 1``."""
    seed: torch.Tensor
    """int64 ``[1]``: the seed of the term's noise ``ε`` (:func:`ul_fast.ops.draw_seed`)."""


def draw_term(device: torch.device | str, generator: torch.Generator | None = None) -> TermDraws:
    """A diffusion term's draws: ``u`` first, then the seed (the order the losses consume them)."""
    u = torch.rand((), device=device, generator=generator)
    return TermDraws(u, ops.draw_seed(device, generator))


class LossDraws(NamedTuple):
    """Every random number of one stage-1 or stage-2 loss evaluation; the fields a loss does not use are None
    (:meth:`UnifiedLatents.draw_loss_randomness` fills exactly those the model's configuration uses)."""

    latent_seed: torch.Tensor | None = None
    """int64 ``[1]``: the seed of ``ε`` in ``z_0 = α_0·z_clean + σ_0·ε`` (stage 1)."""
    latent_level: torch.Tensor | None = None
    """float64 ``[B]`` in [0, 1): uniforms of each example's single-stage ``λ_max`` (clamped logistic)."""
    keep: torch.Tensor | None = None
    """fp32 ``[B]`` in [0, 1): uniforms of condition dropout; an example keeps its condition where
    ``keep >= label_dropout``."""
    rate: TermDraws | None = None
    """The latent's diffusion term: the prior's (stage 1), or the base model's (stage 2, single-stage)."""
    decoder: TermDraws | None = None
    """The decoder's diffusion term (None for the mse decoder, which draws nothing)."""
