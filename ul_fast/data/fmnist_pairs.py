"""Fashion-MNIST pairs: two real garments side by side, captioned by which is on the left and which on the right.

A compositional test of text conditioning that class labels cannot pass: "a bag to the left of a sneaker" and "a
sneaker to the left of a bag" name the same two classes, and only a model that reads the order draws the right
image. Some ``(left, right)`` orders are held out of training (their reverse is trained), so adherence on them
measures composition rather than recall.

Layout (:func:`compose_pairs`, :func:`read_halves`): a square image of side ``S`` (32 in the shipped set) on the
black background -1; each garment, a 28x28 Fashion-MNIST image, is resized to ``S/2`` wide and ``28·S/32`` high
(squeezed horizontally: at 32x32, 16x28) and placed in its half, ``2·S/32`` rows from the top, as Fashion-MNIST's
own 28x28 sits in the package's 32x32. Reading a half back (for the Fashion-MNIST classifier) undoes the resize to
28x28 and pads to 32x32.

Captions: :data:`PHRASINGS` (five ways to say the order) with each class's noun phrases
(:data:`~ul_fast.data.captions.FASHION_MNIST_NOUNS`); :func:`parse_pair_caption` reads a caption back to its
``(left, right)`` classes.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .captions import FASHION_MNIST_NOUNS, with_article
from .fashion_mnist import FASHION_MNIST_CLASSES

__all__ = ["GARMENT_SIZE", "PAIR_SIZE", "PHRASINGS", "compose_pairs", "held_out_orders", "pair_caption",
           "pair_captions", "parse_pair_caption", "read_halves"]

PAIR_SIZE = 32
"""Side of the shipped pairs set's images (``model.image_size`` of the ``pairs-text`` preset)."""
GARMENT_SIZE = 28
"""Side of a Fashion-MNIST garment image."""
_TOP = 2 / 32  # the garment's first row, as a fraction of the side (Fashion-MNIST's padding from 28 to 32)
_HEIGHT = 28 / 32  # the garment's height, as a fraction of the side
PHRASINGS: tuple[str, ...] = (
    "{left} to the left of {right}",
    "{right} to the right of {left}",
    "{left} on the left and {right} on the right",
    "{right} on the right and {left} on the left",
    "on the left {left}, on the right {right}",
)
"""Caption templates; ``{left}`` and ``{right}`` are noun phrases with their article ("a bag")."""


def _box(side: int) -> tuple[int, int, int]:
    """``(top, height, half width)`` of a garment in an image of ``side`` pixels (even)."""
    if side % 2 or side < 8:
        raise ValueError(f"a pairs image needs an even side of at least 8 pixels, got {side}")
    return round(_TOP * side), round(_HEIGHT * side), side // 2


def compose_pairs(left: torch.Tensor, right: torch.Tensor, side: int = PAIR_SIZE) -> torch.Tensor:
    """Garments ``left``, ``right`` float ``[B, 1, 28, 28]`` in [-1, 1] → pairs ``[B, 1, side, side]`` (see the
    module docstring; antialiased bilinear resize)."""
    if left.shape != right.shape or left.dim() != 4 or left.shape[1:] != (1, GARMENT_SIZE, GARMENT_SIZE):
        raise ValueError(f"compose_pairs takes two [B, 1, 28, 28] garment batches, got {tuple(left.shape)} and "
                         f"{tuple(right.shape)}")
    top, height, half = _box(side)
    out = torch.full((left.shape[0], 1, side, side), -1.0, dtype=torch.float32)
    for column, garments in ((0, left), (half, right)):
        squeezed = F.interpolate(garments.float(), size=(height, half), mode="bilinear", antialias=True,
                                 align_corners=False)
        out[:, :, top:top + height, column:column + half] = squeezed.clamp(-1, 1)
    return out


