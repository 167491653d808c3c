"""The diffusers drop-in (extra ``ul-fast[diffusers]``): ``AutoencoderUL`` has AutoencoderKL's interface, its
posterior is UL's, its decoder UL's, it saves and loads as a diffusers model, and a diffusers UNet2DModel trains
on its latents with a diffusers scheduler and samples images through it."""

import importlib
import math
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed")

from ul_fast.api.diffusers_vae import AutoencoderUL  # noqa: E402
from ul_fast.diffusion import alpha_sigma, prior_kl  # noqa: E402
from ul_fast.train import Trainer, load_trained_model  # noqa: E402

from micro import micro_config  # noqa: E402
from readme_blocks import run_block  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers") / "run"
    Trainer(micro_config(train={"stage1_steps": 3, "stage2_steps": 0, "eval_every": 1000, "checkpoint_every": 1000}),
            folder).fit()
    return folder


@pytest.fixture(scope="module")
def vae(run):
    return AutoencoderUL.from_ul(run, decoder_steps=3)


def images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_the_posterior_is_uls_noisy_latent(run, vae):
    _, model = load_trained_model(run)
    x = images()
    posterior = vae.encode(x).latent_dist
    assert isinstance(posterior, diffusers.models.autoencoders.vae.DiagonalGaussianDistribution)
    z_clean = model.encode(x)
    alpha, sigma = alpha_sigma(torch.tensor(model.latent_logsnr_0))
    assert torch.equal(posterior.z_clean, z_clean)
    assert torch.equal(posterior.mean, alpha * z_clean) and torch.equal(posterior.mode(), posterior.mean)
    assert torch.equal(posterior.std, torch.full_like(z_clean, float(sigma)))
    # logvar = log σ² computed in fp64 then rounded once to fp32: within one ulp of |log σ²| ≈ 5.
    torch.testing.assert_close(posterior.logvar, torch.full_like(z_clean, math.log(float(sigma) ** 2)), rtol=0,
                               atol=5 * torch.finfo(torch.float32).eps)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(posterior.sample(generator=g1), posterior.mean + posterior.std * torch.randn(z_clean.shape,
                                                                                                   generator=g2))
    # diffusers' KL to N(0, I) is UL's closed form KL[q(z_0|x) ‖ N(0, I)] at λ_z(0) (the normal prior's rate):
    # the same ½Σ(μ² + σ² − log σ² − 1) over 64 latent dims in fp32, summed in other orders and with logvar from
    # exp vs. log: a relative error of a few fp32 ulps per term, so 64·4 ulps of the total bounds the difference.
    kl = prior_kl(z_clean, model.latent_logsnr_0)
    torch.testing.assert_close(posterior.kl(), kl, rtol=256 * torch.finfo(torch.float32).eps, atol=0)


def test_decode_is_uls_diffusion_decoder(run, vae):
    _, model = load_trained_model(run)
    z = vae.encode(images()).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    decoded = vae.decode(z, generator=torch.Generator().manual_seed(1)).sample
    assert torch.equal(decoded, model.decode(z, 3, "ddim", torch.Generator().manual_seed(1)))
    assert torch.equal(vae.decode(z, generator=torch.Generator().manual_seed(1), return_dict=False)[0], decoded)
    per_image = vae.decode(z[:2], generator=[torch.Generator().manual_seed(i) for i in (5, 6)]).sample
    assert torch.equal(per_image[1:], model.decode(z[1:2], 3, "ddim", torch.Generator().manual_seed(6)))
    with pytest.raises(ValueError, match=r"\[B, 4, 4, 4\]"):
        vae.decode(torch.zeros(1, 4, 8, 8))
    assert vae.config.latent_channels == 4 and vae.config.sample_size == 16


def test_save_pretrained_and_from_pretrained_round_trip(vae, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    again = AutoencoderUL.from_pretrained(tmp_path / "vae")
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.config) == public(vae.config)
    original, loaded = vae.state_dict(), again.state_dict()
    assert original.keys() == loaded.keys() and all(torch.equal(original[k], loaded[k]) for k in original)
    assert not any(k.startswith(("ul.prior.", "ul.base.")) for k in loaded)  # an autoencoder: encoder and decoder
    z = vae.encode(images(2)).latent_dist.mode()
    assert torch.equal(again.decode(z, generator=torch.Generator().manual_seed(0)).sample,
                       vae.decode(z, generator=torch.Generator().manual_seed(0)).sample)
    half = AutoencoderUL.from_pretrained(tmp_path / "vae", torch_dtype=torch.bfloat16)  # as pipelines load it
    latents = half.encode(images(2).bfloat16()).latent_dist.sample()
    decoded = half.decode(latents).sample
    assert latents.dtype == decoded.dtype == torch.bfloat16 and bool(torch.isfinite(decoded.float()).all())


def test_a_diffusers_unet_trains_on_ul_latents_and_samples_through_the_decoder(vae):
    """What a diffusers training script does, with UL's autoencoder in the VAE's place."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    vae.requires_grad_(False)
    c = vae.config
    unet = UNet2DModel(sample_size=vae.ul.latent_size, in_channels=c.latent_channels, out_channels=c.latent_channels,
                       layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    scheduler = DDPMScheduler(num_train_timesteps=100)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    x = images(8)
    vae.register_to_config(scaling_factor=vae.estimate_scaling_factor(x, torch.Generator().manual_seed(1)))
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(1)) * vae.config.scaling_factor
    # The same draws, scaled by 1/std: unit std up to fp32 rounding of the 512-element std (≤ 512 ulps).
    assert latents.std().item() == pytest.approx(1.0, rel=512 * torch.finfo(torch.float32).eps)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
    losses = []
    for _ in range(15):  # one fixed batch: the loss must fall if gradients reach the UNet through the pipeline
        noisy = scheduler.add_noise(latents, noise, timesteps)
        loss = torch.nn.functional.mse_loss(unet(noisy, timesteps).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses

    scheduler.set_timesteps(4)
    sample = torch.randn(2, c.latent_channels, vae.ul.latent_size, vae.ul.latent_size,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            sample = scheduler.step(unet(sample, t).sample, t, sample).prev_sample
        decoded = vae.decode(sample / vae.config.scaling_factor, generator=torch.Generator().manual_seed(0)).sample
    assert decoded.shape == (2, 1, 16, 16) and bool(torch.isfinite(decoded).all()) and decoded.abs().max() <= 1


def test_without_diffusers_the_import_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    monkeypatch.delitem(sys.modules, "ul_fast.api.diffusers_vae")
    with pytest.raises(ImportError, match=r"ul-fast\[diffusers\]"):
        importlib.import_module("ul_fast.api.diffusers_vae")
    monkeypatch.undo()
    assert importlib.import_module("ul_fast.api.diffusers_vae").AutoencoderUL is AutoencoderUL


def test_the_readme_diffusers_block_runs(tmp_path, monkeypatch):
    run_block("### diffusers: UL's autoencoder as a drop-in VAE", tmp_path, monkeypatch)
    assert (tmp_path / "ul-vae" / "config.json").is_file()
