"""A latent cache for stage 2: the frozen encoder's ``z_clean = E(x)`` of every image, read back as a dataset.

Stage 2 trains the base model on the latents of a frozen encoder (paper §3.3), so it needs no pixels and no
encoder forward per step once ``ul-fast encode`` (:func:`ul_fast.train.encode.encode_dataset`) has written
them. Layout of a cache folder::

    DIR/manifest.json                 # written last, atomically: a cache without it is incomplete
    DIR/train-00000.latents.npy       # [n, C_z, h, w] z_clean of images [0, n) of the split
    DIR/train-00000.flipped.npy       # (flip only) z_clean of the same images flipped horizontally
    DIR/train-00000.labels.npy        # int64 [n], class index or -1 (unlabeled)
    DIR/train-00000.captions.json     # (captioned data only) each image's captions, a JSON list of lists
    DIR/train-00001.latents.npy ...   # the next shard_size images; then test-00000.* (no flipped copies)

Shards are ``.npy`` files because NumPy memory-maps them (``np.load(mmap_mode="r")``): a reader touches only
the rows it reads, so its memory does not grow with the data set (ImageNet-512's latents are 1.28 M ×
32×32×32, 84 GB in bf16), and one fancy index gathers a batch. NumPy has no bfloat16: a bf16 shard holds its
bit pattern as ``uint16`` and the manifest's ``dtype`` says how to read it.

The manifest names the run and the SHA-256 of the encoder weights the latents came from
(:func:`encoder_sha256`), the latent shape, storage dtype, data spec and, per shard, each file's size and
SHA-256. :class:`LatentCache` refuses a cache from another encoder or of another latent shape, a missing or
truncated shard and (``verify_hashes``) a corrupted one, naming the file.

Flip: the flipped latents are extra items (item ``N + i`` is image ``i`` flipped), not a per-epoch choice, so
the dataset is a plain map-style one whose items need no epoch; over an epoch of the ``2N`` items every
image is seen once each way, as a random flip with p = 0.5 gives in expectation. A flipped item has its image's
captions (``ul-fast encode --flip`` warns when captions speak of left and right).

Captions are stored as text, not as embeddings, so that one cache serves any text encoder; stage 2 embeds them
as it embeds the captions of images (cached per caption). A text model's ``data.caption_policy`` applies to the
cache's items as to images: ``skip`` leaves items without a caption out.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import operator
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ul_fast.files import sha256_of_file

from .caption_data import CaptionTable, apply_caption_policy

if TYPE_CHECKING:  # a type only: the model is passed in by the caller
    from ul_fast.model import UnifiedLatents

__all__ = ["CACHE_DTYPES", "CAPTIONS", "ENCODER_HASH_METHOD", "FORMAT", "MANIFEST", "PROGRESS", "SPLITS", "LatentCache",
           "LatentCacheError", "check_cache_for_model", "encoder_sha256", "from_storage", "shard_file_name",
           "to_storage"]

FORMAT = "ul_fast.latent_cache.v1"
MANIFEST = "manifest.json"
PROGRESS = ".progress.json"
"""The shards an unfinished encode has written (removed when the manifest is written)."""
SPLITS = ("train", "test")
CAPTIONS = "captions"
"""The kind of a shard's caption file (JSON, not an array)."""
CACHE_DTYPES = {"bf16": np.uint16, "fp16": np.float16, "fp32": np.float32}
"""Storage dtype name → the NumPy dtype of its shards (bf16: its bit pattern as uint16)."""
ENCODER_HASH_METHOD = ("sha256 over the encoder's state-dict entries in sorted name order: for each, "
                       "'name\\0dtype\\0shape\\0' in UTF-8, then the tensor's bytes (contiguous, CPU, native order)")


class LatentCacheError(RuntimeError):
    """A latent cache is missing, incomplete, corrupted, or does not belong to the model using it."""


