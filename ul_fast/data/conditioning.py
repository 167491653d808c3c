"""Conditioning inputs of the base model: class labels and/or caption embeddings, from one place.

A :class:`Conditioning` answers the callers that need them:

* a training batch: its labels → class labels; for a text model, its captions (captioned data: the
  :class:`~ul_fast.data.caption_data.CaptionBatch` a stream yields) or one caption drawn per Fashion-MNIST label;
* the sample grid of a training run and the samples of ``ul-fast eval``: one class per column (a text model sees
  each class's first caption), or, for captioned data, the first caption of the data's first images;
* an ``ul-fast sample`` request: one class for every image or all classes in turn, a prompt, or one prompt per
  image, and a negative prompt.

Text embeddings come from a :class:`~ul_fast.text.TextEncoder` (``model.text_encoder``), built on first use, which
caches each caption's embedding. The null text of classifier-free guidance (``model.null_caption``) is the
encoder's embedding of the empty caption "" (``empty``) or zeros (``zeros``, given to the model as no null at all);
a negative prompt takes its place when sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ul_fast.text import ClassCaptionBank, TextEmbedding, TextEncoder

from .caption_data import CaptionBatch
from .captions import all_fashion_mnist_captions
from .fashion_mnist import FASHION_MNIST_CLASSES

if TYPE_CHECKING:  # a type only: importing ul_fast.data stays free of the model's dependencies
    from ul_fast.config import ModelConfig

__all__ = ["NULL_KEYS", "Conditioning", "Inputs", "slice_inputs"]

Inputs = dict[str, torch.Tensor | None]
"""Keyword arguments of the model's losses and samplers: ``labels [B]`` int64 and, for text models,
``context [B, T, D]`` and ``pooled [B, D]`` float32, and the null text ``null_context [1, T, D]`` and
``null_pooled [1, D]`` (absent: zeros), all on the model's device."""
NULL_KEYS = ("null_context", "null_pooled")


