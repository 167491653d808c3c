"""Which config keys may change when a run is resumed (``ul-fast train --resume RUN --set KEY=VALUE``).

A resumed run continues the exact computation of the checkpointed one, so only keys that do not change what
has been computed so far may change: schedule lengths, cadences, sampling and the optimiser's
hyper-parameters (applied to the restored optimiser). The model's shape, the data and its order (seed,
batch size, accumulation, parallelism) may not.
"""

from __future__ import annotations

from typing import Any

from ul_fast.config import ConfigError

# Exact keys, or prefixes ending in ".".
CHANGEABLE_ON_RESUME = (
    "train.stage1_steps", "train.stage2_steps",
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_last", "train.eval_images",
    "train.progress", "train.max_bad_steps",
    "train.lr", "train.base_lr", "train.warmup_steps", "train.grad_clip", "train.weight_decay",
    "train.device",  # the same computation on another machine (torchrun sets it per rank)
    "train.cuda_graph",  # a replayed step computes what the eager step computes
    "train.activation_checkpointing",  # recomputed activations are the stored ones
    "train.peak_tflops",  # reporting only
    "sample.",
    "model.single_stage_sample_logsnr",  # where single-stage sampling stops: read only when sampling
    # how streamed batches are decoded, not which: order and augmentation follow from (seed, epoch, index)
    "data.num_workers", "data.prefetch_factor", "data.on_bad_image",
)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` → ``{"train.lr": 1}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{key: {"from": old value, "to": new value}}`` for every dotted key whose value differs."""
    before, after = flatten(old), flatten(new)
    return {key: {"from": before.get(key), "to": after.get(key)}
            for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)}


def check_resume_changes(changes: dict[str, dict[str, Any]], stage: int = 1) -> None:
    """ConfigError listing every changed key a resume may not change (``stage``: the checkpoint's stage;
    stage 1's length is history once stage 2 has started, and step numbers depend on it)."""
    refused = [key for key in changes if not key.startswith(CHANGEABLE_ON_RESUME)]
    if stage == 2 and "train.stage1_steps" in changes:
        refused.append("train.stage1_steps (stage 1 has finished)")
    if refused:
        raise ConfigError(f"these keys cannot change on --resume: {', '.join(refused)} (allowed: schedule "
                          "lengths, logging/eval/checkpoint cadence, train.lr/base_lr/warmup_steps/grad_clip/"
                          "weight_decay/max_bad_steps/cuda_graph/activation_checkpointing/peak_tflops, sample.*, "
                          "model.single_stage_sample_logsnr, data.num_workers/prefetch_factor/on_bad_image); start a "
                          "new run for the others")
