"""Hooks between the training loop and batch samplers that follow the model (K-means neighbour batches)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from imtm.data.collate import collate_images
from imtm.engine.evaluation import encode_side
from imtm.engine.graph import IMAGE, PipelineError
from imtm.tokens import Tokens

__all__ = ["image_embeddings", "refresh_sampler"]


def image_embeddings(
    matcher,
    images: Sequence[Any],
    *,
    device: torch.device | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> torch.Tensor:
    """``(n_images, D)`` global image vectors from a Matcher's current blocks (eval mode, no gradient).

    The value ``image_embedding`` when an image-side block provides it, else the
    masked mean of ``image_tokens``. The blocks' train / eval modes are restored.
    ``device``: where to encode (default: the blocks' device); ``autocast``: the forward's context.
    """
    plan = matcher.plan_
    side = frozenset({IMAGE})
    name = next((n for n in ("image_embedding", "image_tokens") if plan.sides.get(n) == side), None)
    if name is None or name not in plan.producers:
        raise PipelineError(
            "Matcher: a sampler asked for image embeddings, but no image-side block provides "
            "'image_embedding' or 'image_tokens'"
        )
    blocks = matcher.components_
    modes = {n: b.training for n, b in blocks.items()}
    blocks.eval()
    try:
        with torch.no_grad():
            values = encode_side(
                plan,
                plan.needed_for([name]),
                "images",
                images,
                collate_images,
                [name],
                batch_size=matcher.eval_batch_size,
                device=device if device is not None else _device_of(blocks),
                autocast=autocast,
            )
    finally:
        for n, b in blocks.items():
            b.train(modes[n])
    out = values[name]
    return (out.masked_mean() if isinstance(out, Tokens) else out).float()


def refresh_sampler(trainer, epoch: int) -> None:
    """Before an epoch: give a DataLoader's batch sampler the current image embeddings and the epoch.

    A batch sampler with ``update_embeddings(embeddings)`` gets the embeddings of its
    ``images`` (:func:`image_embeddings`); one with ``set_epoch(epoch)`` gets the epoch.
    Anything else is left alone. The clusters come from the weights at the epoch's start,
    which a checkpoint written mid-epoch no longer holds: ``fit(resume=True)`` refuses such a
    checkpoint with a ``CheckpointError`` (resume from one written at an epoch's end).
    """
    if not trainer.loader_given:
        return
    sampler = getattr(trainer.train, "batch_sampler", None)
    if sampler is None:
        return
    if callable(getattr(sampler, "set_epoch", None)):
        sampler.set_epoch(epoch)
    if callable(getattr(sampler, "update_embeddings", None)):
        sampler.update_embeddings(
            image_embeddings(
                trainer.m,
                sampler.images,
                device=trainer.device,
                autocast=getattr(trainer, "autocast", contextlib.nullcontext),
            )
        )


def _device_of(blocks: torch.nn.Module) -> torch.device:
    p = next(iter(blocks.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
