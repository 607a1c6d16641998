"""TripletLoss: the VSE++ hinge ranking loss as a pipeline block."""

from __future__ import annotations

from numbers import Integral, Real

import torch

from imtm.component import Component, Loss
from imtm.contract import EXAMPLE_DIM, Example, Interval, Options, Satisfies
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
    """The check the score losses' ``validate`` shares: ``requires`` names 2 or 3 values.

    (``weight`` is declared on :class:`~imtm.Loss` and checked with every constraint.)
    """
    name = type(block).__name__
    if len(tuple(block.requires)) not in (2, 3):
        raise ValueError(
            f"{name}: requires must name 2 values (scores, positives) or 3 (scores_i2t, scores_t2i, positives), "
            f"got {tuple(block.requires)!r}"
        )


class TripletLoss(Loss):
    r"""VSE++ bidirectional hinge loss over the batch score matrix.

    .. math::

        \ell_{MH}(i, t) = \max_{t' \in \bar T_i} [\alpha - s(i, t) + s(i, t')]_+
                        + \max_{i' \in \bar I_t} [\alpha - s(i, t) + s(i', t)]_+   \qquad (6)

    summed over the positive pairs (``hardest=False``: sums over the negatives
    instead, Eq. 5). With ``hardest=True`` and ``warmup_epochs=k``, the first ``k``
    epochs sum over the negatives and the later ones take the hardest: the
    VSE-infinity warm-up (its ``train.py`` switches ``max_violation`` on once
    ``epoch >= vse_mean_warmup_epochs``; CHAN's scripts pass 1). From random
    initialisation the hardest negative of an untrained embedding is noise, and
    the hardest-negative loss alone can collapse in the first epoch (VSE++, Sec. 4);
    the summed loss gives every negative a gradient until the embedding means something.
    See :func:`imtm.functional.triplet_loss` for the exact
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
        warmup_epochs: with ``hardest=True``, sum over the negatives for this many epochs
            first (an integer >= 0; 0: hardest from the start). The loss learns the epoch
            from :meth:`set_epoch`, which ``Matcher.fit`` calls at the start of every epoch
            (the epoch within the current training stage, so a resumed run picks up the
            same setting). Called by hand in a plain loop; never called, the loss stays in
            its warm-up.
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
        >>> warm = TripletLoss(margin=0.2, warmup_epochs=1)
        >>> warm.hardest_now, warm.set_epoch(1), warm.hardest_now
        (False, None, True)
    """

    requires = ("scores", "positives")
    provides = ("triplet_loss",)

    #: 0-based epoch of the current training stage, as the last :meth:`set_epoch` said.
    epoch_: int = 0

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        from imtm.components.mining import DistanceWeightedMiner

        return (
            Example({}),
            Example({"hardest": False, "reduction": "mean"}),
            Example({"miner": DistanceWeightedMiner(dim=EXAMPLE_DIM, random_state=0)}),
            Example({"requires": ("scores_i2t", "scores_t2i", "positives")}),
        )

    def __init__(
        self,
        margin: float = 0.2,
        hardest: bool = True,
        reduction: str = "sum",
        weight: float = 1.0,
        miner=None,
        count_pairs: str = "once",
        *,
        warmup_epochs: int = 0,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.margin = margin
        self.hardest = hardest
        self.reduction = reduction
        self.weight = weight
        self.miner = miner
        self.warmup_epochs = warmup_epochs
        self.count_pairs = count_pairs

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss which epoch starts (0-based, within the training stage).

        ``Matcher.fit`` calls it on every block that has it before each epoch, a resumed
        run included; call it yourself when you drive the loss from your own loop.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, Integral) or epoch < 0:
            raise ValueError(
                f"{type(self).__name__}.set_epoch: epoch must be an integer >= 0, got {epoch!r}"
            )
        self.epoch_ = int(epoch)

    @property
    def hardest_now(self) -> bool:
        """Whether the current epoch takes the hardest negative (``hardest`` and the warm-up is over)."""
        return bool(self.hardest) and self.epoch_ >= self.warmup_epochs

    _parameter_constraints = {
        "margin": [Interval(Real, 0, None, closed="left")],
        "hardest": ["boolean"],  # True: the hardest negative (Eq. 6); False: the sum (Eq. 5)
        "reduction": [Options(REDUCTIONS)],
        "count_pairs": [Options(PAIR_COUNTS)],
        "warmup_epochs": [Interval(Integral, 0, None, closed="left")],
        "miner": [None, Satisfies(callable, "a callable block such as DistanceWeightedMiner")],
    }

    def validate(self) -> TripletLoss:
        """Check the declared constraints, a nested miner block and the arity; return ``self``."""
        if isinstance(self.miner, Component):
            # A nested block: set_params(miner__cutoff=...) is checked with the loss.
            self.miner.validate()
        check_loss_arguments(self)
        return self

    def forward(self, *values) -> torch.Tensor:
        scores, positives = scores_and_positives(self, values)
        try:
            negatives = None if self.miner is None else self.miner(scores, positives)
            return triplet_loss(
                scores,
                positives,
                margin=self.margin,
                hardest=self.hardest_now,
                reduction=self.reduction,
                negatives=negatives,
                count_pairs=self.count_pairs,
            )
        except (ValueError, TypeError) as err:
            raise type(err)(f"{type(self).__name__}: {err}") from err