class Conditioning:
    """The conditioning of a model described by ``model``, on ``device``.

    data: the training data: its captions (captioned data) or its labels (Fashion-MNIST, for a text model's
        per-class captions) give a text model its captions; None when only sampling.
    cache_dir: where the text encoder caches caption embeddings (None: memory only).
    seed: seed of :attr:`generator`, the CPU generator that picks a caption per label (checkpoint its state
        to resume a run exactly).
    """

    def __init__(self, model: ModelConfig, device: torch.device, data: Any = None, cache_dir: Path | None = None,
                 seed: int = 0):
        self.num_classes = model.num_classes  # class-label input of the base model (0: none)
        self.text = bool(model.context_dim)
        self.max_tokens, self.text_encoder, self.null_caption = (model.text_max_tokens, model.text_encoder,
                                                                 model.null_caption)
        self.device, self.data, self.cache_dir = device, data, cache_dir
        self.captions = getattr(data, "captions", None)  # a CaptionTable of the data's images, or None
        self.generator = torch.Generator().manual_seed(seed)
        self._caption_bank: ClassCaptionBank | None = None
        self._encoder: TextEncoder | None = None
        self._null: Inputs | None = None

    @property
    def grid_classes(self) -> int:
        """Classes of a sample grid, one per column: the label classes, else a text model's caption classes
        (Fashion-MNIST's; none for captioned data)."""
        if self.num_classes:
            return self.num_classes
        return len(FASHION_MNIST_CLASSES) if self.text and self.captions is None else 0

    @property
    def encoder(self) -> TextEncoder:
        """The text encoder (``model.text_encoder``), built on first use."""
        if self._encoder is None:
            self._encoder = TextEncoder(self.device, cache_dir=self.cache_dir, max_tokens=self.max_tokens,
                                        encoder=self.text_encoder)
        return self._encoder

    @property
    def caption_bank(self) -> ClassCaptionBank:
        """Embeddings of every Fashion-MNIST caption, built on first use."""
        if self._caption_bank is None:
            labels = getattr(self.data, "labels", None)
            if labels is None or getattr(self.data, "num_classes", 0) != len(FASHION_MNIST_CLASSES):
                raise ValueError("text conditioning draws captions per Fashion-MNIST class: it needs the labelled "
                                 "Fashion-MNIST data (data.dataset fmnist-embedded or fmnist), or captioned data")
            self._caption_bank = ClassCaptionBank(all_fashion_mnist_captions(), self.encoder)
        return self._caption_bank

    def _text(self, text: TextEmbedding) -> Inputs:
        return {"context": text.tokens.to(self.device), "pooled": text.pooled.to(self.device)}

    def null(self, negative_prompt: str | None = None) -> Inputs:
        """The null text of guidance: ``negative_prompt``'s embedding when given, else the run's null caption
        (the empty caption's embedding; nothing for ``zeros``), as ``null_context [1, T, D]`` and
        ``null_pooled [1, D]``."""
        if negative_prompt is not None:
            text = self.encoder.encode([negative_prompt])
            return {"null_context": text.tokens, "null_pooled": text.pooled}
        if self.null_caption == "zeros":
            return {}
        if self._null is None:
            text = self.encoder.encode([""])
            self._null = {"null_context": text.tokens, "null_pooled": text.pooled}
        return self._null

    def for_batch(self, targets: torch.Tensor | CaptionBatch, null: bool = True) -> Inputs:
        """A batch's conditioning: its class labels ``[B]`` and/or, for a text model, the embeddings of its captions
        (``targets`` a :class:`CaptionBatch`) or of one random caption per Fashion-MNIST label (drawn from
        :attr:`generator`); with ``null``, the null text for caption dropout (see :meth:`null`)."""
        labels = targets.labels if isinstance(targets, CaptionBatch) else targets
        inputs: Inputs = {"labels": labels if self.num_classes else None}
        if self.text:
            if isinstance(targets, CaptionBatch):
                inputs.update(self._text(self.encoder.encode(list(targets.captions))))
            else:
                inputs.update(self._text(self.caption_bank.sample(labels, self.generator)))
            if null:
                inputs.update(self.null())
        return inputs

    def for_captions(self, captions: list[str], negative_prompt: str | Sequence[str | None] | None = None) -> Inputs:
        """A text model's inputs for one image per caption, with the null text, or the negative prompt's: one for
        all images, or one per image (a sequence as long as ``captions``; None entries take the null caption)."""
        inputs = {"labels": None, **self._text(self.encoder.encode(captions))}
        if negative_prompt is None or isinstance(negative_prompt, str):
            return {**inputs, **self.null(negative_prompt)}
        if len(negative_prompt) != len(captions):
            raise ValueError(f"{len(negative_prompt)} negative prompts for {len(captions)} captions")
        rows = [self.null(negative) or {"null_context": torch.zeros_like(inputs["context"][:1]),
                                        "null_pooled": torch.zeros_like(inputs["pooled"][:1])}
                for negative in negative_prompt]
        return {**inputs, **{key: torch.cat([row[key] for row in rows]).to(self.device) for key in NULL_KEYS}}

    def grid_captions(self, n: int) -> list[str]:
        """Captions of an ``n``-image grid of a model trained on captioned data: the distinct first captions of
        the data's first images (``4n`` of them at most), in data order, in turn."""
        options = (self.captions.options(i) for i in range(min(len(self.captions), 4 * n)))
        firsts = list(dict.fromkeys(o[0] for o in options if o)) or [""]
        return [firsts[i % len(firsts)] for i in range(n)]

    def for_grid(self, n: int) -> tuple[Inputs, int | None]:
        """``(inputs, columns)`` of an ``n``-image sample grid: class ``i % grid_classes`` for image ``i``, so
        each column shows one class (a text model gets each class's first caption, e.g. "a photo of a
        t-shirt", or the data's captions: :meth:`grid_captions`); ``columns`` is None without classes."""
        if self.text and self.captions is not None and not self.num_classes:
            return self.for_captions(self.grid_captions(n)), None
        classes = self.grid_classes
        labels = torch.arange(n, device=self.device) % classes if classes else None
        inputs: Inputs = {"labels": labels if self.num_classes else None}
        if self.text:
            inputs.update(self._text(self.caption_bank.first(labels)), **self.null())
        return inputs, classes or None

    def for_request(self, n: int, prompt: str | None = None, label: int | None = None,
                    negative_prompt: str | None = None) -> tuple[Inputs, int | None]:
        """``(inputs, columns)`` for ``n`` images of class ``label`` (default: every class in turn, one per
        column) and, for a text model, all of caption ``prompt``, guided away from ``negative_prompt`` (default:
        the null caption). The caller checks the request fits the model (a prompt for a text model, a label below
        :attr:`num_classes`)."""
        inputs: Inputs = {"labels": None}
        if prompt is not None:
            text = self.encoder.encode([prompt])
            inputs.update(context=text.tokens.expand(n, -1, -1), pooled=text.pooled.expand(n, -1),
                          **self.null(negative_prompt))
        if label is not None:
            inputs["labels"] = torch.full((n,), label, device=self.device, dtype=torch.long)
        elif self.num_classes:
            inputs["labels"] = torch.arange(n, device=self.device) % self.num_classes
        return inputs, self.num_classes if inputs["labels"] is not None and label is None else None


def slice_inputs(inputs: Inputs, start: int, stop: int) -> Inputs:
    """The inputs of images ``[start, stop)`` of a larger request: per-image entries sliced, a null text of one row
    (shared by every image) kept."""
    return {k: v if v is None or (k in NULL_KEYS and v.shape[0] == 1) else v[start:stop] for k, v in inputs.items()}
