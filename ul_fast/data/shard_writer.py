"""Writing WebDataset shards from any data the package reads (``ul-fast prepare-shards``).

Each sample is a run of tar members sharing a zero-padded key: ``<key>.png`` or ``<key>.jpg`` (the image),
``<key>.cls`` (its class index as ASCII digits, when labeled) and ``<key>.txt`` (its captions, UTF-8, one per
line, when it has some; a line break inside a caption becomes a space); shards are ``shard-000000.tar``, ...,
written with WebDataset's own ``ShardWriter`` so that any WebDataset tool reads them. Beside the shards:
``classes.json`` (the class names, when known) and ``shards.json`` (the manifest: count, shards, channels,
image format, source). :class:`ul_fast.data.shards.ShardSource` reads them back.

Everything is written into ``<out>.partial`` and renamed to ``<out>`` only when complete, so an interrupted
run never leaves a shard set that looks valid.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ul_fast import __version__

from .augment import ImageTransform
from .dataset import ImageArrayDataset, float_to_uint8, resize_images
from .errors import BadImageError
from .shards import CLASSES_NAME, IMAGE_EXTENSIONS, MANIFEST_NAME, ShardSource
from .spec import load_dataset, splits_apart

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_COUNT", "prepare_shards", "write_shards"]

DEFAULT_MAX_COUNT = 10_000
"""Samples per shard (WebDataset advises shards of roughly 100 MB to 1 GB)."""
DEFAULT_MAX_BYTES = 1 << 30
"""Image bytes per shard; a shard is closed at the first sample that reaches it."""
_FORMATS = {"png": ("png", "PNG"), "jpg": ("jpg", "JPEG"), "jpeg": ("jpg", "JPEG")}  # name -> (ext, Pillow)
_ENCODE_CHUNK = 256  # images converted from float to uint8 at a time (bounds the extra memory)


def _encode(image: Image.Image, image_format: str, quality: int) -> bytes:
    """``image`` (mode L or RGB) encoded as PNG (lossless) or JPEG at ``quality``."""
    buffer = io.BytesIO()
    pil_format = _FORMATS[image_format][1]
    image.save(buffer, pil_format, **({"quality": quality} if pil_format == "JPEG" else {}))
    return buffer.getvalue()


def _from_chw(pixels: torch.Tensor | np.ndarray) -> Image.Image:
    """uint8 ``[C, H, W]`` (C = 1 or 3) -> a Pillow image of mode L or RGB."""
    hwc = np.asarray(pixels).transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc))


Sample = tuple[bytes, str, int, tuple[str, ...]]
"""What is written of one example: ``(image bytes, extension, label, captions)``."""


def _captions(data: Any, index: int) -> tuple[str, ...]:
    """Example ``index``'s captions (none when the data has no captions)."""
    captions = getattr(data, "captions", None)
    return () if captions is None else captions.options(index)


def _array_samples(data: ImageArrayDataset, image_format: str, quality: int) -> Iterator[Sample]:
    """:data:`Sample` per image of an in-memory data set."""
    labels = data.labels.tolist() if data.labels is not None else [-1] * len(data)
    for start in range(0, len(data), _ENCODE_CHUNK):
        chunk = data.images[start:start + _ENCODE_CHUNK]
        pixels = float_to_uint8(chunk)  # exact for images that came from uint8 pixels
        for offset, chw in enumerate(pixels):
            yield (_encode(_from_chw(chw), image_format, quality), _FORMATS[image_format][0], labels[start + offset],
                   _captions(data, start + offset))


def _keeps_bytes(source: Any) -> bool:
    """Whether the source can give its examples' stored bytes: ``ShardSource.encoded(i)`` (bytes and
    extension), ``LazyImageFolder.path(i)`` (a PNG/JPEG file)."""
    return callable(getattr(source, "encoded", None)) or callable(getattr(source, "path", None))


def _stored_bytes(source: Any, index: int) -> tuple[bytes, str]:
    """Example ``index``'s PNG/JPEG bytes as stored, and their extension, of a source that keeps them."""
    if callable(getattr(source, "encoded", None)):
        return source.encoded(index)
    path = Path(source.path(index))
    ext = path.suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"write_shards: {path} is not a PNG/JPEG file (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return path.read_bytes(), ext


