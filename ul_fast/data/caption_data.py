"""Captions of a data set's images: how they are read, stored, checked against a policy and drawn per epoch.

Every image source may give each image zero or more captions (``folder:``/``folder-stream:``: a ``metadata.jsonl``
or ``.txt`` side files; ``shards:``: ``<key>.txt`` members; ``latents:``: the captions the cache was encoded with).
They are held in a :class:`CaptionTable`: a few NumPy arrays (all captions' UTF-8 bytes and offsets, and per
item the range of its captions), so DataLoader workers share it with the parent process without copying Python
objects page by page, and a subset (the images a policy keeps) or a repetition (a latent cache's flipped items)
costs two index arrays.

Caption text: a ``.txt`` file or member holds one caption per line; a ``metadata.jsonl`` row's ``text`` is a string
(one caption) or a list of strings. Surrounding white space is stripped and empty captions are dropped, so an image
whose captions are all empty has none. Bytes that are not UTF-8 are an error naming the file.

When several captions are given, training draws one per epoch from ``(seed, epoch, index)`` (:meth:`CaptionTable.draw`),
so the choice does not depend on the worker that decodes the example or on whether the run was resumed.

A text model's data must give every image a caption; :func:`apply_caption_policy` handles those without one
(``data.caption_policy``): ``skip`` leaves them out, ``empty`` trains them with the empty caption (the null
caption of guidance when ``model.null_caption`` is ``empty``), ``fail`` stops before training. Either way they are
counted and the first ones named.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ul_fast.config import CAPTION_POLICIES

__all__ = ["CaptionBatch", "CaptionTable", "CaptionWarning", "apply_caption_policy", "caption_lines",
           "decode_caption_bytes", "mentions_left_or_right"]

NAMED = 3
"""Images without a caption named in an error or warning (the rest are counted)."""
_DRAW_STREAM = 7
"""Last entry of the caption draw's seed sequence: keeps it apart from the augmentation's ``(seed, epoch, index)``."""


class CaptionWarning(UserWarning):
    """Images without a caption were left out or given the empty caption (``data.caption_policy``)."""


def decode_caption_bytes(data: bytes, where: str) -> str:
    """UTF-8 text of a caption file or member (a leading byte-order mark is dropped); anything else is a
    ValueError naming ``where``."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{where}: captions must be UTF-8 text, but byte {error.start} is {data[error.start]:#04x} "
                         f"({error.reason}); re-save the file as UTF-8") from None


