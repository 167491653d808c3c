"""Batches decoded in DataLoader workers, in the order of a :class:`BatchStream`, resumable exactly.

:class:`StreamingBatches` reads a map-style source (``source[i] -> (example, label)``: a decoded-image source
such as :class:`~ul_fast.data.lazy_folder.LazyImageFolder`, whose images ``transform`` turns into uint8
tensors, or a source of ready tensors with no transform). How it keeps its guarantees:

* **Order.** A batch sampler walks a copy of the consumer's :class:`BatchStream` and hands each batch's
  ``(epoch, index)`` keys to the workers; the DataLoader returns batches in sampler order. Each example's
  augmentation draws from :func:`~ul_fast.data.augment.item_rng` ``(seed, epoch, index)``, and its caption (a
  source with ``captions``) from :meth:`~ul_fast.data.caption_data.CaptionTable.draw` of the same triple, so a
  batch does not depend on the worker count or on what was prefetched.
* **Exact resume.** Workers run ahead by up to ``num_workers * prefetch_factor`` batches, but
  :meth:`StreamingBatches.state_dict` is the consumer's position: after the last batch :meth:`next_batch`
  returned. Restoring it restarts the workers there, so a resumed run sees exactly the batches an
  uninterrupted run would have seen from that point (the prefetched, unconsumed batches are decoded again).
* **Ranks.** Each rank decodes only its slice of every global batch (see :class:`BatchStream`): the ranks'
  examples are disjoint and together make the global batch.
* **Bad images.** A :class:`~ul_fast.data.errors.BadImageError` (undecodable bytes) is, with
  ``on_bad_image="skip"``, replaced by the next example (index + 1, + 2, … modulo the size) that decodes, under
  the same augmentation draws, and counted in :attr:`StreamingBatches.bad_images`, with a warning naming each
  new bad file (the first :data:`MAX_BAD_IMAGE_WARNINGS`). With ``"fail"`` it stops the run: the worker returns
  the error and :meth:`next_batch` raises it, naming the file. Workers also return an OSError (a missing file,
  an I/O error) instead of raising, so the message is the error's own, without a worker traceback.
"""

from __future__ import annotations

import contextlib
import signal
import warnings
from collections.abc import Callable, Iterator, Sized
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from ul_fast.config import BAD_IMAGE_POLICIES

from .augment import item_rng
from .caption_data import CaptionBatch, CaptionTable
from .dataset import ImageArrayDataset, uint8_to_float
from .errors import BadImageError
from .stream import BatchStream

__all__ = ["MAX_BAD_IMAGE_WARNINGS", "BadImageWarning", "StreamingBatches", "load_examples"]

MAX_BAD_IMAGE_WARNINGS = 10
"""Distinct bad files warned about per process; later ones are only counted."""


class BadImageWarning(UserWarning):
    """An undecodable image was skipped (``data.on_bad_image: skip``)."""


class _Item(NamedTuple):
    """One decoded example as a worker returns it: ``example`` None when ``error`` stopped it; ``caption`` the one
    drawn for this epoch (None for a source without captions); ``bad``: the ``(where, reason)`` of each undecodable
    example skipped on the way."""
    example: torch.Tensor | None
    label: int
    caption: str | None
    bad: tuple[tuple[str, str], ...]
    error: Exception | None


class _Examples(Dataset):
    """What a worker computes: key ``(epoch, index)`` → :class:`_Item` (see the module docstring)."""

    def __init__(self, source: Sized, transform: Callable | None, seed: int, skip_bad: bool):
        self.source, self.transform, self.seed, self.skip_bad = source, transform, seed, skip_bad
        self.captions: CaptionTable | None = getattr(source, "captions", None)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> _Item:
        epoch, index = key
        n, bad = len(self.source), []
        for step in range(n):
            try:
                example, label = self.source[(index + step) % n]
            except BadImageError as error:
                bad.append((error.where, error.reason))
                if self.skip_bad:
                    continue
                return _Item(None, -1, None, tuple(bad), error)
            except OSError as error:  # never skipped: returned to be raised in the main process as it is
                return _Item(None, -1, None, tuple(bad), error)
            if self.transform is not None:
                example = self.transform(example, item_rng(self.seed, epoch, index))
            # The caption of the image decoded (a replacement's own), drawn from the key's (seed, epoch, index).
            caption = None if self.captions is None else self.captions.draw((index + step) % n, self.seed, epoch)
            return _Item(example, label, caption, tuple(bad), None)
        return _Item(None, -1, None, tuple(bad), BadImageError(getattr(self.source, "source", "the data"),
                                                               f"none of its {n} examples decodes"))


