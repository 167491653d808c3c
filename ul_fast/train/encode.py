"""``ul-fast encode``: write a latent cache (:mod:`ul_fast.data.latent_cache`) of a data set with a run's frozen
encoder, so stage 2 trains without decoding pixels or running the encoder.

Every image of each split, in data-set order, is center-cropped and resized to the run's resolution (the
data spec's loader does it), encoded by the run's EMA encoder in fp32, ``z_clean = E(x)`` with no noise
(stage 2 draws its own), and stored in ``dtype``; with ``flip``, the train split's images are also encoded
flipped horizontally. The images' captions, when the data has some, are stored beside their latents (all of them,
none left out: a text model's ``data.caption_policy`` applies when stage 2 reads the cache). Only the encoder
forward is batched: images stream through ``batch_size`` at a time into memory-mapped shard files, so memory
does not depend on the data set's size, nor on ``shard_size``.

Bad images: an image that does not decode is left out of the cache (``on_bad_image="skip"``, the run's
``data.on_bad_image`` by default), with a warning and its name in the manifest (``skipped`` per split), or stops
the encode with an error naming it (``"fail"``). ``folder:`` data is read image by image like ``folder-stream:``
(the same images, crop and resize), never all into memory.

Two encodes into one folder: the folder is locked while encoding (``OUT/.lock``); a second one stops at once,
naming the process that holds it.

Interruption: each shard is written under a hidden temporary name and renamed into place when complete;
``.progress.json`` then records it, and ``manifest.json`` is written (atomically) only after the last shard.
A cache without its manifest is refused by :class:`~ul_fast.data.latent_cache.LatentCache`, so an
interrupted encode never looks complete; running the same encode again resumes after the last recorded
shard (re-checking the recorded shards' SHA-256), and writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import ul_fast
from ul_fast.config import BAD_IMAGE_POLICIES
from ul_fast.data import BadImageError, BadImageWarning, ImageArrayDataset, load_dataset, spec_kind, uint8_to_float
from ul_fast.data.augment import ImageTransform
from ul_fast.data.caption_data import CaptionTable, mentions_left_or_right
from ul_fast.data.latent_cache import (
    CACHE_DTYPES,
    CAPTIONS,
    ENCODER_HASH_METHOD,
    FORMAT,
    MANIFEST,
    PROGRESS,
    SPLITS,
    encoder_sha256,
    shard_file_name,
    to_storage,
)
from ul_fast.devices import resolve_device
from ul_fast.files import sha256_of_file, write_json_atomically
from ul_fast.model import UnifiedLatents
from ul_fast.train.checkpoint import load_trained_model
from ul_fast.train.preflight import check_device
from ul_fast.train.run_folder import RunLock

__all__ = ["EncodeError", "encode_dataset"]


class EncodeError(RuntimeError):
    """The encode cannot run as asked (a finished cache or another unfinished encode in the output folder, a
    single-stage run)."""


def encode_dataset(run_dir: str | Path, data_spec: str, out_dir: str | Path, *, dtype: str = "bf16",
                   flip: bool = False, batch_size: int = 256, device: str = "cpu", shard_size: int = 4096,
                   splits: tuple[str, ...] = SPLITS, num_workers: int = 0, overwrite: bool = False,
                   on_bad_image: str = "skip", progress: bool = True) -> Path:
    """Encode every image of ``data_spec``'s ``splits`` with the EMA encoder of ``run_dir`` into ``out_dir``.

    dtype: storage of ``z_clean``, ``"bf16"`` (default; relative rounding error ≤ 2⁻⁸), ``"fp16"`` or
    ``"fp32"`` (exact). flip: also the train split's flipped images (extra items of the cache). device:
    ``cpu``, ``cuda``, ``cuda:N`` or ``auto``. shard_size: images per shard file. num_workers: DataLoader
    workers decoding a streaming source (an in-memory data set is sliced). overwrite: replace a finished
    cache, or an unfinished encode of other settings, in ``out_dir``. on_bad_image: ``"skip"`` leaves an
    undecodable image out (warned, named in the manifest), ``"fail"`` stops (see the module docstring). Returns the
    manifest's path.
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"encode: dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"encode: {name} must be a positive int, got {value!r}")
    if not splits or any(split not in SPLITS for split in splits):
        raise ValueError(f"encode: splits must be a non-empty subset of {SPLITS}, got {splits!r}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"encode: on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EncodeError(f"{out} is a file, not a folder: give --out a folder for the latent cache")
    check_device(device, "--device")
    config, model = load_trained_model(run_dir, resolve_device(device))
    if model.single_stage:
        raise EncodeError(f"{run_dir} is a single-stage run: it has no stage 2 to train from a latent cache")
    m = config.model
    data = {split: _open_images(data_spec, split, m.image_size, m.image_channels) for split in splits}
    if flip and mentions_left_or_right(data.get("train", next(iter(data.values()))).captions):
        warnings.warn(f"encode --flip: captions of {data_spec!r} speak of left and right, which the flipped images "
                      f"contradict; encode without --flip", UserWarning, stacklevel=2)
    job = _job(run_dir, model, data_spec, data, dtype, flip, shard_size, batch_size)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, "encode"):
        return _encode(out, job, model, data, dtype, flip, shard_size, batch_size, num_workers, overwrite,
                       on_bad_image, progress)


