"""Checkpoints: weights as safetensors plus a training-state file, written atomically.

Layout of a run folder::

    RUN/checkpoints/step_00000400/{model.safetensors, ema.safetensors, state.pt}
    RUN/checkpoints/latest          # text file naming the newest complete checkpoint folder

A checkpoint folder is written under a temporary name and renamed into place, and ``latest`` is
replaced atomically, so a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "ul_fast.checkpoint.v1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, or not one of ours."""


def _atomic_write_text(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _weights(source: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = source.state_dict() if isinstance(source, nn.Module) else source
    return {k: v.detach().contiguous().cpu() for k, v in weights.items()}


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module | dict[str, torch.Tensor],
                    ema_model: nn.Module | dict[str, torch.Tensor], state: dict[str, Any], keep_last: int = 2) -> Path:
    """Write ``step_<step>`` atomically, point ``latest`` at it, prune to ``keep_last`` checkpoints.

    ``model`` and ``ema_model`` are modules or their full state dicts (gathered first when sharded)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        save_file(_weights(model), staging / "model.safetensors", metadata={"format": FORMAT})
        save_file(_weights(ema_model), staging / "ema.safetensors", metadata={"format": FORMAT})
        torch.save({"format": FORMAT, "step": step, **state}, staging / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _atomic_write_text(root / "latest", final.name + "\n")
    complete = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The folder ``latest`` points to; a clear error if there is none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        raise CheckpointError(f"no checkpoint in {run_dir}: {pointer} does not exist")
    folder = root / pointer.read_text().strip()
    if not folder.is_dir():
        raise CheckpointError(f"{pointer} names {folder.name}, which does not exist")
    return folder


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint file {path} is truncated or not a safetensors file: {error}") from None


def read_weights(module: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file and check it fits ``module``; foreign or mismatched weights are a clear error."""
    weights = _load_weights(path)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match this model: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]} (was it written with another config?)")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(expected[name].shape)} (another config?)")
    return weights


def load_weights_into(module: nn.Module, path: Path) -> None:
    """Load a safetensors file into an unsharded ``module`` (validated by :func:`read_weights`)."""
    module.load_state_dict(read_weights(module, path))


def load_state(folder: Path) -> dict[str, Any]:
    """The training-state dict of a checkpoint folder, validated."""
    path = folder / "state.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"{path} is truncated or not a ul_fast training state: {error}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ul_fast training state (format {FORMAT} expected)")
    return state


def load_trained_model(run_dir: str | Path, device: torch.device | str = "cpu", use_ema: bool = True):
    """``(config, model)`` from a run folder: its ``config.yaml`` and the newest checkpoint's EMA weights."""
    from ul_fast.config import load_config
    from ul_fast.model import UnifiedLatents

    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise CheckpointError(f"{run_dir} is not a ul_fast run folder: {config_path} does not exist")
    config = load_config(str(config_path))
    model = UnifiedLatents(config.model)
    folder = latest_checkpoint(run_dir)
    load_weights_into(model, folder / ("ema.safetensors" if use_ema else "model.safetensors"))
    return config, model.to(device).eval()
