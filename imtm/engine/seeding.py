"""Seeding every generator, and the switches for deterministic algorithms."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["seed_everything", "CUBLAS_WORKSPACE_CONFIG"]

#: cuBLAS's workspace setting for reproducible results (PyTorch's reproducibility notes; ":16:8" also works,
#: with less memory and possibly less speed).
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def seed_everything(
    seed: int, deterministic: bool | None = None, *, warn_only: bool = False
) -> None:
    """Seed Python, NumPy and torch (all devices); optionally make torch choose deterministic algorithms.

    ``Matcher.fit`` calls ``seed_everything(random_state)``, which seeds and leaves the
    algorithm switches alone. On the CPU that is enough for two runs to give identical
    weights. On a GPU, call ``seed_everything(seed, deterministic=True)`` once at the start of
    the script, before any CUDA work, for run-to-run identical results on the same machine and
    software (see ``docs/robustness.md``, Determinism, for what holds and what does not).

    Args:
        seed: the seed for ``random``, NumPy (modulo 2**32) and torch (CPU and every GPU).
        deterministic: ``True``: ``torch.use_deterministic_algorithms(True, warn_only=warn_only)``
            (an operation with no deterministic implementation raises, or warns), cuDNN
            deterministic and without benchmark autotuning, and ``CUBLAS_WORKSPACE_CONFIG`` set to
            ``":4096:8"`` unless already set (cuBLAS reads it when it starts, hence "before any
            CUDA work"). ``False``: back to torch's defaults (non-deterministic algorithms allowed,
            cuDNN not forced deterministic). ``None``: leave these process-wide switches as they are.
        warn_only: with ``deterministic=True``, warn instead of raising on an operation that has
            no deterministic implementation.

    Example:
        >>> seed_everything(0)
        >>> a = torch.rand(2)
        >>> seed_everything(0)
        >>> torch.equal(a, torch.rand(2))
        True
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic is None:
        return
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
