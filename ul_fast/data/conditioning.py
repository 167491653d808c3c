"""Conditioning inputs of the base model: class labels and/or caption embeddings, from one place.

A :class:`Conditioning` answers the three callers that need them:

* a training batch: its labels → class labels and, for a text model, one caption drawn per label;
* the sample grid of a training run: one class per column (a text model sees each class's first caption);
* an ``ul-fast sample`` request: one class for every image or all classes in turn, and a prompt.

Text models train on the Fashion-MNIST captions (:func:`all_fashion_mnist_captions`); their embeddings are
computed once, on first use, by a :class:`~ul_fast.text.TextEncoder`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ul_fast.text import ClassCaptionBank, TextEncoder

from .captions import all_fashion_mnist_captions
from .dataset import ImageArrayDataset
from .fashion_mnist import FASHION_MNIST_CLASSES

if TYPE_CHECKING:  # a type only: importing ul_fast.data stays free of the model's dependencies
    from ul_fast.config import ModelConfig

__all__ = ["Conditioning"]

Inputs = dict[str, torch.Tensor | None]
"""Keyword arguments of the model's losses and samplers: ``labels [B]`` int64 and, for text models,
``context [B, T, 384]`` and ``pooled [B, 384]`` float32, all on the model's device."""


class Conditioning:
    """The conditioning of a model described by ``model``, on ``device``.

    data: the training data (its labels choose the captions of a text model); None when only sampling.
    cache_dir: where the text encoder caches caption embeddings (None: memory only).
    seed: seed of :attr:`generator`, the CPU generator that picks a caption per label (checkpoint its state
        to resume a run exactly).
    """

    def __init__(self, model: ModelConfig, device: torch.device, data: ImageArrayDataset | None = None,
                 cache_dir: Path | None = None, seed: int = 0):
        self.num_classes = model.num_classes  # class-label input of the base model (0: none)
        self.text = bool(model.context_dim)
        self.max_tokens = model.text_max_tokens
        self.device, self.data, self.cache_dir = device, data, cache_dir
        self.generator = torch.Generator().manual_seed(seed)
        self._caption_bank: ClassCaptionBank | None = None

    @property
    def grid_classes(self) -> int:
        """Classes of a sample grid, one per column: the label classes, else a text model's caption classes."""
        return self.num_classes or (len(FASHION_MNIST_CLASSES) if self.text else 0)

    @property
    def caption_bank(self) -> ClassCaptionBank:
        """Embeddings of every Fashion-MNIST caption, built on first use."""
        if self._caption_bank is None:
            if self.data is None or self.data.labels is None or self.data.num_classes != len(FASHION_MNIST_CLASSES):
                raise ValueError("text conditioning draws captions per Fashion-MNIST class: it needs the labelled "
                                 "Fashion-MNIST data (data.dataset fmnist-embedded or fmnist)")
            encoder = TextEncoder(self.device, cache_dir=self.cache_dir, max_tokens=self.max_tokens)
            self._caption_bank = ClassCaptionBank(all_fashion_mnist_captions(), encoder)
        return self._caption_bank

    def for_batch(self, labels: torch.Tensor) -> Inputs:
        """A training batch's conditioning: its class labels ``[B]`` and/or one random caption per label
        (drawn from :attr:`generator`)."""
        inputs: Inputs = {"labels": labels if self.num_classes else None}
        if self.text:
            text = self.caption_bank.sample(labels, self.generator)
            inputs.update(context=text.tokens.to(self.device), pooled=text.pooled.to(self.device))
        return inputs

    def for_grid(self, n: int) -> tuple[Inputs, int | None]:
        """``(inputs, columns)`` of an ``n``-image sample grid: class ``i % grid_classes`` for image ``i``, so
        each column shows one class (a text model gets each class's first caption, e.g. "a photo of a
        t-shirt"); ``columns`` is None for an unconditional model."""
        classes = self.grid_classes
        labels = torch.arange(n, device=self.device) % classes if classes else None
        inputs: Inputs = {"labels": labels if self.num_classes else None}
        if self.text:
            text = self.caption_bank.first(labels)
            inputs.update(context=text.tokens.to(self.device), pooled=text.pooled.to(self.device))
        return inputs, classes or None

    def for_request(self, n: int, prompt: str | None = None, label: int | None = None) -> tuple[Inputs, int | None]:
        """``(inputs, columns)`` for ``n`` images of class ``label`` (default: every class in turn, one per
        column) and, for a text model, all of caption ``prompt``. The caller checks the request fits the model
        (a prompt for a text model, a label below :attr:`num_classes`)."""
        inputs: Inputs = {"labels": None}
        if prompt is not None:
            text = TextEncoder(self.device, max_tokens=self.max_tokens).encode([prompt])
            inputs.update(context=text.tokens.expand(n, -1, -1), pooled=text.pooled.expand(n, -1))
        if label is not None:
            inputs["labels"] = torch.full((n,), label, device=self.device, dtype=torch.long)
        elif self.num_classes:
            inputs["labels"] = torch.arange(n, device=self.device) % self.num_classes
        return inputs, self.num_classes if inputs["labels"] is not None and label is None else None
