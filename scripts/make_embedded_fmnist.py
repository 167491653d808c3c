#!/usr/bin/env python
"""Build ul_fast's embedded Fashion-MNIST subset from the Debian package `dataset-fashion-mnist`.

Picks, with a fixed seed, 500 train and 100 test images per class (5000 / 1000 in all), keeps them in
their original order, and writes ``ul_fast/data/embedded/fashion_mnist_subset.npz`` holding uint8
``{train,test}_images [N, 28, 28]``, uint8 ``{train,test}_labels [N]`` and int32
``{train,test}_source_index [N]`` (the row in the original idx file). The zip is written with fixed
timestamps, so rerunning the script reproduces the file byte for byte. Also writes the licence notice.

Usage: python scripts/make_embedded_fmnist.py [--root /usr/share/datasets/fashion-mnist] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ul_fast.data.fashion_mnist import (  # noqa: E402
    DEBIAN_FASHION_MNIST_ROOT,
    EMBEDDED_FASHION_MNIST,
    read_fashion_mnist_idx_uint8,
)

SEED = 20170825  # Fashion-MNIST's release date; any fixed value works
PER_CLASS = {"train": 500, "test": 100}
OUT_DIR = REPO / "ul_fast" / "data" / "embedded"
COPYRIGHT = Path("/usr/share/doc/dataset-fashion-mnist/copyright")


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices: ``per_class`` rows of every class, drawn without replacement."""
    picked = []
    for k in range(10):
        rows = np.flatnonzero(labels == k)
        if rows.size < per_class:
            raise ValueError(f"class {k} has only {rows.size} rows, need {per_class}")
        picked.append(rng.choice(rows, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))


def write_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with fixed zip timestamps so the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def licence_text() -> str:
    """Zalando's copyright line and the MIT (Expat) text, taken from the Debian copyright file."""
    text = COPYRIGHT.read_text()
    if "Zalando SE" not in text or "Permission is hereby granted" not in text:
        raise ValueError(f"{COPYRIGHT}: does not hold the expected Zalando MIT notice")
    body = text.rsplit("License: Expat\n", 1)[-1]  # the last stanza holds the licence text
    lines = [ln[1:] if ln.startswith(" ") else ln for ln in body.splitlines()]
    lines = ["" if ln == "." else ln.rstrip() for ln in lines]
    return (
        "Fashion-MNIST\n"
        "Copyright (c) 2017 Zalando SE, https://tech.zalando.com\n"
        "Source: https://github.com/zalandoresearch/fashion-mnist\n\n"
        "The MIT License (MIT)\n\n" + "\n".join(lines).strip() + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=DEBIAN_FASHION_MNIST_ROOT, help="folder with the idx(.gz) files")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: the package's)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {}
    for split, per_class in PER_CLASS.items():
        images, labels = read_fashion_mnist_idx_uint8(args.root, split)
        rows = balanced_subset(labels, per_class, rng)
        arrays[f"{split}_images"] = images[rows]
        arrays[f"{split}_labels"] = labels[rows]
        arrays[f"{split}_source_index"] = rows.astype(np.int32)

    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / EMBEDDED_FASHION_MNIST
    write_npz_deterministic(out, arrays)
    (args.out / "LICENSE-fashion-mnist").write_text(licence_text())
    (args.out / "README.md").write_text(
        "# Embedded Fashion-MNIST subset\n\n"
        f"`{EMBEDDED_FASHION_MNIST}`: 5000 train / 1000 test Fashion-MNIST images (28x28 uint8, 500 / 100 "
        "per class) with uint8 labels and their row in the original files, picked with a fixed seed "
        f"({SEED}) from the Debian package `dataset-fashion-mnist` ({DEBIAN_FASHION_MNIST_ROOT}) by "
        "`scripts/make_embedded_fmnist.py`, which reproduces this file byte for byte. "
        "Fashion-MNIST is (c) 2017 Zalando SE, MIT licence: see `LICENSE-fashion-mnist`.\n"
    )
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out} ({out.stat().st_size} bytes, sha256 {digest})")


if __name__ == "__main__":
    main()
