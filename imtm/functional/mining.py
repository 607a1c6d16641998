r"""Negative mining for ranking losses: distance-weighted sampling (Wu et al. 2017).

:func:`distance_weighted_negatives` picks, for every positive pair of a score
matrix, one negative caption (for the image-to-text term) and one negative image
(for the text-to-image term), drawn with probability inversely proportional to
how often that distance occurs between random points of the unit sphere. Pass the
result to :func:`imtm.functional.triplet_loss` as ``negatives=``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import torch

from imtm.tokens import check_finite

__all__ = ["distance_weighted_negatives"]

#: Floor of ``1 - d^2 / 4`` inside the log: the density has a pole at the antipode (d = 2).
ANTIPODE_EPS = 1e-6


def _check_number(value, name: str, fn: str, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not (low < float(value) < high):
        raise ValueError(f"{fn}: {name} must be a number in ({low}, {high}), got {value!r}")
    return float(value)


def check_mining_args(dim, cutoff, nonzero_loss_cutoff, *, where: str) -> tuple[float, float]:
    """Check the distance-weighted sampling arguments; return ``(cutoff, nonzero_loss_cutoff)`` as floats.

    Raises:
        ValueError: ``dim`` is not an integer >= 4, ``cutoff`` not in ``(0, 2)``, or
            ``nonzero_loss_cutoff`` not in ``(cutoff, 2]``.
    """
    if isinstance(dim, bool) or not isinstance(dim, Integral) or dim < 4:
        raise ValueError(
            f"{where}: dim must be the embedding dimension, an integer >= 4, got {dim!r}"
        )
    cutoff = _check_number(cutoff, "cutoff", where, 0.0, 2.0)
    return cutoff, _check_number(
        nonzero_loss_cutoff, "nonzero_loss_cutoff", where, cutoff, 2.0 + 1e-9
    )


def _sample_direction(
    scores: torch.Tensor,
    positives: torch.Tensor,
    dim: int,
    cutoff: float,
    nonzero_loss_cutoff: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """For row anchor ``i`` and each column ``t``: one sampled negative column of row ``i``."""
    negatives = ~positives
    # Unit vectors: ||a - b||^2 = 2 - 2 cos. Scores outside [-1, 1] are clamped onto the sphere.
    d = (2 - 2 * scores).clamp(cutoff**2, 4.0).sqrt()
    log_w = (2.0 - dim) * d.log() - (dim - 3.0) / 2.0 * (1 - d.square() / 4).clamp_min(
        ANTIPODE_EPS
    ).log()
    keep = negatives & (d < nonzero_loss_cutoff)
    log_w = log_w.masked_fill(~keep, float("-inf"))
    # Shift by the row max so the largest weight is exp(0) = 1 (Wu et al. normalise the same way).
    row_max = log_w.amax(1, keepdim=True)
    weights = torch.where(keep, (log_w - row_max.clamp_min(-1e30)).exp(), torch.zeros_like(log_w))
    # No negative within the cut-off: uniform over the negatives, as Wu et al.; no negative at all
    # (every caption matches): uniform over the row, and the loss drops the term.
    empty = weights.sum(1, keepdim=True) == 0
    fallback = torch.where(
        negatives.any(1, keepdim=True), negatives.to(weights.dtype), torch.ones_like(weights)
    )
    weights = torch.where(empty, fallback, weights)
    return torch.multinomial(weights, scores.shape[1], replacement=True, generator=generator)


def distance_weighted_negatives(
    scores,
    positives: torch.Tensor,
    *,
    dim: int,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Distance-weighted negative sampling (Wu et al. 2017, Eq. 3-4), as DIAS uses for its triplet loss.

    Scores are read as cosines of unit vectors in ``dim`` dimensions, so the
    distance is :math:`d = \sqrt{2 - 2 s}`. Between random points of the unit
    sphere :math:`S^{n-1}` distances follow

    .. math::

        q(d) \propto d^{\,n-2} \big(1 - \tfrac14 d^2\big)^{\frac{n-3}{2}} \qquad (3)

    and a negative is drawn with probability
    :math:`\propto \min(\lambda, q(d)^{-1})` (Eq. 4), restricted to the negatives
    closer than ``nonzero_loss_cutoff`` (farther ones cannot violate a margin).
    ``cutoff`` clips small distances, which is the :math:`\lambda` cap: no negative
    weighs more than one at distance ``cutoff``. A row without a negative within
    ``nonzero_loss_cutoff`` samples uniformly among its negatives.

    For a positive pair :math:`(i, t)`, ``i2t[i, t]`` is a negative caption of image
    ``i`` drawn from row ``i`` of ``scores`` (of ``scores_i2t`` for a pair), and
    ``t2i[i, t]`` a negative image of caption ``t`` drawn from column ``t`` (of
    ``scores_t2i``). Entries at non-positive pairs are draws too, never read by
    :func:`~imtm.functional.triplet_loss`. Sampling passes no gradient.

    Args:
        scores: ``(Bi, Bt)`` similarities, or a pair ``(scores_i2t, scores_t2i)``.
        positives: ``(Bi, Bt)`` bool, True for matching pairs.
        dim: :math:`n`, the dimension of the embedding space (at least 4).
        cutoff: smallest distance (the weight cap), in ``(0, 2)``; Wu et al. use 0.5.
        nonzero_loss_cutoff: largest distance sampled, in ``(cutoff, 2]``; Wu et al. use 1.4.
        generator: the ``torch.Generator`` the draws use (``None``: the global one).

    Returns:
        ``(i2t, t2i)``: two ``(Bi, Bt)`` long tensors of column and row indices.

    Shape:
        - scores: ``(Bi, Bt)``; positives: ``(Bi, Bt)``
        - output: two ``(Bi, Bt)`` long tensors

    Raises:
        ValueError: scores that are not floating ``(Bi, Bt)`` tensors, positives of another
            shape, an empty batch (``Bi`` or ``Bt`` is 0), NaN/inf scores, or bad cutoffs.

    References:
        Wu, Manmatha, Smola and Krähenbühl, "Sampling Matters in Deep Embedding Learning",
        ICCV 2017, Eq. 3-4; used by Ma et al. (DIAS), ACM MM 2024.

    Example:
        >>> s = torch.tensor([[0.9, 0.2, 0.1], [0.3, 0.8, 0.0], [0.1, 0.2, 0.7]])
        >>> i2t, t2i = distance_weighted_negatives(s, torch.eye(3, dtype=torch.bool), dim=16,
        ...                                        generator=torch.Generator().manual_seed(0))
        >>> bool((i2t.diagonal() != torch.arange(3)).all())
        True
    """
    fn = "distance_weighted_negatives"
    if isinstance(scores, torch.Tensor):
        s_i2t = s_t2i = scores
    elif isinstance(scores, Sequence) and not isinstance(scores, str) and len(scores) == 2:
        s_i2t, s_t2i = scores
    else:
        raise TypeError(
            f"{fn}: scores must be a (Bi, Bt) tensor or a pair (scores_i2t, scores_t2i)"
        )
    for s in (s_i2t, s_t2i):
        if not isinstance(s, torch.Tensor) or s.dim() != 2 or not s.is_floating_point():
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"{fn}: scores must be floating (Bi, Bt) tensors, got {got}")
    if s_i2t.shape != s_t2i.shape:
        raise ValueError(
            f"{fn}: scores_i2t {tuple(s_i2t.shape)} and scores_t2i {tuple(s_t2i.shape)} differ in shape"
        )
    if (
        not isinstance(positives, torch.Tensor)
        or positives.dtype != torch.bool
        or positives.shape != s_i2t.shape
    ):
        raise ValueError(
            f"{fn}: positives must be a bool tensor of shape {tuple(s_i2t.shape)} (True = matching pair)"
        )
    if s_i2t.numel() == 0:
        raise ValueError(
            f"{fn}: needs at least one image and one caption, got scores of shape {tuple(s_i2t.shape)}"
        )
    cutoff, nonzero_loss_cutoff = check_mining_args(dim, cutoff, nonzero_loss_cutoff, where=fn)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    check_finite(s_i2t, f"{fn}: scores")
    with torch.no_grad():
        # float64 weights: (2 - n) log d spans hundreds of nats for n = 1024.
        i2t = _sample_direction(
            s_i2t.double(), positives, int(dim), cutoff, nonzero_loss_cutoff, generator
        )
        t2i = _sample_direction(
            s_t2i.double().transpose(0, 1),
            positives.transpose(0, 1),
            int(dim),
            cutoff,
            nonzero_loss_cutoff,
            generator,
        ).transpose(0, 1)
    return i2t, t2i.contiguous()
