"""The UnifiedLatents model: loss bookkeeping, gradients, sampling, checkpoints, bad input."""

import math

import pytest
import torch

from ul_fast import ops
from ul_fast.config import ConfigError
from ul_fast.model import UnifiedLatents
from ul_fast.model.draws import draw_term
from ul_fast.sampling import logsnr_grid, sample
from ul_fast.train import CheckpointError, load_trained_model, save_checkpoint
from ul_fast.train.ema import make_ema_model

from micro import micro_config

U = torch.finfo(torch.float32).eps


@pytest.fixture
def model() -> UnifiedLatents:
    return UnifiedLatents(micro_config().model)


def images(batch: int = 8, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 1, size, size) * 2 - 1


def test_loss_breakdown_is_on_one_per_example_scale(model):
    out = model.stage1_loss(images(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["loss"].detach(), out["prior_nats"] + out["decoder_loss"])
    latent_dims = math.prod(model.latent_shape)
    assert out["bits_per_pixel"].item() == pytest.approx(out["prior_nats"].item() / math.log(2) / (16 * 16))
    assert out["bits_per_latent_dim"].item() == pytest.approx(out["prior_nats"].item() / math.log(2) / latent_dims)
    # Summed over dimensions (not averaged): an untrained prior pays on the order of a nat per latent dim.
    assert out["prior_nats"].item() > 0.2 * latent_dims


def test_diffusion_loss_sums_over_the_example():
    g = torch.Generator().manual_seed(0)
    x, pred = torch.randn(3, 2, 5, 7, generator=g), torch.randn(3, 2, 5, 7, generator=g)
    logsnr, rate, seed = torch.tensor([-3.0, 0.0, 4.0]), torch.tensor([1.0, 2.0, 3.0]), ops.draw_seed("cpu", g)
    eps = ops.gaussian_noise(x.shape, seed)
    expected = 0.5 * rate * 1.5 * torch.sigmoid(0.5 - logsnr) * (eps - pred).square().sum((1, 2, 3))
    got = ops.diffusion_loss(pred, x, logsnr, rate, seed, "eps", loss_factor=1.5, bias=0.5)
    torch.testing.assert_close(got, expected)


def test_v_prediction_loss_is_the_eps_loss_of_the_converted_prediction():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 3, 6, generator=g), torch.randn(4, 3, 6, generator=g)
    logsnr, rate, seed = torch.randn(4, generator=g) * 3, torch.rand(4, generator=g) + 0.5, ops.draw_seed("cpu", g)
    x_t, _ = ops.noise_inject(x, logsnr, seed)
    alpha, sigma = (c[:, None, None] for c in ops.alpha_sigma(logsnr))
    eps_hat = sigma * x_t + alpha * v
    v_loss = ops.diffusion_loss(v, x, logsnr, rate, seed, "v").double()
    eps_loss = ops.diffusion_loss(eps_hat, x, logsnr, rate, seed, "eps").double()
    # Both sides compute ε̂ = σ·x_t + α·v in fp32, the v-loss with its backend's α, σ (≤ 2 ulp from
    # ops.alpha_sigma's). With u = fp32 eps and m = |σ·x_t| + |α·v|: the α, σ differences give ≤ 2·u·m, each
    # side's two products and sum ≤ 1.5·u·m, each side's r = ε − ε̂ one more rounding of u/2·|r|, so
    # δ ≤ 5·u·m + u·|r|. Per example the loss ½·rate·Σr² then differs by ≤ ½·rate·Σ(2|r|δ + δ²), plus each
    # side's rounding of its n squares and their n-term sum (any order: ≤ n·u·Σr²) and of the scale (2 roundings).
    r = ops.gaussian_noise(x.shape, seed).double() - eps_hat.double()
    delta = 5 * U * (sigma * x_t).double().abs() + 5 * U * (alpha * v).double().abs() + U * r.abs()
    n = x[0].numel()
    bound = (0.5 * rate.double() * (2 * r.abs() * delta + delta.square()).sum((1, 2))
             + 2 * (n + 2) * U * eps_loss)
    assert ((v_loss - eps_loss).abs() <= bound).all(), (v_loss - eps_loss, bound)


def test_gradients_reach_the_encoder_from_both_terms(model):
    # The decoder's output layer starts at zero (so at init it ignores z_0): randomise it for this test.
    torch.nn.init.normal_(model.decoder.out[-1].weight, std=0.1)
    x, g = images(), torch.Generator().manual_seed(0)
    z_clean = model.encode(x)
    z_0 = model.noisy_latent(z_clean, generator=g)
    prior_term = model._diffusion_term(model.prior, z_clean, model.latent_schedule, draw_term("cpu", g)).mean()
    decoder_term = model._diffusion_term(model.decoder, x, model.pixel_schedule, draw_term("cpu", g), loss_factor=3.0,
                                         bias=0.0, z_0=z_0).mean()
    params = list(model.encoder.parameters())
    for term in (prior_term, decoder_term):
        grads = torch.autograd.grad(term, params, retain_graph=True)
        assert sum(float(gr.abs().sum()) for gr in grads) > 0


