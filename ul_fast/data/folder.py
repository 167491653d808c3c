"""Image folders (PNG / JPEG via Pillow): the layout rules, the decoder, and the in-memory loader.

Layout: either ``root/<class>/<image>`` (every entry of ``root`` a folder: classes are the sorted
folder names, labels their index) or ``root/<image>`` (unlabeled). Each image is converted to mode "L"
(channels=1) or "RGB" (channels=3; an alpha channel is dropped), center-cropped to a square of its
shorter side and resized to ``image_size`` with Pillow's bicubic filter (antialiased when shrinking).
Hidden files (names starting with ".") are skipped; any other file that is not a PNG/JPEG fails with an
error naming it, except the captions below.

Captions (for text-to-image), either of:

* ``root/metadata.jsonl`` (Hugging Face's imagefolder layout): one JSON object per line, ``{"file_name":
  "<path relative to root>", "text": "<caption>" | ["<caption>", ...]}``; other keys are ignored;
* side files: ``<image stem>.txt`` beside an image (``cat.png`` + ``cat.txt``), one caption per line.

An image without a row or side file has no caption (see ``data.caption_policy``). Both kinds in one folder, a
row naming no image of the folder, a ``.txt`` file beside no image, or caption bytes that are not UTF-8 are
errors naming the file.

:func:`scan_image_folder`, :func:`read_folder_captions`, :func:`open_image` and :func:`decode_image` are shared with
the streaming :class:`~ul_fast.data.lazy_folder.LazyImageFolder`, so both read a folder by the same rules.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ul_fast.devices import available_memory

from .augment import ImageTransform
from .caption_data import CaptionTable, apply_caption_policy, caption_lines, decode_caption_bytes
from .dataset import ImageArrayDataset, uint8_to_float
from .errors import BadImageError

__all__ = ["CAPTION_EXTENSION", "IMAGE_EXTENSIONS", "MEMORY_FRACTION", "METADATA_FILE", "FolderListing",
           "check_folder_fits_in_memory", "decode_image", "list_image_folder", "load_image_folder", "open_image",
           "read_folder_captions", "scan_image_folder", "visible_entries"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
METADATA_FILE = "metadata.jsonl"
CAPTION_EXTENSION = ".txt"
_BUFFER = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")  # how Pillow names the bytes it was given


def visible_entries(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder`` not starting with ".", sorted by name (``os.scandir``: no stat per file)."""
    with os.scandir(folder) as entries:
        return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _images_and_side_files(folder: Path, entries: list[os.DirEntry]) -> tuple[list[str], list[str]]:
    """``(image names, names of the images with a .txt side file)`` of one folder's file entries."""
    images, texts = [], []
    for entry in entries:
        if entry.is_dir():
            raise ValueError(f"unexpected nested folder {folder / entry.name} (one level of class folders is "
                             f"supported)")
        extension = os.path.splitext(entry.name)[1].lower()
        (texts if extension == CAPTION_EXTENSION else images).append(entry.name)
        if extension not in (*IMAGE_EXTENSIONS, CAPTION_EXTENSION):
            raise ValueError(f"{folder / entry.name}: not an image file (accepted extensions: "
                             f"{', '.join(IMAGE_EXTENSIONS)}; {CAPTION_EXTENSION} files caption the image of the "
                             f"same name)")
    stems = {os.path.splitext(name)[0] for name in images}
    for text in texts:
        if os.path.splitext(text)[0] not in stems:
            raise ValueError(f"{folder / text}: not an image file, and no image {os.path.splitext(text)[0]}.* beside "
                             f"it for it to caption (accepted image extensions: {', '.join(IMAGE_EXTENSIONS)})")
    captioned = {os.path.splitext(name)[0] for name in texts}
    return images, [name for name in images if os.path.splitext(name)[0] in captioned]


class FolderListing(NamedTuple):
    """What :func:`scan_image_folder` finds: ``class_names`` (sorted class folders; None when unlabeled),
    ``files[k]`` (sorted image names of class ``k``; one group when unlabeled), ``side_captioned[k]`` (the names
    of ``files[k]`` that have a ``.txt`` side file) and ``metadata`` (whether ``root/metadata.jsonl`` exists)."""

    class_names: list[str] | None
    files: list[list[str]]
    side_captioned: list[list[str]]
    metadata: bool


