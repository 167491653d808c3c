"""Prompt files and prompt adherence: does a text-to-image sample show what its prompt says?

A prompt file (``ul-fast sample --prompts``, ``ul-fast eval --prompts``) is UTF-8 text, either one prompt per
line, or JSON Lines, one object per line: ``{"text": "<prompt>", "left": <class>, "right": <class>,
"held_out": <bool>, "negative": "<prompt>"}`` with ``left``/``right`` (Fashion-MNIST class indices or names,
optional), ``held_out`` (whether training held out this order, optional) and ``negative`` (this prompt's negative
prompt, optional), as ``scripts/make_fmnist_pairs.py`` writes ``prompts.jsonl``.
A plain line in one of the pairs phrasings ("a bag to the left of a sneaker") gets its classes from the text.

Adherence on Fashion-MNIST pairs (:mod:`ul_fast.data.fmnist_pairs`): the shipped Fashion-MNIST classifier
(:mod:`ul_fast.eval.feature_net`) reads each half of every sample; a sample adheres when both halves are read as
the prompt's classes. Reported per group (``seen`` and ``held_out`` orders, and ``all``) with its binomial
standard error, the share of left and of right halves read right, and the share ``reversed``: both halves read as
the prompt's classes in the opposite order (a model that knows which garments but not where draws them so; for a
held-out order, it is the order trained). Chance, for a sampler that ignores the prompt and draws two uniform
classes, is 1 % for both halves.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ul_fast.data.caption_data import decode_caption_bytes
from ul_fast.data.captions import FASHION_MNIST_NOUNS
from ul_fast.data.fashion_mnist import FASHION_MNIST_CLASSES
from ul_fast.data.fmnist_pairs import parse_pair_caption, read_halves

__all__ = ["CHANCE", "Prompt", "negatives", "pair_adherence", "read_prompts"]

CHANCE = 1 / len(FASHION_MNIST_CLASSES) ** 2
"""Probability that two uniformly drawn classes are a prompt's two classes."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: its ``text``, and when known its ``left`` and ``right`` Fashion-MNIST classes and whether its
    order was ``held_out`` of training (None: unknown); ``negative``: its own negative prompt (None: none)."""

    text: str
    left: int | None = None
    right: int | None = None
    held_out: bool | None = None
    negative: str | None = None

    @property
    def group(self) -> str | None:
        """``seen``, ``held_out`` or None (unknown)."""
        return None if self.held_out is None else "held_out" if self.held_out else "seen"


def _class(value: Any, where: str) -> int:
    """A class index, or a class name / noun phrase ("sneaker", "Ankle boot"), as an index."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(FASHION_MNIST_CLASSES):
        return value
    if isinstance(value, str):
        name = value.strip().lower()
        for label, (cls, nouns) in enumerate(zip(FASHION_MNIST_CLASSES, FASHION_MNIST_NOUNS)):
            if name == cls.lower() or name in nouns:
                return label
    raise ValueError(f"{where}: expected a Fashion-MNIST class (0..9 or a name such as 'sneaker'), got {value!r}")


def _row(line: str, where: str) -> Prompt:
    try:
        record = json.loads(line)
    except ValueError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
        raise ValueError(f"{where}: expected an object with a non-empty \"text\" string")
    text = record["text"].strip()
    if ("left" in record) != ("right" in record):
        raise ValueError(f"{where}: give both \"left\" and \"right\", or neither")
    left, right = parse_pair_caption(text) or (None, None)
    if "left" in record:
        left, right = _class(record["left"], f"{where}: left"), _class(record["right"], f"{where}: right")
    held_out = record.get("held_out")
    if held_out is not None and not isinstance(held_out, bool):
        raise ValueError(f"{where}: \"held_out\" must be true or false, got {held_out!r}")
    negative = record.get("negative")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"{where}: \"negative\" must be a string, got {negative!r}")
    return Prompt(text, left, right, held_out, negative)


def read_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a prompt file (see the module docstring), in order; ValueError naming the file and line for
    a file that is not UTF-8, holds no prompt, or has a malformed JSON line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"prompt file {path}: {error.strerror or error}") from None
    lines = [(number, line.strip()) for number, line in
             enumerate(decode_caption_bytes(data, f"prompt file {path}").splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"prompt file {path} holds no prompt (one per line, or JSON Lines with \"text\")")
    if all(line.startswith("{") for _, line in lines):
        return [_row(line, f"prompt file {path}, line {number}") for number, line in lines]
    return [Prompt(line, *(parse_pair_caption(line) or (None, None))) for _, line in lines]


def negatives(prompts: list[Prompt], default: str | None = None) -> str | list[str | None] | None:
    """The negative prompts of images with ``prompts``: ``default`` for all when no prompt has its own, else one per
    image (its own, or ``default``)."""
    if all(p.negative is None for p in prompts):
        return default
    return [p.negative if p.negative is not None else default for p in prompts]


def _share(hits: torch.Tensor) -> dict[str, float]:
    """``{"share", "se"}`` of a bool tensor: the mean and its binomial standard error."""
    p = float(hits.float().mean())
    return {"share": p, "se": math.sqrt(p * (1 - p) / hits.numel())}


@torch.no_grad()
def pair_adherence(images: torch.Tensor, prompts: list[Prompt], classifier: torch.nn.Module,
                   batch_size: int = 500) -> dict[str, Any] | None:
    """Adherence of pairs images ``[N, 1, S, S]`` in [-1, 1] to their ``prompts`` (one per image): per group
    (``all``, ``seen``, ``held_out``; a group without images is left out) ``samples``, ``both`` (the share, with
    its standard error, of images whose two halves ``classifier`` reads as the prompt's classes), ``left`` and
    ``right`` (each half's share) and ``reversed`` (the share read as the prompt's classes swapped; 0 for a prompt
    of one class twice). Images whose prompt names no classes are not counted; None when none does."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"pair_adherence: {images.shape[0]} images for {len(prompts)} prompts")
    known = [i for i, p in enumerate(prompts) if p.left is not None]
    if not known:
        return None
    device = next(classifier.parameters()).device
    predictions = []
    for start in range(0, len(known), batch_size):
        left, right = read_halves(images[known[start:start + batch_size]])
        predictions.append(torch.stack([classifier(h.to(device)).argmax(1).cpu() for h in (left, right)], 1))
    read = torch.cat(predictions)  # [n, 2]
    expected = torch.tensor([[prompts[i].left, prompts[i].right] for i in known])
    correct = read == expected
    reversed_ = (read == expected.flip(1)).all(1) & (expected[:, 0] != expected[:, 1])
    groups = {"all": torch.ones(len(known), dtype=torch.bool)}
    for name in ("seen", "held_out"):
        groups[name] = torch.tensor([prompts[i].group == name for i in known])
    result: dict[str, Any] = {"chance": CHANCE}
    for name, member in groups.items():
        if member.any():
            result[name] = {"samples": int(member.sum()), "both": _share(correct[member].all(1)),
                            "left": _share(correct[member, 0]), "right": _share(correct[member, 1]),
                            "reversed": _share(reversed_[member])}
    return result
