"""The networks on their own: output shapes, token layout, zero-initialised outputs, and constructors that
take their config dataclass and reject bad configurations with messages that name the field."""

import pytest
import torch

from ul_fast.config import DecoderConfig, EncoderConfig, ViTConfig
from ul_fast.nets import ResNetEncoder, UViTDecoder, ViTDenoiser
from ul_fast.nets.layers import patchify, sincos_position_embedding, unpatchify
from ul_fast.nets.vit import _merge, _split

ENCODER = EncoderConfig(channels=[16, 16], blocks_per_stage=[1, 1], patch=2)
VIT = ViTConfig(widths=[32], depths=[1], head_dim=16, mlp_ratio=2.0)
TWO_LEVEL_VIT = ViTConfig(widths=[32, 48], depths=[2, 1], head_dim=16, mlp_ratio=2.0)
DECODER = DecoderConfig(patch=2, conv_channels=[16], blocks_per_stage=1, width=32, depth=1, head_dim=16,
                        mlp_ratio=2.0, dropout=0.0)


def randomise(net: torch.nn.Module) -> torch.nn.Module:
    """Replace the zero-initialised output layers so that outputs depend on the inputs."""
    g = torch.Generator().manual_seed(0)
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    return net


def test_patchify_is_row_major_and_unpatchify_inverts_it():
    x = torch.randn(2, 3, 8, 12)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 2 * 3, 3 * 16)
    # Token 4 is patch row 1, column 1; its features are (channel, row-in-patch, column-in-patch).
    torch.testing.assert_close(tokens[:, 4], x[:, :, 4:8, 4:8].reshape(2, -1), rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(tokens, 3, 8, 12, 4), x, rtol=0, atol=0)


def test_token_merge_and_split_are_inverse_2x2_groupings():
    tokens = torch.randn(2, 16, 5)
    merged = _merge(tokens, 4)
    assert merged.shape == (2, 4, 20)
    # Merged token 1 holds grid cells (0, 2), (0, 3), (1, 2), (1, 3).
    torch.testing.assert_close(merged[:, 1].reshape(2, 2, 2, 5), tokens.reshape(2, 4, 4, 5)[:, 0:2, 2:4],
                               rtol=0, atol=0)
    torch.testing.assert_close(_split(merged, 4), tokens, rtol=0, atol=0)


def test_sincos_positions_are_distinct_per_token():
    positions = sincos_position_embedding(4, 16)
    assert positions.shape == (16, 16)
    assert torch.cdist(positions, positions).add(torch.eye(16)).min() > 0.1
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(4, 18)


def test_encoder_output_shape_and_downsampling_factor():
    encoder = ResNetEncoder(ENCODER, image_channels=3, latent_channels=5)
    assert encoder.downsample_factor == 4
    assert encoder(torch.randn(2, 3, 16, 16)).shape == (2, 5, 4, 4)


@pytest.mark.parametrize("config", [VIT, TWO_LEVEL_VIT, ViTConfig(widths=[32], depths=[1], head_dim=16, patch=2)],
                         ids=["one-level", "two-level", "patch2"])
def test_vit_output_shape_and_zero_output_at_initialisation(config):
    vit = ViTDenoiser(config, channels=4, grid=4, num_classes=10, context_dim=24)
    z_t, logsnr = torch.randn(3, 4, 4, 4), torch.randn(3)
    conditioning = {"labels": torch.tensor([0, 5, 10]), "context": torch.randn(3, 5, 24), "pooled": torch.randn(3, 24)}
    assert torch.equal(vit(z_t, logsnr, **conditioning), torch.zeros(3, 4, 4, 4))  # adaLN-Zero final layer
    randomise(vit)
    out = vit(z_t, logsnr, **conditioning)
    assert out.shape == (3, 4, 4, 4) and not torch.equal(out, vit(z_t, logsnr))  # the conditioning is used
    with pytest.raises(ValueError, match=r"expected latents \[B, 4, 4, 4\]"):
        vit(torch.randn(3, 4, 8, 8), logsnr)


