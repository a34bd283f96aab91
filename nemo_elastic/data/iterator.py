"""Resumable, deterministic, data-parallel batch iteration over any map-style sample dataset.

A dataset is anything with ``__len__`` and ``__getitem__(i) -> dict[str, Tensor]`` of 1-D
``[s]`` tensors (``PackedDataset`` or ``IndexedSamples``).  Batches are those dicts stacked to
``[b, s]``.

Order: epoch ``e`` visits the samples in ``permutation(seed, e)`` (``numpy`` PCG64 seeded with
``SeedSequence([seed, e])``; identity when ``shuffle=False``).  Each call consumes one *global*
batch of ``micro_batch_size * dp_size`` consecutive entries of that order; rank ``r`` gets the
entries ``[r * mbs, (r + 1) * mbs)`` of it, so ranks are disjoint and together cover the global
batch.  An epoch ends when fewer than a global batch of entries remain (that remainder is skipped;
every rank yields the same number of batches).

State: ``{"epoch": e, "index": i}`` where ``i`` is the number of entries of epoch ``e``'s order
already consumed (by all ranks together).  It is identical on every rank and does not depend on
``dp_rank``; resuming with another ``dp_size`` or ``micro_batch_size`` continues at the same
sample offset.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)


def collate(samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample ``[s]`` tensors into a batch dict of ``[b, s]`` tensors."""
    if not samples:
        raise ValueError("collate(samples=[]): needs at least one sample")
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def _check_parallel(micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size!r}: must be an integer >= 1")
    if not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"dp_size={dp_size!r}: must be an integer >= 1")
    if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank!r}: must be in [0, dp_size={dp_size})")


class BatchIterator:
    """Infinite iterator of this rank's micro-batches; see the module docstring for the order."""

    def __init__(self, dataset: Any, micro_batch_size: int, seed: int, shuffle: bool = True, *,
                 dp_rank: int = 0, dp_size: int = 1) -> None:
        _check_parallel(micro_batch_size, dp_rank, dp_size)
        global_batch = micro_batch_size * dp_size
        if len(dataset) < global_batch:
            raise ValueError(
                f"BatchIterator: dataset has {len(dataset)} samples < micro_batch_size * dp_size "
                f"= {micro_batch_size} * {dp_size}; lower micro_batch_size or add data")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.epoch = 0
        self.index = 0
        self._order_epoch: Optional[int] = None
        self._order: Optional[np.ndarray] = None

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_size

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch_size

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (cached for the current epoch)."""
        if self._order_epoch != epoch:
            n = len(self.dataset)
            if self.shuffle:
                seed_seq = np.random.SeedSequence([self.seed, epoch])
                self._order = np.random.Generator(np.random.PCG64(seed_seq)).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index + self.global_batch_size > len(self.dataset):
            self.epoch += 1
            self.index = 0
        start = self.index + self.dp_rank * self.micro_batch_size
        ids = self.order(self.epoch)[start:start + self.micro_batch_size]
        self.index += self.global_batch_size
        return collate([self.dataset[int(i)] for i in ids])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        missing = {"epoch", "index"} - set(state)
        if missing:
            raise KeyError(f"BatchIterator.load_state_dict: state {dict(state)!r} lacks "
                           f"{sorted(missing)}; pass what state_dict() returned")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self.dataset):
            raise ValueError(f"BatchIterator.load_state_dict: state {dict(state)!r} is out of "
                             f"range for a dataset of {len(self.dataset)} samples (was it saved "
                             "for another dataset?)")
        self.epoch, self.index = epoch, index


def iterate_once(dataset: Any, micro_batch_size: int, *, dp_rank: int = 0,
                 dp_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """One in-order pass (validation): every sample exactly once over all ranks.

    The last global batch is completed with copies of sample 0 whose ``loss_mask`` is zero, so
    every rank yields the same number of equally shaped batches and the padding adds no loss.
    """
    _check_parallel(micro_batch_size, dp_rank, dp_size)
    n, global_batch = len(dataset), micro_batch_size * dp_size
    for begin in range(0, n, global_batch):
        start = begin + dp_rank * micro_batch_size
        samples = []
        for i in range(start, start + micro_batch_size):
            if i < n:
                samples.append(dataset[i])
            else:
                filler = dict(dataset[0])
                filler["loss_mask"] = torch.zeros_like(filler["loss_mask"])
                samples.append(filler)
        yield collate(samples)
