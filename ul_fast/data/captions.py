"""Captions for text-to-image training on Fashion-MNIST.

Every class has one or more noun phrases (e.g. "ankle boot", "boot") and every phrase is put into each
of :data:`CAPTION_TEMPLATES` with the right indefinite article, giving several captions per class
("a photo of an ankle boot", "a black and white picture of a sneaker", ...).
"""

from __future__ import annotations

import torch

from .fashion_mnist import FASHION_MNIST_CLASSES

__all__ = [
    "CAPTION_TEMPLATES",
    "FASHION_MNIST_NOUNS",
    "with_article",
    "captions_for_class",
    "all_fashion_mnist_captions",
    "fashion_mnist_captions",
]

# "{}" is replaced by a noun phrase with its article, e.g. "an ankle boot".
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {}",
    "a black and white picture of {}",
    "a grayscale photo of {}",
    "a product photo of {}",
    "a small picture of {}",
    "{} on a black background",
)

# Noun phrases per class, indexed like FASHION_MNIST_CLASSES.
FASHION_MNIST_NOUNS: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "top"),
    ("pair of trousers", "pair of pants"),
    ("pullover", "sweater"),
    ("dress",),
    ("coat",),
    ("sandal",),
    ("shirt",),
    ("sneaker", "running shoe"),
    ("bag", "handbag"),
    ("ankle boot", "boot"),
)
assert len(FASHION_MNIST_NOUNS) == len(FASHION_MNIST_CLASSES)


def with_article(noun: str) -> str:
    """Prefix "a" or "an" (by the first letter; right for every noun used here)."""
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


def _check_label(label: int) -> int:
    label = int(label)
    if not 0 <= label < len(FASHION_MNIST_CLASSES):
        raise ValueError(f"label must be a Fashion-MNIST class index in 0..9, got {label}")
    return label


def captions_for_class(label: int) -> list[str]:
    """Every caption of one class (templates x noun phrases), in a fixed order."""
    nouns = FASHION_MNIST_NOUNS[_check_label(label)]
    return [t.format(with_article(n)) for n in nouns for t in CAPTION_TEMPLATES]


def all_fashion_mnist_captions() -> list[list[str]]:
    """``captions[k]`` = :func:`captions_for_class` ``(k)`` for k in 0..9 (e.g. to pre-compute embeddings)."""
    return [captions_for_class(k) for k in range(len(FASHION_MNIST_CLASSES))]


def fashion_mnist_captions(label: int | torch.Tensor, generator: torch.Generator | None = None
                           ) -> str | list[str]:
    """A caption drawn uniformly from the class's captions using ``generator``.

    ``label`` an int -> one string; an int64 tensor ``[B]`` -> a list of ``B`` strings.
    """
    if isinstance(label, torch.Tensor) and label.dim() == 1:
        return [fashion_mnist_captions(int(k), generator) for k in label]
    options = captions_for_class(int(label))
    i = int(torch.randint(len(options), (1,), generator=generator))
    return options[i]
