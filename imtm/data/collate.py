"""Collate image-caption items into batches of the value names blocks require."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from imtm.tokens import Tokens

__all__ = ["collate", "collate_images", "collate_texts"]


def collate_images(items: Sequence[Any]):
    """Stack image items.

    - ``(3, H, W)`` pixel tensors -> ``(B, 3, H, W)`` tensor;
    - ``(N_b, D)`` region features (any region count) -> Tokens ``(B, N, D)`` padded, with mask;
    - Tokens of batch size 1 -> Tokens (concatenated, padded).
    """
    if len(items) == 0:
        raise ValueError("collate_images: got no images")
    first = items[0]
    if isinstance(first, Tokens):
        return Tokens.cat(list(items))
    if not isinstance(first, torch.Tensor):
        first = torch.as_tensor(first)
        items = [torch.as_tensor(x) for x in items]
    if first.dim() == 3:
        shapes = {tuple(x.shape) for x in items}
        if len(shapes) != 1:
            raise ValueError(f"collate_images: pixel images of different sizes {sorted(shapes)}; resize them first")
        return torch.stack(list(items))
    if first.dim() == 2:
        return Tokens.pad_sequence([x.float() if not x.is_floating_point() else x for x in items])
    raise ValueError(
        f"collate_images: an image must be (3, H, W) pixels or (N, D) region features, got {tuple(first.shape)}"
    )


def collate_texts(items: Sequence[Any]):
    """Captions as a list of strings, or token-id sequences padded into Tokens ``(B, M)``."""
    if len(items) == 0:
        raise ValueError("collate_texts: got no captions")
    if isinstance(items[0], str):
        for k, c in enumerate(items):
            if not isinstance(c, str):
                raise TypeError(f"collate_texts: caption {k} is {type(c).__name__}, expected str like the others")
            if not c.strip():
                raise ValueError(f"collate_texts: caption {k} is empty")
        return list(items)
    seqs = [torch.as_tensor(x, dtype=torch.long) for x in items]
    for k, s in enumerate(seqs):
        if s.numel() == 0:
            raise ValueError(f"collate_texts: caption {k} has length 0")
    return Tokens.pad_sequence(seqs)


def collate(batch: Sequence[dict]) -> dict:
    """Collate dataset items ``{"images", "texts", "image_ids"}`` into one batch dict.

    Returns:
        ``{"images": tensor or Tokens, "texts": list[str] or Tokens, "image_ids": (B,) long}``
    """
    if len(batch) == 0:
        raise ValueError("collate: got an empty batch")
    out = {
        "images": collate_images([b["images"] for b in batch]),
        "texts": collate_texts([b["texts"] for b in batch]),
        "image_ids": torch.as_tensor([int(b["image_ids"]) for b in batch], dtype=torch.long),
    }
    return out
