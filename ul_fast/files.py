"""File helpers shared by the layers that verify what they load (checkpoints, shipped weights, the text model)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_of_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
