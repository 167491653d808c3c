"""The paper's ablations as config switches (Tab. 5 and 6): each trains, and its loss means what it says."""

import math

import pytest
import torch

from ul_fast.config import load_config
from ul_fast.model import UnifiedLatents
from ul_fast.model.draws import draw_term
from ul_fast.train import Trainer
from ul_fast.train.metrics_log import read_metrics

from micro import micro_config


def images(batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, 1, 16, 16, generator=torch.Generator().manual_seed(11)) * 2 - 1


def model_of(**model_keys) -> UnifiedLatents:
    torch.manual_seed(0)
    model = UnifiedLatents(micro_config(model=model_keys).model)
    # The decoder's output layer starts at zero (it would ignore z_0): randomise it so every path carries gradient.
    torch.nn.init.normal_(model.decoder.out[-1].weight, std=0.1)
    return model


def encoder_gradient(model: UnifiedLatents, loss: torch.Tensor) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.encoder.parameters()))])


def test_normal_prior_rate_is_the_closed_form_kl_and_no_prior_network_exists():
    model = model_of(latent_prior="normal")
    assert model.prior is None and model.trained_networks(1) == ("encoder", "decoder")
    x = images()
    out = model.stage1_loss(x, generator=torch.Generator().manual_seed(0))
    # KL[N(α_0·z, σ_0²) ‖ N(0, 1)] per dimension, summed over the example, at λ_z(0) = 5.
    z = model.encode(x).double()
    lam = torch.tensor(5.0, dtype=torch.float64)
    alpha_sq, sigma_sq = torch.sigmoid(lam), torch.sigmoid(-lam)
    kl = 0.5 * (alpha_sq * z.square() + sigma_sq - torch.log(sigma_sq) - 1).flatten(1).sum(1)
    torch.testing.assert_close(out["prior_nats"].double(), kl.mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out["prior_kl"], out["prior_nats"], rtol=0, atol=0)
    assert out["bits_per_pixel"].item() == pytest.approx(kl.mean().item() / math.log(2) / 256, rel=1e-5)
    # Held-out bits (latent_nats) are the same closed form, whatever the generator (nothing is drawn).
    torch.testing.assert_close(model.latent_nats(x, generator=torch.Generator().manual_seed(9)).double(), kl,
                               rtol=1e-6, atol=0)
    out["loss"].backward()
    for name in ("encoder", "decoder"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, name).parameters()), name
    assert all(p.grad is None for p in model.base.parameters())
    # Sampling from a normal prior is a draw from N(0, I); the base model still trains in stage 2.
    drawn = model.sample_latents(3, steps=2, use_prior=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn, torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(5)))
    model.stage2_loss(x, generator=torch.Generator().manual_seed(0))["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.base.parameters())


def test_mse_decoder_is_a_one_pass_gaussian_likelihood():
    scale = 0.2
    model = model_of(decoder_loss="mse", mse_decoder_scale=scale)
    x = images()
    out = model.stage1_loss(x, generator=torch.Generator().manual_seed(0))
    # The same z_0 (stage 1's first draw), then x̂ = α·0 − σ·v̂ at log-SNR 0: x̂ = −v̂/√2.
    z_0 = model.noisy_latent(model.encode(x), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x_hat = -model.decoder(torch.zeros_like(x), torch.zeros(4), z_0) / math.sqrt(2)
    nll = 0.5 * (x - x_hat).square().flatten(1).sum(1) / scale**2 + 256 * math.log(scale * math.sqrt(2 * math.pi))
    torch.testing.assert_close(out["decoder_loss"], nll.mean())
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    # decode: one forward pass, deterministic (the generator and step count do not matter).
    calls = []
    model.decoder.register_forward_hook(lambda *_: calls.append(1))
    first = model.decode(z_0, steps=7, generator=torch.Generator().manual_seed(1))
    second = model.decode(z_0, steps=2, sampler="ancestral", generator=torch.Generator().manual_seed(2))
    assert len(calls) == 2 and torch.equal(first, second)
    torch.testing.assert_close(first, x_hat.clamp(-1, 1))
    assert model.sample(2, latent_steps=2, generator=torch.Generator().manual_seed(3)).shape == (2, 1, 16, 16)


def test_prior_stop_grad_leaves_only_the_decoder_term_training_the_encoder():
    model = model_of(prior_stop_grad=True)
    x, seed = images(), 0
    out = model.stage1_loss(x, generator=torch.Generator().manual_seed(seed))
    with_stop_grad = encoder_gradient(model, out["loss"])
    # The decoder's term alone, with stage 1's draws replayed in order: z_0, then the prior's, then the decoder's.
    g = torch.Generator().manual_seed(seed)
    z_clean = model.encode(x)
    z_0 = model.noisy_latent(z_clean, generator=g)
    prior_nats = model._latent_rate(z_clean.detach(), model._rate_kl(z_clean.detach(), "prior"), "prior",
                                    draw_term("cpu", g))
    decoder_term = model._decoder_loss(x, z_0, draw_term("cpu", g), None).mean()
    torch.testing.assert_close(prior_nats.mean(), out["prior_nats"], rtol=0, atol=0)
    torch.testing.assert_close(with_stop_grad, encoder_gradient(model, decoder_term), rtol=1e-6, atol=1e-9)
    # Without the switch the prior's term adds to the encoder's gradient; the prior trains either way.
    out = model.stage1_loss(x, generator=torch.Generator().manual_seed(seed))
    out["loss"].backward()
    assert any(p.grad.abs().sum() > 0 for p in model.prior.parameters())
    model.config.prior_stop_grad = False  # read at each call: the same weights, the switch off
    out = model.stage1_loss(x, generator=torch.Generator().manual_seed(seed))
    assert (encoder_gradient(model, out["loss"]) - with_stop_grad).abs().max() > 1e-3


def test_kl_weight_scales_the_rate_term_only():
    outs = [model_of(kl_weight=w).stage1_loss(images(), generator=torch.Generator().manual_seed(0))
            for w in (1.0, 0.25)]
    for key in ("prior_nats", "decoder_loss", "bits_per_pixel"):
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=0, atol=0)
    torch.testing.assert_close(outs[1]["loss"].detach(), 0.25 * outs[1]["prior_nats"] + outs[1]["decoder_loss"])


def test_vae_ldm_preset_is_tiny_with_the_baseline_switches_and_trains(tmp_path):
    preset, tiny = load_config("vae-ldm"), load_config("tiny")
    m = preset.model
    assert (m.latent_prior, m.decoder_loss) == ("normal", "mse") and m.kl_weight < 1
    assert (m.encoder, m.decoder, m.base, preset.train) == (tiny.model.encoder, tiny.model.decoder, tiny.model.base,
                                                            tiny.train)
    switches = {key: getattr(m, key) for key in ("latent_prior", "decoder_loss", "mse_decoder_scale", "kl_weight")}
    config = micro_config(model=switches, train={"stage1_steps": 2, "stage2_steps": 2, "eval_every": 2,
                                                 "checkpoint_every": 2})
    Trainer(config, tmp_path / "run").fit()
    metrics = read_metrics(tmp_path / "run")
    assert [r["stage"] for r in metrics if "loss" in r] == [1, 1, 2, 2]
    assert all(math.isfinite(r["loss"]) for r in metrics if "loss" in r)
    assert (tmp_path / "run" / "samples.png").exists() and (tmp_path / "run" / "reconstructions.png").exists()