@pytest.mark.parametrize("latent_logsnr_conditioning", [False, True])
def test_decoder_output_shape_and_zero_output_at_initialisation(latent_logsnr_conditioning):
    decoder = UViTDecoder(DECODER, image_channels=1, image_size=16, latent_channels=4,
                          latent_logsnr_conditioning=latent_logsnr_conditioning)
    assert decoder.bottleneck_grid == 4
    x_t, logsnr, z_0 = torch.randn(2, 1, 16, 16), torch.randn(2), torch.randn(2, 4, 4, 4)
    latent_logsnr = torch.randn(2) if latent_logsnr_conditioning else None
    assert torch.equal(decoder(x_t, logsnr, z_0, latent_logsnr), torch.zeros(2, 1, 16, 16))
    randomise(decoder)
    out = decoder(x_t, logsnr, z_0, latent_logsnr)
    assert out.shape == (2, 1, 16, 16) and not torch.equal(out, decoder(x_t, logsnr, z_0 + 1, latent_logsnr))
    with pytest.raises(ValueError, match=r"expected x_t \[B, 1, 16, 16\]"):
        decoder(torch.randn(2, 3, 16, 16), logsnr, z_0, latent_logsnr)


@pytest.mark.parametrize("build,match", [
    (lambda: ResNetEncoder(EncoderConfig(channels=[16], blocks_per_stage=[1, 1]), image_channels=1,
                           latent_channels=4),
     r"EncoderConfig.channels and blocks_per_stage .* got \[16\] and \[1, 1\]"),
    (lambda: ResNetEncoder(EncoderConfig(channels=[], blocks_per_stage=[]), image_channels=1, latent_channels=4),
     "EncoderConfig.channels and blocks_per_stage must be non-empty"),
    (lambda: ResNetEncoder(EncoderConfig(patch=0), image_channels=1, latent_channels=4),
     "EncoderConfig.patch must be >= 1, got 0"),
    (lambda: ViTDenoiser(ViTConfig(widths=[32], depths=[1, 1], head_dim=16), channels=4, grid=4),
     "ViTConfig.widths and depths must be non-empty and of the same length"),
    (lambda: ViTDenoiser(ViTConfig(widths=[40], depths=[1], head_dim=16), channels=4, grid=4),
     r"ViTConfig.widths\[0\] = 40 must be divisible by head_dim 16"),
    (lambda: ViTDenoiser(ViTConfig(widths=[32, 32], depths=[1, 2], head_dim=16), channels=4, grid=4),
     r"ViTConfig.depths\[0\] = 1 must be even"),
    (lambda: ViTDenoiser(ViTConfig(widths=[32], depths=[1], head_dim=16, patch=3), channels=4, grid=4),
     "latent grid 4 must be divisible by ViTConfig.patch 3"),
    (lambda: ViTDenoiser(ViTConfig(widths=[32] * 3, depths=[2, 2, 1], head_dim=16), channels=4, grid=2),
     "token grid 2 cannot be halved 2 times"),
    (lambda: ViTDenoiser(ViTConfig(widths=[32], depths=[1], head_dim=0), channels=4, grid=4),
     "ViTConfig.patch and head_dim must be >= 1"),
    (lambda: UViTDecoder(DecoderConfig(conv_channels=[]), image_channels=1, image_size=16, latent_channels=4),
     "DecoderConfig.conv_channels must be non-empty"),
    (lambda: UViTDecoder(DECODER, image_channels=1, image_size=10, latent_channels=4),
     r"image size 10 must be divisible by DecoderConfig's patch·2\^len\(conv_channels\) = 4"),
    (lambda: UViTDecoder(DecoderConfig(conv_channels=[16], width=40, head_dim=16), image_channels=1, image_size=16,
                         latent_channels=4), "DecoderConfig.width 40 must be divisible by head_dim 16"),
], ids=["encoder-lengths", "encoder-empty", "encoder-patch", "vit-lengths", "vit-head-dim", "vit-odd-depth",
        "vit-patch", "vit-levels", "vit-zero-head-dim", "decoder-empty", "decoder-image-size", "decoder-head-dim"])
def test_bad_configs_are_rejected_naming_the_field(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("build,match", [
    (lambda: ResNetEncoder(VIT, image_channels=1, latent_channels=4), "ResNetEncoder takes its EncoderConfig"),
    (lambda: ViTDenoiser(4, channels=4, grid=4), "ViTDenoiser takes its ViTConfig .* got int"),
    (lambda: UViTDecoder(ENCODER, image_channels=1, image_size=16, latent_channels=4),
     "UViTDecoder takes its DecoderConfig .* got EncoderConfig"),
], ids=["encoder", "vit", "decoder"])
def test_a_network_given_something_else_than_its_config_says_so(build, match):
    with pytest.raises(TypeError, match=match):
        build()


def test_shape_facts_are_keyword_only():
    with pytest.raises(TypeError):
        ResNetEncoder(ENCODER, 1, 4)  # (in, latent) channels are easy to swap: they must be named
