"""How a block takes its inputs: tensors as Tokens, and the functional's errors named after the block.

An underscore module shared by every block (it imports only :mod:`imtm.tokens`), so that no
block imports these helpers from another block's file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from imtm.tokens import Tokens

__all__ = ["as_tokens", "named_errors"]


def as_tokens(block: Any, value: Any, what: str) -> Tokens:
    """``value`` as Tokens (a ``(B, N, D)`` tensor means every token is real), or an error naming ``block``.

    Raises:
        ValueError: a tensor that is not 3-D.
        TypeError: neither Tokens nor a tensor.

    Example:
        >>> as_tokens(object(), torch.zeros(2, 3, 4), "image tokens").mask.all().item()
        True
    """
    if isinstance(value, Tokens):
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() != 3:
            raise ValueError(
                f"{type(block).__name__}: expected {what} of shape (B, N, D), got {tuple(value.shape)}"
            )
        return Tokens(value)
    raise TypeError(
        f"{type(block).__name__}: expected {what} as Tokens or a (B, N, D) tensor, got {type(value).__name__}"
    )


@contextlib.contextmanager
def named_errors(block: Any) -> Iterator[None]:
    """Prefix the functional's input errors with the block's class name, so they say where they came from."""
    try:
        yield
    except (TypeError, ValueError) as err:
        raise type(err)(f"{type(block).__name__}: {err}") from err
