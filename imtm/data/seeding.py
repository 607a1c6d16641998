"""Random draws of data loading fixed by ``(seed, epoch, item)``: the same in any worker, after any resume.

``Matcher.fit`` reads every training item through :class:`SeededItems`: while ``dataset[k]``
runs, torch's, NumPy's and Python's generators are seeded from ``(seed, epoch, k)`` and put
back afterwards, and :func:`current_item_seed` gives that seed to
:class:`~imtm.data.CaptionAugment` (and to any code of yours that wants its own generator).
So a random crop or an augmented caption depends only on the run's seed, the epoch and the
item, not on which worker process loaded it, on ``num_workers``, on what was drawn before,
or on where a run was interrupted and resumed. The training stream (dropout, noise) of the
main process is left exactly where it was.

Example:
    >>> import torch
    >>> items = SeededItems([0, 1, 2], seed=0, epoch=1, transform=lambda x: torch.rand(()).item())
    >>> items[2] == SeededItems([0, 1, 2], seed=0, epoch=1, transform=lambda x: torch.rand(()).item())[2]
    True
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "SeededItems",
    "restored",
    "seeded_item",
    "current_item_seed",
    "item_seed",
    "fit_epoch_key",
    "fit_epoch_serial",
    "set_fit_epoch_key",
]

_ITEM_SEED: int | None = None
_EPOCH_KEY: int | None = None
_EPOCH_SERIAL = 0

# Large odd multipliers (splitmix64's) mix the three numbers into one 63-bit seed.
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for item ``index`` in ``epoch`` of a run seeded with ``seed`` (a pure function)."""
    x = (int(seed) * _MIX[0] + (int(epoch) + 1) * _MIX[1] + (int(index) + 1) * _MIX[2]) & (
        2**64 - 1
    )
    x ^= x >> 31
    x = (x * _MIX[1]) & (2**64 - 1)
    x ^= x >> 29
    return x & (2**63 - 1)


def current_item_seed() -> int | None:
    """The seed of the item being loaded by :class:`SeededItems` (``None`` outside one)."""
    return _ITEM_SEED


def fit_epoch_key() -> int | None:
    """A number fixed by the seed and epoch ``Matcher.fit`` is running in this process (``None`` outside a fit)."""
    return _EPOCH_KEY


def fit_epoch_serial() -> int:
    """How many times :func:`set_fit_epoch_key` was called in this process: a new epoch, even of the same key."""
    return _EPOCH_SERIAL


def set_fit_epoch_key(key: int | None) -> None:
    """Set by the training loop at each epoch start, ``None`` when the fit ends."""
    global _EPOCH_KEY, _EPOCH_SERIAL
    _EPOCH_KEY = key
    _EPOCH_SERIAL += 1


def _seed_all(seed: int) -> None:
    global _ITEM_SEED
    torch.default_generator.manual_seed(
        seed
    )  # torch.manual_seed would also seed every GPU: 100x slower
    np.random.seed(seed % 2**32)
    random.seed(seed)
    _ITEM_SEED = seed


@contextlib.contextmanager
def restored() -> Iterator[None]:
    """Put torch's (CPU), NumPy's and Python's generators back as they were after the block."""
    global _ITEM_SEED
    saved = (
        torch.default_generator.get_state(),
        np.random.get_state(),
        random.getstate(),
        _ITEM_SEED,
    )
    try:
        yield
    finally:
        torch.default_generator.set_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])
        _ITEM_SEED = saved[3]


@contextlib.contextmanager
def seeded_item(seed: int) -> Iterator[None]:
    """Seed torch's (CPU), NumPy's and Python's generators with ``seed`` for the block; restore them after."""
    with restored():
        _seed_all(seed)
        yield


class SeededItems(Dataset):
    """``data[k]`` under :func:`seeded_item` with the seed of ``(seed, epoch, k)``.

    Args:
        data: a map-style dataset.
        seed: the run's seed. epoch: the epoch (0-based over the run's stages and epochs).
        transform: applied to each item inside the seeded block (``None``: none).
    """

    def __init__(self, data, seed: int, epoch: int, transform: Callable[[Any], Any] | None = None):
        self.data, self.seed, self.epoch, self.transform = data, int(seed), int(epoch), transform

    def __len__(self) -> int:
        return len(self.data)

    def _item(self, k):
        _seed_all(item_seed(self.seed, self.epoch, int(k)))
        item = self.data[k]
        return self.transform(item) if self.transform is not None else item

    def __getitem__(self, k):
        with restored():
            return self._item(k)

    def __getitems__(self, indices) -> list:
        # What a DataLoader calls for a whole batch: the generators are saved and restored once.
        with restored():
            return [self._item(k) for k in indices]
