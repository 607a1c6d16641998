"""TripletLoss: the VSE++ hinge ranking loss as a pipeline block."""

from __future__ import annotations

import math
from numbers import Real

import torch

from imtm.component import Component, Loss, suggest
from imtm.functional.losses import PAIR_COUNTS, REDUCTIONS, triplet_loss

__all__ = ["TripletLoss"]


def scores_and_positives(block: Loss, values: tuple):
    """``forward(*values)`` of a score loss -> ``(scores or (scores_i2t, scores_t2i), positives)``.

    Two values are ``(scores, positives)``; three are ``(scores_i2t, scores_t2i, positives)``.
    """
    if len(values) == 2:
        return values[0], values[1]
    if len(values) == 3:
        return (values[0], values[1]), values[2]
    raise TypeError(
        f"{type(block).__name__}: forward takes (scores, positives) or (scores_i2t, scores_t2i, positives), "
        f"got {len(values)} value(s)"
    )


def check_loss_arguments(block: Loss) -> None:
    """Checks shared by the score losses' ``validate``: ``requires`` arity and ``weight``."""
    name = type(block).__name__
    if len(tuple(block.requires)) not in (2, 3):
        raise ValueError(
            f"{name}: requires must name 2 values (scores, positives) or 3 (scores_i2t, scores_t2i, positives), "
            f"got {tuple(block.requires)!r}"
        )
    weight = block.weight
    if (
        isinstance(weight, bool)
        or not isinstance(weight, Real)
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise ValueError(f"{name}: weight must be a finite number >= 0, got {weight!r}")


class TripletLoss(Loss):
    r"""VSE++ bidirectional hinge loss over the batch score matrix.

    .. math::

        \ell_{MH}(i, t) = \max_{t' \in \bar T_i} [\alpha - s(i, t) + s(i, t')]_+
                        + \max_{i' \in \bar I_t} [\alpha - s(i, t) + s(i', t)]_+   \qquad (6)

    summed over the positive pairs (``hardest=False``: sums over the negatives
    instead, Eq. 5). See :func:`imtm.functional.triplet_loss` for the exact
    definition, the reductions and the handling of several captions per image.

    ``forward`` takes its values in ``requires`` order and accepts two arities:
    ``(scores, positives)`` (the default ``requires``), or
    ``(scores_i2t, scores_t2i, positives)`` when renamed to
    ``requires=("scores_i2t", "scores_t2i", "positives")``: the image-to-text
    term then reads the first matrix and the text-to-image term the second
    (DCPA's decoupled branches).

    Args:
        margin: :math:`\alpha`, at least 0.
        hardest: max over negatives (VSE++) or sum over negatives.
        reduction: ``"sum"``, ``"mean"`` or ``"none"`` (a ``(Bi, Bt)`` matrix; a Matcher
            needs a scalar, so use it only outside one).
        weight: factor of this loss in the Matcher's total.
        miner: ``None`` (the negatives ``hardest`` says), or a block such as
            :class:`~imtm.components.DistanceWeightedMiner` called as ``miner(scores, positives)``
            that returns one negative caption and one negative image per positive pair
            (see the ``negatives`` argument of :func:`imtm.functional.triplet_loss`).

    Shape:
        - scores (or scores_i2t and scores_t2i): ``(Bi, Bt)``
        - positives: ``(Bi, Bt)`` bool
        - output: ``()`` (``(Bi, Bt)`` with ``reduction="none"``)

    References:
        Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives", BMVC 2018, Eqs. 5-6.

    Example:
        >>> loss = TripletLoss(margin=0.2)
        >>> loss(torch.tensor([[0.9, 0.8], [0.1, 0.5]]), torch.eye(2, dtype=torch.bool))
        tensor(0.6000)
    """

    requires = ("scores", "positives")
    provides = ("triplet_loss",)

    def __init__(
        self,
        margin: float = 0.2,
        hardest: bool = True,
        reduction: str = "sum",
        weight: float = 1.0,
        miner=None,
        count_pairs: str = "once",
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.margin = margin
        self.hardest = hardest
        self.reduction = reduction
        self.weight = weight
        self.miner = miner
        self.count_pairs = count_pairs

    def validate(self) -> TripletLoss:
        """Check the hyper-parameters (margin, hardest, reduction, miner, weight, arity); return ``self``."""
        name = type(self).__name__
        if self.reduction not in REDUCTIONS:
            raise ValueError(
                f"{name}: reduction must be one of {sorted(REDUCTIONS)}, got {self.reduction!r}."
                + suggest(self.reduction, REDUCTIONS)
            )
        if not isinstance(self.count_pairs, str) or self.count_pairs not in PAIR_COUNTS:
            raise ValueError(
                f"{name}: count_pairs must be one of {sorted(PAIR_COUNTS)}, got {self.count_pairs!r}."
                + suggest(self.count_pairs, PAIR_COUNTS)
            )
        margin = self.margin
        if (
            isinstance(margin, bool)
            or not isinstance(margin, Real)
            or not math.isfinite(margin)
            or margin < 0
        ):
            raise ValueError(f"{name}: margin must be a finite number >= 0, got {margin!r}")
        if not isinstance(self.hardest, bool):
            raise TypeError(
                f"{name}: hardest must be True (max over negatives) or False (sum), got {self.hardest!r}"
            )
        if self.miner is not None and not callable(self.miner):
            raise TypeError(
                f"{name}: miner must be None or a callable block such as DistanceWeightedMiner, "
                f"got {self.miner!r}"
            )
        if isinstance(self.miner, Component):
            # A nested block: set_params(miner__cutoff=...) is checked with the loss.
            self.miner.validate()
        check_loss_arguments(self)
        return self

    def forward(self, *values) -> torch.Tensor:
        self.validate()
        scores, positives = scores_and_positives(self, values)
        try:
            negatives = None if self.miner is None else self.miner(scores, positives)
            return triplet_loss(
                scores,
                positives,
                margin=self.margin,
                hardest=self.hardest,
                reduction=self.reduction,
                negatives=negatives,
                count_pairs=self.count_pairs,
            )
        except (ValueError, TypeError) as err:
            raise type(err)(f"{type(self).__name__}: {err}") from err
