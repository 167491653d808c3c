"""An image folder read lazily: a file index in memory, each image decoded when it is asked for.

The folder follows :mod:`ul_fast.data.folder`'s layout rules (``root/<class>/<image>``, ImageNet's layout,
or flat and unlabeled). Listing a large folder is the slow part of a start (1.28 M files for ImageNet), so
the index (relative paths, labels, class names) is built once and cached as JSON:

* beside the data, ``<root>/.ul_fast/index.json``, when ``root`` is writable; the ``.ul_fast`` folder is
  made before ``root`` is listed, so writing the index later does not change ``root``'s modification time;
* else in the ``cache_dir`` the caller passes (e.g. the run folder), named by a hash of ``root``'s path.

A cached index is reused while the modification times of ``root`` and of every class folder are those it
recorded: adding, removing or renaming an image changes its folder's time, and the index is rebuilt.
(Rewriting an image in place does not; :meth:`LazyImageFolder.fingerprint` does not see it either.) A folder's
time only moves by ticks of the file system's clock, so a file added in the tick in which the listing ended would
leave it unchanged: an index is trusted only when every folder it lists had last changed at least
:data:`MTIME_GRANULARITY_NS` before its listing ended; otherwise the next start lists the folder again. (So a new
folder is listed at its first two starts: making ``<root>/.ul_fast`` at the first changes ``root``.)

In memory the index is two numpy arrays (paths as fixed-width bytes, labels as int32), not Python lists:
DataLoader workers share them with the parent without the reference-count writes that copy lists page by page.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ul_fast.files import write_json_atomically

from .folder import list_image_folder, open_image, visible_entries

__all__ = ["INDEX_VERSION", "LazyImageFolder"]

INDEX_VERSION = 2
MTIME_GRANULARITY_NS = 2 * 10**9
"""The coarsest tick of a file system's modification times in use (FAT: 2 s; ext4 and most others: a few ms),
by which a folder must have changed before its listing ended for the index to be trusted."""
_INDEX_FOLDER = ".ul_fast"  # hidden: the layout rules skip it
_INDEX_NAME = "index.json"


def _store_index(index: dict[str, Any], locations: list[Path]) -> Path | None:
    """Write ``index`` to the first of ``locations`` that takes it; that path, or None when none does."""
    for path in locations:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomically(path, index, indent=None)
            return path
        except OSError:  # read-only (e.g. a stale .ul_fast folder on a data set mounted read-only since)
            continue
    return None


def _beside_the_data(root: Path) -> Path | None:
    """``<root>/.ul_fast/index.json``, its folder made now; None when ``root`` is read-only."""
    try:
        (root / _INDEX_FOLDER).mkdir(exist_ok=True)
    except OSError:
        return None
    return root / _INDEX_FOLDER / _INDEX_NAME


def _in_cache(root: Path, cache_dir: Path) -> Path:
    key = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return cache_dir / f"folder-index-{key}.json"


def _mtimes(root: Path, class_names: list[str] | None) -> list[int]:
    """Modification times (ns) of ``root`` then of each class folder."""
    folders = [root] + [root / name for name in class_names or []]
    return [os.stat(folder).st_mtime_ns for folder in folders]


def _is_current(index: Any, root: Path) -> bool:
    """Whether a loaded index describes ``root`` as it is now."""
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION or index.get("root") != str(root):
        return False
    try:
        settled = all(mtime <= index["listed_ns"] - MTIME_GRANULARITY_NS for mtime in index["mtimes_ns"])
        return settled and _mtimes(root, index["classes"]) == index["mtimes_ns"]
    except (OSError, KeyError, TypeError):  # a class folder is gone, or the file is not an index
        return False


def _read_index(path: Path, root: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):  # unreadable or torn: rebuild it
        return None
    return index if _is_current(index, root) else None


def _build_index(root: Path) -> dict[str, Any]:
    # Times are taken before listing, so a file added while listing makes the next start rebuild, not miss it.
    root_mtime = os.stat(root).st_mtime_ns
    before = {e.name: e.stat().st_mtime_ns for e in visible_entries(root) if e.is_dir()}
    class_names, files = list_image_folder(root)
    listed_ns = time.time_ns()  # a folder that changed later than a tick before this may change unseen
    # A class folder made while listing has no time from before: -1 never matches, so it is rebuilt next time.
    mtimes = [root_mtime] + [before.get(name, -1) for name in class_names or []]
    return {"version": INDEX_VERSION, "root": str(root), "mtimes_ns": mtimes, "listed_ns": listed_ns,
            "classes": class_names, "files": files}


def _cached_index(root: Path, locations: list[Path]) -> tuple[dict[str, Any], Path | None, bool]:
    """``(index, where it is cached or None, whether it was read back)``: the first current index found in
    ``locations``, else a new one stored in the first location that takes it."""
    for path in locations:
        if (index := _read_index(path, root)) is not None:
            return index, path, True
    index = _build_index(root)
    return index, _store_index(index, locations), False


class LazyImageFolder:
    """Map-style source of the images of a folder, decoded on access (see the module docstring).

    Args:
        root: the folder.
        channels: 1 (images converted to mode "L") or 3 ("RGB").
        cache_dir: where to cache the index when ``root`` is read-only (None: rebuild it on every start).

    ``folder[i]`` is ``(image, label)``: a Pillow image at its stored size and the class index (-1 when
    unlabeled); it raises :class:`~ul_fast.data.errors.BadImageError` for bytes that do not decode.
    Attributes: ``channels``, ``class_names`` (None when unlabeled), ``source`` (``folder-stream:<root>``),
    ``index_path`` (where the index is cached, or None) and ``index_reused`` (whether it was read back).
    """

    def __init__(self, root: str | Path, channels: int, cache_dir: str | Path | None = None):
        if channels not in (1, 3):
            raise ValueError(f"LazyImageFolder: channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        self.root = Path(root).resolve()
        self.channels = channels
        self.source = f"folder-stream:{self.root}"
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} is not a folder")
        locations = [_beside_the_data(self.root), _in_cache(self.root, Path(cache_dir)) if cache_dir else None]
        index, self.index_path, self.index_reused = _cached_index(self.root, [p for p in locations if p])
        self.class_names: list[str] | None = index["classes"]
        groups: list[list[str]] = index["files"]
        if self.class_names is None:
            paths = groups[0]
            labels = np.full(len(paths), -1, dtype=np.int32)
        else:
            paths = [f"{name}/{file}" for name, names in zip(self.class_names, groups) for file in names]
            labels = np.repeat(np.arange(len(groups), dtype=np.int32), [len(names) for names in groups])
        self._paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)  # fixed-width bytes [N]
        self._labels = labels
        digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
        self._fingerprint = f"{len(paths)}-{digest}"

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, i: int) -> Path:
        """The file of example ``i``."""
        return self.root / os.fsdecode(self._paths[i])

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return open_image(self.path(i), self.channels), int(self._labels[i])

    @property
    def num_classes(self) -> int:
        """``len(class_names)``; 0 when unlabeled."""
        return len(self.class_names or [])

    def fingerprint(self) -> str:
        """``"<count>-<hash of the relative paths>"``: changes when a file is added, removed or renamed."""
        return self._fingerprint

    def __repr__(self) -> str:
        labels = f"{self.num_classes} classes" if self.class_names is not None else "unlabeled"
        return f"LazyImageFolder(n={len(self)}, channels={self.channels}, {labels}, root={str(self.root)!r})"
