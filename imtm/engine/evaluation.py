"""Blocked all-pairs scoring: encode each side once, then run pairwise blocks on image x caption blocks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from imtm.engine.blocks import concat, move, run_blocks, take
from imtm.engine.graph import IMAGE, TEXT, Plan
from imtm.tokens import NonFiniteValueError, Tokens

__all__ = ["run_blocks", "take", "concat", "move", "encode_side", "blocked_scores"]


def _check_finite_batch(batch: Any, start: int, what: str) -> None:
    """Refuse NaN/inf input features (padding excluded) naming the first bad item, as ``fit`` does."""
    if isinstance(batch, Tokens):
        feats = batch.feats
        bad = ~torch.isfinite(feats) & batch.mask.reshape(
            *batch.mask.shape, *(1,) * (feats.dim() - 2)
        )
    elif isinstance(batch, torch.Tensor):
        feats = batch
        bad = ~torch.isfinite(feats)
    else:
        return
    if not feats.is_floating_point() or not bool(bad.any()):
        return
    rows = torch.nonzero(bad.reshape(bad.shape[0], -1).any(1)).flatten()
    raise NonFiniteValueError(
        f"encoding {what}: item {start + int(rows[0])} holds NaN or inf features ({rows.numel()} bad item(s) in "
        f"items {start}..{start + bad.shape[0] - 1}); fix or filter the inputs"
    )


def encode_side(
    plan: Plan,
    indices: Sequence[int],
    raw_name: str,
    items: Sequence[Any],
    collate_fn: Callable,
    keep: Sequence[str],
    *,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    progress: bool = False,
    desc: str = "",
) -> dict[str, Any]:
    """Run one side's blocks over ``items`` in batches; return the ``keep`` values concatenated."""
    n = len(items)
    chunks: dict[str, list] = {name: [] for name in keep}
    bar = tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False)
    for start in bar:
        batch = collate_fn([items[j] for j in range(start, min(n, start + batch_size))])
        _check_finite_batch(batch, start, desc or raw_name)
        values = {raw_name: move(batch, device)}
        with autocast():
            run_blocks(plan, indices, values)
        for name in keep:
            chunks[name].append(values[name])
    return {name: concat(parts) for name, parts in chunks.items()}


def blocked_scores(
    plan: Plan,
    pair_indices: Sequence[int],
    image_values: dict[str, Any],
    text_values: dict[str, Any],
    n_images: int,
    n_captions: int,
    *,
    image_block: int,
    text_block: int,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Fill ``(n_images, n_captions)`` score matrices block by block (float32, on the CPU).

    Only one ``(image_block, text_block)`` block of pairwise intermediates exists at a time.
    """
    out = {
        name: torch.empty(n_images, n_captions, dtype=torch.float32) for name in plan.score_values
    }
    starts = [
        (i0, t0)
        for i0 in range(0, n_images, image_block)
        for t0 in range(0, n_captions, text_block)
    ]
    cached_i: tuple[int, dict] | None = None
    for i0, t0 in tqdm(starts, desc="scoring", disable=not progress, leave=False):
        if cached_i is None or cached_i[0] != i0:
            cached_i = (
                i0,
                {k: take(v, slice(i0, i0 + image_block)) for k, v in image_values.items()},
            )
        values = dict(cached_i[1])
        values.update({k: take(v, slice(t0, t0 + text_block)) for k, v in text_values.items()})
        with autocast():
            run_blocks(plan, pair_indices, values)
        for name in plan.score_values:
            block = values[name]
            out[name][i0 : i0 + image_block, t0 : t0 + text_block] = block.detach().float().cpu()
    return out


class RowRange:
    """Items ``[start, stop)`` of an indexable sequence, without copying it (one rank's share)."""

    def __init__(self, items: Sequence[Any], start: int, stop: int):
        self.items, self.start, self.stop = items, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, j: int) -> Any:
        if not 0 <= j < len(self):
            raise IndexError(f"row {j} outside a range of {len(self)}")
        return self.items[self.start + j]


def side_values_needed(plan: Plan, pair_indices: Sequence[int], side: str) -> list[str]:
    """Values of one side that the pairwise blocks read (the cache to keep)."""
    target = frozenset({side})
    need: list[str] = []
    for k in pair_indices:
        for r in plan.blocks[k].requires:
            if plan.sides.get(r) == target and r not in need:
                need.append(r)
    return need


__all__ += ["side_values_needed", "IMAGE", "TEXT", "RowRange"]
