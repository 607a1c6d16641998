"""Ranking objectives over a score matrix: the VSE++ hinge (triplet) loss and symmetric InfoNCE.

Both take ``scores[i, t]`` (images rows, captions columns) and a bool matrix
``positives[i, t]``, True where image ``i`` and caption ``t`` match. Several
captions of one image (or one image repeated in the rows) are all positives of
each other and are never used as negatives. Both also take a pair
``(scores_i2t, scores_t2i)`` instead of one matrix: the image-to-text term is
computed on the first and the text-to-image term on the second (DCPA's
decoupled branches).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch

from imtm._checks import suggest
from imtm.tokens import check_finite

__all__ = ["PAIR_COUNTS", "REDUCTIONS", "info_nce_loss", "row_multiplicity", "triplet_loss"]


def _reduce_sum(cost: torch.Tensor, n_pairs: torch.Tensor) -> torch.Tensor:
    return cost.sum()


def _reduce_mean(cost: torch.Tensor, n_pairs: torch.Tensor) -> torch.Tensor:
    # One term per positive pair; the caller has checked that there is at least one.
    return cost.sum() / n_pairs.to(cost.dtype)


def _reduce_none(cost: torch.Tensor, n_pairs: torch.Tensor) -> torch.Tensor:
    return cost


#: How ``triplet_loss`` reduces its ``(Bi, Bt)`` matrix of per-positive-pair terms.
REDUCTIONS = {"sum": _reduce_sum, "mean": _reduce_mean, "none": _reduce_none}


def _split_scores(scores, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores`` or ``(scores_i2t, scores_t2i)`` -> the matrix each direction uses."""
    if isinstance(scores, torch.Tensor):
        pair = (scores, scores)
    elif isinstance(scores, Sequence) and not isinstance(scores, str):
        if len(scores) != 2:
            raise ValueError(
                f"{fn}: scores must be one (Bi, Bt) matrix or a pair (scores_i2t, scores_t2i), "
                f"got a sequence of {len(scores)}"
            )
        pair = (scores[0], scores[1])
    else:
        raise TypeError(
            f"{fn}: scores must be a (Bi, Bt) tensor or a pair (scores_i2t, scores_t2i), got {type(scores).__name__}"
        )
    for s, what in zip(
        pair, ("scores_i2t", "scores_t2i") if pair[0] is not pair[1] else ("scores", "scores")
    ):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{fn}: {what} must be a tensor, got {type(s).__name__}")
        if s.dim() != 2:
            raise ValueError(f"{fn}: {what} must have shape (Bi, Bt), got {tuple(s.shape)}")
        if not s.is_floating_point():
            raise TypeError(f"{fn}: {what} must be floating point, got {s.dtype}")
    if pair[0].shape != pair[1].shape:
        raise ValueError(
            f"{fn}: scores_i2t {tuple(pair[0].shape)} and scores_t2i {tuple(pair[1].shape)} must have the same shape"
        )
    return pair


def _check_positives(positives, shape: torch.Size, device: torch.device, fn: str) -> None:
    if not isinstance(positives, torch.Tensor):
        raise TypeError(
            f"{fn}: positives must be a bool tensor (Bi, Bt), got {type(positives).__name__}"
        )
    if positives.dtype != torch.bool:
        raise TypeError(
            f"{fn}: positives must be a bool tensor (True = matching pair), got {positives.dtype}; "
            "build it as image_ids[:, None] == image_ids[None, :]"
        )
    if positives.shape != shape:
        raise ValueError(
            f"{fn}: positives has shape {tuple(positives.shape)} but scores have {tuple(shape)}"
        )
    if positives.device != device:
        raise ValueError(f"{fn}: positives are on {positives.device} but scores are on {device}")
    # A value check (a device synchronisation) is left out inside a compiled region, so that the
    # losses compile with fullgraph=True; Matcher.fit builds positives from image ids, which
    # gives every caption its own image, so a batch there always has a matching pair.
    if not torch.compiler.is_compiling() and not bool(positives.any()):
        raise ValueError(
            f"{fn}: positives holds no True entry; every batch needs at least one matching pair"
        )


