"""ScanAttention: SCAN's text-to-image cross-attention score (the alignment of a LAPS Table 4 row)."""

from __future__ import annotations

import torch

from imtm._block_inputs import as_tokens, named_errors
from imtm.component import Component
from imtm.contract import BLOCK_BUDGET, POSITIVE, Example
from imtm.functional.scan_attention import SCAN_SMOOTH, scan_t2i_scores

__all__ = ["ScanAttention"]


class ScanAttention(Component):
    r"""Scores every image-caption pair by SCAN's text-to-image attention with average pooling.

    .. math::

        \alpha_{ij} = \mathrm{softmax}_i(\lambda_1 \bar s_{ij}), \quad
        S(I, T) = \frac{1}{M} \sum_j \cos\Big(e_j, \sum_i \alpha_{ij} \hat v_i\Big)

    A thin module over :func:`imtm.functional.scan_attention.scan_t2i_scores` (no parameters),
    written after ``xattn_score_t2i`` / ``func_attention`` in lib/xttn.py of CrossmodalGroup/LAPS.
    As :class:`~imtm.components.PatchSlimming`'s ``alignment`` it is the "SCAN" row of LAPS's
    Table 4 (the slimmed sets aligned by SCAN instead of the sparse alignment).

    Args:
        smooth: :math:`\lambda_1` of the attention softmax (9).
        max_block_elements: memory budget of one block; ``None``: the default.

    Shape:
        - image_tokens: Tokens ``(Bi, N, D)``; text_tokens: Tokens ``(Bt, M, D)``
        - output: ``(Bi, Bt)`` scores in ``[-1, 1]``

    References:
        Lee et al., "Stacked Cross Attention for Image-Text Matching", ECCV 2018.

    Example:
        >>> from imtm import Tokens
        >>> ScanAttention()(Tokens(torch.randn(2, 6, 8)), Tokens.from_lengths(torch.randn(3, 4, 8), [4, 2, 3])).shape
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
            Example({}, padding=True),
            Example({"smooth": 4.0, "max_block_elements": 30}, padding=True),
        )

    def __init__(
        self,
        smooth: float = SCAN_SMOOTH,
        max_block_elements: int | None = None,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.smooth = smooth
        self.max_block_elements = max_block_elements

    _parameter_constraints = {"smooth": [POSITIVE], "max_block_elements": BLOCK_BUDGET}

    def forward(self, image_tokens, text_tokens) -> torch.Tensor:
        images = as_tokens(self, image_tokens, "image tokens")
        texts = as_tokens(self, text_tokens, "text tokens")
        with named_errors(self):
            return scan_t2i_scores(
                images.feats,
                texts.feats,
                images.mask,
                texts.mask,
                smooth=self.smooth,
                max_block_elements=self.max_block_elements,
            )

    def extra_repr(self) -> str:
        return f"smooth={self.smooth}, " + super().extra_repr()