def _encode(out: Path, job: dict[str, Any], model: UnifiedLatents, data: dict[str, Any], dtype: str, flip: bool,
            shard_size: int, batch_size: int, num_workers: int, overwrite: bool, on_bad_image: str,
            progress: bool) -> Path:
    """:func:`encode_dataset`'s work, in the locked folder ``out``."""
    done = _claim_output(out, job, overwrite)
    total = sum(len(images) * (2 if flip and split == "train" else 1) for split, images in data.items())
    with tqdm(total=total, desc="encoding", unit="img", disable=not progress) as bar:
        for split, images in data.items():
            flipped = flip and split == "train"
            shards = done.setdefault(split, [])
            bar.update(sum(s["count"] for s in shards) * (2 if flipped else 1))
            for k in range(len(shards), math.ceil(len(images) / shard_size)):
                start, stop = k * shard_size, min((k + 1) * shard_size, len(images))
                shards.append(_write_shard(out, split, k, model, images, start, stop, dtype, flipped, batch_size,
                                           num_workers, on_bad_image, bar))
                write_json_atomically(out / PROGRESS, {"job": job, "shards": done})
    splits_record = {split: _split_record(done[split], flip and split == "train", f"the {split} split of {job['data']}")
                     for split in data}
    class_names = next(iter(data.values())).class_names
    manifest = write_json_atomically(out / MANIFEST, {**job, "class_names": class_names, "splits": splits_record})
    (out / PROGRESS).unlink()
    return manifest


# ----------------------------------------------------------------------------- the data
class _CenterCropped(Dataset):
    """A decoded-image source's items as ``(uint8 [C, S, S], label, index, None)``: center crop and resize, no
    flip; an image that does not decode as ``(None, -1, index, (where, reason))``."""

    def __init__(self, source: Any, image_size: int, channels: int):
        self.source, self.transform = source, ImageTransform(image_size, channels, crop="center")
        self.class_names = source.class_names
        self.captions: CaptionTable | None = source.captions

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, int, tuple[str, str] | None]:
        try:
            image, label = self.source[index]
        except BadImageError as error:  # returned, not raised: the main process applies on_bad_image
            return None, -1, index, (error.where, error.reason)
        return self.transform(image), label, index, None


def _collate(items: list[tuple[torch.Tensor | None, int, int, tuple[str, str] | None]],
             ) -> tuple[torch.Tensor | None, torch.Tensor, list[int], list[tuple[str, str]]]:
    """``(uint8 [b, C, S, S] of the images that decoded (None when none did), their labels, their indices,
    (where, reason) of the others)``."""
    good = [(pixels, label, index) for pixels, label, index, bad in items if bad is None]
    pixels = torch.stack([p for p, _, _ in good]) if good else None
    return (pixels, torch.tensor([label for _, label, _ in good], dtype=torch.int64), [i for _, _, i in good],
            [b for *_, b in items if b])


def _open_images(spec: str, split: str, image_size: int, channels: int) -> ImageArrayDataset | _CenterCropped:
    """The images of ``spec``'s ``split`` at the run's resolution, in data-set order: in memory (sliced), or a
    decoded-image source, center-cropped as the trainer's loader does (decoded in DataLoader workers); a
    ``folder:`` spec is read as ``folder-stream:`` (the same images, crop and resize, never all in memory)."""
    if spec_kind(spec) == "latents":
        raise ValueError(f"encode: --data must name images, but {spec!r} is a latent cache")
    if spec_kind(spec) == "folder":
        spec = "folder-stream:" + spec.partition(":")[2]
    data = load_dataset(spec, split, image_size, channels)
    if not isinstance(data, ImageArrayDataset):
        data = _CenterCropped(data, image_size, channels)
    if len(data) == 0:
        raise ValueError(f"encode: the {split} split of {spec!r} has no images")
    return data


