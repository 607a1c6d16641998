"""DCPA's top-K similarity aggregation: the mean of the K best token scores.

References:
    Shi et al., "Decoupled Cross-modal Phrase-Attention Network for
    Image-Sentence Matching", IEEE TIP 2022, Eq. 10 (and the aggregation of Eq. 14).
"""

from __future__ import annotations

import math

import torch

from imtm._checks import check_option
from imtm.functional.blocking import (
    EPS,
    check_block_args,
    check_side,
    default_block_elements,
    normalize_tokens,
)
from imtm.tokens import l2_normalize

__all__ = ["AVERAGES", "DEFAULT_TOPK", "check_average", "check_k", "topk_mean", "topk_mean_scores"]

#: DCPA's K: the number of best-aligned tokens averaged (the paper's setting, Sec. IV-B).
DEFAULT_TOPK = 10

#: What ``k=None`` (the "global average" ablation) averages: ``"features"`` pools the token features
#: and then takes one cosine (the ablation as the paper describes it: a global vector per side);
#: ``"cosines"`` averages the per-token cosines (the top-K mean with K = all tokens).
AVERAGES = ("features", "cosines")


def check_average(average, *, where: str) -> str:
    """``average`` if it is one of :data:`AVERAGES`, else a ValueError with a suggestion."""
    return check_option(average, AVERAGES, name="average", where=where)


