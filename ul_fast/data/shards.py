"""Sharded tar archives in the WebDataset layout, read as a map-style decoded-image source.

Layout (what :func:`ul_fast.data.shard_writer.write_shards` writes, and what any WebDataset tool reads):
``<root>/*.tar``, each holding samples as consecutive members ``<key>.<ext>`` that share a key (the member
name up to the first dot of its file name): one image (``png``, ``jpg`` or ``jpeg``), optionally its
class index as ASCII digits (``cls``), its captions (``txt``: UTF-8, one caption per line; without one, the
``caption`` string of a ``json`` member, as img2dataset writes it) and anything else (ignored). An optional
``<root>/classes.json`` (a JSON list of strings) names the classes.

WebDataset's own reader only streams a shard from its start. Training here needs random access instead:
the deterministic, resumable, rank-disjoint order of the batch stream picks any index at any time. So
:class:`ShardSource` walks the tar headers once, records every sample's (shard, byte offset, byte size,
label, captions), and reads an image with one positioned read of exactly its bytes. The index is cached as JSON
beside the shards (:data:`INDEX_NAME`) and reused while the shards' names, sizes and modification times
are unchanged; a read-only shard folder just rebuilds it in memory on every start.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ul_fast.files import write_json_atomically

from .caption_data import CaptionTable, apply_caption_policy, caption_lines, decode_caption_bytes
from .folder import decode_image

__all__ = ["CLASSES_NAME", "IMAGE_EXTENSIONS", "INDEX_NAME", "MANIFEST_NAME", "ShardSource", "list_shards"]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
"""Member extensions read as the sample's image (lower case; WebDataset lower-cases extensions too)."""
CLASSES_NAME = "classes.json"
MANIFEST_NAME = "shards.json"  # written by ul_fast.data.shard_writer: count, shards, channels, source
INDEX_NAME = "shards-index.json"
_INDEX_VERSION = 2  # 2: captions
_MAX_OPEN_SHARDS = 64  # file descriptors one process keeps open (least recently used are closed)
# WebDataset's key rule (webdataset.tariterators.base_plus_ext): the key is the path up to the first dot of
# the file name, the extension everything after it.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def list_shards(root: str | Path) -> list[Path]:
    """The ``*.tar`` files directly in ``root``, sorted by name; errors name ``root`` when there are none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"shards: {root} is not a folder")
    if not any(root.iterdir()):
        raise ValueError(f"shards: {root} is empty (expected WebDataset shards *.tar; write them with "
                         f"`ul-fast prepare-shards`)")
    shards = sorted(p for p in root.glob("*.tar") if p.is_file() and not p.name.startswith("."))
    if not shards:
        hint = (": its train/ and test/ folders hold the splits (the spec shards:<dir> reads them)"
                if (root / "train").is_dir() and (root / "test").is_dir() else
                f" (found e.g. {sorted(root.iterdir())[0].name})")
        raise ValueError(f"shards: {root} holds no *.tar shards{hint}")
    return shards


def _shard_stats(shards: list[Path]) -> list[dict[str, Any]]:
    """``[{"name", "size", "mtime_ns"}]`` per shard: what the index cache and the fingerprint depend on."""
    stats = []
    for path in shards:
        st = path.stat()
        stats.append({"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return stats


def _json_caption(data: bytes, where: str) -> list[str] | None:
    """The ``caption`` of a sample's ``json`` member (img2dataset's layout), None when it has none."""
    try:
        record = json.loads(decode_caption_bytes(data, where))
    except ValueError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from None
    caption = record.get("caption") if isinstance(record, dict) else None
    if caption is None:
        return None
    if not isinstance(caption, str):
        raise ValueError(f"{where}: \"caption\" must be a string, got {caption!r}")
    return [caption.strip()] if caption.strip() else []


def _index_shard(path: Path) -> dict[str, list]:
    """Walk one shard's tar headers: per sample its key, image extension, image data offset and size (bytes),
    label (-1 without a ``cls`` member) and captions (None without a ``txt`` member or a ``json`` caption)."""
    keys: list[str] = []
    exts: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    labels: list[int] = []
    captions: list[list[str] | None] = []
    current: str | None = None  # key of the sample being collected
    image: tuple[str, int, int] | None = None
    label = -1
    text: list[str] | None = None  # the txt member's captions
    from_json: list[str] | None = None  # the json member's caption

    def finish() -> None:
        if current is None:
            return
        if image is None:
            raise ValueError(f"{path}: sample {current!r} has no image member (expected one of "
                             f"{', '.join(f'{current}.{e}' for e in IMAGE_EXTENSIONS)})")
        keys.append(current)
        exts.append(image[0])
        offsets.append(image[1])
        sizes.append(image[2])
        labels.append(label)
        captions.append(text if text is not None else from_json)

    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed: headers are read, data is skipped by seeking
            for member in tar:
                if not member.isfile():
                    continue
                match = _KEY_AND_EXTENSION.match(member.name)
                if match is None or member.name.rpartition("/")[2].startswith("__"):  # WebDataset skips these too
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if key != current:
                    finish()
                    current, image, label, text, from_json = key, None, -1, None, None
                if ext in IMAGE_EXTENSIONS:
                    if image is not None:
                        raise ValueError(f"{path}: sample {key!r} has two images ({key}.{image[0]}, {member.name})")
                    image = (ext, member.offset_data, member.size)
                elif ext == "cls":
                    digits = tar.extractfile(member).read().decode("ascii", errors="replace").strip()
                    if not re.fullmatch(r"\d+", digits):
                        raise ValueError(f"{path}: {member.name} must hold a class index >= 0, got {digits!r}")
                    label = int(digits)
                elif ext == "txt":
                    where = f"{path}:{member.name}"
                    text = caption_lines(decode_caption_bytes(tar.extractfile(member).read(), where))
                elif ext == "json":
                    from_json = _json_caption(tar.extractfile(member).read(), f"{path}:{member.name}")
            finish()
    except tarfile.TarError as e:
        raise ValueError(f"{path}: not a readable tar file ({e})") from e
    return {"keys": keys, "exts": exts, "offsets": offsets, "sizes": sizes, "labels": labels, "captions": captions}


def _load_index(root: Path, shards: list[Path], stats: list[dict[str, Any]]) -> list[dict[str, list]]:
    """Per-shard index records (:func:`_index_shard`), in ``shards`` order.

    A shard whose name, size and modification time match the cache keeps its cached record; the others
    are indexed now, and the cache is rewritten (when ``root`` is writable).
    """
    cache = root / INDEX_NAME
    cached: dict[str, dict[str, Any]] = {}
    try:
        record = json.loads(cache.read_text())
        if record.get("version") == _INDEX_VERSION:
            cached = {entry["stat"]["name"]: entry for entry in record["shards"]}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass  # no cache, or a torn or foreign one: index every shard
    entries, changed = [], len(cached) != len(shards)  # a removed shard changes the cache too
    for path, stat in zip(shards, stats):
        entry = cached.get(stat["name"])
        if entry is None or entry["stat"] != stat:
            entry, changed = {"stat": stat, **_index_shard(path)}, True
        entries.append(entry)
    if changed:
        try:
            write_json_atomically(cache, {"version": _INDEX_VERSION, "shards": entries}, indent=None)
        except OSError as e:
            warnings.warn(f"shards: cannot cache the shard index at {cache} ({e}); it is rebuilt on every start",
                          stacklevel=3)
    return entries


def _load_class_names(root: Path) -> list[str] | None:
    path = root / CLASSES_NAME
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: expected a JSON list of class names (strings)")
    return names


def _manifest_channels(root: Path) -> int:
    """``channels`` recorded in ``<root>/shards.json`` by the writer; 3 when there is no manifest."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        return 3
    try:
        return int(json.loads(path.read_text())["channels"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected a manifest with an integer 'channels' ({e})") from e


class ShardSource:
    """Map-style decoded-image source over the WebDataset shards ``<root>/*.tar`` (sorted by name).

    Args:
        root: the folder holding the shards.
        channels: 1 (every image converted to mode "L") or 3 ("RGB"); None takes ``channels`` from the
            manifest ``<root>/shards.json`` written with the shards, else 3.
        caption_policy: a text model's ``data.caption_policy`` for samples without a caption (None: captions are
            not required): ``skip`` leaves them out of the source.

    ``source[i]`` is ``(PIL.Image in mode L/RGB at its stored size, label)``, label -1 when the sample has no
    ``cls`` member; ``source.captions`` the samples' :class:`~ul_fast.data.caption_data.CaptionTable` (None when
    no sample has a caption). Samples are numbered shard by shard in member order. Undecodable image bytes raise
    :class:`~ul_fast.data.errors.BadImageError` naming ``<shard>:<member>``; a shard that shrank or cannot be
    read raises ``OSError``.

    Picklable: the pickle carries the index (NumPy arrays), never open files; shards are opened on first read
    (at most 64 at a time per object), so ``DataLoader`` workers, forked or spawned, read independently.
    """

    def __init__(self, root: str | Path, channels: int | None = None, caption_policy: str | None = None) -> None:
        root = Path(root)
        if channels is None:
            channels = _manifest_channels(root)
        if channels not in (1, 3):
            raise ValueError(f"ShardSource: channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        shards = list_shards(root)
        stats = _shard_stats(shards)
        index = _load_index(root, shards, stats)
        if not any(shard["keys"] for shard in index):
            raise ValueError(f"ShardSource: the shards in {root} hold no samples")

        self.root = root
        self.channels = channels
        self.source = f"shards:{root}"
        self.shard_paths = [str(p) for p in shards]
        self._fingerprint = hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()
        # Flat per-sample columns (NumPy, so that pickling to workers and forking stay cheap).
        self._shard = np.concatenate([np.full(len(s["keys"]), k, np.int32) for k, s in enumerate(index)])
        self._offset = np.concatenate([np.asarray(s["offsets"], np.int64) for s in index])
        self._size = np.concatenate([np.asarray(s["sizes"], np.int64) for s in index])
        self.labels = np.concatenate([np.asarray(s["labels"], np.int64) for s in index])
        """int64 ``[N]``: every sample's label (-1 when it has none)."""
        self._member = np.array([f"{key}.{ext}".encode() for s in index for key, ext in zip(s["keys"], s["exts"])])

        self.class_names = _load_class_names(root)
        if self.class_names is not None and int(self.labels.max()) >= len(self.class_names):
            raise ValueError(f"ShardSource: label {int(self.labels.max())} in {root} has no name in "
                             f"{root / CLASSES_NAME} ({len(self.class_names)} names)")
        self._files: collections.OrderedDict[int, int] = collections.OrderedDict()  # shard -> fd, LRU order
        per_sample = [captions for shard in index for captions in shard["captions"]]
        self.captions = None if all(c is None for c in per_sample) else CaptionTable([c or [] for c in per_sample])
        self.caption_report = None
        if self.captions is not None and caption_policy is not None:
            self.captions, kept, self.caption_report = apply_caption_policy(self.captions, caption_policy,
                                                                            self.source, self.member_name)
            if kept is not None:  # the samples left out are not items of this source
                self._shard, self._offset, self._size = self._shard[kept], self._offset[kept], self._size[kept]
                self.labels, self._member = self.labels[kept], self._member[kept]

    def __len__(self) -> int:
        return int(self._offset.shape[0])

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the shards' names, sizes and modification times: changes when a shard is added,
        removed or rewritten."""
        return self._fingerprint

    def member_name(self, index: int) -> str:
        """``<shard path>:<key>.<ext>`` of sample ``index``'s image, as errors name it."""
        return f"{self.shard_paths[self._shard[index]]}:{self._member[index].decode()}"

    def encoded(self, index: int) -> tuple[bytes, str]:
        """Sample ``index``'s stored image bytes and extension (``png``, ``jpg`` or ``jpeg``), undecoded."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"ShardSource: index {index} out of range for {len(self)} samples")
        shard, offset, size = int(self._shard[index]), int(self._offset[index]), int(self._size[index])
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise OSError(f"{self.shard_paths[shard]}: expected {size} bytes at offset {offset}, read "
                          f"{len(data)}: the shard changed after it was indexed")
        return data, self._member[index].decode().rpartition(".")[2]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        data, _ = self.encoded(index)
        return decode_image(data, self.channels, self.member_name(index)), int(self.labels[index])

    def _fd(self, shard: int) -> int:
        """A read-only descriptor of shard ``shard``, kept open (least recently used closed beyond 64).

        Reads are positioned (``os.pread``), so no file position is shared: descriptors a ``DataLoader``
        worker inherits through fork are safe to use, and a pickled copy starts with none.
        """
        fd = self._files.get(shard)
        if fd is None:
            fd = os.open(self.shard_paths[shard], os.O_RDONLY)
            self._files[shard] = fd
            if len(self._files) > _MAX_OPEN_SHARDS:
                os.close(self._files.popitem(last=False)[1])
        else:
            self._files.move_to_end(shard)
        return fd

    def close(self) -> None:
        """Close the descriptors this object holds (reading again reopens them)."""
        files, self._files = self._files, collections.OrderedDict()
        for fd in files.values():
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown os may already be gone
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": collections.OrderedDict()}

    def __repr__(self) -> str:
        return (f"ShardSource(n={len(self)}, shards={len(self.shard_paths)}, channels={self.channels}, "
                f"root={str(self.root)!r})")
