"""HardAssignmentCoding: CHAN's scorer, each word keeps only its best-matching region."""

from __future__ import annotations

import torch

from imtm._block_inputs import as_tokens, named_errors
from imtm.component import Component
from imtm.contract import BLOCK_BUDGET, COMPUTE_DTYPE, POSITIVE, Example, Options
from imtm.functional.hard_assignment import (
    CODEBOOKS,
    hard_assignment_from_cosines,
    hard_assignment_scores,
)
from imtm.functional.pooling import POOLINGS
from imtm.tokens import Tokens  # noqa: F401 - the docstring example uses it

__all__ = ["HardAssignmentCoding"]


class HardAssignmentCoding(Component):
    r"""Scores every image-caption pair by CHAN's hard assignment coding.

    With the visual codebook every word takes the cosine of its single best
    region, and a caption's word scores are pooled (log-sum-exp by default):

    .. math::

        s(t_i, V) = \max_j \cos(t_i, v_j) \quad \text{(Eq. 5-6)}, \qquad
        S(I, T) = \frac{1}{\lambda} \log \sum_i \exp\big(\lambda\, s(t_i, V)\big)
        \quad \text{(Eq. 8)}

    A thin module over :func:`imtm.functional.hard_assignment_scores`; it has
    no parameters. The computation is blocked and padding-free, so scoring a
    whole test set block by block gives the same numbers as a training step.

    Args:
        codebook: ``"visual"`` (words query regions) or ``"textual"`` (regions query words).
        pooling: ``"max"``, ``"mean"``, ``"sum"``, ``"softmax"`` or ``"lse"``.
        temperature: ``T = 1 / lambda`` of the softmax and log-sum-exp poolings.
        max_block_elements: memory budget of one block (token similarities); ``None``: the default.
        compute_dtype: dtype of the matrix products, e.g. ``torch.bfloat16``; ``None``: the inputs'.

    Shape:
        - image_tokens: Tokens ``(Bi, N, D)`` (or a ``(Bi, N, D)`` tensor, all tokens real)
        - text_tokens: Tokens ``(Bt, M, D)`` (or a ``(Bt, M, D)`` tensor)
        - output: ``(Bi, Bt)`` scores

    References:
        Pan, Wu and Zhang, "Fine-grained Image-text Matching by Cross-modal Hard
        Aligning Network", CVPR 2023, Eq. 3, 5-8.

    Example:
        >>> scorer = HardAssignmentCoding(pooling="lse", temperature=0.1)
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
        return Example.variants(
            {"pooling": "lse", "max_block_elements": 40},
            {"codebook": "textual", "pooling": "max"},
            {"pooling": "mean"},
            {"codebook": "textual", "pooling": "sum"},
            {"pooling": "softmax", "temperature": 0.01},
            padding=True,
        )

    def __init__(
        self,
        codebook: str = "visual",
        pooling: str = "lse",
        temperature: float = 0.1,
        max_block_elements: int | None = None,
        compute_dtype: torch.dtype | None = None,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.codebook = codebook
        self.pooling = pooling
        self.temperature = temperature
        self.max_block_elements = max_block_elements
        self.compute_dtype = compute_dtype

    _parameter_constraints = {
        "codebook": [Options(CODEBOOKS)],
        "pooling": [Options(POOLINGS)],
        "temperature": [POSITIVE],
        "max_block_elements": BLOCK_BUDGET,
        "compute_dtype": COMPUTE_DTYPE,
    }

    def reduce_cosines(self, sims: torch.Tensor, image_mask, text_mask) -> torch.Tensor:
        """Eq. 5-8 on given cosine matrices ``(..., N, M)`` (see :func:`~imtm.functional.hard_assignment.hard_assignment_from_cosines`)."""
        return hard_assignment_from_cosines(
            sims,
            image_mask,
            text_mask,
            codebook=self.codebook,
            pooling=self.pooling,
            temperature=self.temperature,
        )

    def forward(self, image_tokens, text_tokens) -> torch.Tensor:
        images = as_tokens(self, image_tokens, "image tokens")
        texts = as_tokens(self, text_tokens, "text tokens")
        with named_errors(self):
            return hard_assignment_scores(
                images.feats,
                texts.feats,
                images.mask,
                texts.mask,
                codebook=self.codebook,
                pooling=self.pooling,
                temperature=self.temperature,
                max_block_elements=self.max_block_elements,
                compute_dtype=self.compute_dtype,
            )

    def extra_repr(self) -> str:
        return (
            f"codebook={self.codebook!r}, pooling={self.pooling!r}, temperature={self.temperature}, "
            + super().extra_repr()
        )
