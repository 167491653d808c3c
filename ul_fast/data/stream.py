"""Deterministic, resumable, shardable stream of shuffled batches.

The stream is the endless concatenation of one random permutation of the dataset per epoch; a global
batch is the next ``batch_size`` indices of it (a batch may span two epochs, so no example is dropped and
any dataset size works). The permutation of epoch ``e`` is drawn from a generator seeded by
``(seed, e)``, so the position ``(epoch, offset)`` is the whole state: restoring it reproduces every later
batch exactly, and nothing large is stored.

With ``world_size > 1`` every rank walks the same global stream and takes its contiguous slice
``[rank * b, (rank + 1) * b)`` of each global batch (``b = batch_size // world_size``). All ranks hold the
same state, so rank 0's ``state_dict()`` resumes every rank.

The order works for any sized data set: :meth:`BatchStream.next_batch` gathers the batch of an in-memory
:class:`ImageArrayDataset`, and :class:`~ul_fast.data.loader.StreamingBatches` decodes the examples of
:meth:`BatchStream.next_items` in DataLoader workers. A data set with a ``fingerprint()`` (files on disk) puts
it in the state, so that resuming on a changed set of files is an error.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any

import numpy as np
import torch

from .caption_data import CaptionBatch
from .dataset import ImageArrayDataset

__all__ = ["BatchStream"]

_STATE_VERSION = 1


class BatchStream:
    """Endless shuffled batches from an :class:`ImageArrayDataset` (or the indices of any sized data set).

    Args:
        dataset: the data; ``len(dataset) >= 1``. :meth:`next_batch` needs an :class:`ImageArrayDataset`.
        batch_size: GLOBAL batch size (summed over ranks); must be divisible by ``world_size``.
        seed: the shuffling seed (an int >= 0).
        rank, world_size: this process's shard of each global batch.
    """

    def __init__(self, dataset: ImageArrayDataset | Sized, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"BatchStream: batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"BatchStream: world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"BatchStream: rank must be in [0, world_size={world_size}), got {rank!r}")
        if batch_size % world_size:
            raise ValueError(f"BatchStream: batch_size={batch_size} (global) must be divisible by "
                             f"world_size={world_size}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"BatchStream: seed must be an int >= 0, got {seed!r}")
        if len(dataset) < 1:
            raise ValueError("BatchStream: dataset is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.offset = 0  # index into the current epoch's permutation
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)
        fingerprint = getattr(dataset, "fingerprint", None)
        self.fingerprint: str | None = fingerprint() if callable(fingerprint) else None

    def permutation(self, epoch: int) -> torch.Tensor:
        """Dataset indices in epoch order: int64 ``[len(dataset)]``, a function of (seed, epoch)."""
        if epoch != self._perm_epoch:
            # SeedSequence mixes (seed, epoch) into well-separated generator seeds.
            key = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0] >> 1)
            g = torch.Generator().manual_seed(key)
            self._perm = torch.randperm(len(self.dataset), generator=g)
            self._perm_epoch = epoch
        return self._perm

    def _next_global(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance by one global batch: ``(epochs, indices)``, each int64 ``[batch_size]`` (the epoch of each
        example: a batch may span two)."""
        n = len(self.dataset)
        parts, epochs = [], []
        need = self.batch_size
        while need:
            take = min(need, n - self.offset)
            parts.append(self.permutation(self.epoch)[self.offset:self.offset + take])
            epochs.append(torch.full((take,), self.epoch, dtype=torch.int64))
            self.offset += take
            need -= take
            if self.offset == n:
                self.epoch, self.offset = self.epoch + 1, 0
        return torch.cat(epochs), torch.cat(parts)

    def next_global_indices(self) -> torch.Tensor:
        """Advance by one global batch; returns its dataset indices, int64 ``[batch_size]``."""
        return self._next_global()[1]

    def next_items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance by one global batch; returns this rank's share as ``(epochs, indices)``, int64 ``[b]`` each,
        ``b = batch_size // world_size``."""
        epochs, indices = self._next_global()
        lo = self.rank * self.local_batch_size
        return epochs[lo:lo + self.local_batch_size], indices[lo:lo + self.local_batch_size]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor | CaptionBatch]:
        """This rank's share of the next global batch of an in-memory data set.

        Returns ``(images [b, C, H, W] float32 in [-1, 1], labels [b] int64)``, ``b = batch_size //
        world_size``; labels are -1 for unlabeled data. Captioned data gives a
        :class:`~ul_fast.data.caption_data.CaptionBatch` in place of the labels: the labels and each example's
        caption for its epoch (:meth:`~ul_fast.data.caption_data.CaptionTable.draw` of ``(seed, epoch, index)``).
        """
        if not isinstance(self.dataset, ImageArrayDataset):
            raise TypeError(f"BatchStream.next_batch gathers an in-memory ImageArrayDataset; "
                            f"{type(self.dataset).__name__} is read with ul_fast.data.StreamingBatches")
        epochs, idx = self.next_items()
        images = self.dataset.images[idx]
        if self.dataset.labels is None:
            labels = torch.full((idx.numel(),), -1, dtype=torch.int64)
        else:
            labels = self.dataset.labels[idx]
        captions = self.dataset.captions
        if captions is None:
            return images, labels
        return images, CaptionBatch(labels, tuple(captions.draw(i, self.seed, e)
                                                  for e, i in zip(epochs.tolist(), idx.tolist())))

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream (plain ints, and the data set's fingerprint string when it has one;
        JSON- and torch.save-friendly)."""
        state = {"version": _STATE_VERSION, "seed": self.seed, "epoch": self.epoch, "offset": self.offset,
                 "dataset_len": len(self.dataset)}
        if self.fingerprint is not None:
            state["fingerprint"] = self.fingerprint
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (from any rank / world size / batch size)."""
        missing = {"version", "seed", "epoch", "offset", "dataset_len"} - set(state)
        if missing:
            raise ValueError(f"BatchStream.load_state_dict: state is missing {sorted(missing)}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"BatchStream.load_state_dict: state version {state['version']} is not "
                             f"{_STATE_VERSION}")
        if state.get("fingerprint") != self.fingerprint:
            where = getattr(self.dataset, "source", "") or type(self.dataset).__name__
            raise ValueError(f"BatchStream.load_state_dict: the data changed since the state was saved ({where}: "
                             f"fingerprint {state.get('fingerprint')} then, {self.fingerprint} now; files added, "
                             f"removed or renamed?): resume on the same data, or start a new run")
        if state["dataset_len"] != len(self.dataset):
            raise ValueError(f"BatchStream.load_state_dict: state was saved for a dataset of "
                             f"{state['dataset_len']} examples, this one has {len(self.dataset)}")
        if state["seed"] != self.seed:
            raise ValueError(f"BatchStream.load_state_dict: state was saved with seed={state['seed']}, "
                             f"this stream has seed={self.seed}")
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < len(self.dataset):
            raise ValueError(f"BatchStream.load_state_dict: invalid position epoch={epoch}, offset={offset}")
        self.epoch, self.offset = epoch, offset
