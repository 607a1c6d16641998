"""SparsePatchWordAlignment: LAPS's bidirectional max-mean patch-word alignment."""

from __future__ import annotations

import torch

from imtm._block_inputs import as_tokens, named_errors
from imtm.component import Component
from imtm.contract import BLOCK_BUDGET, COMPUTE_DTYPE, Example, Options
from imtm.functional.sparse_alignment import (
    DIRECTIONS,
    sparse_alignment_from_cosines,
    sparse_alignment_scores,
)

__all__ = ["SparsePatchWordAlignment"]


class SparsePatchWordAlignment(Component):
    r"""Scores every image-caption pair by sparse patch-word alignment (LAPS, Eq. 8).

    .. math::

        S(I, T) = \frac{1}{N} \sum_{i=1}^{N} \max_j A_{ij}
                + \frac{1}{M} \sum_{j=1}^{M} \max_i A_{ij} \qquad \text{(Eq. 8)}

    with :math:`A` the cosines of image tokens and words, over valid tokens. A thin
    module over :func:`imtm.functional.sparse_alignment_scores`; no parameters. On
    its own it aligns all the image's tokens (LAPS "without selection"); inside
    :class:`~imtm.components.PatchSlimming` it aligns the slimmed set of each pair
    through :meth:`reduce_cosines`.

    Args:
        direction: ``"both"`` (Eq. 8), ``"patch_to_word"`` or ``"word_to_patch"``
            (one half, the ablations of the paper's Table 4).
        max_block_elements: memory budget of one block (token cosines); ``None``: the default.
        compute_dtype: dtype of the matrix products, e.g. ``torch.bfloat16``; ``None``: the inputs'.

    Shape:
        - image_tokens: Tokens ``(Bi, N, D)`` (or a ``(Bi, N, D)`` tensor, all tokens real)
        - text_tokens: Tokens ``(Bt, M, D)`` (or a ``(Bt, M, D)`` tensor)
        - output: ``(Bi, Bt)`` scores in ``[-2, 2]``

    References:
        Fu et al., "Linguistic-Aware Patch Slimming Framework for Fine-grained
        Cross-Modal Alignment", CVPR 2024, Eq. 8.

    Example:
        >>> from imtm import Tokens
        >>> align = SparsePatchWordAlignment()
        >>> align(Tokens(torch.randn(2, 10, 16)), Tokens.from_lengths(torch.randn(3, 6, 16), [6, 2, 4])).shape
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
        return Example.variants(
            {"max_block_elements": 30},
            {"direction": "patch_to_word"},
            {"direction": "word_to_patch"},
            padding=True,
        )

    def __init__(
        self,
        direction: str = "both",
        max_block_elements: int | None = None,
        compute_dtype: torch.dtype | None = None,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.direction = direction
        self.max_block_elements = max_block_elements
        self.compute_dtype = compute_dtype

    _parameter_constraints = {
        "direction": [Options(DIRECTIONS)],
        "max_block_elements": BLOCK_BUDGET,
        "compute_dtype": COMPUTE_DTYPE,
    }

    def reduce_cosines(self, sims: torch.Tensor, image_mask, text_mask) -> torch.Tensor:
        """Eq. 8 on given cosine matrices ``(..., N, M)`` (see :func:`~imtm.functional.sparse_alignment_from_cosines`)."""
        return sparse_alignment_from_cosines(sims, image_mask, text_mask, direction=self.direction)

    def forward(self, image_tokens, text_tokens) -> torch.Tensor:
        images = as_tokens(self, image_tokens, "image tokens")
        texts = as_tokens(self, text_tokens, "text tokens")
        with named_errors(self):
            return sparse_alignment_scores(
                images.feats,
                texts.feats,
                images.mask,
                texts.mask,
                direction=self.direction,
                max_block_elements=self.max_block_elements,
                compute_dtype=self.compute_dtype,
            )

    def extra_repr(self) -> str:
        return f"direction={self.direction!r}, " + super().extra_repr()