class _Batch(NamedTuple):
    examples: torch.Tensor | None  # [b, ...] (uint8 images [b, C, S, S]); None when ``error`` is set
    labels: torch.Tensor  # int64 [b]
    captions: tuple[str, ...] | None  # one per example; None for a source without captions
    bad: tuple[tuple[str, str], ...]
    error: Exception | None


def _collate(items: list[_Item]) -> _Batch:
    bad = tuple(b for item in items for b in item.bad)
    error = next((item.error for item in items if item.error is not None), None)
    labels = torch.tensor([item.label for item in items], dtype=torch.int64)
    examples = None if error is not None else torch.stack([item.example for item in items])
    captions = None if error is not None or items[0].caption is None else tuple(item.caption for item in items)
    return _Batch(examples, labels, captions, bad, error)


class _KeyBatches:
    """The batch sampler: endless lists of ``(epoch, index)`` keys, this rank's share of each global batch."""

    def __init__(self, stream: BatchStream):
        self.stream = stream

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while True:
            epochs, indices = self.stream.next_items()
            yield list(zip(epochs.tolist(), indices.tolist()))


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _ignore_stop_signals(worker_id: int) -> None:
    """A worker ignores SIGINT and SIGTERM: they reach the whole process group (Ctrl-C, a job scheduler), and
    stopping is the main process's decision (the trainer finishes its step and checkpoints), which then stops
    the workers; a worker that died first would fail the step instead. The worker was forked with both signals
    blocked (:func:`_workers_forked_with_stop_signals_blocked`), so none reaches it before they are ignored; the
    ones that arrived meanwhile are dropped when they are unblocked."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def _workers_forked_with_stop_signals_blocked() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread while DataLoader forks its workers: a fork inherits the mask, so a
    signal sent before a worker's init ignores it cannot kill the worker. Here they only wait: a signal that
    arrived meanwhile is handled when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StreamingBatches:
    """Endless batches of ``source`` decoded in ``num_workers`` DataLoader workers (0: in this process).

    Args:
        source: a map-style source, ``source[i] -> (example, label)``, with ``len``; its ``fingerprint()``,
            when it has one, goes into the state.
        transform: ``transform(example, rng) -> tensor`` (e.g. an :class:`~ul_fast.data.augment.ImageTransform`);
            None when the examples are tensors already.
        batch_size, seed, rank, world_size: as for :class:`BatchStream` (``batch_size`` is global).
        num_workers: decoding processes per rank; 0 decodes in this process.
        prefetch_factor: batches each worker prepares ahead (with ``num_workers > 0``).
        device: where :meth:`next_batch` puts the batch; on CUDA, batches are assembled in pinned memory and
            copied without blocking.
        on_bad_image: ``"skip"`` or ``"fail"`` (see the module docstring).

    :meth:`next_batch`, :meth:`state_dict` and :meth:`load_state_dict` are those of :class:`BatchStream`; the
    state also holds the source's fingerprint. Call :meth:`close` to stop the workers (they also stop when
    this object is garbage-collected).
    """

    def __init__(self, source: Sized, transform: Callable | None, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, *, num_workers: int = 0, prefetch_factor: int = 2,
                 device: torch.device | str = "cpu", on_bad_image: str = "skip"):
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"StreamingBatches: num_workers must be an int >= 0, got {num_workers!r}")
        if not isinstance(prefetch_factor, int) or prefetch_factor < 1:
            raise ValueError(f"StreamingBatches: prefetch_factor must be an int >= 1, got {prefetch_factor!r}")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"StreamingBatches: on_bad_image must be one of {BAD_IMAGE_POLICIES}, "
                             f"got {on_bad_image!r}")
        self.position = BatchStream(source, batch_size, seed, rank, world_size)  # after the last batch taken
        self.source = source
        self.device = torch.device(device)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self._examples = _Examples(source, transform, seed, skip_bad=on_bad_image == "skip")
        self._batches: Iterator[_Batch] | None = None
        self.bad_images = 0  # undecodable examples skipped in the batches taken by this process
        self._warned: set[str] = set()

    def _start(self) -> Iterator[_Batch]:
        """A DataLoader whose sampler starts at the consumer's position."""
        p = self.position
        sampler_stream = BatchStream(self.source, p.batch_size, p.seed, p.rank, p.world_size)
        sampler_stream.load_state_dict(p.state_dict())
        workers = self.num_workers > 0
        loader = DataLoader(self._examples, batch_sampler=_KeyBatches(sampler_stream), collate_fn=_collate,
                            num_workers=self.num_workers, prefetch_factor=self.prefetch_factor if workers else None,
                            pin_memory=self.device.type == "cuda", worker_init_fn=_ignore_stop_signals)
        if not workers:
            return iter(loader)
        with _workers_forked_with_stop_signals_blocked():
            return iter(loader)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor | CaptionBatch]:
        """This rank's share of the next global batch: ``(images float32 [b, C, S, S] in [-1, 1] (or the
        source's float tensors as they are), labels int64 [b])``, both on ``device``; for a source with captions,
        a :class:`~ul_fast.data.caption_data.CaptionBatch` of the labels and one caption per example in place
        of the labels."""
        if self._batches is None:
            self._batches = self._start()
        batch = next(self._batches)
        if batch.error is not None:
            self.close()
            error = batch.error
            if isinstance(error, BadImageError) and not self._examples.skip_bad:
                raise BadImageError(error.where, f"{error.reason}; data.on_bad_image is fail: set it to skip to "
                                                 f"train on without such images")
            raise error
        self.position.next_items()  # the consumer's position: this batch is taken
        self._count_bad(batch.bad)
        examples = batch.examples.to(self.device, non_blocking=True)
        if examples.dtype == torch.uint8:
            examples = uint8_to_float(examples)  # after the copy: a quarter of the bytes cross to the device
        labels = batch.labels.to(self.device, non_blocking=True)
        return examples, labels if batch.captions is None else CaptionBatch(labels, batch.captions)

    def _count_bad(self, bad: tuple[tuple[str, str], ...]) -> None:
        self.bad_images += len(bad)
        for where, reason in bad:
            if where in self._warned or len(self._warned) >= MAX_BAD_IMAGE_WARNINGS:
                continue
            self._warned.add(where)
            last = len(self._warned) == MAX_BAD_IMAGE_WARNINGS
            warnings.warn(f"skipped an image that does not decode: {where} ({reason}); data.on_bad_image is skip, "
                          f"the next image takes its place" + ("; further bad images are only counted" if last else ""),
                          BadImageWarning, stacklevel=3)

    def close(self) -> None:
        """Stop the workers (the next :meth:`next_batch` starts new ones at the current position)."""
        self._batches = None

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch :meth:`next_batch` returned (see :meth:`BatchStream.state_dict`)."""
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by :meth:`state_dict`; prefetched batches are dropped."""
        self.position.load_state_dict(state)
        self.close()


