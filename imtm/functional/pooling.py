"""Masked poolings of per-token scores into one score per set (CHAN, Sec. 3.3).

Each function reduces ``x`` along ``dim`` over the positions where ``mask`` is
True. ``mask`` broadcasts against ``x`` (for example a ``(1, Bt, M)`` caption
mask against ``(Bi, Bt, M)`` word scores), and whatever padded positions hold,
NaN included, never reaches the result.

The per-pooling functions do no validation and never synchronise with the
device, so blocked engines can call them inside their loops. A set without any
valid position gives ``-inf`` (max, lse), ``0`` (sum) or NaN (mean, softmax).
:func:`masked_pool` is the checked entry point: it validates its arguments and
refuses empty sets.

References:
    Pan, Wu and Zhang, "Fine-grained Image-text Matching by Cross-modal Hard
    Aligning Network", CVPR 2023, Eq. 3 and 8.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from imtm.functional.blocking import resolve_option
from imtm.tokens import masked_mean_along

__all__ = [
    "POOLINGS",
    "TEMPERED_POOLINGS",
    "check_temperature",
    "lse_pool",
    "masked_pool",
    "max_pool",
    "mean_pool",
    "resolve_pooling",
    "softmax_pool",
    "sum_pool",
]

#: A resolved pooling: ``pool(x, mask, dim)`` with any temperature already bound.
PoolFn = Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor]


def _fill(x: torch.Tensor, mask: torch.Tensor | None, value: float) -> torch.Tensor:
    # where() rather than a product with the mask: 0 * NaN in padding would be NaN.
    if mask is None:
        return x
    return torch.where(mask, x, torch.full((), value, dtype=x.dtype, device=x.device))


def _shifted_exp(x, mask, temperature, dim, top=None):
    """``(z, w)``: ``x`` with padding replaced by the set's maximum, and ``exp((z - max) / T)``
    with padding zeroed.

    Shifting by the (detached) maximum keeps the exponentials finite for any temperature, and
    changes neither value nor gradient of the poolings. Padding is set to the maximum before the
    exp and zeroed after it, rather than set to ``-inf`` before: on CPU, exp of ``-inf`` (or of
    any argument that underflows) takes a slow path, many times slower than the common case.
    """
    if top is None:
        top = _fill(x, mask, -math.inf).amax(dim, keepdim=True).detach()
    z = x if mask is None else torch.where(mask, x, top)
    w = ((z - top) / temperature).exp()
    if mask is not None:
        w = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
    return z, w


def max_pool(x: torch.Tensor, mask: torch.Tensor | None = None, *, dim: int = -1) -> torch.Tensor:
    r"""Largest valid score of each set.

    .. math::

        S = \max_{i : m_i} s_i

    At ties the gradient is shared equally between the tied positions (the
    sub-gradient of :func:`torch.amax`).

    Args:
        x: per-token scores.
        mask: True where a position counts; broadcasts against ``x``. ``None``: all count.
        dim: the axis to pool.

    Shape:
        - x: ``(*, M)`` with ``M`` at ``dim``
        - mask: broadcastable to ``x``
        - output: ``x``'s shape without ``dim``

    References:
        CHAN (Pan et al., CVPR 2023), max pooling of Sec. 3.3.

    Example:
        >>> max_pool(torch.tensor([[0.1, 0.9, 5.0]]), torch.tensor([[True, True, False]]))
        tensor([0.9000])
    """
    return _fill(x, mask, -math.inf).amax(dim)


def sum_pool(x: torch.Tensor, mask: torch.Tensor | None = None, *, dim: int = -1) -> torch.Tensor:
    r"""Sum of the valid scores of each set (ColBERT's MaxSim when the scores are maxima).

    .. math::

        S = \sum_{i : m_i} s_i

    Args:
        x: per-token scores.
        mask: True where a position counts; broadcasts against ``x``. ``None``: all count.
        dim: the axis to pool.

    Shape:
        - x: ``(*, M)`` with ``M`` at ``dim``
        - mask: broadcastable to ``x``
        - output: ``x``'s shape without ``dim``

    References:
        CHAN (Pan et al., CVPR 2023), sum pooling of Sec. 3.3.

    Example:
        >>> sum_pool(torch.tensor([[0.1, 0.9, 5.0]]), torch.tensor([[True, True, False]]))
        tensor([1.])
    """
    return _fill(x, mask, 0.0).sum(dim)


def mean_pool(x: torch.Tensor, mask: torch.Tensor | None = None, *, dim: int = -1) -> torch.Tensor:
    r"""Mean of the valid scores of each set.

    .. math::

        S = \frac{1}{|\{i : m_i\}|} \sum_{i : m_i} s_i

    Args:
        x: per-token scores.
        mask: True where a position counts; broadcasts against ``x``. ``None``: all count.
        dim: the axis to pool.

    Shape:
        - x: ``(*, M)`` with ``M`` at ``dim``
        - mask: broadcastable to ``x``
        - output: ``x``'s shape without ``dim``

    References:
        CHAN (Pan et al., CVPR 2023), mean pooling of Sec. 3.3.

    Example:
        >>> mean_pool(torch.tensor([[0.1, 0.9, 5.0]]), torch.tensor([[True, True, False]]))
        tensor([0.5000])
    """
    # An empty set has no mean: NaN, as 0 / 0 (masked_pool refuses empty sets before this).
    return masked_mean_along(x, mask, dim=dim, empty=math.nan)


def softmax_pool(
    x: torch.Tensor, mask: torch.Tensor | None = None, *, temperature: float = 0.1, dim: int = -1
) -> torch.Tensor:
    r"""Softmax-weighted mean of the valid scores of each set.

    .. math::

        S = \sum_{i : m_i} \frac{\exp(s_i / T)}{\sum_{k : m_k} \exp(s_k / T)} \, s_i

    It lies between the mean (``T`` large) and the max (``T`` small) of the set.

    Args:
        x: per-token scores.
        mask: True where a position counts; broadcasts against ``x``. ``None``: all count.
        temperature: ``T > 0``.
        dim: the axis to pool.

    Shape:
        - x: ``(*, M)`` with ``M`` at ``dim``
        - mask: broadcastable to ``x``
        - output: ``x``'s shape without ``dim``

    References:
        CHAN (Pan et al., CVPR 2023), softmax pooling of Sec. 3.3.

    Example:
        >>> softmax_pool(torch.tensor([[0.0, 1.0]]), temperature=1e-3)
        tensor([1.])
    """
    z, weights = _shifted_exp(x, mask, temperature, dim)
    return (weights * z).sum(dim) / weights.sum(dim)


def lse_pool(
    x: torch.Tensor, mask: torch.Tensor | None = None, *, temperature: float = 0.1, dim: int = -1
) -> torch.Tensor:
    r"""Log-sum-exp of the valid scores of each set, in the paper's scale.

    .. math::

        S = \frac{1}{\lambda} \log \sum_{i : m_i} \exp(\lambda s_i), \qquad \lambda = 1 / T
        \qquad \text{(CHAN, Eq. 3 and 8)}

    It lies in ``[max, max + T log n]`` for a set of ``n`` valid scores and is
    computed shifted by the set's maximum, so it stays finite for very small
    temperatures.

    Args:
        x: per-token scores.
        mask: True where a position counts; broadcasts against ``x``. ``None``: all count.
        temperature: ``T = 1 / lambda > 0``.
        dim: the axis to pool.

    Shape:
        - x: ``(*, M)`` with ``M`` at ``dim``
        - mask: broadcastable to ``x``
        - output: ``x``'s shape without ``dim``

    References:
        CHAN (Pan et al., CVPR 2023), Eq. 3 and 8. The authors' code returns
        ``log sum exp(lambda s)`` without the ``1 / lambda`` factor (scores
        scaled by ``lambda``); the paper's form is kept here, so scores stay on
        the cosine scale.

    Example:
        >>> lse_pool(torch.tensor([[0.5, 0.5]]), temperature=1.0)
        tensor([1.1931])
    """
    top = _fill(x, mask, -math.inf).amax(dim, keepdim=True).detach()
    _, weights = _shifted_exp(x, mask, temperature, dim, top)
    return top.squeeze(dim) + temperature * weights.sum(dim).log()


#: Every pooling by name.
POOLINGS: dict[str, Callable[..., torch.Tensor]] = {
    "max": max_pool,
    "mean": mean_pool,
    "sum": sum_pool,
    "softmax": softmax_pool,
    "lse": lse_pool,
}

#: The poolings that read a ``temperature``.
TEMPERED_POOLINGS = frozenset({"softmax", "lse"})


def check_temperature(temperature, name: str = "temperature", where: str = "pooling") -> float:
    """Return ``temperature`` as a float, or raise ``ValueError`` unless it is a finite number > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(
            f"{where}: {name} must be a positive number, got {type(temperature).__name__}"
        )
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{where}: {name} must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def resolve_pooling(pooling: str, temperature: float = 0.1, *, where: str = "pooling") -> PoolFn:
    """Look ``pooling`` up in :data:`POOLINGS` once and bind its temperature.

    Returns a callable ``pool(x, mask, dim)``.

    Raises:
        ValueError: unknown name (with a "did you mean" hint) or a temperature that is not > 0.

    Example:
        >>> pool = resolve_pooling("lse", 0.05)
        >>> pool(torch.zeros(2, 3), None, -1).shape
        torch.Size([2])
    """
    fn = resolve_option(pooling, POOLINGS, name="pooling", where=where)
    temperature = check_temperature(temperature, where=where)
    if pooling in TEMPERED_POOLINGS:
        fn = functools.partial(fn, temperature=temperature)
    return lambda x, mask, dim: fn(x, mask, dim=dim)


def masked_pool(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    pooling: str = "lse",
    temperature: float = 0.1,
    dim: int = -1,
) -> torch.Tensor:
    """Pool ``x`` along ``dim`` over the valid positions, with the pooling named ``pooling``.

    The checked entry point: ``x`` must be floating point, ``mask`` bool and
    broadcastable to ``x`` without enlarging it, and every set must hold at
    least one valid position.

    Args:
        x: per-token scores.
        mask: True where a position counts; ``None``: all count.
        pooling: one of ``"max"``, ``"mean"``, ``"sum"``, ``"softmax"``, ``"lse"``.
        temperature: temperature of ``"softmax"`` and ``"lse"`` (checked > 0 for all).
        dim: the axis to pool.

    Shape:
        - x: ``(*, M)`` with ``M`` at ``dim``
        - mask: broadcastable to ``x``
        - output: ``x``'s shape without ``dim``

    References:
        CHAN (Pan et al., CVPR 2023), Sec. 3.3, Eq. 3 and 8.

    Example:
        >>> x = torch.tensor([[0.2, 0.4, 9.0]])
        >>> masked_pool(x, torch.tensor([[True, True, False]]), "mean")
        tensor([0.3000])
    """
    where = "masked_pool"
    pool = resolve_pooling(pooling, temperature, where=where)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"{where}: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}"
        )
    if x.dim() == 0:
        raise ValueError(f"{where}: x must have at least one axis to pool, got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{where}: dim={dim} is out of range for x of shape {tuple(x.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"{where}: mask must be a bool tensor (True = valid), got {getattr(mask, 'dtype', type(mask).__name__)}"
            )
        try:
            shape = torch.broadcast_shapes(mask.shape, x.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            raise ValueError(
                f"{where}: mask of shape {tuple(mask.shape)} does not broadcast to x of shape {tuple(x.shape)}"
            )
    if x.shape[dim] == 0:
        raise ValueError(
            f"{where}: x of shape {tuple(x.shape)} has no position to pool over along dim={dim}"
        )
    if mask is not None:
        empty = ~torch.broadcast_to(mask, x.shape).any(dim)
        if bool(empty.any()):
            raise ValueError(
                f"{where}: {int(empty.sum())} set(s) have no valid position to pool over "
                f"(mask all False along dim={dim})"
            )
    return pool(x, mask, dim)
