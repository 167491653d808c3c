"""Single-stage variant (paper App. B): base model trained jointly up to a clamped-logistic latent log-SNR."""

import math

import pytest
import torch

from ul_fast.config import ConfigError
from ul_fast.diffusion import clamped_logistic
from ul_fast.model import UnifiedLatents
from ul_fast.model.draws import draw_term
from ul_fast.sampling import logsnr_grid
from ul_fast.train import Trainer
from ul_fast.train.metrics_log import read_metrics

from micro import micro_config

UPPER = 5.0  # λ_z(0)
DRAWS = 200_000


def renormalised_logistic(batch: int, loc: float, upper: float, generator: torch.Generator) -> torch.Tensor:
    """The sampler this variant used before: Logistic(loc, 1) conditioned on λ ≤ upper (mass renormalised)."""
    top = torch.sigmoid(torch.tensor(upper - loc, dtype=torch.float64)).item()
    u = (torch.rand(batch, generator=generator, dtype=torch.float64) * top).clamp_min(1e-12)
    return (loc + torch.log(u) - torch.log1p(-u)).float()


def sigmoid_weight_misses(draws: torch.Tensor, loc: float, levels: tuple[float, ...]) -> list[str]:
    """The levels λ where the Monte-Carlo E[1{λ ≤ λ_max}] is more than 5 binomial standard errors from
    sigmoid(loc − λ): the weight the single-stage loss must give the ELBO at λ."""
    misses = []
    for lam in levels:
        expected = 1.0 / (1.0 + math.exp(lam - loc))
        got = float((draws >= lam).double().mean())
        standard_error = math.sqrt(expected * (1 - expected) / draws.numel())
        if abs(got - expected) > 5 * standard_error:
            misses.append(f"loc {loc}, λ {lam}: {got:.4f} vs sigmoid {expected:.4f} (se {standard_error:.1e})")
    return misses


@pytest.mark.parametrize("loc", [-2.0, 0.0, 2.0, 4.0])
def test_clamped_logistic_gives_the_sigmoid_weight_exactly_up_to_the_clamp(loc):
    draws = clamped_logistic(DRAWS, loc, UPPER, "cpu", torch.Generator().manual_seed(int(loc) + 10))
    assert draws.dtype == torch.float32 and draws.max() == UPPER  # the mass above λ_z(0) sits at it
    levels = (-6.0, -1.0, loc - 0.5, loc, 4.0, 4.9, UPPER)
    assert sigmoid_weight_misses(draws, loc, levels) == []


def test_the_renormalised_sampler_fails_the_sigmoid_weight_test():
    """Why the clamp: conditioning on λ ≤ λ_z(0) gives [σ(b−λ) − σ(b−λ_z0)] / σ(λ_z0−b), 0.32 at b = λ = 4."""
    draws = renormalised_logistic(DRAWS, 4.0, UPPER, torch.Generator().manual_seed(14))
    assert len(sigmoid_weight_misses(draws, 4.0, (4.0,))) == 1
    renormalised_weight = (0.5 - 1 / (1 + math.e)) / (1 / (1 + math.exp(-1.0)))  # 0.316
    assert float((draws >= 4.0).double().mean()) == pytest.approx(renormalised_weight, abs=5e-3)


def test_single_stage_model_has_no_prior_and_a_latent_conditioned_decoder():
    model = UnifiedLatents(micro_config(model={"mode": "single_stage"}, train={"stage2_steps": 0}).model)
    assert model.prior is None and model.decoder.latent_logsnr_embedding is not None
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    out = model.stage1_loss(x, labels=torch.tensor([0, 1, 2, 3]), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["loss"].detach(), out["prior_nats"] + out["decoder_loss"])
    out["loss"].backward()
    for name in ("encoder", "base", "decoder"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, name).parameters()), name
    with pytest.raises(ValueError, match="latent_logsnr"):
        model.decoder(x, torch.zeros(4), torch.zeros(4, *model.latent_shape))
    with pytest.raises(ValueError, match="no separate prior"):
        model.sample_latents(2, steps=2, use_prior=True)


