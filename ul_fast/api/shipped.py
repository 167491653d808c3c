"""Pretrained models shipped inside the package (``ul_fast/api/pretrained/<name>/``, exported folders).

Each is checked at load: the SHA-256 of its ``manifest.json`` must be the one recorded here, and the manifest
holds the SHA-256 of every other file, which :func:`~ul_fast.api.export.load_export` verifies. Rebuild one with
``scripts/make_pretrained.py`` (it trains, evaluates, exports, and updates the hash below).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ul_fast.api.export import MANIFEST_FILE, ExportError
from ul_fast.files import sha256_of_file

__all__ = ["SHIPPED_MODELS", "shipped_model_folder"]

SHIPPED_MODELS: dict[str, str] = {
    # name: SHA-256 of its manifest.json (written by scripts/make_pretrained.py)
    "fmnist-tiny": "75e1bb8c369b47beaacbdbac55fae0ad2a886d29f4cd80b1b9ff5f75107b0d75",
}


def shipped_model_folder(name: str) -> Path:
    """The folder of the shipped model ``name``, its manifest verified; a clear error for an unknown name or a
    damaged installation."""
    if name not in SHIPPED_MODELS:
        raise ExportError(f"no shipped model named {name!r}; shipped: {', '.join(SHIPPED_MODELS)}")
    folder = Path(str(resources.files("ul_fast.api") / "pretrained" / name))
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        raise ExportError(f"the shipped model {name} is missing from this installation ({manifest} does not exist); "
                          f"reinstall ul-fast, or rebuild it with scripts/make_pretrained.py")
    actual = sha256_of_file(manifest)
    if actual != SHIPPED_MODELS[name]:
        raise ExportError(f"{manifest} has SHA-256 {actual}, expected {SHIPPED_MODELS[name]}: the shipped model is "
                          f"damaged or was rebuilt without updating SHIPPED_MODELS; reinstall ul-fast")
    return folder