def _hardest_violation(
    scores: torch.Tensor,
    positives: torch.Tensor,
    margin: float,
    excluded: torch.Tensor,
    neg_weight: torch.Tensor,
) -> torch.Tensor:
    """Row-wise max-violation term of every positive pair: (Bi, Bt), zero off the positives.

    ``excluded`` marks the entries that are no negatives of their row (the positives, and in
    the text-to-image direction the repeated rows of the row's own image); ``neg_weight`` is
    not needed by a max (a repeated negative row has the same hinge).
    """
    has_neg = (~excluded).any(1, keepdim=True)
    # The hinge grows with s(i, t'), so its max over the negatives is the hinge of the largest negative.
    hard = scores.masked_fill(excluded, float("-inf")).amax(1, keepdim=True)
    # A row without negatives has nothing to push away: keep the arithmetic finite, zero the term below.
    hard = torch.where(has_neg, hard, torch.zeros_like(hard))
    cost = (margin - scores + hard).clamp_min(0)
    return torch.where(positives & has_neg, cost, torch.zeros_like(cost))


def _summed_violation(
    scores: torch.Tensor,
    positives: torch.Tensor,
    margin: float,
    excluded: torch.Tensor,
    neg_weight: torch.Tensor,
) -> torch.Tensor:
    """Row-wise sum-of-hinges term of every positive pair: (Bi, Bt), zero off the positives.

    The term of (i, t) sums ``w(t') (margin - s(i, t) + s(i, t'))`` over the negatives ``t'``
    with ``s(i, t') > s(i, t) - margin``, ``w = neg_weight`` (1, or one over the number of
    repeated rows of a negative image, so that it counts once). Sorting each row once turns
    it into a prefix sum of weights and of weighted scores of the largest negatives, so memory
    stays O(Bi * Bt) instead of the O(Bi * Bt * Bt) of broadcasting every triplet.
    """
    neg_sorted, order = scores.masked_fill(excluded, float("-inf")).sort(dim=1, descending=True)
    finite = torch.isfinite(neg_sorted)
    w_sorted = torch.where(
        finite, neg_weight.expand_as(scores).gather(1, order), torch.zeros_like(neg_sorted)
    )
    zero = torch.zeros_like(neg_sorted[:, :1])
    top_sums = torch.cat(
        [
            zero,
            (w_sorted * torch.where(finite, neg_sorted, torch.zeros_like(neg_sorted))).cumsum(1),
        ],
        1,
    )
    top_weights = torch.cat([zero, w_sorted.cumsum(1)], 1)
    # Number of negatives strictly above s(i, t) - margin; searchsorted needs ascending rows.
    count = torch.searchsorted(
        (-neg_sorted).detach().contiguous(), (margin - scores).detach().contiguous()
    )
    cost = top_weights.gather(1, count) * (margin - scores) + top_sums.gather(1, count)
    # clamp: the sum of non-negative hinges can round to a hair below zero.
    return torch.where(positives, cost.clamp_min(0), torch.zeros_like(cost))


def _mined_violation(
    scores: torch.Tensor, positives: torch.Tensor, margin: float, index: torch.Tensor
) -> torch.Tensor:
    """Hinge of every positive pair against its mined negative ``index[i, t]`` of row ``i``: (Bi, Bt)."""
    has_neg = (~positives).any(1, keepdim=True)
    cost = (margin - scores + scores.gather(1, index)).clamp_min(0)
    return torch.where(positives & has_neg, cost, torch.zeros_like(cost))


def row_multiplicity(positives: torch.Tensor) -> torch.Tensor:
    """How many rows of ``positives`` hold the same non-empty set of positive captions: ``(Bi,)``, at least 1.

    In a training batch row ``b`` of the images is the image of caption ``b``, so an image with
    ``k`` captions in the batch is ``k`` rows whose positives are the same ``k`` captions: a
    multiplicity of ``k``. Rows without any positive are counted as distinct images (1).

    Shape:
        - positives: ``(Bi, Bt)`` bool
        - output: ``(Bi,)`` long

    Example:
        >>> ids = torch.tensor([7, 7, 3, 7])
        >>> row_multiplicity(ids[:, None] == ids[None, :])
        tensor([3, 3, 1, 3])
    """
    p = positives.to(torch.float64 if positives.shape[1] >= 1 << 24 else torch.float32)
    shared = p @ p.transpose(0, 1)  # shared[r, u]: captions positive for both rows (exact integers)
    count = p.sum(1)
    same = (shared == count[:, None]) & (shared == count[None, :]) & (count[:, None] > 0)
    return same.sum(1).clamp_min(1)