def check_k(k, *, where: str) -> int | None:
    """``k`` if it is a positive int or ``None`` (mean over every valid token), else a ValueError."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(
            f"{where}: k must be a positive int (top-K mean) or None (mean of all tokens), got {k!r}"
        )
    return k


def topk_mean(
    x: torch.Tensor, mask: torch.Tensor | None = None, k: int | None = DEFAULT_TOPK, dim: int = -1
) -> torch.Tensor:
    r"""Mean of the ``k`` largest valid entries of ``x`` along ``dim``.

    .. math::

        \operatorname{topK\text{-}mean}(s) = \frac{1}{K'} \sum_{j \in \operatorname{top}_{K'}(s)} s_j,
        \qquad K' = \min(K, |\{j : m_j\}|)

    When a row holds fewer than ``k`` valid entries, all of them are averaged
    (``K'`` is the number of valid entries): the paper does not say what to do
    then, and this keeps the score a mean of real similarities. ``k=None``
    averages every valid entry (the mean of the scores: the ``average="cosines"`` reading;
    DCPA's "global average" ablation pools the features first, see :func:`topk_mean_scores`).
    Padded entries never enter the result, whatever they hold. A row without
    any valid entry gives 0. The gradient flows to the selected entries only.

    Args:
        x: scores.
        mask: True where an entry is valid, broadcastable to ``x``; ``None``: all are.
        k: how many of the best entries to average; ``None``: all valid entries.
        dim: the axis to reduce.

    Shape:
        - x: ``(*, L, *)``, mask: broadcastable to ``x``, output: ``x`` without ``dim``

    References:
        Shi et al., DCPA, IEEE TIP 2022, Eq. 10.

    Example:
        >>> topk_mean(torch.tensor([[0.9, 0.1, 0.5, 7.0]]), torch.tensor([[True, True, True, False]]), k=2)
        tensor([0.7000])
    """
    if mask is not None:
        mask = torch.broadcast_to(mask, x.shape)
    if k is None:
        if mask is None:
            return x.mean(dim)
        w = mask.to(x.dtype)
        total = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim)
        return total / w.sum(dim).clamp_min(1.0)
    size = x.shape[dim]
    kk = min(k, size)
    if mask is None:
        return x.topk(kk, dim=dim).values.mean(dim)
    top = (
        torch.where(mask, x, torch.full((), -math.inf, dtype=x.dtype, device=x.device))
        .topk(kk, dim=dim)
        .values
    )
    # The first min(k, valid) of the sorted values are real (a real score is > -inf); the rest are padding.
    # K larger than the valid entries (the paper is silent): all valid entries are averaged.
    count = mask.sum(dim, keepdim=True).clamp_max(kk)
    rank = torch.arange(kk, device=x.device).view(
        [kk if d == (dim % x.dim()) else 1 for d in range(x.dim())]
    )
    keep = rank < count
    total = torch.where(keep, top, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim)
    return total / count.squeeze(dim).clamp_min(1).to(x.dtype)


def topk_mean_scores(
    images: torch.Tensor,
    texts: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    *,
    k: int | None = DEFAULT_TOPK,
    max_block_elements: int | None = None,
    compute_dtype: torch.dtype | None = None,
    average: str = "features",
) -> torch.Tensor:
    r"""DCPA's intra-modal score: the mean of the top-K region-to-sentence cosines (Eq. 10).

    .. math::

        S(i^V, c^T) = \frac{1}{K'} \sum_{k \in \operatorname{top}_{K'}} \cos(r^V_k, c^T) \qquad (10)

    For every image ``i`` and caption ``t``, the cosine of each valid region
    (visual phrase) ``r^V_k`` with the caption's sentence vector ``c^T``; the
    ``K`` best are averaged (all valid regions when fewer than ``K``, see
    :func:`topk_mean`).

    ``k=None`` is the "global average" ablation (DCPA Table III, the SAEM-style global
    aggregation of the intra-modal model; and the intra-modal half of Table IV's
    "w/o local-agg"): with ``average="features"`` (default) the valid regions are averaged
    *first* and one cosine taken, :math:`\cos(\frac1N \sum_k r^V_k, c^T)`; ``average="cosines"``
    averages the per-region cosines instead (a different number: the mean of cosines is not
    the cosine of the mean).

    The images are cut into blocks whose ``(b_i, N, Bt_block)`` cosine matrix
    holds at most ``max_block_elements`` numbers; each block is one matrix
    product, so the result does not depend on the block size.

    Args:
        images: region (visual phrase) features; need not be normalised.
        texts: one sentence vector per caption; need not be normalised.
        image_mask: True where a region is real; ``None``: all are.
        k: regions averaged per pair; ``None``: all valid regions.
        max_block_elements: at most this many cosines exist at once; ``None``: the
            device default (:func:`~imtm.functional.blocking.default_block_elements`).
        compute_dtype: dtype of the matrix products (e.g. ``torch.bfloat16``); ``None``: the inputs'.
        average: with ``k=None``, ``"features"`` (pool, then one cosine) or ``"cosines"``
            (mean of the cosines); ignored for an integer ``k``.

    Returns:
        ``scores[i, t]`` in the inputs' dtype, in ``[-1, 1]``.

    Raises:
        TypeError: non-tensor or non-float features, a mask that is not bool.
        ValueError: wrong shapes, mismatched ``D``, an image without a real region,
            NaN or inf in real features, a bad ``k`` or budget.

    Shape:
        - images: ``(Bi, N, D)``, image_mask: ``(Bi, N)``
        - texts: ``(Bt, D)``
        - output: ``(Bi, Bt)``

    References:
        Shi et al., "Decoupled Cross-modal Phrase-Attention Network for
        Image-Sentence Matching", IEEE TIP 2022, Eq. 10.

    Example:
        >>> regions, sentences = torch.randn(3, 36, 16), torch.randn(5, 16)
        >>> topk_mean_scores(regions, sentences, k=10).shape
        torch.Size([3, 5])
    """
    where = "topk_mean_scores"
    check_k(k, where=where)
    check_average(average, where=where)
    budget, compute_dtype = check_block_args(max_block_elements, compute_dtype, where=where)
    image_mask = check_side(images, image_mask, "images", where)
    if not isinstance(texts, torch.Tensor):
        raise TypeError(
            f"{where}: texts must be a tensor of shape (Bt, D), got {type(texts).__name__}"
        )
    if texts.dim() != 2:
        raise ValueError(
            f"{where}: texts must be one vector per caption, shape (Bt, D), got {tuple(texts.shape)}"
        )
    if not texts.is_floating_point():
        raise TypeError(f"{where}: texts must be floating point, got {texts.dtype}")
    if texts.shape[-1] != images.shape[-1]:
        raise ValueError(
            f"{where}: images and texts must share the feature dimension D, got images {tuple(images.shape)} "
            f"and texts {tuple(texts.shape)}"
        )
    if texts.device != images.device:
        raise ValueError(f"{where}: images are on {images.device} but texts on {texts.device}")
    if not bool(torch.isfinite(texts).all()):
        raise ValueError(f"{where}: texts hold NaN or inf values; check the sentence vectors")
    dtype = torch.promote_types(images.dtype, texts.dtype)
    budget = default_block_elements(images.device) if budget is None else budget
    Bi, N, D = images.shape
    Bt = texts.shape[0]
    if Bi == 0 or Bt == 0:
        return torch.zeros(Bi, Bt, dtype=dtype, device=images.device)
    c = l2_normalize(texts.to(dtype), dim=-1, eps=EPS)
    if compute_dtype is not None:
        c = c.to(compute_dtype)
    if k is None and average == "features":
        # Pool first, one cosine after: a (Bi, D) x (D, Bt) product, no per-region cosines at all.
        x = images.to(dtype)
        if image_mask is not None:
            x = torch.where(
                image_mask.unsqueeze(-1), x, torch.zeros((), dtype=dtype, device=x.device)
            )
            count = image_mask.sum(1, keepdim=True).clamp_min(1).to(dtype)
        else:
            count = torch.full((Bi, 1), float(N), dtype=dtype, device=x.device)
        pooled = l2_normalize(x.sum(1) / count, dim=-1, eps=EPS)
        if compute_dtype is not None:
            pooled = pooled.to(compute_dtype)
        return (pooled @ c.t()).to(dtype)
    v = normalize_tokens(images.to(dtype), image_mask, dtype=compute_dtype)
    # Block sizes: all captions per block when an image fits, else a run of captions.
    bt = max(1, min(Bt, budget // max(N, 1)))
    bi = max(1, min(Bi, budget // (max(N, 1) * bt)))
    rows = []
    for i0 in range(0, Bi, bi):
        vb = v[i0 : i0 + bi]
        mb = None if image_mask is None else image_mask[i0 : i0 + bi, :, None]
        parts = []
        for t0 in range(0, Bt, bt):
            sims = torch.matmul(vb, c[t0 : t0 + bt].t()).to(dtype)  # (b_i, N, b_t)
            parts.append(topk_mean(sims, mb, k, dim=1))
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