def scan_image_folder(root: str | Path) -> FolderListing:
    """The images of a folder and their caption files by the layout rules above, without opening them.

    Raises FileNotFoundError when ``root`` is not a folder and ValueError, naming the path, on a layout the
    rules do not accept (empty, files mixed with class folders, nested folders, other file types, a ``.txt`` file
    beside no image, ``metadata.jsonl`` and ``.txt`` side files together).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} is not a folder")
    entries = [e for e in visible_entries(root) if e.name != METADATA_FILE]
    metadata = (root / METADATA_FILE).is_file()
    if not entries:
        raise ValueError(f"image folder {root} is empty (expected PNG/JPEG files or class sub-folders)")
    dirs = [e for e in entries if e.is_dir()]
    if not dirs:
        images, captioned = _images_and_side_files(root, entries)
        listing = FolderListing(None, [images], [captioned], metadata)
    elif len(dirs) != len(entries):
        loose = next(e for e in entries if not e.is_dir())
        raise ValueError(f"image folder {root} mixes class sub-folders with files such as {root / loose.name}; "
                         f"put every image in a class folder, or use no sub-folders for unlabeled data")
    else:
        files, side_captioned = [], []
        for d in dirs:
            images, captioned = _images_and_side_files(root / d.name, visible_entries(root / d.name))
            if not images:
                raise ValueError(f"class folder {root / d.name} has no images")
            files.append(images)
            side_captioned.append(captioned)
        listing = FolderListing([d.name for d in dirs], files, side_captioned, metadata)
    if metadata and any(listing.side_captioned):
        raise ValueError(f"image folder {root} has both {METADATA_FILE} and {CAPTION_EXTENSION} caption files (e.g. "
                         f"for {next(n for g in listing.side_captioned for n in g)}): keep one kind of captions")
    return listing


def list_image_folder(root: str | Path) -> tuple[list[str] | None, list[list[str]]]:
    """``(class_names, files)`` of :func:`scan_image_folder`: the images of a folder, without opening them."""
    listing = scan_image_folder(root)
    return listing.class_names, listing.files


def relative_paths(listing: FolderListing) -> list[str]:
    """Every image's path relative to the folder (``class/name`` in a labelled folder), in listing order."""
    if listing.class_names is None:
        return list(listing.files[0])
    return [f"{name}/{file}" for name, files in zip(listing.class_names, listing.files) for file in files]