# ----------------------------------------------------------------------------- the encoder's identity
def encoder_sha256(weights: nn.Module | Mapping[str, torch.Tensor], prefix: str = "") -> str:
    """Hex SHA-256 of encoder weights (see ``ENCODER_HASH_METHOD``): the same for the same tensors, whatever
    file or device they came from, so a trainer can check a cache against the weights it holds.

    weights: the encoder module, or a state dict; with ``prefix`` (e.g. ``"encoder."`` for a whole model's
    state dict) only its entries under ``prefix`` count, named without it. Sharded (DTensor) weights must be
    gathered first."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    entries = {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}
    if not entries:
        raise ValueError(f"encoder_sha256: no weights{f' under {prefix!r}' if prefix else ''} to hash")
    digest = hashlib.sha256()
    for name in sorted(entries):
        tensor = entries[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- storage
def shard_file_name(split: str, shard: int, kind: str) -> str:
    """``train-00003.latents.npy``: ``kind`` is ``latents``, ``flipped`` or ``labels``; ``captions`` is
    ``train-00003.captions.json``."""
    return f"{split}-{shard:05d}.{kind}.{'json' if kind == CAPTIONS else 'npy'}"



def to_storage(z: torch.Tensor, dtype: str) -> np.ndarray:
    """Latents ``[n, C_z, h, w]`` (any float dtype) as the NumPy array a shard of ``dtype`` stores."""
    if dtype == "bf16":
        return z.detach().cpu().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if dtype == "fp16":
        return z.detach().cpu().to(torch.float16).numpy()
    if dtype == "fp32":
        return z.detach().cpu().to(torch.float32).numpy()
    raise ValueError(f"latent cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")


def from_storage(rows: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored rows (as :func:`to_storage` wrote them) → float32 tensor; exact (bf16 and fp16 widen losslessly)."""
    rows = np.array(rows)  # a copy: the tensor must not alias a read-only memory map
    if dtype == "bf16":
        return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(rows).float()


