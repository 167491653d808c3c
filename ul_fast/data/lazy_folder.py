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

Captions (``metadata.jsonl`` or ``.txt`` side files, :mod:`ul_fast.data.folder`) are read when the index is built
and kept in it; ``metadata.jsonl``'s size and modification time are part of what must be unchanged for a reuse.
A ``.txt`` side file rewritten in place is not seen until the index is rebuilt (adding or removing any file of
its folder, or deleting ``.ul_fast/index.json``, rebuilds it).

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

from .caption_data import CaptionTable, apply_caption_policy
from .folder import (
    METADATA_FILE,
    FolderListing,
    open_image,
    read_folder_captions,
    relative_paths,
    scan_image_folder,
    visible_entries,
)

__all__ = ["INDEX_VERSION", "LazyImageFolder"]

INDEX_VERSION = 3  # 2: captions; 3: the listing's time (settled folders)
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


def _metadata_stat(root: Path) -> list[int] | None:
    """``[size, mtime_ns]`` of ``root/metadata.jsonl``, None when there is none."""
    try:
        stat = os.stat(root / METADATA_FILE)
    except FileNotFoundError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _is_current(index: Any, root: Path) -> bool:
    """Whether a loaded index describes ``root`` as it is now."""
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION or index.get("root") != str(root):
        return False
    try:
        settled = all(mtime <= index["listed_ns"] - MTIME_GRANULARITY_NS for mtime in index["mtimes_ns"])
        return (settled and _mtimes(root, index["classes"]) == index["mtimes_ns"]
                and _metadata_stat(root) == index["metadata_stat"])
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
    metadata = _metadata_stat(root)
    before = {e.name: e.stat().st_mtime_ns for e in visible_entries(root) if e.is_dir()}
    listing = scan_image_folder(root)
    captions = read_folder_captions(root, listing)
    listed_ns = time.time_ns()  # a folder that changed later than a tick before this may change unseen
    # A class folder made while listing has no time from before: -1 never matches, so it is rebuilt next time.
    mtimes = [root_mtime] + [before.get(name, -1) for name in listing.class_names or []]
    return {"version": INDEX_VERSION, "root": str(root), "mtimes_ns": mtimes, "listed_ns": listed_ns,
            "metadata_stat": metadata, "classes": listing.class_names, "files": listing.files,
            "captions": None if captions is None else captions.to_lists()}


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
        caption_policy: a text model's ``data.caption_policy`` for images without a caption (None: captions are
            not required): ``skip`` leaves them out of the source.

    ``folder[i]`` is ``(image, label)``: a Pillow image at its stored size and the class index (-1 when
    unlabeled); it raises :class:`~ul_fast.data.errors.BadImageError` for bytes that do not decode.
    Attributes: ``channels``, ``class_names`` (None when unlabeled), ``captions`` (a
    :class:`~ul_fast.data.caption_data.CaptionTable` of the items, None when the folder has none),
    ``source`` (``folder-stream:<root>``), ``index_path`` (where the index is cached, or None) and
    ``index_reused`` (whether it was read back).
    """

    def __init__(self, root: str | Path, channels: int, cache_dir: str | Path | None = None,
                 caption_policy: str | None = None):
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
        paths = relative_paths(FolderListing(self.class_names, groups, [], False))
        if self.class_names is None:
            labels = np.full(len(paths), -1, dtype=np.int32)
        else:
            labels = np.repeat(np.arange(len(groups), dtype=np.int32), [len(names) for names in groups])
        self.captions = None if index["captions"] is None else CaptionTable(index["captions"])
        self.caption_report = None
        if self.captions is not None and caption_policy is not None:
            self.captions, kept, self.caption_report = apply_caption_policy(self.captions, caption_policy,
                                                                            self.source, lambda i: paths[i])
            if kept is not None:
                paths, labels = [paths[i] for i in kept], labels[kept]
        self._paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)  # fixed-width bytes [N]
        self._labels = labels
        digest = hashlib.sha256("\n".join(paths).encode())
        if self.captions is not None:  # resuming on changed captions is an error too
            digest.update(self.captions.digest().encode())
        self._fingerprint = f"{len(paths)}-{digest.hexdigest()[:16]}"

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