def caption_lines(text: str) -> list[str]:
    """The captions of a ``.txt`` caption file: its non-empty lines, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def mentions_left_or_right(captions: CaptionTable | None, sample: int = 1000) -> bool:
    """Whether any of the first ``sample`` items' captions says "left" or "right": a horizontal flip would
    contradict it."""
    if captions is None:
        return False
    pattern = re.compile(r"\b(left|right)\b", re.IGNORECASE)
    return any(pattern.search(c) for i in range(min(sample, len(captions))) for c in captions.options(i))


class CaptionTable:
    """The captions of ``N`` items, item ``i`` having ``counts[i] >= 0`` of them.

    Build it from ``per_item`` (a sequence of sequences of strings); :meth:`options` reads them back,
    :meth:`draw` picks one for an epoch. Immutable; :meth:`subset` and :meth:`tiled` share the caption bytes.
    """

    def __init__(self, per_item: Sequence[Sequence[str]]):
        encoded = [c.encode("utf-8") for captions in per_item for c in captions]
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._ends = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)  # caption k: [ends[k], ends[k+1])
        counts = np.array([len(captions) for captions in per_item], dtype=np.int64)
        self._first = np.cumsum(counts, dtype=np.int64) - counts  # item i: captions [first, first + count)
        self._count = counts

    @classmethod
    def _view(cls, source: CaptionTable, first: np.ndarray, count: np.ndarray) -> CaptionTable:
        table = cls.__new__(cls)
        table._blob, table._ends, table._first, table._count = source._blob, source._ends, first, count
        return table

    def __len__(self) -> int:
        return int(self._count.shape[0])

    def options(self, index: int) -> tuple[str, ...]:
        """Item ``index``'s captions (empty when it has none)."""
        first, count = int(self._first[index]), int(self._count[index])
        return tuple(bytes(self._blob[self._ends[k]:self._ends[k + 1]]).decode("utf-8")
                     for k in range(first, first + count))

    def draw(self, index: int, seed: int, epoch: int) -> str:
        """One of item ``index``'s captions, uniformly, from a generator of ``(seed, epoch, index)``; ValueError
        when it has none (the caption policy should have handled it)."""
        count = int(self._count[index])
        if count == 0:
            raise ValueError(f"item {index} has no caption")
        k = 0 if count == 1 else int(np.random.default_rng(
            np.random.SeedSequence([seed, epoch, index, _DRAW_STREAM])).integers(count))
        return self.options(index)[k]

    def first(self, index: int) -> str:
        """Item ``index``'s first caption (deterministic: sample grids, held-out evaluation)."""
        options = self.options(index)
        if not options:
            raise ValueError(f"item {index} has no caption")
        return options[0]

    @property
    def counts(self) -> np.ndarray:
        """int64 ``[N]``: captions per item."""
        return self._count

    def subset(self, indices: np.ndarray) -> CaptionTable:
        """The captions of items ``indices`` (int array), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return self._view(self, self._first[indices], self._count[indices])

    def tiled(self, times: int) -> CaptionTable:
        """Items ``0..N-1`` repeated ``times`` times (item ``k·N + i`` has item ``i``'s captions)."""
        return self._view(self, np.tile(self._first, times), np.tile(self._count, times))

    def with_empty_caption(self, indices: np.ndarray) -> CaptionTable:
        """A copy whose items ``indices`` have the one caption "" (the empty caption)."""
        table = CaptionTable.__new__(CaptionTable)
        table._blob = self._blob
        table._ends = np.append(self._ends, self._ends[-1])  # one more caption, of zero bytes
        table._first, table._count = self._first.copy(), self._count.copy()
        table._first[indices] = len(self._ends) - 1
        table._count[indices] = 1
        return table

    def to_lists(self) -> list[list[str]]:
        """Every item's captions as lists (e.g. to write them out)."""
        return [list(self.options(i)) for i in range(len(self))]

    def digest(self) -> str:
        """Hex SHA-256 of every item's captions, in order: changes when any caption changes."""
        digest = hashlib.sha256()
        for i in range(len(self)):
            for caption in self.options(i):
                digest.update(caption.encode("utf-8") + b"\0")
            digest.update(b"\1")
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"CaptionTable(items={len(self)}, captions={int(self._count.sum())})"


@dataclass(frozen=True)
class CaptionBatch:
    """The targets of a batch of captioned examples: ``labels`` int64 ``[b]`` (-1: unlabelled) and one caption
    per example, drawn for this epoch. A stream yields it where it yields plain labels for uncaptioned data;
    :meth:`to` moves the labels as ``Tensor.to`` would."""

    labels: torch.Tensor
    captions: tuple[str, ...]

    def __post_init__(self):
        if self.labels.shape != (len(self.captions),):
            raise ValueError(f"CaptionBatch: labels {tuple(self.labels.shape)} for {len(self.captions)} captions")

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, *args: Any, **kwargs: Any) -> CaptionBatch:
        return CaptionBatch(self.labels.to(*args, **kwargs), self.captions)


def apply_caption_policy(captions: CaptionTable, policy: str, where: str, name: Callable[[int], str],
                         ) -> tuple[CaptionTable, np.ndarray | None, dict[str, Any]]:
    """Handle the items of ``captions`` that have none, by ``policy`` (one of ``CAPTION_POLICIES``).

    where: the data, for messages (e.g. ``folder-stream:/data/x``); name: item index → its name (a file, a shard
    member). Returns ``(captions, kept, report)``: the captions after the policy, the indices of the items kept
    (None: all of them) and ``{"policy", "without_caption", "examples"}``. ``fail`` raises ValueError; ``skip`` and
    ``empty`` warn (:class:`CaptionWarning`) with the count and the first names.
    """
    if policy not in CAPTION_POLICIES:
        raise ValueError(f"caption policy must be one of {CAPTION_POLICIES}, got {policy!r}")
    missing = np.flatnonzero(captions.counts == 0)
    examples = [name(int(i)) for i in missing[:NAMED]]
    report = {"policy": policy, "without_caption": int(missing.size), "examples": examples}
    if missing.size == 0:
        return captions, None, report
    count = f"{missing.size} of {len(captions)} images of {where} have no caption (none given, or only empty ones), " \
            f"e.g. {', '.join(examples)}"
    if policy == "fail":
        raise ValueError(f"{count}; data.caption_policy is fail: set it to skip (leave them out) or empty (train "
                         f"them with the empty caption)")
    if policy == "empty":
        warnings.warn(f"{count}; data.caption_policy is empty: they train with the empty caption", CaptionWarning,
                      stacklevel=3)
        return captions.with_empty_caption(missing), None, report
    kept = np.flatnonzero(captions.counts > 0)
    if kept.size == 0:
        raise ValueError(f"no image of {where} has a caption: nothing to train a text model on")
    warnings.warn(f"{count}; data.caption_policy is skip: they are left out", CaptionWarning, stacklevel=3)
    return captions.subset(kept), kept, report
