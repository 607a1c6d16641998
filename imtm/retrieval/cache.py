"""Cached per-item values of a gallery (token features, vectors) that stage 2 reads back by row.

A value lives either in memory (torch tensors on the model's device) or on disk
as plain ``.npy`` files opened memory-mapped, so only the rows of the top-K
candidates are ever read. No pickle is involved: ``np.load(..., allow_pickle=False)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imtm.tokens import Tokens

__all__ = ["CachedValue", "load_values", "save_values"]


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    x = x.detach()
    if x.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
        x = x.float()
    return x.cpu().numpy()


@dataclass
class CachedValue:
    """One cached value: Tokens (``feats`` + ``mask``) or a plain per-row array (``feats`` only).

    ``feats`` and ``mask`` are torch tensors or NumPy arrays (memory-mapped after loading).
    """

    feats: Any
    mask: Any = None
    grid: tuple[int, int] | None = None
    num_prefix_tokens: int = 0

    @classmethod
    def from_value(cls, value: Any, name: str) -> CachedValue:
        if isinstance(value, Tokens):
            return cls(value.feats, value.mask, value.grid, value.num_prefix_tokens)
        if isinstance(value, torch.Tensor):
            return cls(value)
        raise TypeError(
            f"TwoStageRetriever: cannot cache the value {name!r} of type {type(value).__name__}; the fine-grained "
            "blocks must read Tokens or tensors from each side"
        )

    @property
    def is_tokens(self) -> bool:
        return self.mask is not None

    def __len__(self) -> int:
        return int(self.feats.shape[0])

    def take(self, rows: torch.Tensor, device: torch.device) -> Any:
        """Rows ``rows`` (sorted, unique) on ``device``: Tokens trimmed of all-padding columns, or a tensor."""
        feats, mask = self.feats, self.mask
        if isinstance(feats, np.ndarray):
            r = rows.cpu().numpy()
            feats = torch.from_numpy(np.ascontiguousarray(feats[r]))
            mask = torch.from_numpy(np.ascontiguousarray(mask[r])) if mask is not None else None
        else:
            r = rows.to(feats.device)
            feats = feats.index_select(0, r)
            mask = mask.index_select(0, r) if mask is not None else None
        feats = feats.to(device, non_blocking=True)
        if mask is None:
            return feats
        return Tokens(
            feats, mask.to(device), grid=self.grid, num_prefix_tokens=self.num_prefix_tokens
        ).trim()

    def spec(self) -> dict:
        return {
            "kind": "tokens" if self.is_tokens else "tensor",
            "grid": list(self.grid) if self.grid else None,
            "num_prefix_tokens": self.num_prefix_tokens,
        }


def save_values(folder: Path, values: dict[str, CachedValue]) -> dict:
    """Write every value as ``<name>.feats.npy`` (and ``<name>.mask.npy``); return their description."""
    spec = {}
    for name, v in values.items():
        np.save(
            folder / f"{name}.feats.npy", _to_numpy(torch.as_tensor(v.feats)), allow_pickle=False
        )
        if v.is_tokens:
            np.save(
                folder / f"{name}.mask.npy", _to_numpy(torch.as_tensor(v.mask)), allow_pickle=False
            )
        spec[name] = v.spec()
    return spec


def load_values(
    folder: Path, spec: dict, mmap: bool = True, size: int | None = None
) -> dict[str, CachedValue]:
    """Open the values :func:`save_values` wrote (memory-mapped by default: nothing is read yet).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a file is truncated, damaged or of the wrong shape (its rows differ from ``size``,
            a mask that does not match its features); the message names the file.
    """
    from imtm.retrieval.index import load_array

    out = {}
    for name, s in spec.items():
        feats_path = Path(folder) / f"{name}.feats.npy"
        feats = load_array(feats_path, mmap, "TwoStageRetriever.load")
        if feats.ndim == 0 or (size is not None and feats.shape[0] != size):
            raise ValueError(
                f"TwoStageRetriever.load: {feats_path} holds shape {feats.shape}, expected {size} rows "
                "(the gallery size in retriever.json)"
            )
        mask = None
        if s["kind"] == "tokens":
            mask_path = Path(folder) / f"{name}.mask.npy"
            mask = load_array(mask_path, mmap, "TwoStageRetriever.load")
            if mask.dtype != np.bool_ or mask.shape != feats.shape[:2]:
                raise ValueError(
                    f"TwoStageRetriever.load: {mask_path} holds {mask.dtype} of shape {mask.shape}, "
                    f"expected a bool mask of shape {feats.shape[:2]}"
                )
        grid = tuple(s["grid"]) if s.get("grid") else None
        out[name] = CachedValue(feats, mask, grid, int(s.get("num_prefix_tokens", 0)))
    return out