def load_examples(source: Sized, transform: Callable, count: int, on_bad_image: str = "skip") -> ImageArrayDataset:
    """The first ``count`` examples of ``source`` that decode, in memory: e.g. held-out images for evaluation.

    ``transform`` must not be random (a center crop, no flip: ``rng`` is None). Undecodable examples are
    skipped (``on_bad_image="skip"``, with a :class:`BadImageWarning` each) or raise (``"fail"``). Returns an
    :class:`ImageArrayDataset` of ``min(count, decodable examples)`` images, labelled when ``source`` has
    ``class_names``, with their captions when it has ``captions``.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"load_examples: on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    images, labels, kept = [], [], []
    for i in range(len(source)):
        if len(images) == count:
            break
        try:
            image, label = source[i]
        except BadImageError as error:
            if on_bad_image == "fail":
                raise
            warnings.warn(f"skipped an image that does not decode: {error.where} ({error.reason})", BadImageWarning,
                          stacklevel=2)
            continue
        images.append(transform(image))
        labels.append(label)
        kept.append(i)
    if not images:
        raise ValueError(f"load_examples: no example of {getattr(source, 'source', 'the data')} decodes")
    class_names = getattr(source, "class_names", None)
    captions = getattr(source, "captions", None)
    return ImageArrayDataset(uint8_to_float(torch.stack(images)),
                             torch.tensor(labels, dtype=torch.int64) if class_names is not None else None,
                             class_names=class_names, source=getattr(source, "source", ""),
                             captions=None if captions is None else captions.subset(kept))
