"""Collate image-caption items into batches of the value names blocks require."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch

from imtm.tokens import Tokens

__all__ = ["collate", "collate_images", "collate_texts"]


def collate_images(items: Sequence[Any]):
    """Stack image items.

    - ``(3, H, W)`` pixel tensors -> ``(B, 3, H, W)`` tensor;
    - ``(N_b, D)`` region features (any region count) -> Tokens ``(B, N, D)`` padded, with mask;
    - Tokens of batch size 1 -> Tokens (concatenated, padded).

    Raises:
        ValueError: no items; images of different shapes (pixels of different sizes,
            pixels mixed with features, features of different ``D``).
        TypeError: an item that is not a tensor or array (a string, ``None``), or Tokens
            mixed with tensors (each named by its index).
    """
    if len(items) == 0:
        raise ValueError("collate_images: got no images")
    first = items[0]
    if isinstance(first, Tokens):
        for k, x in enumerate(items):
            if not isinstance(x, Tokens):
                raise TypeError(
                    f"collate_images: image {k} is {type(x).__name__} but image 0 is Tokens; mixed types"
                )
        return Tokens.cat(list(items))
    items = [_as_tensor(x, k, "image", "collate_images") for k, x in enumerate(items)]
    first = items[0]
    for k, x in enumerate(items):
        if x.dim() != first.dim() or (first.dim() == 2 and x.shape[-1] != first.shape[-1]):
            raise ValueError(
                f"collate_images: image {k} has shape {tuple(x.shape)} but image 0 has {tuple(first.shape)}; "
                "every image of a batch must be (3, H, W) pixels, or (N, D) features of one D"
            )
    # One dtype for the batch, whatever the order of its images: the common floating-point type
    # (float16 and float32 give float32), never the first image's (which would truncate the others).
    dtype = _common_float_dtype(items)
    if first.dim() == 3:
        shapes = {tuple(x.shape) for x in items}
        if len(shapes) != 1:
            raise ValueError(
                f"collate_images: pixel images of different sizes {sorted(shapes)}; resize them first"
            )
        same = all(x.dtype == first.dtype for x in items)  # uint8 pixels stay uint8
        return torch.stack(list(items) if same else [x.to(dtype) for x in items])
    if first.dim() == 2:
        return Tokens.pad_sequence([x.to(dtype) for x in items])
    raise ValueError(
        f"collate_images: an image must be (3, H, W) pixels or (N, D) region features, got {tuple(first.shape)}"
    )


def _common_float_dtype(items: Sequence[torch.Tensor]) -> torch.dtype:
    """The promoted dtype of the items, made floating point (integers become float32)."""
    dtype = items[0].dtype
    for x in items[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    if not dtype.is_floating_point:
        dtype = torch.promote_types(dtype, torch.float32)
    return dtype


def collate_texts(items: Sequence[Any]):
    """Captions as a list of strings, or token-id sequences padded into Tokens ``(B, M)``.

    Raises:
        ValueError: no items, an empty caption or sequence, a sequence that is not 1-D.
        TypeError: strings mixed with token ids, ids that are not integers (each named by index).
    """
    if len(items) == 0:
        raise ValueError("collate_texts: got no captions")
    if isinstance(items[0], str):
        for k, c in enumerate(items):
            if not isinstance(c, str):
                raise TypeError(
                    f"collate_texts: caption {k} is {type(c).__name__}, expected str like the others"
                )
            if not c.strip():
                raise ValueError(f"collate_texts: caption {k} is empty")
        return list(items)
    seqs = []
    for k, x in enumerate(items):
        if isinstance(x, str):
            raise TypeError(
                f"collate_texts: caption {k} is str but caption 0 is token ids; mixed types"
            )
        s = _as_tensor(x, k, "caption", "collate_texts")
        if s.dim() != 1:
            raise ValueError(
                f"collate_texts: caption {k} has shape {tuple(s.shape)}, expected a 1-D sequence of token ids"
            )
        if s.numel() == 0:
            raise ValueError(f"collate_texts: caption {k} has length 0")
        if s.is_floating_point() or s.is_complex() or s.dtype == torch.bool:
            raise TypeError(
                f"collate_texts: caption {k} holds {s.dtype} values, expected integer token ids"
            )
        seqs.append(s.long())
    return Tokens.pad_sequence(seqs)


def _as_tensor(x, k: int, what: str, who: str) -> torch.Tensor:
    """``x`` as a tensor, or a ``TypeError`` naming item ``k`` (a string, ``None``, a ragged list)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (str, bytes, Tokens)) or x is None:
        raise TypeError(
            f"{who}: {what} {k} is {type(x).__name__}, expected a tensor or array like {what} 0"
        )
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(
            f"{who}: {what} {k} ({type(x).__name__}) cannot be made a tensor: {e}"
        ) from e


def collate(batch: Sequence[dict]) -> dict:
    """Collate dataset items ``{"images", "texts", "image_ids"}`` into one batch dict.

    Returns:
        ``{"images": tensor or Tokens, "texts": list[str] or Tokens, "image_ids": (B,) long}``

    Raises:
        ValueError: an empty batch, an item without one of the three keys, and what
            :func:`collate_images` and :func:`collate_texts` raise.
        TypeError: an item that is not a dict, an ``image_ids`` that is not an integer (a
            float is never truncated), mixed types (see the two functions above).
    """
    if len(batch) == 0:
        raise ValueError("collate: got an empty batch")
    for k, b in enumerate(batch):
        if not isinstance(b, dict):
            raise TypeError(
                f"collate: item {k} is {type(b).__name__}, expected a dict {{images, texts, image_ids}}"
            )
        missing = [key for key in ("images", "texts", "image_ids") if key not in b]
        if missing:
            raise ValueError(f"collate: item {k} has no {missing} (keys: {sorted(map(str, b))})")
    out = {
        "images": collate_images([b["images"] for b in batch]),
        "texts": collate_texts([b["texts"] for b in batch]),
        "image_ids": torch.as_tensor(
            [_image_id(b["image_ids"], k) for k, b in enumerate(batch)], dtype=torch.long
        ),
    }
    return out


def _image_id(i, k: int) -> int:
    """An integer image index (a Python, NumPy or 0-d tensor integer), never a truncated float."""
    try:
        if isinstance(i, bool):
            raise TypeError
        return operator.index(i)
    except TypeError:
        raise TypeError(
            f"collate: item {k} has image_ids {i!r}, expected an integer image index"
        ) from None
