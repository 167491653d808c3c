"""Data parallelism helpers: FSDP2 sharding (``fully_shard``) and full-state-dict gathering.

DDP is wired in the trainer directly; with ``train.parallel: fsdp`` every network is sharded per
transformer/residual block and as a whole, so its parameters are DTensors. Checkpoints always hold full,
unsharded tensors, so a run can be resumed or sampled from with any number of processes' worth of files.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The full value of a (possibly sharded or replicated) DTensor, or the tensor itself (a collective)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def shard_networks(model: nn.Module, world_size: int, device_type: str) -> None:
    """FSDP2: shard each adaLN/residual block, then each network, over one data-parallel mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ul_fast.nets.layers import AdaLNBlock, ResBlock

    mesh = init_device_mesh(device_type, (world_size,))
    for name in model.NETWORKS:
        network = getattr(model, name, None)
        if network is None:
            continue
        for block in network.modules():
            if isinstance(block, (AdaLNBlock, ResBlock)):
                fully_shard(block, mesh=mesh)
        fully_shard(network, mesh=mesh)


_FULL = {"full_state_dict": True, "cpu_offload": True}


def gather_weights(module: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """Full CPU weights (on rank 0 when sharded: a collective every rank must join)."""
    if not sharded:
        return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(**_FULL))


def load_weights(module: nn.Module, weights: dict[str, torch.Tensor], sharded: bool) -> None:
    """Load full weights (every rank passes the same full dict when sharded)."""
    if not sharded:
        module.load_state_dict(weights)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True))


def gather_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(**_FULL))


def load_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                   sharded: bool) -> None:
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
