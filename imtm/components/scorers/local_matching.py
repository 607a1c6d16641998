"""LocalMatching: DIAS's local matching framework (Eq. 1-3) as a scorer block."""

from __future__ import annotations

import torch

from imtm._block_inputs import as_tokens, named_errors
from imtm.component import Component
from imtm.contract import BLOCK_BUDGET, POSITIVE, Example, Options
from imtm.functional.local_matching import LOCAL_WEIGHTINGS, local_matching_scores

__all__ = ["LocalMatching"]


class LocalMatching(Component):
    r"""Scores every image-caption pair with DIAS's local matching framework.

    Each region becomes the weighted mean of the caption's words and each word the
    weighted mean of the image's regions (Eq. 1, weights from the cosines
    :math:`s_{ij} = \sigma_l(v_i, t_j)`), the updated regions and words are averaged
    into :math:`\hat V` and :math:`\hat T` (Eq. 2), and the score is
    :math:`\sigma_g(\hat V, \hat T) = \cos(\hat V, \hat T)` (Eq. 3):

    .. math::

        \hat v_i = \sum_j \frac{s_{ij}}{\sum_{j'} s_{ij'}} t_j, \quad
        \hat t_j = \sum_i \frac{s_{ij}}{\sum_{i'} s_{i'j}} v_i, \quad
        S = \cos\Big(\frac1N \sum_i \hat v_i, \frac1M \sum_j \hat t_j\Big)

    A thin module over :func:`imtm.functional.local_matching_scores`, which states
    what ``weighting="linear"`` does where the printed ratio is undefined (cosines
    clamped at 0; uniform weights where all are at most 0). It has no parameters.

    Args:
        weighting: normalisation of Eq. 1, ``"softmax"`` (default, measured better in ``docs/dias.md``) or
            ``"linear"`` (as printed, clamped).
        tau: temperature of ``"softmax"``.
        max_block_elements: memory budget of one block (token similarities); ``None``: the default.

    Shape:
        - image_tokens: Tokens ``(Bi, N, D)`` (or a ``(Bi, N, D)`` tensor, all tokens real)
        - text_tokens: Tokens ``(Bt, M, D)`` (or a ``(Bt, M, D)`` tensor)
        - output: ``(Bi, Bt)`` scores in ``[-1, 1]``

    References:
        Ma, Li, Fang and Zhang, "Bridging the Modality Gap: Dimension Information Alignment and
        Sparse Spatial Constraint for Image-Text Matching", ACM MM 2024, Eq. 1-3.

    Example:
        >>> from imtm import Tokens
        >>> scorer = LocalMatching()
        >>> scorer(Tokens(torch.randn(2, 36, 16)), Tokens.from_lengths(torch.randn(3, 9, 16), [9, 4, 6])).shape
        torch.Size([2, 3])
    """

    requires = ("image_tokens", "text_tokens")
    provides = ("scores",)
    #: Its forward is one call into a blocked engine of :mod:`imtm.functional.blocking`, which runs
    #: eagerly inside any compiled region (it plans its blocks on the host): compiled, the block
    #: only adds graph breaks around it (CHAN's coding 1.34 against 1.06 ms a step,
    #: ``bench_compile.py --per-block``), so ``Matcher(compile=True)`` leaves it eager.
    compiles = False

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (
            Example({"max_block_elements": 40}, padding=True),
            Example({"weighting": "softmax", "tau": 0.05}, padding=True),
        )

    def __init__(
        self,
        weighting: str = "softmax",
        tau: float = 0.1,
        max_block_elements: int | None = None,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.weighting = weighting
        self.tau = tau
        self.max_block_elements = max_block_elements

    _parameter_constraints = {
        "weighting": [Options(LOCAL_WEIGHTINGS)],
        "tau": [POSITIVE],
        "max_block_elements": BLOCK_BUDGET,
    }

    def forward(self, image_tokens, text_tokens) -> torch.Tensor:
        images = as_tokens(self, image_tokens, "image tokens")
        texts = as_tokens(self, text_tokens, "text tokens")
        with named_errors(self):
            return local_matching_scores(
                images.feats,
                texts.feats,
                images.mask,
                texts.mask,
                weighting=self.weighting,
                tau=self.tau,
                max_block_elements=self.max_block_elements,
            )

    def extra_repr(self) -> str:
        return f"weighting={self.weighting!r}, tau={self.tau}, " + super().extra_repr()
