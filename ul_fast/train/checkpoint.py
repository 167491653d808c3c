"""Checkpoints: weights as safetensors plus a training-state file, written atomically.

Layout of a run folder::

    RUN/checkpoints/step_00000400/{model.safetensors, ema.safetensors, state.pt, checksums.json}
    RUN/checkpoints/latest          # text file naming the newest complete checkpoint folder

A checkpoint folder is written under a temporary name (``.step_00000400.*``) and renamed into place, and
``latest`` is replaced atomically, so a run killed at any moment leaves the previous checkpoint intact.
``checksums.json`` holds the SHA-256 of every other file; loading verifies it, and a run resumes from the
newest checkpoint that reads back intact (checkpoints written before checksums load unverified).

Weights holding NaN or inf (a diverged run) are never written: :func:`save_checkpoint` refuses them before it
writes or prunes anything, so the checkpoints already written, the newest good one among them, stay. Nor are
they read: :func:`read_weights` refuses them (:class:`NonFiniteWeightsError`), so a checkpoint of an older
version that wrote them is skipped like a damaged one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ul_fast.files import sha256_of_file, write_atomically

FORMAT = "ul_fast.checkpoint.v1"
CHECKSUMS = "checksums.json"
FOLDER_NAME = re.compile(r"step_\d+")
"""Names of complete checkpoint folders (``step_00000400``); ``latest`` must hold one."""
T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted, or not one of ours."""


class NonFiniteWeightsError(CheckpointError):
    """Weights hold NaN or inf (the run diverged): such a checkpoint is never written, nor read."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped as unreadable, or loaded without checksums to verify it."""


