"""Exponential moving average of a model's weights, kept as a second module for evaluation."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ul_fast.train.parallel import local


def make_ema_model(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` that an :class:`EmaUpdater` moves towards the trained weights."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    ema.eval()
    return ema


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up ``min(decay, (1 + n)/(10 + n))`` after ``n`` updates, so early evaluations are not
    dominated by the random initialisation."""
    return min(decay, (1.0 + step) / (10.0 + step))


class EmaUpdater:
    """``ema ← ema + w·(model − ema)`` for the parameters under ``prefixes`` (the trained sub-networks), with
    ``w = 1 − decay``; buffers are copied.

    The weight may be a device tensor (0-dim): the trainer passes ``(1 − decay)·applied``, zero on a skipped
    step, so that the update needs no decision on the host and can be captured in a CUDA graph. The parameter
    lists are gathered once, not per step.
    """

    def __init__(self, ema: nn.Module, model: nn.Module, prefixes: tuple[str, ...]):
        trained = dict(model.named_parameters())
        names = [name for name, _ in ema.named_parameters() if name.startswith(prefixes)]
        # local(): with FSDP both copies are sharded alike, so the update is shard-local.
        ema_params = dict(ema.named_parameters())
        self.ema_params = [local(ema_params[name]) for name in names]
        self.model_params = [local(trained[name].detach()) for name in names]
        self.buffers = [(local(e), local(m)) for e, m in zip(ema.buffers(), model.buffers())]

    @torch.no_grad()
    def __call__(self, weight: float | torch.Tensor) -> None:
        if self.ema_params:
            step = torch._foreach_sub(self.model_params, self.ema_params)
            torch._foreach_mul_(step, weight)
            torch._foreach_add_(self.ema_params, step)
        for ema_buffer, buffer in self.buffers:
            ema_buffer.copy_(buffer)


@torch.no_grad()
def copy_weights(target: nn.Module, source: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Copy parameters under ``prefixes`` from ``source`` to ``target`` (e.g. at a stage change)."""
    params = dict(source.named_parameters())
    for name, p in target.named_parameters():
        if name.startswith(prefixes):
            local(p).copy_(local(params[name]))
