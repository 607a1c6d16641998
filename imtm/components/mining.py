"""DistanceWeightedMiner: distance-weighted negative sampling (Wu et al. 2017) for TripletLoss."""

from __future__ import annotations

from numbers import Integral, Real

import torch

from imtm._block_inputs import named_errors
from imtm.component import Component
from imtm.contract import EXAMPLE_DIM, Example, Interval, Satisfies
from imtm.functional.mining import distance_weighted_negatives

__all__ = ["DistanceWeightedMiner"]


class DistanceWeightedMiner(Component):
    r"""Samples one negative caption and one negative image per positive pair, weighted by distance.

    A negative at distance :math:`d = \sqrt{2 - 2 s}` is drawn with probability

    .. math::

        \Pr(d) \propto \min\big(\lambda,\ q(d)^{-1}\big), \qquad
        q(d) \propto d^{\,n-2} \big(1 - \tfrac14 d^2\big)^{\frac{n-3}{2}} \qquad (3\text{-}4)

    (Wu et al.), which spreads the negatives over all distances instead of the
    hardest one only. Give it to a triplet loss, ``TripletLoss(miner=DistanceWeightedMiner(dim=1024))``,
    as DIAS does; alone it provides the method-specific values ``negatives_i2t``
    and ``negatives_t2i`` (see :func:`imtm.functional.distance_weighted_negatives`).

    Randomness: in training mode the draws use ``random_state``'s own generator
    (advancing from call to call, and saved in training checkpoints through
    :meth:`generator_states`, so a resumed run continues the stream), or with ``random_state=None`` torch's global
    generator, which ``Matcher.fit`` seeds and checkpoints (so a resumed run draws
    the same negatives). In eval mode every call draws from a generator freshly
    seeded with ``random_state`` (0 when ``None``): the same inputs give the same
    negatives.

    Args:
        dim: :math:`n`, the dimension of the embeddings the scores come from.
        cutoff: smallest distance counted (the cap :math:`\lambda`), as in Wu et al.
        nonzero_loss_cutoff: negatives farther than this are never drawn.
        random_state: seed of the block's own generator, or ``None``.

    Shape:
        - scores: ``(Bi, Bt)`` (or a pair ``(scores_i2t, scores_t2i)``); positives: ``(Bi, Bt)`` bool
        - output: two ``(Bi, Bt)`` long tensors (negative caption, negative image of each pair)

    References:
        Wu, Manmatha, Smola and Krähenbühl, "Sampling Matters in Deep Embedding Learning",
        ICCV 2017, Eq. 3-4; Ma et al. (DIAS), ACM MM 2024, Sec. 3.5.

    Example:
        >>> miner = DistanceWeightedMiner(dim=16, random_state=0)
        >>> i2t, t2i = miner(torch.rand(4, 4), torch.eye(4, dtype=torch.bool))
        >>> i2t.shape, bool((i2t.diagonal() != torch.arange(4)).all())
        (torch.Size([4, 4]), True)
    """

    requires = ("scores", "positives")
    provides = ("negatives_i2t", "negatives_t2i")

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (Example({"dim": EXAMPLE_DIM, "random_state": 0}),)

    def __init__(
        self,
        dim: int = 1024,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        random_state: int | None = None,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim
        self.cutoff = cutoff
        self.nonzero_loss_cutoff = nonzero_loss_cutoff
        self.random_state = random_state

    _parameter_constraints = {
        "dim": [
            Satisfies(
                Interval(Integral, 4, None).is_satisfied_by,
                "the embedding dimension, an integer >= 4",
                refused=[3, 4.0, True],
            )
        ],
        "cutoff": [Interval(Real, 0, 2, closed="neither")],
        # (cutoff, 2] in fact: the lower bound is the other parameter, checked in validate().
        "nonzero_loss_cutoff": [Interval(Real, 0, 2, closed="right")],
        "random_state": [Interval(Integral, None, None), None],
    }

    def validate(self) -> DistanceWeightedMiner:
        """Check that ``nonzero_loss_cutoff`` lies above ``cutoff`` (each is declared above); return ``self``."""
        if self.nonzero_loss_cutoff <= self.cutoff:
            raise ValueError(
                f"{type(self).__name__}: nonzero_loss_cutoff must be a number in (cutoff, 2] = "
                f"({self.cutoff}, 2], got {self.nonzero_loss_cutoff!r}"
            )
        return self

    def _generator(self, device: torch.device) -> torch.Generator | None:
        seed = self.random_state
        if not self.training:
            return torch.Generator(device=device).manual_seed(0 if seed is None else int(seed))
        if seed is None:
            return None
        # One generator per device, created on first use: the block owns its stream of draws.
        generators = self.__dict__.setdefault("_generators", {})
        if str(device) not in generators:
            generators[str(device)] = torch.Generator(device=device).manual_seed(int(seed))
        return generators[str(device)]

    def generator_states(self) -> dict[str, torch.Tensor]:
        """The state of the block's own generator on each device it drew on (training mode)."""
        return {dev: g.get_state() for dev, g in self.__dict__.get("_generators", {}).items()}

    def load_generator_states(self, states: dict[str, torch.Tensor]) -> None:
        """Continue the streams saved by :meth:`generator_states` (a resumed ``fit``)."""
        generators = self.__dict__.setdefault("_generators", {})
        for dev, state in states.items():
            g = torch.Generator(device=dev)
            g.set_state(state)
            generators[dev] = g

    def forward(self, scores, positives):
        device = (scores[0] if isinstance(scores, (tuple, list)) else scores).device
        with named_errors(self):
            return distance_weighted_negatives(
                scores,
                positives,
                dim=self.dim,
                cutoff=self.cutoff,
                nonzero_loss_cutoff=self.nonzero_loss_cutoff,
                generator=self._generator(device),
            )

    def __deepcopy__(self, memo):
        # torch.Generator cannot be deep-copied: a copy starts its own stream from random_state.
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        import copy

        for k, v in self.__dict__.items():
            if k != "_generators":
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, cutoff={self.cutoff}, random_state={self.random_state}, "
            + super().extra_repr()
        )
