"""Image folders (PNG / JPEG via Pillow): the layout rules, the decoder, and the in-memory loader.

Layout: either ``root/<class>/<image>`` (every entry of ``root`` a folder: classes are the sorted
folder names, labels their index) or ``root/<image>`` (unlabeled). Each image is converted to mode "L"
(channels=1) or "RGB" (channels=3; an alpha channel is dropped), center-cropped to a square of its
shorter side and resized to ``image_size`` with Pillow's bicubic filter (antialiased when shrinking).
Hidden files (names starting with ".") are skipped; any other file that is not a PNG/JPEG fails with an
error naming it.

:func:`list_image_folder`, :func:`open_image` and :func:`decode_image` are shared with the streaming
:class:`~ul_fast.data.lazy_folder.LazyImageFolder`, so both read a folder by the same rules.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ul_fast.devices import available_memory

from .augment import ImageTransform
from .dataset import ImageArrayDataset, uint8_to_float
from .errors import BadImageError

__all__ = ["IMAGE_EXTENSIONS", "MEMORY_FRACTION", "check_folder_fits_in_memory", "decode_image", "list_image_folder",
           "load_image_folder", "open_image", "visible_entries"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_BUFFER = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")  # how Pillow names the bytes it was given


def visible_entries(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder`` not starting with ".", sorted by name (``os.scandir``: no stat per file)."""
    with os.scandir(folder) as entries:
        return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _check_image_name(folder: Path, entry: os.DirEntry) -> str:
    if entry.is_dir():
        raise ValueError(f"unexpected nested folder {folder / entry.name} (one level of class folders is supported)")
    if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"{folder / entry.name}: not an image file (accepted extensions: "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    return entry.name


def list_image_folder(root: str | Path) -> tuple[list[str] | None, list[list[str]]]:
    """The images of a folder by the layout rules above, without opening them.

    Returns ``(class_names, files)``: ``class_names`` the sorted class folders (None when unlabeled) and
    ``files[k]`` the sorted file names of class ``k`` (one group, names directly in ``root``, when unlabeled).
    Raises FileNotFoundError when ``root`` is not a folder and ValueError, naming the path, on a layout the
    rules do not accept (empty, files mixed with class folders, nested folders, other file types).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} is not a folder")
    entries = visible_entries(root)
    if not entries:
        raise ValueError(f"image folder {root} is empty (expected PNG/JPEG files or class sub-folders)")
    dirs = [e for e in entries if e.is_dir()]
    if not dirs:
        return None, [[_check_image_name(root, e) for e in entries]]
    if len(dirs) != len(entries):
        loose = next(e for e in entries if not e.is_dir())
        raise ValueError(f"image folder {root} mixes class sub-folders with files such as {root / loose.name}; "
                         f"put every image in a class folder, or use no sub-folders for unlabeled data")
    files = []
    for d in dirs:
        names = [_check_image_name(root / d.name, e) for e in visible_entries(root / d.name)]
        if not names:
            raise ValueError(f"class folder {root / d.name} has no images")
        files.append(names)
    return [d.name for d in dirs], files


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


def load_image_folder(root: str | Path, image_size: int, channels: int = 3) -> ImageArrayDataset:
    """Load every image under ``root`` into memory.

    Returns images ``[N, channels, image_size, image_size]`` in [-1, 1]; labels ``[N]`` and
    ``class_names`` when ``root`` holds class sub-folders, else unlabeled. ValueError before any image is read
    when they would not fit in memory (:func:`check_folder_fits_in_memory`).
    """
    root = Path(root)
    if channels not in (1, 3):
        raise ValueError(f"load_image_folder: channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"load_image_folder: image_size must be a positive int, got {image_size!r}")
    class_names, files = list_image_folder(root)
    check_folder_fits_in_memory(root, sum(len(names) for names in files), image_size, channels)
    transform = ImageTransform(image_size, channels)  # center crop, no flip
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for label, names in enumerate(files):
        folder = root if class_names is None else root / class_names[label]
        for name in names:
            images.append(transform(open_image(folder / name, channels)))
            labels.append(label)
    x = uint8_to_float(torch.stack(images))
    y = torch.tensor(labels, dtype=torch.int64) if class_names is not None else None
    return ImageArrayDataset(x, y, class_names=class_names, source=f"folder:{root}")
