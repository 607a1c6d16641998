"""SoftAssignmentCoding: cross-attention scoring, the baseline CHAN's hard assignment replaces."""

from __future__ import annotations

import torch

from imtm._block_inputs import as_tokens, named_errors
from imtm.component import Component
from imtm.contract import BLOCK_BUDGET, COMPUTE_DTYPE, POSITIVE, Example, Options
from imtm.functional.hard_assignment import CODEBOOKS
from imtm.functional.pooling import POOLINGS
from imtm.functional.soft_assignment import soft_assignment_scores

__all__ = ["SoftAssignmentCoding"]


class SoftAssignmentCoding(Component):
    r"""Scores every image-caption pair by soft assignment (cross-attention) coding.

    With the visual codebook every word attends over the regions and scores
    the cosine with what it attended to; the word scores are then pooled:

    .. math::

        \hat t_i = \sum_j \operatorname{softmax}_j\big(\cos(t_i, v_j) / \tau\big)\, v_j
        \quad \text{(Eq. 2)}, \qquad
        s(t_i, V) = \cos(t_i, \hat t_i) \quad \text{(Eq. 4, 1)}

    A thin module over :func:`imtm.functional.soft_assignment_scores`; it has
    no parameters. Blocked like :class:`HardAssignmentCoding` and never builds
    the attended ``(Bi, Bt, M, D)`` vectors.

    Args:
        tau: temperature of the attention softmax.
        pooling: ``"max"``, ``"mean"``, ``"sum"``, ``"softmax"`` or ``"lse"``.
        temperature: ``T = 1 / lambda`` of the softmax and log-sum-exp poolings.
        codebook: ``"visual"`` (words attend over regions) or ``"textual"``.
        max_block_elements: memory budget of one block (token similarities); ``None``: the default.
        compute_dtype: dtype of the matrix products, e.g. ``torch.bfloat16``; ``None``: the inputs'.

    Shape:
        - image_tokens: Tokens ``(Bi, N, D)`` (or a ``(Bi, N, D)`` tensor, all tokens real)
        - text_tokens: Tokens ``(Bt, M, D)`` (or a ``(Bt, M, D)`` tensor)
        - output: ``(Bi, Bt)`` scores

    References:
        Pan, Wu and Zhang, "Fine-grained Image-text Matching by Cross-modal Hard
        Aligning Network", CVPR 2023, Eq. 1-4.

    Example:
        >>> from imtm import Tokens
        >>> scorer = SoftAssignmentCoding(tau=0.1)
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
            {"codebook": "textual", "pooling": "softmax"},
            {"tau": 0.01, "pooling": "lse", "max_block_elements": 40},
            {"pooling": "max"},
            padding=True,
        )

    def __init__(
        self,
        tau: float = 0.1,
        pooling: str = "lse",
        temperature: float = 0.1,
        codebook: str = "visual",
        max_block_elements: int | None = None,
        compute_dtype: torch.dtype | None = None,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.tau = tau
        self.pooling = pooling
        self.temperature = temperature
        self.codebook = codebook
        self.max_block_elements = max_block_elements
        self.compute_dtype = compute_dtype

    _parameter_constraints = {
        "tau": [POSITIVE],
        "codebook": [Options(CODEBOOKS)],
        "pooling": [Options(POOLINGS)],
        "temperature": [POSITIVE],
        "max_block_elements": BLOCK_BUDGET,
        "compute_dtype": COMPUTE_DTYPE,
    }

    def forward(self, image_tokens, text_tokens) -> torch.Tensor:
        images = as_tokens(self, image_tokens, "image tokens")
        texts = as_tokens(self, text_tokens, "text tokens")
        with named_errors(self):
            return soft_assignment_scores(
                images.feats,
                texts.feats,
                images.mask,
                texts.mask,
                tau=self.tau,
                pooling=self.pooling,
                temperature=self.temperature,
                codebook=self.codebook,
                max_block_elements=self.max_block_elements,
                compute_dtype=self.compute_dtype,
            )

    def extra_repr(self) -> str:
        return (
            f"tau={self.tau}, pooling={self.pooling!r}, temperature={self.temperature}, codebook={self.codebook!r}, "
            + super().extra_repr()
        )
