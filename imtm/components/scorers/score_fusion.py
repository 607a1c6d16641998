"""ScoreFusion: weighted sums of named score matrices (DCPA's inference-time fusion)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

import torch

from imtm.component import Component, suggest
from imtm.contract import Example, Satisfies

__all__ = ["DCPA_WEIGHTS", "ScoreFusion"]

#: DCPA's inference fusion: 0.6 intra-modal + 0.4 the direction's inter-modal branch.
DCPA_WEIGHTS: dict[str, dict[str, float]] = {
    "scores_i2t": {"scores_intra": 0.6, "scores_inter_i2t": 0.4},
    "scores_t2i": {"scores_intra": 0.6, "scores_inter_t2i": 0.4},
}


class ScoreFusion(Component):
    r"""Combine named ``(Bi, Bt)`` score matrices into new ones by fixed weights.

    .. math::

        S_{i2t} = 0.6\, S(i^V, c^T) + 0.4\, S(i^T, c), \qquad
        S_{t2i} = 0.6\, S(i^V, c^T) + 0.4\, S(i, c^V)

    (DCPA's inference, the default weights :data:`DCPA_WEIGHTS`). ``weights``
    maps each provided value to ``{required value: weight}``; every provided
    name needs an entry and every input it names must be in ``requires``, in
    the order ``forward`` takes them. For example one symmetric score for both
    directions (the "without decoupling" ablation)::

        ScoreFusion({"scores": {"scores_intra": 0.6, "scores_inter": 0.4}},
                    requires=("scores_intra", "scores_inter"), provides=("scores",))

    Args:
        weights: ``{output: {input: weight}}``; ``None``: :data:`DCPA_WEIGHTS`.

    Shape:
        - every input: ``(Bi, Bt)``
        - every output: ``(Bi, Bt)``

    References:
        Shi et al., "Decoupled Cross-modal Phrase-Attention Network for
        Image-Sentence Matching", IEEE TIP 2022, Sec. III-E (inference).

    Example:
        >>> fusion = ScoreFusion()
        >>> i2t, t2i = fusion(torch.ones(2, 3), torch.zeros(2, 3), torch.full((2, 3), 0.5))
        >>> i2t[0, 0].item(), t2i[0, 0].item()
        (0.6000000238418579, 0.800000011920929)
    """

    requires = ("scores_intra", "scores_inter_i2t", "scores_inter_t2i")
    provides = ("scores_i2t", "scores_t2i")

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (Example({}),)

    def __init__(
        self,
        weights: Mapping[str, Mapping[str, float]] | None = None,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.weights = weights

    def _resolved(self) -> dict[str, dict[str, float]]:
        return DCPA_WEIGHTS if self.weights is None else self.weights

    _parameter_constraints = {
        "weights": [
            Satisfies(
                lambda w: isinstance(w, Mapping),
                "a dict {output: {input: weight}}",
                refused=[[0.6, 0.4], "scores"],
            ),
            None,
        ],
    }

    def validate(self) -> ScoreFusion:
        """Check that ``weights`` (a dict, as declared) names exactly the provided values and only
        required ones, each with a finite weight; return ``self``."""
        name = type(self).__name__
        weights = self._resolved()
        provides, requires = tuple(self.provides), tuple(self.requires)
        if set(weights) != set(provides):
            raise ValueError(
                f"{name}: weights must have one entry per provided value {provides}, got {sorted(weights)}; "
                "rename provides= or change weights"
            )
        for out, terms in weights.items():
            if not isinstance(terms, Mapping) or not terms:
                raise ValueError(
                    f"{name}: weights[{out!r}] must be a non-empty dict {{input: weight}}, got {terms!r}"
                )
            for value, w in terms.items():
                if value not in requires:
                    raise ValueError(
                        f"{name}: weights[{out!r}] names {value!r}, which is not in requires={requires}."
                        + suggest(value, requires)
                    )
                if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w):
                    raise ValueError(
                        f"{name}: weights[{out!r}][{value!r}] must be a finite number, got {w!r}"
                    )
        return self

    def forward(self, *scores: torch.Tensor):
        name = type(self).__name__
        requires = tuple(self.requires)
        if len(scores) != len(requires):
            raise TypeError(
                f"{name}: forward takes {len(requires)} score matrices {requires}, got {len(scores)}"
            )
        shape = tuple(scores[0].shape) if isinstance(scores[0], torch.Tensor) else None
        for value, s in zip(requires, scores):
            if not isinstance(s, torch.Tensor) or s.dim() != 2 or tuple(s.shape) != shape:
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(
                    f"{name}: every input must be a (Bi, Bt) matrix of shape {shape}; {value!r} is {got}"
                )
        by_name = dict(zip(requires, scores))
        weights = self._resolved()
        out = []
        for value in self.provides:
            total = None
            for term, w in weights[value].items():
                total = by_name[term] * w if total is None else total + by_name[term] * w
            out.append(total)
        return out[0] if len(out) == 1 else tuple(out)

    def extra_repr(self) -> str:
        return f"weights={self._resolved()!r}, " + super().extra_repr()
