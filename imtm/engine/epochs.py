"""The epoch hook: blocks whose behaviour changes with the epoch (a loss's warm-up) learn it here."""

from __future__ import annotations

import torch

__all__ = ["start_epoch"]


def start_epoch(blocks: torch.nn.Module, epoch: int) -> list[str]:
    """Call ``set_epoch(epoch)`` on every module inside ``blocks`` that has it; return their names.

    The training loop calls it before each epoch with the 0-based epoch of the
    current stage, a run resumed mid-epoch included, so a block that depends on the
    epoch (:class:`~imtm.components.TripletLoss` with ``warmup_epochs``) computes in a
    resumed run what it computed in the uninterrupted one. Your own training loop
    calls it the same way.

    Example:
        >>> from imtm.components import TripletLoss
        >>> blocks = torch.nn.ModuleDict({"loss": TripletLoss(warmup_epochs=2)})
        >>> start_epoch(blocks, 2), blocks["loss"].hardest_now
        (['loss'], True)
    """
    told = []
    for name, module in blocks.named_modules():
        hook = getattr(module, "set_epoch", None)
        if module is not blocks and callable(hook):
            hook(epoch)
            told.append(name)
    return told
