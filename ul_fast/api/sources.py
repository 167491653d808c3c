"""Where a model comes from: a run folder, an exported folder, or the name of a shipped model.

:func:`open_model` is the one loader behind ``ul_fast.load`` and the ``--run`` option of ``ul-fast sample`` and
``ul-fast eval``: an existing path is a run folder (it has ``config.yaml``) or an export (``manifest.json``);
any other string must name a shipped model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ul_fast.api.export import CARD_FILE, MANIFEST_FILE, ExportError, load_export
from ul_fast.api.shipped import SHIPPED_MODELS, shipped_model_folder
from ul_fast.config import Config
from ul_fast.model import UnifiedLatents
from ul_fast.train.checkpoint import load_trained_model
from ul_fast.train.run_info import base_model_trained

__all__ = ["KINDS", "OpenedModel", "open_model", "resolve_source"]

KINDS = ("run", "export", "shipped")


@dataclass
class OpenedModel:
    """A loaded model and what is known about it.

    kind: one of :data:`KINDS`; path: its folder; config: the run's config (an export's: its model config, the
    run's sampling defaults and data spec); model: in eval mode, fp32, on the device asked for (a network an
    export left out is None); base_model_trained: whether the base model can generate (else the stage-1 prior
    samples); card: the model card of an export, None for a run.
    """

    kind: str
    path: Path
    config: Config
    model: UnifiedLatents
    base_model_trained: bool
    card: Path | None = None

    @property
    def networks(self) -> tuple[str, ...]:
        return tuple(n for n in UnifiedLatents.NETWORKS if getattr(self.model, n) is not None)


def resolve_source(source: str | Path) -> tuple[str, Path]:
    """``(kind, folder)`` of ``source`` without loading anything; a one-line error naming what was expected."""
    path = Path(source)
    if path.is_dir():
        if (path / MANIFEST_FILE).is_file():
            return "export", path
        if (path / "config.yaml").is_file():
            return "run", path
        raise ExportError(f"{path} is not a ul_fast run folder (no config.yaml) nor an exported model (no "
                          f"{MANIFEST_FILE})")
    if path.exists():
        raise ExportError(f"{path} is a file, not a ul_fast run folder, an exported model's folder or a shipped "
                          f"model's name")
    if str(source) in SHIPPED_MODELS:
        return "shipped", shipped_model_folder(str(source))
    raise ExportError(f"{source} is not a ul_fast run folder, an exported model or a shipped model's name: it does "
                      f"not exist (shipped models: {', '.join(SHIPPED_MODELS)})")


def open_model(source: str | Path, device: torch.device | str = "cpu") -> OpenedModel:
    """Load ``source`` (see :func:`resolve_source`) onto ``device``: a run's newest readable checkpoint (EMA
    weights), or an export's files (every SHA-256 verified)."""
    kind, path = resolve_source(source)
    if kind == "run":
        config, model = load_trained_model(path, device)
        return OpenedModel(kind, path, config, model, base_model_trained(path))
    export, model = load_export(path, device)
    return OpenedModel(kind, path, export.config, model, export.base_model_trained, path / CARD_FILE)
