#!/usr/bin/env python
"""Train ul_fast's feature network for grayscale data on the full Fashion-MNIST (60000 train images).

Trains :class:`ul_fast.eval.feature_net.FashionMNISTClassifier` at 32x32 (the 28x28 images padded by 2,
as ``ul_fast.data`` does) with random shifts of up to 2 pixels and horizontal flips, SGD with Nesterov
momentum and a one-cycle learning rate. Prints per-epoch train loss and full test-set accuracy, writes the
weights as safetensors with metadata (test accuracy, epochs, seed, versions, date, time) and prints the
file's SHA-256 to paste into ``WEIGHTS_SHA256`` in ``ul_fast/eval/feature_net.py``. Deterministic under
``--seed`` for a given torch build and thread count (CPU).

Usage: python scripts/train_fmnist_classifier.py [--data /usr/share/datasets/fashion-mnist]
           [--out ul_fast/eval/weights/fmnist_classifier.safetensors] [--epochs 10] [--seed 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ul_fast.data import DEBIAN_FASHION_MNIST_ROOT, load_dataset  # noqa: E402
from ul_fast.eval.feature_net import (  # noqa: E402
    INPUT_SIZE,
    WEIGHTS_PATH,
    FashionMNISTClassifier,
    classifier_accuracy,
)
from ul_fast.files import sha256_of_file  # noqa: E402

SHIFT = 2  # largest random translation in pixels, per axis; the uncovered border is background (-1)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift by up to ``SHIFT`` pixels per axis (background fill -1) and random horizontal flip.

    images: ``[B, 1, S, S]`` in [-1, 1] -> same shape, a fresh tensor.
    """
    b, _, s, _ = images.shape
    padded = F.pad(images[:, 0], (SHIFT,) * 4, value=-1.0)  # [B, S + 2 SHIFT, S + 2 SHIFT]
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, b), generator=generator)
    rows = (torch.arange(s)[None, :] + dy[:, None])[:, :, None]  # [B, S, 1]
    cols = (torch.arange(s)[None, :] + dx[:, None])[:, None, :]  # [B, 1, S]
    out = padded[torch.arange(b)[:, None, None], rows, cols][:, None]  # [B, 1, S, S]
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEBIAN_FASHION_MNIST_ROOT, help="folder with the idx(.gz) files")
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="safetensors file to write")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=0,
                        help="stop each epoch after this many steps (timing runs; 0 = full epochs)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(args.seed)

    train = load_dataset(f"fmnist:{args.data}", "train", INPUT_SIZE)
    test = load_dataset(f"fmnist:{args.data}", "test", INPUT_SIZE)
    steps_per_epoch = len(train) // args.batch_size  # drop the last partial batch: BatchNorm sees full ones
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)

    model = FashionMNISTClassifier()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{len(train)} train / {len(test)} test images from {args.data}; {n_params} parameters; "
          f"{args.epochs} epochs x {steps_per_epoch} steps of {args.batch_size}", flush=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, epochs=args.epochs,
                                                   steps_per_epoch=steps_per_epoch, pct_start=0.25)

    start = time.perf_counter()
    accuracy = 0.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total_loss = 0.0
        epoch_start = time.perf_counter()
        for step in range(steps_per_epoch):
            rows = order[step * args.batch_size:(step + 1) * args.batch_size]
            loss = F.cross_entropy(model(augment(train.images[rows], generator)), train.labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item()
        train_seconds = time.perf_counter() - epoch_start
        model.eval()
        accuracy = classifier_accuracy(model, test.images, test.labels)
        print(f"epoch {epoch:2d}: train loss {total_loss / steps_per_epoch:.4f}  test accuracy {accuracy:.2%}  "
              f"({train_seconds:.0f} s train, {time.perf_counter() - start:.0f} s total)", flush=True)
    elapsed = time.perf_counter() - start

    model.eval()
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    metadata = {
        "test_accuracy": f"{accuracy:.4f}",
        "test_images": str(len(test)),
        "epochs": str(args.epochs),
        "seed": str(args.seed),
        "batch_size": str(args.batch_size),
        "lr": str(args.lr),
        "weight_decay": str(args.weight_decay),
        "threads": str(args.threads),
        "train_seconds": f"{elapsed:.0f}",
        "parameters": str(n_params),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.system()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata=metadata)
    args.out.chmod(0o644)  # safetensors creates the file 0600; installed package data must be readable
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) in {elapsed / 60:.1f} min; "
          f"test accuracy {accuracy:.2%}")
    print(f"WEIGHTS_SHA256 = \"{sha256_of_file(args.out)}\"")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
