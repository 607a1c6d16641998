"""Running a plan's blocks on a batch of values: what training, evaluation and retrieval all call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from imtm.engine.graph import Plan
from imtm.tokens import Tokens

__all__ = ["run_blocks", "move"]


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
