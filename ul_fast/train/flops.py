"""Model FLOPs utilisation (MFU): the FLOPs of a training step, counted once, against the card's peak.

The FLOPs of one example's forward and backward are counted by :class:`torch.utils.flop_counter.FlopCounterMode`
on a copy of the model built on the ``meta`` device (no memory, no computation: shapes only), so the count costs
the same for a 0.4 M-parameter test model and the 720 M-parameter paper config, and runs the reference ops, whose
matmuls and convolutions the counter knows (a custom kernel's FLOPs would not be counted). Attention runs SDPA's
math backend there, so it counts as its matmuls: ``4·S²·D`` per head forward, twice that backward, the usual
model-FLOPs convention (a flash kernel's recomputation is not counted; on a CPU tensor, SDPA's flash kernel would
not be counted at all). As usual for MFU, elementwise work is not counted, and a stage counts what its step
computes: stage 2 counts the frozen encoder's forward unless it trains from a latent cache.

Achieved TFLOP/s per device = FLOPs per example × examples per device / seconds; MFU = that / the card's dense
bf16 peak (:data:`PEAK_TFLOPS`, or ``train.peak_tflops``).
"""

from __future__ import annotations

import dataclasses
import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ul_fast.config import Config, ModelConfig

__all__ = ["PEAK_TFLOPS", "FlopsMeter", "flops_per_example", "peak_tflops"]

PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    # (a substring of torch.cuda.get_device_name(), dense bf16 tensor-core TFLOP/s from the vendor's data sheet);
    # the first match wins, so the more specific names come first.
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
"""Dense bf16 peaks per card, for ``mfu`` in ``metrics.jsonl``; a card not listed gets no ``mfu`` unless
``train.peak_tflops`` is set."""


def peak_tflops(device: torch.device, configured: float = 0.0) -> float | None:
    """The peak TFLOP/s MFU is measured against: ``configured`` when > 0, else the table's entry for a CUDA
    device's name, else None (a CPU, or a card not in :data:`PEAK_TFLOPS`)."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def flops_per_example(model: ModelConfig, stage: int, from_latents: bool = False) -> float:
    """FLOPs of one example's forward and backward in a ``stage`` (1 or 2) training step of ``model``
    (stage 2 given clean latents when ``from_latents``)."""
    key = (json.dumps(dataclasses.asdict(model), sort_keys=True), stage, from_latents)
    if key not in _COUNTED:
        _COUNTED[key] = _count(model, stage, from_latents)
    return _COUNTED[key]


_COUNTED: dict[tuple[str, int, bool], float] = {}
"""FLOPs per example already counted in this process, by (model config as JSON, stage, from_latents)."""


def _count(config: ModelConfig, stage: int, from_latents: bool) -> float:
    from ul_fast.model import UnifiedLatents  # the model layer imports this package's config only

    batch = 2  # every counted op is linear in the batch; 2 avoids any special case of a batch of one
    with torch.device("meta"):
        # .to("meta"): after a transformers (5.x) from_pretrained, some factories (torch.linspace) ignore the device
        # context and would leave a buffer on the CPU
        model = UnifiedLatents(config).to("meta")
        prefixes = tuple(f"{name}." for name in model.trained_networks(stage))
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(prefixes))
        x = torch.empty(batch, *model.image_shape)
        z_clean = torch.empty(batch, *model.latent_shape) if from_latents else None
        uses_base = stage == 2 or model.single_stage
        labels = torch.zeros(batch, dtype=torch.long) if uses_base and config.num_classes else None
        context = pooled = None
        if uses_base and config.context_dim:
            context = torch.empty(batch, config.text_max_tokens, config.context_dim)
            pooled = torch.empty(batch, config.context_dim)
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            out = model(None if from_latents else x, labels, context, pooled, stage=stage, z_clean=z_clean)
            out["loss"].backward()
    return counter.get_total_flops() / batch


class FlopsMeter:
    """``tflops`` and ``mfu`` of a training run's log windows (FLOPs per example counted once per stage)."""

    def __init__(self, config: Config, device: torch.device, from_latents: bool = False):
        self.model, self.from_latents = config.model, from_latents
        self.peak = peak_tflops(device, config.train.peak_tflops)

    def rates(self, stage: int, examples_per_device: float, seconds: float) -> dict[str, float]:
        """``{"tflops": achieved TFLOP/s per device, "mfu": its share of the peak}`` (no ``mfu`` without a
        known peak) for ``examples_per_device`` trained in ``seconds``."""
        if seconds <= 0:
            return {}
        tflops = flops_per_example(self.model, stage, self.from_latents) * examples_per_device / seconds / 1e12
        return {"tflops": tflops} if self.peak is None else {"tflops": tflops, "mfu": tflops / self.peak}