def _count_once(positives: torch.Tensor) -> torch.Tensor:
    return 1.0 / row_multiplicity(positives).to(torch.float64)


def _count_per_row(positives: torch.Tensor) -> torch.Tensor:
    return torch.ones(positives.shape[0], dtype=torch.float64, device=positives.device)


#: How ``triplet_loss`` counts an (image, caption) pair whose image fills several rows of the
#: batch: ``"once"`` (each row weighted by one over its number of copies) or ``"per_row"`` (each
#: row counted, so an image with ``k`` captions in the batch counts each of its pairs ``k`` times).
PAIR_COUNTS = {"once": _count_once, "per_row": _count_per_row}


def _check_negatives(
    negatives, positives: torch.Tensor, fn: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(negatives, Sequence) or isinstance(negatives, str) or len(negatives) != 2:
        raise TypeError(
            f"{fn}: negatives must be a pair (i2t, t2i) of (Bi, Bt) index tensors, e.g. from a miner"
        )
    i2t, t2i = negatives
    bi, bt = positives.shape
    for idx, what, high in ((i2t, "i2t", bt), (t2i, "t2i", bi)):
        if (
            not isinstance(idx, torch.Tensor)
            or idx.dtype != torch.int64
            or tuple(idx.shape) != (bi, bt)
        ):
            raise ValueError(f"{fn}: negatives {what} must be a long tensor of shape {(bi, bt)}")
        if (
            idx.numel()
            and not torch.compiler.is_compiling()
            and (int(idx.min()) < 0 or int(idx.max()) >= high)
        ):
            raise ValueError(f"{fn}: negatives {what} holds indices outside [0, {high})")
    if torch.compiler.is_compiling():
        return i2t, t2i  # the value checks below synchronise; they run eagerly only
    # A mined "negative" that is a positive would push a match away: refuse it where it counts.
    rows = torch.arange(bi, device=positives.device)[:, None]
    cols = torch.arange(bt, device=positives.device)[None, :]
    bad_i2t = positives & (~positives).any(1, keepdim=True) & positives[rows, i2t]
    bad_t2i = positives & (~positives).any(0, keepdim=True) & positives[t2i, cols]
    if bool(bad_i2t.any()) or bool(bad_t2i.any()):
        raise ValueError(
            f"{fn}: negatives picks a matching pair as the negative of a positive pair"
        )
    return i2t, t2i


def triplet_loss(
    scores,
    positives: torch.Tensor,
    margin: float = 0.2,
    hardest: bool = True,
    reduction: str = "sum",
    *,
    negatives=None,
    count_pairs: str = "once",
) -> torch.Tensor:
    r"""Bidirectional hinge (triplet) ranking loss of VSE++ over a batch score matrix.

    For every positive pair :math:`(i, t)`, with :math:`\bar T_i` the captions that
    are not positives of image :math:`i` and :math:`\bar I_t` the images that are
    not positives of caption :math:`t`:

    .. math::

        \ell_{SH}(i, t) = \sum_{t' \in \bar T_i} [\alpha - s(i, t) + s(i, t')]_+
                        + \sum_{i' \in \bar I_t} [\alpha - s(i, t) + s(i', t)]_+   \qquad (5)

        \ell_{MH}(i, t) = \max_{t' \in \bar T_i} [\alpha - s(i, t) + s(i, t')]_+
                        + \max_{i' \in \bar I_t} [\alpha - s(i, t) + s(i', t)]_+   \qquad (6)

    ``hardest=True`` is the max-of-hinges loss (6), VSE++'s hardest negative;
    ``hardest=False`` is the sum-of-hinges loss (5). With a pair
    ``(scores_i2t, scores_t2i)`` the first sum/max reads ``scores_i2t`` and the
    second ``scores_t2i``. A direction with no negative at all (a batch holding
    one image only) contributes 0.

    *Repeated image rows.* In a training batch row ``b`` of the images is the image
    of caption ``b``, so an image with ``k`` captions in the batch fills ``k`` rows,
    and with ``positives = image_ids[:, None] == image_ids[None, :]`` each of its
    ``k`` pairs appears in ``k`` rows. With ``count_pairs="once"`` (default) rows
    with the same non-empty set of positives are copies of one image
    (:func:`row_multiplicity`): each copy's terms are weighted by one over the
    number of copies, so each matched pair counts once (the mean over the copies,
    which are equal when the image encoder is deterministic), and in the summed
    loss a negative image counts once however many rows it fills. That is the loss
    of the batch with its image rows de-duplicated, as evaluation scores each image
    once. ``count_pairs="per_row"`` counts every row (each pair ``k`` times).

    Args:
        scores: ``(Bi, Bt)`` similarities, or a pair ``(scores_i2t, scores_t2i)``.
        positives: True where image ``i`` and caption ``t`` match; in a training batch
            ``image_ids[:, None] == image_ids[None, :]``. Several captions of one image
            are never each other's negatives.
        margin: :math:`\alpha`, at least 0.
        hardest: max over negatives (VSE++) or sum over negatives.
        negatives: ``None``, or a pair ``(i2t, t2i)`` of ``(Bi, Bt)`` long tensors from a miner
            (e.g. :func:`imtm.functional.distance_weighted_negatives`): the term of positive
            pair ``(i, t)`` is then the hinge against caption ``i2t[i, t]`` and image
            ``t2i[i, t]`` only, and ``hardest`` is not used.
        reduction: ``"sum"`` (VSE++: the sum over positive pairs of both directions),
            ``"mean"`` (that sum divided by the number of positive pairs) or ``"none"``
            (the ``(Bi, Bt)`` matrix of :math:`\ell(i, t)`, zero where ``positives`` is False).
        count_pairs: ``"once"`` or ``"per_row"``, how pairs of an image that fills several
            rows count (see above).

    Returns:
        A scalar, or ``(Bi, Bt)`` for ``reduction="none"``; always :math:`\ge 0`.

    Shape:
        - scores: ``(Bi, Bt)`` (each of the pair)
        - positives: ``(Bi, Bt)`` bool
        - output: ``()`` or ``(Bi, Bt)``

    References:
        Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives",
        BMVC 2018, Eqs. 5 and 6.

    Example:
        >>> s = torch.tensor([[0.9, 0.8], [0.1, 0.5]])
        >>> triplet_loss(s, torch.eye(2, dtype=torch.bool))  # [0.2 - 0.9 + 0.8] + [0.2 - 0.5 + 0.8]
        tensor(0.6000)
    """
    fn = "triplet_loss"
    s_i2t, s_t2i = _split_scores(scores, fn)
    _check_positives(positives, s_i2t.shape, s_i2t.device, fn)
    if (
        isinstance(margin, bool)
        or not isinstance(margin, Real)
        or not math.isfinite(margin)
        or margin < 0
    ):
        raise ValueError(f"{fn}: margin must be a finite number >= 0, got {margin!r}")
    if not isinstance(hardest, bool):
        raise TypeError(
            f"{fn}: hardest must be True (max over negatives) or False (sum), got {hardest!r}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}."
            + suggest(reduction, REDUCTIONS)
        )
    check_finite(s_i2t, f"{fn}: scores")
    if s_t2i is not s_i2t:
        check_finite(s_t2i, f"{fn}: scores_t2i")
    count_weight = _resolve_count(count_pairs, fn)
    margin = float(margin)
    # w[r]: 1 / number of copies of image row r ("once"), or 1 ("per_row").
    w = count_weight(positives).to(s_i2t.dtype)
    n_pairs = (positives.to(s_i2t.dtype) * w[:, None]).sum()
    pos_t = positives.transpose(0, 1)
    if negatives is not None:
        i2t, t2i = _check_negatives(negatives, positives, fn)
        cost_i2t = _mined_violation(s_i2t, positives, margin, i2t)
        cost_t2i = _mined_violation(
            s_t2i.transpose(0, 1), pos_t, margin, t2i.transpose(0, 1)
        ).transpose(0, 1)
        return REDUCTIONS[reduction]((cost_i2t + cost_t2i) * w[:, None], n_pairs)
    violation = _hardest_violation if hardest else _summed_violation
    ones = torch.ones_like(s_i2t[:1])
    cost_i2t = violation(s_i2t, positives, margin, positives, ones)
    # The text-to-image term is the same computation with captions as the rows; there each
    # negative image is weighted by one over its copies.
    cost_t2i = violation(s_t2i.transpose(0, 1), pos_t, margin, pos_t, w[None, :]).transpose(0, 1)
    return REDUCTIONS[reduction]((cost_i2t + cost_t2i) * w[:, None], n_pairs)


def _resolve_count(count_pairs, fn: str):
    if isinstance(count_pairs, str) and count_pairs in PAIR_COUNTS:
        return PAIR_COUNTS[count_pairs]
    raise ValueError(
        f"{fn}: count_pairs must be one of {sorted(PAIR_COUNTS)}, got {count_pairs!r}."
        + suggest(count_pairs, PAIR_COUNTS)
    )


def _nce_direction(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over queries (rows) that have a positive of ``-log(sum_pos exp / sum_all exp)``."""
    has_pos = positives.any(1, keepdim=True)
    pos_logits = logits.masked_fill(~positives, float("-inf"))
    # Rows without a positive are dropped below; keep them finite so no NaN reaches the gradient.
    pos_logits = torch.where(has_pos, pos_logits, logits)
    per_query = torch.logsumexp(logits, 1) - torch.logsumexp(pos_logits, 1)
    has_pos = has_pos.squeeze(1)
    return torch.where(has_pos, per_query, torch.zeros_like(per_query)).sum() / has_pos.sum().to(
        logits.dtype
    )


def info_nce_loss(scores, positives: torch.Tensor, temperature=0.05) -> torch.Tensor:
    r"""Symmetric InfoNCE (CLIP-style contrastive) loss with several positives per query.

    For an image query :math:`i` with positive captions :math:`P_i`:

    .. math::

        \ell_{i2t}(i) = -\log \frac{\sum_{t \in P_i} \exp(s(i, t) / \tau)}
                                  {\sum_{t} \exp(s(i, t) / \tau)}

    and symmetrically :math:`\ell_{t2i}(t)` over the images of column :math:`t`
    (read from ``scores_t2i`` when a pair is given). The loss is
    :math:`\tfrac12(\operatorname{mean}_i \ell_{i2t} + \operatorname{mean}_t \ell_{t2i})`.
    With one positive per query this is CLIP's loss (InfoNCE, CPC Eq. 4, in both
    directions). With several, the positives share the numerator, as in MIL-NCE
    (Eq. 1): a query is satisfied when its positives together win, rather than
    each one being pushed against the others. Queries without any positive
    (a row or column of all False) are left out of the mean.

    Args:
        scores: ``(Bi, Bt)`` similarities, or a pair ``(scores_i2t, scores_t2i)``.
        positives: True where image ``i`` and caption ``t`` match.
        temperature: :math:`\tau > 0`, a number or a 0-d tensor (a learnable one).

    Shape:
        - scores: ``(Bi, Bt)``
        - positives: ``(Bi, Bt)`` bool
        - output: ``()``

    References:
        van den Oord et al., "Representation Learning with Contrastive Predictive Coding", 2018, Eq. 4;
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP), 2021;
        Miech et al., "End-to-End Learning of Visual Representations from Uncurated Instructional Videos"
        (MIL-NCE), CVPR 2020, Eq. 1.

    Example:
        >>> s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> info_nce_loss(s, torch.eye(2, dtype=torch.bool), temperature=1.0)
        tensor(0.3133)
    """
    fn = "info_nce_loss"
    s_i2t, s_t2i = _split_scores(scores, fn)
    _check_positives(positives, s_i2t.shape, s_i2t.device, fn)
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(
                f"{fn}: temperature must be a number or a one-element tensor, got shape {tuple(temperature.shape)}"
            )
        temperature = temperature.reshape(())
    elif (
        isinstance(temperature, bool)
        or not isinstance(temperature, Real)
        or not (0 < float(temperature) < math.inf)
    ):
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {temperature!r}")
    check_finite(s_i2t, f"{fn}: scores")
    if s_t2i is not s_i2t:
        check_finite(s_t2i, f"{fn}: scores_t2i")
    loss_i2t = _nce_direction(s_i2t / temperature, positives)
    loss_t2i = _nce_direction(s_t2i.transpose(0, 1) / temperature, positives.transpose(0, 1))
    return (loss_i2t + loss_t2i) / 2