def test_single_stage_rejects_a_second_stage():
    with pytest.raises(ConfigError, match="stage2_steps"):
        micro_config(model={"mode": "single_stage"}, train={"stage2_steps": 5})


def test_single_stage_training_runs_and_samples(tmp_path):
    config = micro_config(model={"mode": "single_stage"},
                          train={"stage1_steps": 30, "stage2_steps": 0, "eval_every": 30, "checkpoint_every": 30,
                                 "ema_decay": 0.9})
    Trainer(config, tmp_path / "run").fit()
    metrics = read_metrics(tmp_path / "run")
    assert math.isfinite(metrics[-1]["heldout_bits_per_pixel"]) and metrics[-1]["heldout_bits_per_pixel"] > 0
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert (tmp_path / "run" / "samples.png").exists() and (tmp_path / "run" / "reconstructions.png").exists()


def test_sample_logsnr_key_sets_the_latent_level_the_decoder_receives():
    config = micro_config(model={"mode": "single_stage", "single_stage_sample_logsnr": 2.0}, train={"stage2_steps": 0})
    model = UnifiedLatents(config.model)
    assert model.sample_logsnr == 2.0 and model.latent_schedule.logsnr_max == UPPER
    assert logsnr_grid(model.sample_schedule, 4)[-1].item() == pytest.approx(2.0, abs=1e-5)
    seen = []
    model.decoder.register_forward_pre_hook(lambda _, args: seen.append((args[2].clone(), args[3].clone())))
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    model.reconstruct(x, steps=2, generator=torch.Generator().manual_seed(0))
    expected_z_0 = model.noisy_latent(model.encode(x), generator=torch.Generator().manual_seed(0), logsnr=2.0)
    assert all(torch.equal(z_0, expected_z_0) and bool((level == 2.0).all()) for z_0, level in seen)
    seen.clear()
    model.sample(2, latent_steps=2, decoder_steps=2, generator=torch.Generator().manual_seed(1))
    assert seen and all(bool((level == 2.0).all()) for _, level in seen)
    # Default (null): λ_z(0).
    default = UnifiedLatents(micro_config(model={"mode": "single_stage"}, train={"stage2_steps": 0}).model)
    assert default.sample_logsnr == UPPER and default.sample_schedule is default.latent_schedule


def test_single_stage_rate_of_the_decoded_latent_is_the_untruncated_base_elbo():
    """latent_nats("base") of a single-stage model: the base model's ELBO up to the sampling level (λ_z(0) by
    default, else single_stage_sample_logsnr), so it is comparable with a two-stage run's prior rate."""
    x = torch.rand(16, 1, 16, 16) * 2 - 1
    rates = {}
    for level in (None, 2.0):
        torch.manual_seed(0)
        model = UnifiedLatents(micro_config(model={"mode": "single_stage", "single_stage_sample_logsnr": level},
                                            train={"stage2_steps": 0}).model)
        rates[level] = model.latent_nats(x, "base", generator=torch.Generator().manual_seed(3))
        z = model.encode(x)
        max_logsnr = None if level is None else torch.full((16,), level)
        manual = model._latent_rate(z, model._rate_kl(z, "base"), "base",
                                    draw_term("cpu", torch.Generator().manual_seed(3)), max_logsnr)
        torch.testing.assert_close(rates[level], manual, rtol=0, atol=0)
        with pytest.raises(ValueError, match="no separate prior"):
            model.latent_nats(x, "prior")
    # The same weights and draws: truncating at 2 drops the ELBO's (positive) integrand at the examples whose
    # antithetic time falls on (2, 5] (about 18% of t on this cosine schedule), and changes no other.
    assert bool((rates[2.0] <= rates[None]).all()) and bool((rates[2.0] < rates[None]).any())
