"""Per-class caption banks: embed every caption of every class once, then draw one per label each step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ul_fast.text.text_encoder import TextEmbedding, TextEncoder

__all__ = ["ClassCaptionBank"]


class ClassCaptionBank:
    """Embeddings of ``captions_per_class[k]`` for every class k, flattened in class order.

    ``bank.sample(labels, generator)`` picks, for each label, one of its class's captions uniformly and
    returns their embeddings: the text conditioning of a text-to-image training batch.
    """

    def __init__(self, captions_per_class: Sequence[Sequence[str]], encoder: TextEncoder):
        if len(captions_per_class) == 0 or any(len(c) == 0 for c in captions_per_class):
            raise ValueError("captions_per_class must give at least one caption for every class")
        self.captions = [c for per_class in captions_per_class for c in per_class]
        counts = torch.tensor([len(c) for c in captions_per_class], dtype=torch.int64)
        self.counts = counts  # [K] captions per class
        self.offsets = torch.cumsum(counts, 0) - counts  # [K] index of each class's first caption
        self.embedding = encoder.encode_caption_bank(self.captions)

    @property
    def num_classes(self) -> int:
        return self.counts.shape[0]

    def caption_ids(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """labels int64 ``[B]`` in 0..K-1 -> indices ``[B]`` into :attr:`captions` (uniform within class).

        Draws ``B`` uniforms from ``generator`` (on the CPU), so a seeded run draws the same captions.
        """
        labels = labels.detach().to("cpu", torch.int64)
        if labels.dim() != 1 or (labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes)):
            raise ValueError(f"labels must be int64 [B] in 0..{self.num_classes - 1}, got {tuple(labels.shape)} "
                             f"with values {labels.unique().tolist()[:10]}")
        u = torch.rand(labels.shape[0], generator=generator)
        choice = (u * self.counts[labels]).long().clamp_max(self.counts[labels] - 1)
        return self.offsets[labels] + choice

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> TextEmbedding:
        """One random caption's embedding per label, on the encoder's device."""
        return self.embedding[self.caption_ids(labels, generator)]

    def first(self, labels: torch.Tensor) -> TextEmbedding:
        """The embedding of each label's first caption (e.g. "a photo of a t-shirt"): fixed sample grids."""
        return self.embedding[self.offsets[labels.detach().cpu()]]
