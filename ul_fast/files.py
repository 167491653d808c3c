"""File helpers shared by the layers that write or verify files: atomic writes (checkpoints' pointers, run and
evaluation records, data indexes, cache manifests) and SHA-256 (checkpoints, shipped weights, the text model)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def sha256_of_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: str | Path, data: str | bytes, *, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``: a reader (another
    rank, a resumed run) sees the old file or the new one, never half of one; a failed write leaves no temporary
    file. ``durable``: fsync before the rename, so the new file survives a power loss (checkpoints). The file is
    readable by all (mode 0644: ``mkstemp``'s 0600 would hide an index in a shared data folder from other users).
    Returns the path."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_json_atomically(path: str | Path, record: Any, *, indent: int | None = 2) -> Path:
    """``record`` as JSON (``indent`` None: compact, for large indexes), written with :func:`write_atomically`."""
    text = json.dumps(record, indent=indent) + "\n" if indent is not None else \
        json.dumps(record, separators=(",", ":"))
    return write_atomically(path, text)
