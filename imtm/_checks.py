"""Checks of plain values that every layer shares: "did you mean" suggestions, options, numbers.

An underscore module: its names are for imtm's own modules (all of which may import it, since
it imports nothing of imtm), not a public API. Blocks declare their constraints with
:mod:`imtm.contract`, which is built on these.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from numbers import Integral, Real
from typing import Any

__all__ = ["suggest", "resolve_option", "check_option", "is_int", "is_real"]


def suggest(name: Any, options: Iterable[Any]) -> str:
    """A ``" Did you mean 'x'?"`` suffix for a misspelled ``name`` (empty when nothing is close).

    Example:
        >>> suggest("mena", ["mean", "max"])
        " Did you mean 'mean'?"
    """
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_option(value: Any, options: Iterable[Any], *, name: str, where: str) -> Any:
    """``value`` if it is one of ``options``, else a ``ValueError`` listing them with a suggestion.

    Example:
        >>> check_option("sum", ("mean", "sum"), name="reduction", where="f")
        'sum'
    """
    options = list(options)
    if isinstance(value, str) and value in options:
        return value
    raise ValueError(
        f"{where}: {name} must be one of {sorted(options)}, got {value!r}."
        + suggest(value, options)
    )


def resolve_option(value: Any, options: Mapping, *, name: str, where: str) -> Any:
    """``options[value]``, or a ``ValueError`` that lists the options and suggests the closest.

    Example:
        >>> resolve_option("visual", {"visual": 0, "textual": 1}, name="codebook", where="f")
        0
    """
    if isinstance(value, str) and value in options:
        return options[value]
    raise ValueError(
        f"{where}: {name} must be one of {sorted(options)}, got {value!r}."
        + suggest(value, options)
    )


def is_int(value: Any) -> bool:
    """Whether ``value`` is a whole number (a Python or NumPy integer, never a ``bool``)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_real(value: Any, *, finite: bool = True) -> bool:
    """Whether ``value`` is a real number (never a ``bool``; with ``finite``, not NaN or inf either)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return False
    return math.isfinite(value) if finite else True
