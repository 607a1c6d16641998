"""TopKAggregation: DCPA's intra-modal score, the mean of the top-K region-to-sentence cosines."""

from __future__ import annotations

from numbers import Integral

import torch

from imtm._block_inputs import as_tokens, named_errors
from imtm.component import Component
from imtm.contract import BLOCK_BUDGET, COMPUTE_DTYPE, Example, Interval, Options
from imtm.functional.topk import AVERAGES, DEFAULT_TOPK, topk_mean_scores

__all__ = ["TopKAggregation"]


class TopKAggregation(Component):
    r"""Scores every image-caption pair by the mean of its K best region-to-sentence cosines.

    .. math::

        S(i^V, c^T) = \frac{1}{K'} \sum_{k \in \operatorname{top}_{K'}} \cos(r^V_k, c^T),
        \qquad K' = \min(K, \text{valid regions}) \qquad (10)

    A thin module over :func:`imtm.functional.topk_mean_scores`; it has no
    parameters. An image with fewer than ``k`` real regions averages all of
    them. ``k=None`` is the "global average" ablation (Table III, SAEM; the intra-modal half
    of Table IV's "w/o local-agg"): the regions are pooled first and one cosine taken
    (``average="features"``), or, with ``average="cosines"``, the cosines are averaged.

    Args:
        k: regions averaged per pair (10 in the paper); ``None``: the global average.
        average: what ``k=None`` averages, ``"features"`` (default) or ``"cosines"``.
        max_block_elements: memory budget of one block (cosines); ``None``: the default.
        compute_dtype: dtype of the matrix products, e.g. ``torch.bfloat16``; ``None``: the inputs'.

    Shape:
        - visual_phrases: Tokens ``(Bi, N, D)`` (or a ``(Bi, N, D)`` tensor, all tokens real)
        - text_phrase: ``(Bt, D)`` sentence vectors
        - output: ``(Bi, Bt)`` scores in ``[-1, 1]``

    References:
        Shi et al., "Decoupled Cross-modal Phrase-Attention Network for
        Image-Sentence Matching", IEEE TIP 2022, Eq. 10.

    Example:
        >>> from imtm import Tokens
        >>> agg = TopKAggregation(k=10)
        >>> agg(Tokens.from_lengths(torch.randn(2, 36, 16), [36, 7]), torch.randn(3, 16)).shape
        torch.Size([2, 3])
    """

    requires = ("visual_phrases", "text_phrase")
    provides = ("scores_intra",)

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return Example.variants(
            {"k": 2}, {"k": None}, {"k": None, "average": "cosines"}, padding=True
        )

    def __init__(
        self,
        k: int | None = DEFAULT_TOPK,
        max_block_elements: int | None = None,
        compute_dtype: torch.dtype | None = None,
        average: str = "features",
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.k = k
        self.average = average
        self.max_block_elements = max_block_elements
        self.compute_dtype = compute_dtype

    _parameter_constraints = {
        "k": [Interval(Integral, 1, None, closed="left"), None],  # None: the mean of every token
        "average": [Options(AVERAGES)],
        "max_block_elements": BLOCK_BUDGET,
        "compute_dtype": COMPUTE_DTYPE,
    }

    def forward(self, visual_phrases, text_phrase) -> torch.Tensor:
        images = as_tokens(self, visual_phrases, "visual phrases")
        with named_errors(self):
            return topk_mean_scores(
                images.feats,
                text_phrase,
                images.mask,
                k=self.k,
                max_block_elements=self.max_block_elements,
                compute_dtype=self.compute_dtype,
                average=self.average,
            )

    def extra_repr(self) -> str:
        return f"k={self.k}, average={self.average!r}, " + super().extra_repr()
