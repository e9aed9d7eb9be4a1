"""A shuffling sampler whose order depends only on (seed, epoch), so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSeededSampler(Sampler[int]):
    """Random permutation of ``range(length)`` drawn from ``seed + epoch``.

    Lightning calls ``set_epoch`` at the start of every epoch, so an interrupted run resumed from a checkpoint
    shuffles each remaining epoch exactly as the uninterrupted run did (a plain ``shuffle=True`` loader draws from the
    global RNG, which a resume does not restore).

    Example:
        >>> sampler = EpochSeededSampler(5, seed=0)
        >>> sampler.set_epoch(3)
        >>> sorted(sampler) == [0, 1, 2, 3, 4]
        True
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length