# ----------------------------------------------------------------------------- the reader
class LatentCache(Dataset):
    """One split of a latent cache as a map-style dataset: ``cache[i] -> (z_clean float32 [C_z, h, w], label)``.

    Args:
        root: the cache folder (with ``manifest.json``).
        expected_encoder_hash: the :func:`encoder_sha256` of the encoder that will use the latents; a cache
            from other weights is a :class:`LatentCacheError` naming the manifest and both hashes.
        expected_latent_shape: ``(C_z, h, w)`` of the model; another shape is an error naming the manifest.
        split: ``"train"`` or ``"test"``.
        verify_hashes: check every shard file's SHA-256 now (reads the whole split once: minutes for
            ImageNet, so off by default); the default checks each file's existence, size and array header.
        caption_policy: a text model's ``data.caption_policy`` for items without a caption (None: not required).

    Items ``[0, N)`` are the images in data-set order; with a flipped cache's train split, ``[N, 2N)`` are the
    same images flipped (a ``skip`` caption policy leaves out the items without a caption). Labels are class
    indices, -1 for unlabeled data; ``captions`` the items' :class:`~ul_fast.data.caption_data.CaptionTable`
    (None when the images had none). Shards are memory-mapped on first use in each process (a DataLoader worker
    maps its own), so memory does not grow with the data set.
    """

    def __init__(self, root: str | Path, expected_encoder_hash: str | None = None,
                 expected_latent_shape: Sequence[int] | None = None, split: str = "train",
                 verify_hashes: bool = False, caption_policy: str | None = None):
        if split not in SPLITS:
            raise ValueError(f"LatentCache: split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST
        self.manifest = _read_manifest(self.root)
        self.check(expected_encoder_hash, expected_latent_shape)
        if split not in self.manifest["splits"]:
            raise LatentCacheError(f"{self.manifest_path} has no {split!r} split (it has "
                                   f"{', '.join(self.manifest['splits'])})")
        entry = self.manifest["splits"][split]
        self.split = split
        self.dtype: str = self.manifest["dtype"]
        self.latent_shape: tuple[int, ...] = tuple(self.manifest["latent_shape"])
        self.encoder_hash: str = self.manifest["encoder_sha256"]
        self.class_names: list[str] | None = self.manifest["class_names"]
        self.labeled: bool = entry["labeled"]
        self.flipped: bool = entry["flipped"]
        self.source = f"latent cache {self.root} ({split})"
        self.image_spec: str = self.manifest["data"]  # the data spec the latents were encoded from
        self._shards: list[dict[str, Any]] = entry["shards"]
        self._starts = [0, *itertools.accumulate(s["count"] for s in self._shards)]  # first item of each shard
        self.images = self._starts[-1]  # distinct images; items are twice as many when flipped
        if self.images != entry["count"]:
            raise LatentCacheError(f"{self.manifest_path}: the {split} shards hold {self.images} latents, the "
                                   f"manifest's count says {entry['count']}")
        self._max_label = entry["max_label"]
        for shard in self._shards:
            for kind, record in shard["files"].items():
                self._check_file(record, kind, shard["count"], verify_hashes)
        self._mapped: dict[int, dict[str, np.ndarray]] = {}
        self._items: np.ndarray | None = None  # the stored items this split's items are (None: all of them)
        self.captions = self._read_captions() if entry.get("captioned") else None
        self.caption_report = None
        if self.captions is not None and caption_policy is not None:
            self.captions, self._items, self.caption_report = apply_caption_policy(
                self.captions, caption_policy, self.source, lambda i: f"item {i}")

    # ------------------------------------------------------------------------- checks
    def check(self, encoder_hash: str | None = None, latent_shape: Sequence[int] | None = None) -> None:
        """Raise :class:`LatentCacheError` unless the cache came from encoder weights with hash ``encoder_hash``
        and holds latents of shape ``latent_shape`` (each check skipped when None)."""
        recorded = self.manifest["encoder_sha256"]
        if encoder_hash is not None and encoder_hash != recorded:
            raise LatentCacheError(
                f"{self.manifest_path} was encoded by other encoder weights (run {self.manifest['run']}): its "
                f"encoder SHA-256 is {recorded}, this model's is {encoder_hash}; encode the data with this run's "
                f"weights (ul-fast encode --run RUN) or train from the run the cache came from")
        shape = tuple(self.manifest["latent_shape"])
        if latent_shape is not None and tuple(latent_shape) != shape:
            raise LatentCacheError(f"{self.manifest_path} holds latents of shape {list(shape)}, the model expects "
                                   f"{list(latent_shape)} (another model config?)")

    def _read_captions(self) -> CaptionTable:
        """Every stored item's captions (read whole: text is small beside the latents)."""
        per_image: list[list[str]] = []
        for shard in self._shards:
            path = self.root / shard["files"][CAPTIONS]["name"]
            try:
                captions = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise LatentCacheError(f"latent cache file {path} is unreadable: {error}") from None
            if not isinstance(captions, list) or len(captions) != shard["count"]:
                raise LatentCacheError(f"latent cache file {path} must list the captions of {shard['count']} images")
            per_image.extend(captions)
        table = CaptionTable(per_image)
        return table.tiled(2) if self.flipped else table

    def _check_file(self, record: dict[str, Any], kind: str, count: int, verify_hash: bool) -> None:
        path = self.root / record["name"]
        if not path.is_file():
            raise LatentCacheError(f"latent cache file {path} is missing (listed in {self.manifest_path})")
        if path.stat().st_size != record["bytes"]:
            raise LatentCacheError(f"latent cache file {path} has {path.stat().st_size} bytes, {self.manifest_path} "
                                   f"says {record['bytes']} (truncated or rewritten?)")
        if kind == CAPTIONS:  # JSON, read whole by _read_captions
            if verify_hash and sha256_of_file(path) != record["sha256"]:
                raise LatentCacheError(f"latent cache file {path} fails its SHA-256 check against "
                                       f"{self.manifest_path} (corrupted on disk?)")
            return
        if kind == "labels":
            shape, dtype = (count,), np.dtype(np.int64)
        else:
            shape, dtype = (count, *self.latent_shape), np.dtype(CACHE_DTYPES[self.dtype])
        try:
            array = np.load(path, mmap_mode="r")
        except ValueError as error:
            raise LatentCacheError(f"latent cache file {path} is not a .npy array: {error}") from None
        if array.shape != shape or array.dtype != dtype:
            raise LatentCacheError(f"latent cache file {path} holds {array.dtype} {list(array.shape)}, "
                                   f"{self.manifest_path} says {dtype} {list(shape)}")
        del array
        if verify_hash and sha256_of_file(path) != record["sha256"]:
            raise LatentCacheError(f"latent cache file {path} fails its SHA-256 check against {self.manifest_path} "
                                   f"(corrupted on disk?)")

    # ------------------------------------------------------------------------- what the trainer reads
    @property
    def num_classes(self) -> int:
        """``len(class_names)`` when known, else the largest label + 1; 0 for unlabeled data."""
        if self.class_names is not None:
            return len(self.class_names)
        return self._max_label + 1 if self.labeled else 0

    @property
    def max_label(self) -> int:
        """The largest label of the split (-1 when unlabeled)."""
        return self._max_label

    def fingerprint(self) -> str:
        """SHA-256 of the manifest: changes whenever the cache is re-encoded (it names every shard's hash)."""
        return sha256_of_file(self.manifest_path)

    def __len__(self) -> int:
        return self.images * (2 if self.flipped else 1) if self._items is None else len(self._items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.source}: index {index} out of range [0, {len(self)})")
        index %= len(self)
        if self._items is not None:
            index = int(self._items[index])
        flipped, image = divmod(index, self.images)
        k = bisect.bisect_right(self._starts, image) - 1
        arrays, row = self._shard(k), image - self._starts[k]
        latent = from_storage(arrays["flipped" if flipped else "latents"][row], self.dtype)
        self._check_finite(latent[None], np.array([index]))
        return latent, int(arrays["labels"][row])

    def batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` at once: ``(z_clean float32 [b, C_z, h, w], labels int64 [b])``, gathered with one
        fancy index per shard touched (cheaper than ``b`` single items)."""
        order = np.asarray(indices, dtype=np.int64).reshape(-1)
        if order.size and (order.min() < 0 or order.max() >= len(self)):
            bad = int(order.min() if order.min() < 0 else order.max())
            raise IndexError(f"{self.source}: index {bad} out of range [0, {len(self)})")
        if self._items is not None:
            order = self._items[order]
        flipped = order >= self.images
        image = order - self.images * flipped
        starts = np.asarray(self._starts)
        shard = np.searchsorted(starts, image, side="right") - 1
        latents = torch.empty((order.size, *self.latent_shape), dtype=torch.float32)
        labels = torch.empty(order.size, dtype=torch.int64)
        for k in np.unique(shard):
            arrays = self._shard(int(k))
            for kind, mask in (("latents", ~flipped), ("flipped", flipped)):
                picked = np.flatnonzero((shard == k) & mask)
                if picked.size:
                    rows = image[picked] - starts[k]
                    latents[torch.from_numpy(picked)] = from_storage(arrays[kind][rows], self.dtype)
                    labels[torch.from_numpy(picked)] = torch.from_numpy(np.asarray(arrays["labels"][rows]))
        self._check_finite(latents, order)
        return latents, labels

    def _check_finite(self, latents: torch.Tensor, order: np.ndarray) -> None:
        """Raise :class:`LatentCacheError` naming the first item whose latent holds NaN or inf: checked here, on
        the CPU, so that the training step never reads the device to check its input."""
        finite = np.isfinite(latents.numpy()).reshape(len(order), -1).all(axis=1)
        if not finite.all():
            bad = int(order[np.flatnonzero(~finite)[0]])
            raise LatentCacheError(f"{self.source}: the latent of item {bad} is not finite (NaN or inf): the cache is "
                                   "damaged; encode it again (ul-fast encode)")

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        """Shard ``k``'s arrays, memory-mapped on first use in this process."""
        if k not in self._mapped:
            self._mapped[k] = {kind: np.load(self.root / record["name"], mmap_mode="r")
                               for kind, record in self._shards[k]["files"].items() if kind != CAPTIONS}
        return self._mapped[k]

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers map the shards themselves
        return {**self.__dict__, "_mapped": {}}

    def __repr__(self) -> str:
        return (f"LatentCache(n={len(self)}, latent_shape={list(self.latent_shape)}, dtype={self.dtype}, "
                f"flipped={self.flipped}, source={self.source!r})")


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        if not root.is_dir():
            raise LatentCacheError(f"latent cache {root} does not exist (write one with ul-fast encode)")
        unfinished = (root / PROGRESS).exists() or any(root.glob("*.npy")) or any(root.glob(".*.npy.tmp"))
        why = (" its encode did not finish (rerun the same ul-fast encode to resume it)" if unfinished
               else " write one with ul-fast encode")
        raise LatentCacheError(f"{root} is not a complete latent cache: {path} does not exist;{why}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LatentCacheError(f"{path} is unreadable: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LatentCacheError(f"{path} is not a ul_fast latent cache manifest (format {FORMAT} expected)")
    return manifest


def check_cache_for_model(cache: LatentCache, model: UnifiedLatents,
                          weights: Mapping[str, torch.Tensor] | None = None) -> None:
    """The trainer's check at start: ``cache`` holds latents of ``model``'s shape from ``model``'s encoder.

    The encoder's hash is taken from ``model.encoder`` (unsharded: call it before FSDP shards the model), or,
    given ``weights``, from that full state dict of the whole model (its ``encoder.*`` entries; e.g. the EMA
    weights a resumed run reads from its checkpoint). Raises :class:`LatentCacheError` naming the manifest
    and both hashes, or both shapes."""
    digest = encoder_sha256(model.encoder) if weights is None else encoder_sha256(weights, prefix="encoder.")
    cache.check(digest, model.latent_shape)