def _metadata_captions(root: Path, paths: list[str]) -> list[list[str]]:
    """Captions per image (``paths`` relative to ``root``) from ``root/metadata.jsonl``."""
    where = root / METADATA_FILE
    index = {path: i for i, path in enumerate(paths)}
    captions: list[list[str] | None] = [None] * len(paths)
    for number, line in enumerate(decode_caption_bytes(where.read_bytes(), str(where)).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{where}, line {number}: not valid JSON ({error})") from None
        name = row.get("file_name") if isinstance(row, dict) else None
        if not isinstance(name, str):
            raise ValueError(f"{where}, line {number}: expected an object with a \"file_name\" string, got "
                             f"{line[:80]!r}")
        key = os.path.normpath(name).replace(os.sep, "/")
        if key not in index:
            raise ValueError(f"{where}, line {number}: file_name {name!r} is not an image of {root}")
        if captions[index[key]] is not None:
            raise ValueError(f"{where}, line {number}: a second row for {name!r}")
        text = row.get("text")
        if text is None:
            text = []
        elif isinstance(text, str):
            text = [text]
        elif not (isinstance(text, list) and all(isinstance(t, str) for t in text)):
            raise ValueError(f"{where}, line {number}: \"text\" must be a string or a list of strings, got {text!r}")
        captions[index[key]] = [t.strip() for t in text if t.strip()]
    return [c or [] for c in captions]


def read_folder_captions(root: str | Path, listing: FolderListing) -> CaptionTable | None:
    """The captions of the images of ``listing`` (in its order) from ``root/metadata.jsonl`` or ``.txt`` side
    files; None when the folder has neither."""
    root = Path(root)
    paths = relative_paths(listing)
    if listing.metadata:
        return CaptionTable(_metadata_captions(root, paths))
    if not any(listing.side_captioned):
        return None
    captioned = {f"{name}/{file}" if name is not None else file
                 for name, group in zip(listing.class_names or [None], listing.side_captioned) for file in group}
    per_image = []
    for path in paths:
        side = root / (os.path.splitext(path)[0] + CAPTION_EXTENSION)
        per_image.append(caption_lines(decode_caption_bytes(side.read_bytes(), str(side))) if path in captioned
                         else [])
    return CaptionTable(per_image)


def decode_image(data: bytes, channels: int, where: str) -> Image.Image:
    """Decode PNG or JPEG bytes to a Pillow image of mode "L" (``channels`` 1) or "RGB" (3; alpha dropped), at
    the stored size. Bytes that do not decode as either (truncated, empty, another format) raise
    :class:`BadImageError` naming ``where`` (a path, a shard member)."""
    if not data:
        raise BadImageError(where, "the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            image_format = im.format
            if image_format in ("PNG", "JPEG"):
                return im.convert("L" if channels == 1 else "RGB")
    except UnidentifiedImageError as e:  # its message names the in-memory buffer, not the file
        raise BadImageError(where, f"not an image format Pillow reads ({len(data)} bytes starting "
                                   f"{data[:8]!r})") from e
    # Pillow's decode errors: truncated data (OSError), garbled headers or tiles (SyntaxError, ValueError), absurd
    # dimensions (DecompressionBombError).
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(where, _BUFFER.sub("the image", str(e)) or type(e).__name__) from e
    raise BadImageError(where, f"a {image_format} image, expected PNG or JPEG")


def open_image(path: str | Path, channels: int) -> Image.Image:
    """Read and decode one PNG/JPEG file (see :func:`decode_image`).

    The file is read whole first, so a missing or unreadable file raises its own OSError, never
    :class:`BadImageError`.
    """
    return decode_image(Path(path).read_bytes(), channels, str(path))


MEMORY_FRACTION = 0.5
"""The most of the machine's available memory (:func:`~ul_fast.devices.available_memory`) that loading an image
folder into memory may take; a larger folder is refused and pointed to ``folder-stream:``."""
BYTES_PER_VALUE_WHILE_LOADING = 6
"""Peak bytes per pixel and channel of :func:`load_image_folder`: each image as uint8 (1), their stack (1) and the
float32 result (4)."""


def check_folder_fits_in_memory(root: Path, images: int, image_size: int, channels: int) -> None:
    """Raise ValueError, pointing to ``folder-stream:``, when loading ``images`` images of ``root`` at
    ``image_size`` would take more than :data:`MEMORY_FRACTION` of the available memory (unchecked where the
    system does not tell it)."""
    need = images * channels * image_size**2 * BYTES_PER_VALUE_WHILE_LOADING
    have = available_memory()
    if have is not None and need > MEMORY_FRACTION * have:
        gib = 2**30
        raise ValueError(f"folder:{root} holds {images:,} images, {need / gib:.1f} GiB while loading them into memory "
                         f"at {image_size}x{image_size}x{channels}: more than {MEMORY_FRACTION:.0%} of the "
                         f"{have / gib:.1f} GiB available; use data.dataset folder-stream:{root} (decoded image by "
                         f"image while training, never all in memory)")


def load_image_folder(root: str | Path, image_size: int, channels: int = 3,
                      caption_policy: str | None = None) -> ImageArrayDataset:
    """Load every image under ``root`` into memory.

    Returns images ``[N, channels, image_size, image_size]`` in [-1, 1]; labels ``[N]`` and
    ``class_names`` when ``root`` holds class sub-folders, else unlabeled; its captions when the folder has
    some. ``caption_policy`` (a text model's ``data.caption_policy``; None: captions are not required) decides
    what an image without a caption does (:func:`~ul_fast.data.caption_data.apply_caption_policy`). ValueError
    before any image is read when they would not fit in memory (:func:`check_folder_fits_in_memory`).
    """
    root = Path(root)
    if channels not in (1, 3):
        raise ValueError(f"load_image_folder: channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"load_image_folder: image_size must be a positive int, got {image_size!r}")
    listing = scan_image_folder(root)
    class_names, paths = listing.class_names, relative_paths(listing)
    labels = np.repeat(np.arange(len(listing.files)), [len(names) for names in listing.files])
    captions = read_folder_captions(root, listing)
    if captions is not None and caption_policy is not None:
        captions, kept, _ = apply_caption_policy(captions, caption_policy, f"folder:{root}", lambda i: paths[i])
        if kept is not None:
            paths, labels = [paths[i] for i in kept], labels[kept]
    check_folder_fits_in_memory(root, len(paths), image_size, channels)
    transform = ImageTransform(image_size, channels)  # center crop, no flip
    x = uint8_to_float(torch.stack([transform(open_image(root / path, channels)) for path in paths]))
    y = torch.from_numpy(labels).to(torch.int64) if class_names is not None else None
    return ImageArrayDataset(x, y, class_names=class_names, source=f"folder:{root}", captions=captions)
