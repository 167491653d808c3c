"""Test helper: folders dated back, so that a cached folder index is trusted at once (see
:mod:`ul_fast.data.lazy_folder`: an index is reused only for folders that had settled when it was listed)."""

from __future__ import annotations

import os
from pathlib import Path


def age_folders(root: Path) -> None:
    """Date ``root`` and its sub-folders back a day: a file added later changes its folder's time even within
    the same tick of the file system's clock (a few ms), as it would in real use."""
    for folder in (root, *(p for p in root.iterdir() if p.is_dir())):
        old = folder.stat().st_mtime_ns - 86_400 * 10**9
        os.utime(folder, ns=(old, old))