def _write_checksums(folder: Path) -> None:
    """SHA-256 of every file in ``folder``, fsynced with them before the folder is renamed into place."""
    sums = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        with path.open("rb") as f:
            os.fsync(f.fileno())
        sums[path.name] = sha256_of_file(path)
    with (folder / CHECKSUMS).open("w") as f:
        json.dump(sums, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoint(folder: Path, warn_unverified: bool = True) -> bool:
    """Check every file of ``folder`` against its ``checksums.json``: True when verified, False (with a
    CheckpointWarning unless not ``warn_unverified``) for a checkpoint written without checksums;
    CheckpointError on a mismatch."""
    sums_path = folder / CHECKSUMS
    if not sums_path.is_file():
        if warn_unverified:
            warnings.warn(f"{folder} has no {CHECKSUMS} (written before checksums): loading it unverified",
                          CheckpointWarning, stacklevel=2)
        return False
    try:
        sums = json.loads(sums_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{sums_path} is unreadable: {error}") from None
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if sha256_of_file(path) != expected:
            raise CheckpointError(f"checkpoint file {path} fails its SHA-256 check (corrupted on disk?)")
    return True


def _weights(source: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = source.state_dict() if isinstance(source, nn.Module) else source
    return {k: v.detach().contiguous().cpu() for k, v in weights.items()}


def first_non_finite(weights: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``weights`` holding NaN or inf, or None."""
    return next((name for name, tensor in weights.items()
                 if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module | dict[str, torch.Tensor],
                    ema_model: nn.Module | dict[str, torch.Tensor], state: dict[str, Any], keep_last: int = 2) -> Path:
    """Write ``step_<step>`` atomically, point ``latest`` at it, prune to ``keep_last`` checkpoints.

    ``model`` and ``ema_model`` are modules or their full state dicts (gathered first when sharded).
    Raises :class:`NonFiniteWeightsError`, naming the first tensor, when either holds NaN or inf: before anything
    is written or pruned, so the checkpoints already there (the newest good one among them) stay as they are."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    weights, ema_weights = _weights(model), _weights(ema_model)
    for what, tensors in (("weight", weights), ("EMA weight", ema_weights)):
        if (name := first_non_finite(tensors)) is not None:
            raise NonFiniteWeightsError(f"not writing checkpoint {final.name}: {what} {name} holds NaN or inf (the "
                                        f"training diverged); the checkpoints already in {root} are kept as they are")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        save_file(weights, staging / "model.safetensors", metadata={"format": FORMAT})
        save_file(ema_weights, staging / "ema.safetensors", metadata={"format": FORMAT})
        torch.save({"format": FORMAT, "step": step, **state}, staging / "state.pt")
        _write_checksums(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_atomically(root / "latest", final.name + "\n", durable=True)
    for old in _checkpoint_folders(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The folder ``latest`` points to; a clear error if there is none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        raise CheckpointError(f"no checkpoint in {run_dir}: {pointer} does not exist")
    name = pointer.read_text().strip()
    if FOLDER_NAME.fullmatch(name) is None:
        raise CheckpointError(f"{pointer} holds {name!r}, not the name of a checkpoint folder (step_N)")
    folder = root / name
    if not folder.is_dir():
        raise CheckpointError(f"{pointer} names {folder.name}, which does not exist")
    return folder


def _checkpoint_folders(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def clean_staging(run_dir: str | Path) -> list[Path]:
    """Remove what interrupted checkpoint writes left (``.step_*`` staging folders, ``.latest.*`` files)."""
    root = Path(run_dir) / "checkpoints"
    leftovers = sorted(root.glob(".step_*")) + sorted(root.glob(".latest.*")) if root.is_dir() else []
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


def _move_aside(root: Path, folder: Path, error: CheckpointError) -> Path:
    """Rename a checkpoint that cannot be used to ``corrupt-step_*`` (damaged) or ``nonfinite-step_*`` (NaN or inf
    weights), ``.1``, ``.2``, … when taken: out of pruning and of the next resume, but not deleted."""
    prefix = "nonfinite" if isinstance(error, NonFiniteWeightsError) else "corrupt"
    target, copy = root / f"{prefix}-{folder.name}", 1
    while target.exists():
        target, copy = root / f"{prefix}-{folder.name}.{copy}", copy + 1
    os.replace(folder, target)
    return target


def newest_readable_checkpoint(run_dir: str | Path, read: Callable[[Path], T],
                               repair: bool = False) -> tuple[Path, T]:
    """``(folder, read(folder))`` for the newest checkpoint that verifies and reads: ``latest`` first, then
    the others newest first. Each one skipped is named in a CheckpointWarning. With ``repair`` (the process
    that owns the run folder), every checkpoint that cannot be used is moved aside (:func:`_move_aside`): those
    skipped, and of the others those whose files fail their checksums (each named in a warning); ``latest`` is
    pointed at the one taken when it named another or nothing usable. CheckpointError when none is readable."""
    root = Path(run_dir) / "checkpoints"
    folders = list(reversed(_checkpoint_folders(root)))
    pointer_wrong = False
    try:
        newest = latest_checkpoint(run_dir)
    except CheckpointError as error:
        if not folders:
            raise
        warnings.warn(f"{error}: trying the checkpoint folders instead", CheckpointWarning, stacklevel=2)
        newest, pointer_wrong = folders[0], True
    candidates = [newest] + [p for p in folders if p != newest]
    failures = []
    for position, folder in enumerate(candidates):
        try:
            verify_checkpoint(folder)
            value = read(folder)
        except CheckpointError as error:
            failures.append((folder, error))
            warnings.warn(f"skipping checkpoint {folder.name}: {error}", CheckpointWarning, stacklevel=2)
            continue
        if failures:
            warnings.warn(f"resuming from {folder}, the newest readable checkpoint", CheckpointWarning, stacklevel=2)
        if repair:
            for bad, error in failures:
                _move_aside(root, bad, error)
            for other in candidates[position + 1:]:  # not tried: a damaged one must not wait to be needed
                try:
                    verify_checkpoint(other, warn_unverified=False)
                except CheckpointError as error:
                    target = _move_aside(root, other, error)
                    warnings.warn(f"checkpoint {other.name} is damaged ({error}): moved aside to {target.name}",
                                  CheckpointWarning, stacklevel=2)
            if failures or pointer_wrong:
                write_atomically(root / "latest", folder.name + "\n", durable=True)
        return folder, value
    (newest_folder, newest_error), *older = failures
    also = f"; older ones fail too ({', '.join(p.name for p, _ in older)})" if older else ""
    raise CheckpointError(f"no readable checkpoint in {root}: the newest, {newest_folder.name}: {newest_error}{also}")


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint file {path} is truncated or not a safetensors file: {error}") from None


def read_weights(module: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file and check it fits ``module``; foreign or mismatched weights are a clear error, and
    NaN or inf in them a :class:`NonFiniteWeightsError`."""
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
    if (name := first_non_finite(weights)) is not None:
        raise NonFiniteWeightsError(f"{path}: {name} holds NaN or inf (written by a run that diverged)")
    return weights


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


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None):
    """The :class:`~ul_fast.config.Config` of a run folder, from its ``config.yaml`` (then ``overrides``).

    ``ul-fast train`` writes that file fully resolved, so a key it lacks would silently take the dataclass default
    (the paper's ImageNet-512 networks) and the checkpoints would then fail to fit. An empty file is refused, and
    so is one that lacks keys the newest readable checkpoint's own copy of the config (``state.pt``) has: it was
    truncated or edited. Keys that copy lacks too come from an older version and keep their defaults."""
    from ul_fast.config import ConfigError, load_config, missing_keys, read_config_mapping

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a ul_fast run folder: {path} does not exist")
    restore = "restore it: ul-fast train writes it whole, and every checkpoint's state.pt holds a copy (its 'config')"
    if not path.read_text().strip():
        raise ConfigError(f"{path} is empty; {restore}")
    missing = missing_keys(read_config_mapping(path))
    if missing and (root := Path(run_dir) / "checkpoints").is_dir():
        with warnings.catch_warnings():  # damaged checkpoints are reported where the weights are read
            warnings.simplefilter("ignore", CheckpointWarning)
            try:
                folder, state = newest_readable_checkpoint(run_dir, load_state)
            except CheckpointError:
                folder, state = None, {}
        saved = state.get("config")
        lost = [key for key in missing if key not in missing_keys(saved)] if isinstance(saved, dict) else []
        if lost:
            more = f" and {len(lost) - 3} more" if len(lost) > 3 else ""
            raise ConfigError(f"{path} lacks {', '.join(lost[:3])}{more}, which checkpoint {folder.name} in {root} "
                              f"was trained with: the file is truncated or was edited; {restore}")
    return load_config(str(path), overrides)


def load_trained_model(run_dir: str | Path, device: torch.device | str = "cpu", use_ema: bool = True):
    """``(config, model)`` from a run folder: its ``config.yaml`` (:func:`load_run_config`) and the newest
    checkpoint's EMA weights."""
    from ul_fast.model import UnifiedLatents

    config = load_run_config(run_dir)
    model = UnifiedLatents(config.model)
    name = "ema.safetensors" if use_ema else "model.safetensors"
    _, weights = newest_readable_checkpoint(run_dir, lambda folder: read_weights(model, folder / name))
    model.load_state_dict(weights)
    return config, model.to(device).eval()
