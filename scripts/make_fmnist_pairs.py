"""Build "Fashion-MNIST pairs": two real garments side by side, captioned by their order, some orders held out.

    python scripts/make_fmnist_pairs.py --out data/fmnist-pairs                      # from the embedded subset
    python scripts/make_fmnist_pairs.py --out data/fmnist-pairs --data fmnist:/usr/share/datasets/fashion-mnist \\
        --train 30000 --test 3000 --shards data/fmnist-pairs-shards

Writes (everything into ``OUT.partial``, renamed to ``OUT`` when complete):

* ``OUT/train/`` and ``OUT/test/``: 32x32 grayscale PNGs and a ``metadata.jsonl`` (Hugging Face's imagefolder
  layout: ``file_name``, ``text`` = one caption per phrasing, plus ``left``, ``right``, ``held_out``), read by
  ``data.dataset: folder:OUT`` (or ``folder-stream:OUT``);
* ``OUT/prompts.jsonl``: one prompt per ordered pair of distinct classes (90), each phrasing in turn, with its
  classes and whether it was held out: the input of ``ul-fast eval --prompts`` and ``ul-fast sample --prompts``;
  ``OUT/prompts-reversed-negative.jsonl``: the same, each with the reverse order's caption as negative prompt;
* ``OUT/pairs.json``: the layout, the held-out orders, the phrasings, counts, the source and seed, and the
  adherence of the real test pairs (the Fashion-MNIST classifier reading both halves of real images: the
  ceiling a generator can reach under this measure);
* with ``--shards DIR``: the same images and captions as WebDataset shards (``ul-fast prepare-shards``), written
  after ``OUT``.

Each image draws an order (train: the orders not held out; test: every order), then a random garment of each
class from the split of ``--data`` (so test pairs are made of test garments), and composes them
(:func:`ul_fast.data.fmnist_pairs.compose_pairs`). Deterministic under ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from PIL import Image

from ul_fast.data import float_to_uint8, load_dataset
from ul_fast.data.fashion_mnist import FASHION_MNIST_CLASSES
from ul_fast.data.fmnist_pairs import (
    GARMENT_SIZE,
    PAIR_SIZE,
    PHRASINGS,
    compose_pairs,
    held_out_orders,
    pair_caption,
    pair_captions,
)
from ul_fast.data.shard_writer import prepare_shards
from ul_fast.eval.adherence import Prompt, pair_adherence
from ul_fast.eval.feature_net import load_fmnist_classifier

FORMAT = "ul_fast.fmnist_pairs.v1"
REVERSED_NEGATIVE = "prompts-reversed-negative.jsonl"
"""The prompts of ``prompts.jsonl``, each with its reverse order as negative prompt ("a sneaker to the left of a
bag" for "a bag to the left of a sneaker"): guidance then pushes away from the swapped drawing."""


def all_orders() -> list[tuple[int, int]]:
    """Every ordered pair of distinct classes (90)."""
    classes = range(len(FASHION_MNIST_CLASSES))
    return [(a, b) for a in classes for b in classes if a != b]


def make_split(spec: str, split: str, count: int, orders: list[tuple[int, int]], held_out: set[tuple[int, int]],
               generator: torch.Generator) -> tuple[torch.Tensor, list[dict]]:
    """``count`` pairs of ``spec``'s ``split`` garments: images ``[count, 1, 32, 32]`` and their metadata rows."""
    garments = load_dataset(spec, split, GARMENT_SIZE, 1)
    if garments.labels is None or garments.num_classes != len(FASHION_MNIST_CLASSES):
        raise ValueError(f"--data {spec!r}: expected labelled Fashion-MNIST (10 classes)")
    by_class = [torch.nonzero(garments.labels == k).flatten() for k in range(len(FASHION_MNIST_CLASSES))]
    chosen = torch.randint(len(orders), (count,), generator=generator)
    left_classes = torch.tensor([orders[i][0] for i in chosen])
    right_classes = torch.tensor([orders[i][1] for i in chosen])

    def pick(classes: torch.Tensor) -> torch.Tensor:
        draws = torch.rand(count, generator=generator)
        return torch.stack([by_class[k][int(u * len(by_class[k]))] for k, u in zip(classes.tolist(), draws)])

    left, right = pick(left_classes), pick(right_classes)
    images = compose_pairs(garments.images[left], garments.images[right])
    rows = [{"file_name": f"{i:06d}.png", "text": pair_captions(a, b, generator), "left": a, "right": b,
             "held_out": (a, b) in held_out}
            for i, (a, b) in enumerate(zip(left_classes.tolist(), right_classes.tolist()))]
    return images, rows


def write_split(folder: Path, images: torch.Tensor, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    for pixels, row in zip(float_to_uint8(images), rows):
        Image.fromarray(pixels[0].numpy()).save(folder / row["file_name"])
    with (folder / "metadata.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def eval_prompts(held_out: set[tuple[int, int]], negative: bool = False) -> list[dict]:
    """One prompt per order, phrasing ``k mod 5`` for the ``k``-th order, first noun phrases; with ``negative``,
    each with the reverse order's caption in the same phrasing as its negative prompt."""
    return [{"text": pair_caption(a, b, k), "left": a, "right": b, "held_out": (a, b) in held_out,
             **({"negative": pair_caption(b, a, k)} if negative else {})}
            for k, (a, b) in enumerate(all_orders())]


def real_adherence(images: torch.Tensor, rows: list[dict]) -> dict:
    """The classifier's reading of real test pairs: the ceiling of the adherence measure."""
    prompts = [Prompt(row["text"][0], row["left"], row["right"], row["held_out"]) for row in rows]
    return pair_adherence(images, prompts, load_fmnist_classifier())


def build(out: Path, spec: str, train: int, test: int, held_out_count: int, seed: int,
          shards: Path | None = None) -> dict:
    """Write the pairs set into ``out`` (see the module docstring); returns the ``pairs.json`` record."""
    if out.exists():
        raise FileExistsError(f"{out} exists: remove it or choose another --out")
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    generator = torch.Generator().manual_seed(seed)
    held_out = set(held_out_orders(generator, held_out_count))
    seen = [order for order in all_orders() if order not in held_out]
    train_images, train_rows = make_split(spec, "train", train, seen, held_out, generator)
    test_images, test_rows = make_split(spec, "test", test, all_orders(), held_out, generator)
    write_split(staging / "train", train_images, train_rows)
    write_split(staging / "test", test_images, test_rows)
    prompts = eval_prompts(held_out)
    for name, rows in (("prompts.jsonl", prompts), (REVERSED_NEGATIVE, eval_prompts(held_out, negative=True))):
        (staging / name).write_text("".join(json.dumps(p) + "\n" for p in rows), encoding="utf-8")
    record = {
        "format": FORMAT, "image_size": PAIR_SIZE, "source": spec, "seed": seed,
        "layout": "each 28x28 garment resized to 16 wide x 28 high, rows 2..30, columns 0..16 (left) and 16..32 "
                  "(right), background -1",
        "classes": list(FASHION_MNIST_CLASSES), "phrasings": list(PHRASINGS),
        "held_out": sorted([list(order) for order in held_out]),
        "counts": {"train": train, "test": test, "prompts": len(prompts)},
        "real_test_adherence": real_adherence(test_images, test_rows),
    }
    (staging / "pairs.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(staging, out)
    if shards is not None:
        prepare_shards(f"folder:{out}", shards, channels=1, progress=False)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to create")
    parser.add_argument("--data", default="fmnist-embedded",
                        help="Fashion-MNIST spec the garments come from (default fmnist-embedded, the shipped "
                             "subset; fmnist:DIR for the full set)")
    parser.add_argument("--train", type=int, default=20000, help="training pairs (default 20000)")
    parser.add_argument("--test", type=int, default=2000, help="test pairs (default 2000)")
    parser.add_argument("--held-out", type=int, default=10, help="orders held out of training (default 10 of 90)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=Path, help="also write the pairs as WebDataset shards into this folder")
    args = parser.parse_args(argv)
    if args.train < 1 or args.test < 1:
        parser.error("--train and --test must be positive")
    record = build(args.out, args.data, args.train, args.test, args.held_out, args.seed, args.shards)
    real = record["real_test_adherence"]
    print(f"wrote {args.train} train and {args.test} test pairs to {args.out} (held out: {record['held_out']}); the "
          f"classifier reads both halves of {100 * real['all']['both']['share']:.1f} % of the real test pairs")


if __name__ == "__main__":
    main()