def _image_batches(images: ImageArrayDataset | _CenterCropped, start: int, stop: int, batch_size: int,
                   num_workers: int,
                   ) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, list[int], list[tuple[str, str]]]]:
    """Images ``[start, stop)`` in order, ``batch_size`` at a time: ``(float32 [b, C, S, S] in [-1, 1] (None when
    none decoded), labels int64 [b] (-1: unlabeled), their indices in the data, (where, reason) of each image that
    did not decode)``."""
    if isinstance(images, ImageArrayDataset):
        for a in range(start, stop, batch_size):
            b = min(a + batch_size, stop)
            labels = images.labels[a:b] if images.labels is not None else torch.full((b - a,), -1)
            yield images.images[a:b], labels.to(torch.int64), list(range(a, b)), []
        return
    part = torch.utils.data.Subset(images, range(start, stop))
    for pixels, labels, indices, bad in DataLoader(part, batch_size=batch_size, num_workers=num_workers,
                                                   collate_fn=_collate):
        yield None if pixels is None else uint8_to_float(pixels), labels, indices, bad


# ----------------------------------------------------------------------------- the output folder
def _job(run_dir: str | Path, model: UnifiedLatents, data_spec: str, data: dict[str, Any], dtype: str, flip: bool,
         shard_size: int, batch_size: int) -> dict[str, Any]:
    """What an encode is: the manifest's header. A resumed encode must match it exactly (encoder weights, data
    and its size, dtype, flip, shard and batch sizes, device, version), so that it writes the same bytes."""
    c = model.config
    return {
        "format": FORMAT, "run": str(Path(run_dir).resolve()), "weights": "ema",
        "encoder_sha256": encoder_sha256(model.encoder), "encoder_hash_method": ENCODER_HASH_METHOD,
        "latent_shape": list(model.latent_shape), "latent_logsnr_0": c.latent_logsnr_0, "dtype": dtype,
        "flip": flip, "data": data_spec, "image_size": c.image_size, "image_channels": c.image_channels,
        "counts": {split: len(images) for split, images in data.items()},
        "captioned": {split: images.captions is not None for split, images in data.items()},
        "fingerprints": {split: images.source.fingerprint() for split, images in data.items()
                         if isinstance(images, _CenterCropped)},  # streamed data changed under a resume
        "shard_size": shard_size, "batch_size": batch_size, "device": next(model.parameters()).device.type,
        "ul_fast_version": ul_fast.__version__,
    }


def _claim_output(out: Path, job: dict[str, Any], overwrite: bool) -> dict[str, list[dict[str, Any]]]:
    """Make ``out`` ready for ``job``: the shards an unfinished encode of the same job recorded (still intact)
    to resume from, or nothing. A finished cache, or an unfinished encode of another job, is an error unless
    ``overwrite`` (the manifest goes first, so the folder never looks complete while it is rewritten)."""
    out.mkdir(parents=True, exist_ok=True)
    for leftover in (*out.glob(".*.npy.tmp"), *out.glob(".*.json.tmp")):  # shards being written when killed
        leftover.unlink()
    manifest, progress = out / MANIFEST, out / PROGRESS
    if manifest.exists():
        if not overwrite:
            raise EncodeError(f"{out} already holds a latent cache ({manifest}); pass --overwrite to replace it")
        _remove_cache(out)
    if not progress.exists():
        return {}
    try:
        recorded = json.loads(progress.read_text())
    except (OSError, ValueError):
        recorded = {}
    if recorded.get("job") != job:
        differ = sorted(k for k in job if recorded.get("job", {}).get(k) != job[k])
        if not overwrite:
            raise EncodeError(f"{out} holds an unfinished encode with other settings ({progress}: differs in "
                              f"{', '.join(differ) or 'format'}); rerun it as it was to resume it, or pass "
                              f"--overwrite to start over")
        _remove_cache(out)
        return {}
    done: dict[str, list[dict[str, Any]]] = {}
    for split, shards in recorded["shards"].items():
        done[split] = []
        for shard in shards:  # keep the intact prefix; the rest is encoded again
            if not all(_intact(out, record) for record in shard["files"].values()):
                break
            done[split].append(shard)
    return done


def _remove_cache(out: Path) -> None:
    """Remove a cache's manifest (first: the folder stops looking complete), progress record and shards."""
    (out / MANIFEST).unlink(missing_ok=True)
    (out / PROGRESS).unlink(missing_ok=True)
    for split in SPLITS:
        for path in (*out.glob(f"{split}-{'[0-9]' * 5}.*.npy"), *out.glob(f"{split}-{'[0-9]' * 5}.*.json")):
            path.unlink()  # the names shard_file_name gives


