"""Exponential moving average of a model's weights, kept as a second module for evaluation."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ul_fast.train.parallel import local


def make_ema_model(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` that :func:`update_ema` moves towards the trained weights."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    ema.eval()
    return ema


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up ``min(decay, (1 + n)/(10 + n))`` after ``n`` updates, so early evaluations are not
    dominated by the random initialisation."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, prefixes: tuple[str, ...]) -> None:
    """``ema ← decay·ema + (1 − decay)·model`` for parameters under ``prefixes`` (the trained
    sub-networks); buffers are copied."""
    trained = dict(model.named_parameters())
    # local(): with FSDP both copies are sharded alike, so the update is shard-local.
    ema_params = [local(p) for name, p in ema.named_parameters() if name.startswith(prefixes)]
    model_params = [local(trained[name].detach()) for name, _ in ema.named_parameters() if name.startswith(prefixes)]
    if ema_params:
        torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        local(ema_buffer).copy_(local(buffer))


@torch.no_grad()
def copy_weights(target: nn.Module, source: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Copy parameters under ``prefixes`` from ``source`` to ``target`` (e.g. at a stage change)."""
    params = dict(source.named_parameters())
    for name, p in target.named_parameters():
        if name.startswith(prefixes):
            local(p).copy_(local(params[name]))
