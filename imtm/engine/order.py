"""The data order of an epoch: a seeded permutation that a resumed run re-creates without loading anything."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

__all__ = ["EpochSampler"]


class EpochSampler(Sampler):
    """A permutation of ``range(n)`` fixed by ``(seed, epoch)``, optionally starting ``start`` items in.

    Resuming mid-epoch re-creates the same order and skips what was already seen,
    without loading the skipped items.
    """

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0, shuffle: bool = True):
        self.n, self.seed, self.epoch, self.start, self.shuffle = n, seed, epoch, start, shuffle

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(self.epoch))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return max(0, self.n - self.start)