def _intact(out: Path, record: dict[str, Any]) -> bool:
    path = out / record["name"]
    return path.is_file() and path.stat().st_size == record["bytes"] and sha256_of_file(path) == record["sha256"]


# ----------------------------------------------------------------------------- one shard
@torch.no_grad()
def _write_shard(out: Path, split: str, k: int, model: UnifiedLatents, images: Any, start: int, stop: int,
                 dtype: str, flipped: bool, batch_size: int, num_workers: int, on_bad_image: str,
                 bar: tqdm) -> dict[str, Any]:
    """Encode images ``[start, stop)`` into shard ``k`` of ``split`` (and store their captions), those that do not
    decode left out (``on_bad_image`` skip) or raised (fail); returns its manifest entry."""
    kinds = ("latents", "flipped") if flipped else ("latents",)
    stored = (*kinds, "labels", *((CAPTIONS,) if images.captions is not None else ()))
    temporary = {kind: out / f".{shard_file_name(split, k, kind)}.tmp" for kind in stored}
    device = next(model.parameters()).device
    try:
        arrays = {kind: np.lib.format.open_memmap(temporary[kind], mode="w+", dtype=CACHE_DTYPES[dtype],
                                                  shape=(stop - start, *model.latent_shape)) for kind in kinds}
        labels = np.empty(stop - start, dtype=np.int64)
        row, skipped, encoded = 0, [], []  # encoded: the data indices of the rows written
        for x, y, indices, bad in _image_batches(images, start, stop, batch_size, num_workers):
            for where, reason in bad:
                if on_bad_image == "fail":
                    raise BadImageError(where, f"{reason}; on_bad_image is fail (ul-fast encode --on-bad-image, "
                                               f"default the run's data.on_bad_image): use skip to leave it out")
                warnings.warn(f"left an image that does not decode out of the cache: {where} ({reason})",
                              BadImageWarning, stacklevel=2)
                skipped.append(where)
            bar.update((len(y) + len(bad)) * len(kinds))
            if x is None:
                continue
            x = x.to(device)
            rows = slice(row, row + len(x))
            arrays["latents"][rows] = to_storage(model.encode(x), dtype)
            if flipped:
                arrays["flipped"][rows] = to_storage(model.encode(x.flip(-1)), dtype)
            labels[rows] = y.numpy()
            encoded += indices
            row += len(x)
        for array in arrays.values():
            array.flush()
        # Images left out: each file is rewritten with the rows written only (a shard's worth, in memory once).
        kept = {kind: np.array(array[:row]) for kind, array in arrays.items()} if row < stop - start else {}
        del arrays
        for kind, rows_written in kept.items():
            with temporary[kind].open("wb") as f:  # a file object: np.save would add ".npy" to a path
                np.save(f, rows_written)
        labels = labels[:row]
        with temporary["labels"].open("wb") as f:
            np.save(f, labels)
        if images.captions is not None:
            captions = [list(images.captions.options(i)) for i in encoded]  # those of the images kept
            temporary[CAPTIONS].write_text(json.dumps(captions, ensure_ascii=False), encoding="utf-8")
        files = {}
        for kind, path in temporary.items():
            with path.open("rb") as f:
                os.fsync(f.fileno())
            name = shard_file_name(split, k, kind)
            files[kind] = {"name": name, "bytes": path.stat().st_size, "sha256": sha256_of_file(path)}
            os.replace(path, out / name)
    except BaseException:
        for path in temporary.values():
            path.unlink(missing_ok=True)
        raise
    return {"count": row, "first": start, "min_label": int(labels.min()) if row else None,
            "max_label": int(labels.max()) if row else None, "skipped": skipped, "files": files}


def _split_record(shards: list[dict[str, Any]], flipped: bool, where: str) -> dict[str, Any]:
    """A split's manifest entry: its count, labels, the images left out (``skipped``), whether it has captions,
    and shards."""
    filled = [s for s in shards if s["count"]]
    if not filled:
        raise EncodeError(f"no image of {where} decodes")
    return {"count": sum(s["count"] for s in shards), "flipped": flipped,
            "labeled": min(s["min_label"] for s in filled) >= 0, "max_label": max(s["max_label"] for s in filled),
            "skipped": [where for s in shards for where in s.get("skipped", [])],
            "captioned": all(CAPTIONS in s["files"] for s in shards), "shards": shards}