def test_one_latent_logsnr_drives_encoder_noise_and_prior_schedule():
    model = UnifiedLatents(micro_config(model={"latent_logsnr_0": 4.0}).model)
    assert model.latent_schedule.logsnr_max == 4.0
    z = torch.zeros(2, *model.latent_shape)
    noise_only = model.noisy_latent(z, seed=torch.tensor([7]))
    sigma = ops.alpha_sigma(torch.tensor([4.0]))[1]
    torch.testing.assert_close(noise_only, sigma * ops.gaussian_noise(z.shape, torch.tensor([7])))


def test_sampling_shapes_and_stop_level(model):
    g = torch.Generator().manual_seed(0)
    z0 = model.sample_latents(3, steps=4, labels=torch.tensor([0, 1, 2]), guidance=2.0, generator=g)
    assert z0.shape == (3, *model.latent_shape)
    out = model.decode(z0, steps=3, generator=g)
    assert out.shape == (3, 1, 16, 16) and out.abs().max() <= 1
    assert logsnr_grid(model.latent_schedule, 4)[-1].item() == pytest.approx(model.latent_logsnr_0, abs=1e-5)
    assert model.reconstruct(images(2), steps=2, sampler="ancestral", generator=g).shape == (2, 1, 16, 16)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, model):
    from ul_fast.config import save_config

    config = micro_config()
    save_config(config, tmp_path / "config.yaml")
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    ema = make_ema_model(model)
    save_checkpoint(tmp_path, 3, model, ema, {"note": "test"})
    _, loaded = load_trained_model(tmp_path)
    x = images(4)
    a = model.eval().reconstruct(x, steps=3, generator=torch.Generator().manual_seed(5))
    b = loaded.reconstruct(x, steps=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_truncated_or_foreign_checkpoint_is_a_clear_error(tmp_path, model):
    from ul_fast.config import save_config

    save_config(micro_config(), tmp_path / "config.yaml")
    folder = save_checkpoint(tmp_path, 3, model, make_ema_model(model), {})
    data = (folder / "ema.safetensors").read_bytes()
    (folder / "ema.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_trained_model(tmp_path)
    other = UnifiedLatents(micro_config(model={"latent_channels": 8}).model)
    save_checkpoint(tmp_path, 6, other, make_ema_model(other), {})
    with pytest.raises(CheckpointError, match="does not match|shape"):
        load_trained_model(tmp_path)
    with pytest.raises(CheckpointError, match="not a ul_fast run"):
        load_trained_model(tmp_path / "nothing")


@pytest.mark.parametrize("bad,match", [
    (torch.rand(2, 3, 16, 16), "1 channel"),
    (torch.rand(2, 1, 32, 32), "size 16x16"),
    (torch.rand(1, 16, 16), r"\[B, C, H, W\]"),
])
def test_bad_images_are_rejected(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model.stage1_loss(bad)


def test_non_finite_pixels_are_rejected(model):
    x = images(2)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        model.encode(x)


@pytest.mark.parametrize("loss_factor", [0.0, -1.5])
def test_non_positive_loss_factor_is_rejected(loss_factor):
    with pytest.raises(ConfigError, match="decoder_weighting.factor"):
        micro_config(model={"decoder_weighting": {"factor": loss_factor, "bias": 0.0}})
    with pytest.raises(ValueError, match="loss_factor"):
        x = torch.zeros(2, 3)
        ops.diffusion_loss(x, x, torch.zeros(2), torch.ones(2), ops.draw_seed("cpu"), "eps", loss_factor, 0.0)


def test_ops_reject_mismatched_arguments():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="logsnr must have shape"):
        ops.noise_inject(x, torch.zeros(2), ops.draw_seed("cpu"))
    with pytest.raises(ValueError, match="seed must be an int64"):
        ops.noise_inject(x, torch.zeros(3), torch.tensor([1.0]))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.noise_inject(x.long(), torch.zeros(3), ops.draw_seed("cpu"))



def test_attention_op_handles_cross_attention_lengths():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 3, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 5, 3, 8, generator=g, dtype=torch.float64), torch.randn(2, 5, 3, 8, generator=g,
                                                                                  dtype=torch.float64)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    torch.testing.assert_close(ops.attention(q, k, v), expected)
    with pytest.raises(ValueError, match="k, v"):
        ops.attention(q, k, v[:, :4])
    with pytest.raises(ValueError, match="k, v"):
        ops.attention(q, k[..., :4], v[..., :4])


def test_text_conditioned_base_model_with_more_latent_tokens_than_text_tokens():
    """Cross-attention from 16 latent tokens to 5 text tokens (lengths differ)."""
    model = UnifiedLatents(micro_config(model={"num_classes": 0, "context_dim": 384, "text_max_tokens": 5}).model)
    x = images(3)
    context, pooled = torch.randn(3, 5, 384), torch.randn(3, 384)
    out = model.stage2_loss(x, context=context, pooled=pooled, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    z = model.sample_latents(3, steps=2, context=context, pooled=pooled, guidance=2.0)
    assert z.shape == (3, *model.latent_shape)


def test_decoder_weighting_reaches_the_decoder_loss():
    """Doubling decoder_weighting.factor doubles the decoder's term and leaves the prior's alone."""
    outs = []
    for factor in (3.0, 6.0):
        torch.manual_seed(0)
        model = UnifiedLatents(micro_config(model={"decoder_weighting": {"factor": factor, "bias": 1.0}}).model)
        outs.append(model.stage1_loss(images(4), generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(outs[1]["prior_nats"], outs[0]["prior_nats"], rtol=0, atol=0)
    torch.testing.assert_close(outs[1]["decoder_loss"], 2 * outs[0]["decoder_loss"])


def test_latent_nats_of_the_prior_is_stage1s_prior_term(model):
    x = images(4)
    out = model.stage1_loss(x, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    ops.draw_seed("cpu", generator)  # stage 1 draws z_0's noise first; the prior's term starts from here
    nats = model.latent_nats(x, "prior", generator=generator)
    assert nats.shape == (4,) and nats.dtype == torch.float32
    torch.testing.assert_close(nats.mean(), out["prior_nats"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="network must be 'prior' or 'base'"):
        model.latent_nats(x, "decoder")


def test_latent_nats_of_the_base_model_is_the_same_elbo_under_the_base_network():
    """A base model with the prior's architecture and weights gives the prior's rate; its conditioning counts
    (given, never dropped)."""
    same = {"widths": [32], "depths": [1], "head_dim": 16, "mlp_ratio": 2.0, "dropout": 0.0}
    model = UnifiedLatents(micro_config(model={"base": same, "num_classes": 0}).model)
    for p in model.prior.final.parameters():  # zero at initialisation: randomise, so the network matters
        torch.nn.init.normal_(p, std=0.1)
    model.base.load_state_dict(model.prior.state_dict())
    x = images(4)
    base = model.latent_nats(x, "base", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(base, model.latent_nats(x, "prior", generator=torch.Generator().manual_seed(1)),
                               rtol=0, atol=0)
    conditional = UnifiedLatents(micro_config(model={"label_dropout": 0.9}).model)
    for p in conditional.base.final.parameters():  # zero at initialisation: the output would ignore the label
        torch.nn.init.normal_(p, std=0.1)
    labels = torch.tensor([0, 1, 2, 3])
    given = conditional.latent_nats(x, "base", labels=labels, generator=torch.Generator().manual_seed(1))
    z = conditional.encode(x)
    undropped = conditional._latent_rate(z, conditional._rate_kl(z, "base"), "base",
                                         draw_term("cpu", torch.Generator().manual_seed(1)), labels=labels)
    torch.testing.assert_close(given, undropped, rtol=0, atol=0)  # a dropout would draw and null most labels
    assert not torch.equal(given, conditional.latent_nats(x, "base", generator=torch.Generator().manual_seed(1)))


def test_guidance_is_one_call_on_2n_examples_equal_to_two_calls(model, monkeypatch):
    """Inside the guidance interval the conditional and unconditional predictions come from one base-model
    call on 2n examples; the result equals the guided DDIM chain built from two calls of n."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.base.parameters():  # adaLN-Zero starts at zero output: give the condition an effect
            p.add_(0.2 * torch.randn_like(p))
    model.eval()
    labels, w, steps, interval = torch.tensor([0, 3, 7]), 2.5, 4, (-3.0, 3.0)

    def two_calls(z_t, logsnr):
        def denoised(y):
            return model._to_denoised(z_t, model.base(z_t, logsnr, y, None, None), logsnr)
        cond = denoised(labels)
        if not interval[0] <= float(logsnr[0]) <= interval[1]:
            return cond
        uncond = denoised(torch.full_like(labels, model.config.num_classes))
        return uncond + w * (cond - uncond)

    grid = logsnr_grid(model.sample_schedule, steps)
    z = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(5))
    expected = sample("ddim", two_calls, z, grid, disable=True)
    guided_steps = sum(interval[0] <= float(lam) <= interval[1] for lam in grid[:-1])
    assert 0 < guided_steps < steps  # the interval switches guidance on and off within the chain

    batch_sizes = []
    base_forward = model.base.forward
    monkeypatch.setattr(model.base, "forward", lambda z_t, *rest: batch_sizes.append(len(z_t)) or
                        base_forward(z_t, *rest))
    got = model.sample_latents(3, steps=steps, labels=labels, guidance=w, guidance_interval=interval,
                               generator=torch.Generator().manual_seed(5))
    assert sorted(batch_sizes) == [3] * (steps - guided_steps) + [6] * guided_steps
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