def _source_samples(source: Any, image_format: str, quality: int, image_size: int | None,
                    skipped: list[str]) -> Iterator[Sample]:
    """:data:`Sample` per decodable example of a decoded-image source.

    Every example is decoded once, so that undecodable ones are found now (appended to ``skipped``, their
    :class:`BadImageError` re-raised when ``skipped`` is None) rather than during training. Stored PNG/JPEG
    bytes are then copied unchanged unless ``image_size`` asks for a resize.
    """
    transform = ImageTransform(image_size, source.channels) if image_size is not None else None
    copy = transform is None and _keeps_bytes(source)
    for i in range(len(source)):
        try:
            image, label = source[i]
        except BadImageError as e:
            if skipped is None:
                raise
            skipped.append(e.where)
            continue
        if copy:
            yield *_stored_bytes(source, i), label, _captions(source, i)
        else:
            image = image if transform is None else _from_chw(transform(image))
            yield _encode(image, image_format, quality), _FORMATS[image_format][0], label, _captions(source, i)


def _write_split(data: ImageArrayDataset | Any, directory: Path, *, max_count: int, max_bytes: int,
                 image_format: str, quality: int, image_size: int | None, split: str | None,
                 on_bad_image: str, progress: bool) -> dict[str, Any]:
    """Write the shards, ``classes.json`` and ``shards.json`` of one split into ``directory`` (created);
    returns the manifest."""
    try:
        import webdataset  # only the writer needs it: reading uses the standard library's tarfile
    except ImportError as e:
        raise ModuleNotFoundError("writing shards needs the webdataset package: pip install webdataset") from e

    skipped: list[str] = []
    if isinstance(data, ImageArrayDataset):
        if image_size is not None:
            data = ImageArrayDataset(resize_images(data.images, image_size), data.labels, data.class_names,
                                     data.source, data.captions)
        samples = _array_samples(data, image_format, quality)
        stored = image_format
    else:
        samples = _source_samples(data, image_format, quality, image_size,
                                  skipped if on_bad_image == "skip" else None)
        stored = "copied" if image_size is None and _keeps_bytes(data) else image_format
    if len(data) == 0:
        raise ValueError(f"write_shards: {data.source} has no examples")

    directory.mkdir(parents=True)
    counts: dict[str, int] = {}  # shard file name -> samples
    labeled = False
    captioned = 0  # samples written with captions
    key_width = max(8, len(str(len(data) - 1)))
    # A fixed member mtime makes the same data give the same bytes. An int: a float (WebDataset's default,
    # time.time()) makes tarfile write a PAX header before every member, twice the headers to index.
    writer = webdataset.ShardWriter(str(directory / "shard-%06d.tar"), maxcount=max_count, maxsize=max_bytes,
                                    verbose=0, mtime=0)
    try:
        with tqdm(total=len(data), desc=f"shards {split or ''}".strip(), unit="img", disable=not progress) as bar:
            for index, (encoded, ext, label, captions) in enumerate(samples):
                sample = {"__key__": f"{index:0{key_width}d}", ext: encoded}
                if label >= 0:
                    sample["cls"] = str(label).encode("ascii")
                    labeled = True
                if captions:
                    sample["txt"] = "\n".join(" ".join(c.splitlines()) for c in captions).encode("utf-8")
                    captioned += 1
                writer.write(sample)
                name = Path(writer.fname).name  # the shard this sample went to
                counts[name] = counts.get(name, 0) + 1
                bar.update(index + 1 + len(skipped) - bar.n)  # examples read so far, skipped ones included
    finally:
        writer.close()
    if not counts:
        raise ValueError(f"write_shards: no example of {data.source} could be decoded (e.g. {skipped[0]})")
    if skipped:
        warnings.warn(f"write_shards: skipped {len(skipped)} undecodable image(s) of {data.source}, e.g. "
                      f"{', '.join(skipped[:3])} (listed in {directory / MANIFEST_NAME})", stacklevel=3)

    if data.class_names is not None:
        (directory / CLASSES_NAME).write_text(json.dumps(list(data.class_names), indent=1) + "\n")
    manifest = {
        "format": "webdataset",
        "count": sum(counts.values()),
        "channels": data.channels,
        "image_size": image_size if image_size is not None else getattr(data, "image_size", None),
        "image_format": stored,
        "labeled": labeled,
        "captioned": captioned,
        "split": split,
        "source": data.source,
        "shards": [{"name": name, "count": n} for name, n in counts.items()],
        "skipped": skipped,
        "written_by": f"ul_fast {__version__}",
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    ShardSource(directory, data.channels)  # builds and caches the index; also checks what was written
    return manifest


def _staging(out_dir: Path) -> Path:
    """``<out>.partial`` emptied, for a run that renames it to ``out_dir`` when complete; checks that
    ``out_dir`` does not hold anything yet."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"write_shards: {out_dir} already exists and is not an empty folder; remove it "
                              f"or choose another output folder")
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():  # left by an interrupted run
        shutil.rmtree(staging)
    return staging


def _check_options(max_count: int, max_bytes: int, image_format: str, quality: int, image_size: int | None,
                   on_bad_image: str) -> None:
    if not isinstance(max_count, int) or max_count < 1:
        raise ValueError(f"write_shards: max_count must be a positive int, got {max_count!r}")
    if not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"write_shards: max_bytes must be a positive int, got {max_bytes!r}")
    if image_format not in _FORMATS:
        raise ValueError(f"write_shards: image_format must be 'png' or 'jpg', got {image_format!r}")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"write_shards: quality must be an int in [1, 100], got {quality!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"write_shards: image_size must be None or a positive int, got {image_size!r}")
    if on_bad_image not in ("skip", "fail"):
        raise ValueError(f"write_shards: on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}")


def write_shards(data: ImageArrayDataset | Any, out_dir: str | Path, *, max_count: int = DEFAULT_MAX_COUNT,
                 max_bytes: int = DEFAULT_MAX_BYTES, image_format: str = "png", quality: int = 95,
                 image_size: int | None = None, split: str | None = None, on_bad_image: str = "skip",
                 progress: bool = False) -> Path:
    """Write ``data`` as WebDataset shards into ``out_dir`` (new, or an empty folder); returns ``out_dir``.

    Args:
        data: an :class:`ImageArrayDataset` (float [-1, 1] pixels, stored as the uint8 values they came from)
            or a decoded-image source (``ShardSource``, ``LazyImageFolder``: ``len``, ``[i] -> (PIL image,
            label)``, ``channels``, ``class_names``, ``source``).
        max_count, max_bytes: a new shard starts after ``max_count`` samples or once ``max_bytes`` of image
            data are written.
        image_format: ``png`` (lossless, the default) or ``jpg`` at ``quality`` (1-100). A source that keeps
            its PNG/JPEG bytes (shards, image folders) has them copied instead, unless ``image_size`` is given.
        image_size: None keeps each image's size; an int resizes in-memory data, or center-crops a source's
            images to the square of their shorter side and resizes them (as ``folder:`` specs load them).
        split: recorded in the manifest (``train``, ``test``), nothing else.
        on_bad_image: a source's undecodable image is left out with a warning and listed in the manifest
            (``skip``), or stops the run (``fail``).
        progress: show a progress bar.
    """
    _check_options(max_count, max_bytes, image_format, quality, image_size, on_bad_image)
    out_dir = Path(out_dir)
    staging = _staging(out_dir)
    _write_split(data, staging, max_count=max_count, max_bytes=max_bytes, image_format=image_format,
                 quality=quality, image_size=image_size, split=split, on_bad_image=on_bad_image,
                 progress=progress)
    os.replace(staging, out_dir)
    return out_dir


def prepare_shards(spec: str, out_dir: str | Path, *, image_size: int | None = None, channels: int | None = None,
                   image_format: str = "png", quality: int = 95, max_count: int = DEFAULT_MAX_COUNT,
                   max_bytes: int = DEFAULT_MAX_BYTES, on_bad_image: str = "skip", progress: bool = True) -> Path:
    """``ul-fast prepare-shards``: write the data named by ``spec`` as WebDataset shards in ``out_dir``.

    Data with a train and a test split (``fmnist*``, an ``.npz`` with ``train_images`` and ``test_images``,
    a folder or shard set with ``train/`` and ``test/``) goes to ``out_dir/train`` and ``out_dir/test``; other
    data to ``out_dir`` itself. Either way ``shards:<out_dir>`` reads it back. ``folder:`` and ``folder-stream:``
    specs are both read image by image (never all in memory), their PNG/JPEG files copied unless
    ``image_size`` is given; ``fmnist`` specs keep 28x28 unless ``image_size`` is given; ``channels`` None
    keeps the data's own (3 for folders). The other arguments are :func:`write_shards`'s. Nothing appears at
    ``out_dir`` until every split is written.
    """
    _check_options(max_count, max_bytes, image_format, quality, image_size, on_bad_image)
    if not isinstance(spec, str):
        raise TypeError(f"prepare_shards: spec must be a string, got {type(spec).__name__}")
    kind, _, arg = spec.partition(":")
    if kind == "latents":
        raise ValueError(f"prepare_shards: {spec!r} is a latent cache, not images")
    if kind == "folder":
        spec = f"folder-stream:{arg}"  # streamed, never whole in memory: same images, same crop and resize
    if kind in ("fmnist-embedded", "fmnist") and image_size is None:
        image_size = 28  # Fashion-MNIST's own size
    out_dir = Path(out_dir)
    staging = _staging(out_dir)
    for split in ("train", "test") if splits_apart(spec) else (None,):
        data = load_dataset(spec, split or "train", image_size, channels)
        _write_split(data, staging if split is None else staging / split, max_count=max_count,
                     max_bytes=max_bytes, image_format=image_format, quality=quality, image_size=image_size,
                     split=split, on_bad_image=on_bad_image, progress=progress)
    os.replace(staging, out_dir)
    return out_dir