def read_halves(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two garments of pairs ``[B, 1, S, S]`` as the Fashion-MNIST classifier reads garments: each half's box
    resized back to 28x28 (bilinear) and padded to 32x32 with -1. Returns ``(left, right)``, ``[B, 1, 32, 32]``."""
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise ValueError(f"read_halves takes grayscale square images [B, 1, S, S], got {tuple(images.shape)}")
    top, height, half = _box(images.shape[-1])
    pad = (32 - GARMENT_SIZE) // 2
    halves = []
    for column in (0, half):
        box = images[:, :, top:top + height, column:column + half].float()
        garment = F.interpolate(box, size=(GARMENT_SIZE, GARMENT_SIZE), mode="bilinear", align_corners=False)
        halves.append(F.pad(garment.clamp(-1, 1), (pad,) * 4, value=-1.0))
    return halves[0], halves[1]


def pair_caption(left: int, right: int, phrasing: int = 0, left_noun: int = 0, right_noun: int = 0) -> str:
    """The caption of a pair: :data:`PHRASINGS` ``[phrasing]`` with each class's noun phrase number ``*_noun``
    (modulo the class's count), e.g. ``pair_caption(8, 7)`` = "a bag to the left of a sneaker"."""
    for label in (left, right):
        if not 0 <= label < len(FASHION_MNIST_CLASSES):
            raise ValueError(f"a pair's classes are Fashion-MNIST class indices 0..9, got {label}")
    nouns_l, nouns_r = FASHION_MNIST_NOUNS[left], FASHION_MNIST_NOUNS[right]
    return PHRASINGS[phrasing % len(PHRASINGS)].format(left=with_article(nouns_l[left_noun % len(nouns_l)]),
                                                        right=with_article(nouns_r[right_noun % len(nouns_r)]))


def pair_captions(left: int, right: int, generator: torch.Generator) -> list[str]:
    """One caption per phrasing of a pair, each with noun phrases drawn from ``generator``."""
    nouns = torch.randint(0, 2, (len(PHRASINGS), 2), generator=generator).tolist()
    return [pair_caption(left, right, k, a, b) for k, (a, b) in enumerate(nouns)]


def _caption_patterns() -> list[re.Pattern]:
    noun = {label: "|".join(re.escape(with_article(n)) for n in nouns)
            for label, nouns in enumerate(FASHION_MNIST_NOUNS)}
    any_noun = "|".join(f"(?P<c{label}_{{side}}>{alternatives})" for label, alternatives in noun.items())
    patterns = []
    for phrasing in PHRASINGS:
        text = re.escape(phrasing).replace(r"\{left\}", f"(?:{any_noun.format(side='l')})")
        text = text.replace(r"\{right\}", f"(?:{any_noun.format(side='r')})")
        patterns.append(re.compile(f"^{text}$", re.IGNORECASE))
    return patterns


_PATTERNS: list[re.Pattern] | None = None


def parse_pair_caption(caption: str) -> tuple[int, int] | None:
    """``(left, right)`` classes of a caption in one of :data:`PHRASINGS` (any of the classes' noun phrases, any
    letter case, surrounding space ignored); None for any other text."""
    global _PATTERNS
    if _PATTERNS is None:
        _PATTERNS = _caption_patterns()
    for pattern in _PATTERNS:
        match = pattern.match(caption.strip())
        if match:
            found = {name[-1]: int(name[1:-2]) for name, value in match.groupdict().items() if value is not None}
            return found["l"], found["r"]
    return None


def held_out_orders(generator: torch.Generator, count: int = 10) -> list[tuple[int, int]]:
    """``count`` ordered pairs ``(a, b)``, ``a ≠ b``, to hold out of training, drawn from ``generator``: no class is
    held out twice on the left nor twice on the right, and each reverse ``(b, a)`` stays in training (the model sees
    both garments together, in the other order). Sorted."""
    classes = len(FASHION_MNIST_CLASSES)
    if not 1 <= count <= classes:
        raise ValueError(f"held-out orders: count must be in 1..{classes}, got {count}")
    while True:
        chosen = torch.randperm(classes, generator=generator)[:count].tolist()
        targets = torch.randperm(classes, generator=generator).tolist()
        pairs = list(zip(chosen, targets[:count]))
        if len({b for _, b in pairs}) == count and all(a != b and (b, a) not in pairs for a, b in pairs):
            return sorted(pairs)
