"""Device names from configs and the command line (``"auto"``, ``"cpu"``, ``"cuda:1"``) as torch devices."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → the first CUDA device when one is available, else the CPU; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
