"""A micro configuration (16×16 Fashion-MNIST, 4×4×4 latents) small enough for CPU tests."""

from __future__ import annotations

from ul_fast.config import Config, config_from_dict

MICRO = {
    "model": {
        "image_size": 16, "image_channels": 1, "latent_channels": 4,
        "encoder": {"channels": [16, 16], "blocks_per_stage": [1, 1], "patch": 2},
        "prior": {"widths": [32], "depths": [1], "head_dim": 16, "mlp_ratio": 2.0},
        "decoder": {"patch": 2, "conv_channels": [16], "blocks_per_stage": 1, "width": 32, "depth": 1,
                    "head_dim": 16, "mlp_ratio": 2.0, "dropout": 0.0},
        "base": {"widths": [32], "depths": [2], "head_dim": 16, "mlp_ratio": 2.0, "dropout": 0.0},
        "decoder_weighting": {"factor": 3.0, "bias": 0.0}, "num_classes": 10,
    },
    "train": {"batch_size": 16, "stage1_steps": 6, "stage2_steps": 4, "warmup_steps": 2, "log_every": 1,
              "eval_every": 3, "eval_images": 4, "checkpoint_every": 3, "progress": False, "lr": 1e-3},
    "sample": {"latent_steps": 3, "decoder_steps": 3, "grid_images": 10},
}


def micro_config(**sections) -> Config:
    """MICRO with per-section overrides, e.g. ``micro_config(train={"stage1_steps": 10})``."""
    data = {key: dict(value) for key, value in MICRO.items()}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)
