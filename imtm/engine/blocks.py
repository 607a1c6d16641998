"""Running a plan's blocks on a batch of values: what training, evaluation and retrieval all call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from imtm.engine.graph import Plan
from imtm.tokens import Tokens

__all__ = ["run_blocks", "move", "take", "concat"]


def run_blocks(plan: Plan, indices: Sequence[int], values: dict[str, Any]) -> dict[str, Any]:
    """Run blocks ``indices`` in order, reading and writing ``values`` (returned, updated in place)."""
    for k in indices:
        block = plan.blocks[k]
        args = [values[name] for name in block.requires]
        out = block(*args)
        provides = tuple(block.provides)
        if len(provides) == 1:
            values[provides[0]] = out
        else:
            if not isinstance(out, (tuple, list)) or len(out) != len(provides):
                raise TypeError(
                    f"{plan.names[k]!r} ({type(block).__name__}) declares provides={provides} but returned "
                    f"{type(out).__name__}{'' if not isinstance(out, (tuple, list)) else f' of length {len(out)}'}"
                )
            values.update(zip(provides, out))
    return values


def move(value: Any, device: torch.device) -> Any:
    if isinstance(value, (Tokens, torch.Tensor)):
        return value.to(device)
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    return value


def take(value: Any, sl: slice) -> Any:
    """Rows ``sl`` of a batch value (Tokens trimmed of all-padding columns, tensors, lists)."""
    if isinstance(value, Tokens):
        return value[sl].trim()
    if isinstance(value, torch.Tensor):
        return value[sl]
    if isinstance(value, (list, tuple)):
        return value[sl]
    raise TypeError(f"cannot split a value of type {type(value).__name__} into blocks")


def concat(parts: list) -> Any:
    """Concatenate batch values along the batch axis, consuming ``parts``.

    The output is allocated empty and each part is released once copied, so the
    peak stays near one copy of the cache (pages of a fresh allocation are only
    backed when written) instead of two.
    """
    first = parts[0]
    if isinstance(first, Tokens):
        n = sum(p.batch_size for p in parts)
        width = max(p.num_tokens for p in parts)
        feats = first.feats.new_empty((n, width, *first.feats.shape[2:]))
        mask = torch.zeros(n, width, dtype=torch.bool, device=first.feats.device)
        meta = {"grid": first.grid, "num_prefix_tokens": first.num_prefix_tokens}
        row = 0
        while parts:
            p = parts.pop(0)
            feats[row : row + p.batch_size, : p.num_tokens] = p.feats
            feats[row : row + p.batch_size, p.num_tokens :] = 0
            mask[row : row + p.batch_size, : p.num_tokens] = p.mask
            row += p.batch_size
        return Tokens(feats, mask, **meta)
    if isinstance(first, torch.Tensor):
        out = first.new_empty((sum(p.shape[0] for p in parts), *first.shape[1:]))
        row = 0
        while parts:
            p = parts.pop(0)
            out[row : row + p.shape[0]] = p
            row += p.shape[0]
        return out
    if isinstance(first, list):
        return [x for p in parts for x in p]
    raise TypeError(f"cannot concatenate values of type {type(first).__name__}")
