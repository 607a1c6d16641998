"""GlobalCosine: the VSE++ baseline scorer, cosine of mean-pooled image tokens and words."""

from __future__ import annotations

from typing import ClassVar

import torch

from imtm.component import Component
from imtm.contract import Example
from imtm.functional.similarity import global_cosine_scores
from imtm.tokens import Tokens, autocast_common_dtype

__all__ = ["GlobalCosine"]


class GlobalCosine(Component):
    r"""Scores every image-caption pair by the cosine of their mean-pooled tokens.

    .. math::

        s(i, t) = \cos\Big(\tfrac{1}{|N_i|}\sum_{n \in N_i} v_{in},\;
                           \tfrac{1}{|M_t|}\sum_{m \in M_t} w_{tm}\Big)

    VSE++'s similarity (Eq. 4) over average-pooled tokens. Row ``i`` depends on
    image ``i`` only and column ``t`` on caption ``t`` only, so the ``(Bi, Bt)``
    matrix is one matrix product of normalised means and any blocking of the
    images and captions gives the same numbers. Prefix tokens ([CLS]) are
    averaged like the others.

    Shape:
        - image_tokens: Tokens ``(Bi, N, D)`` (or a ``(Bi, N, D)`` tensor, all tokens real)
        - text_tokens: Tokens ``(Bt, M, D)`` (or a ``(Bt, M, D)`` tensor)
        - output: ``(Bi, Bt)`` scores in ``[-1, 1]``

    References:
        Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives", BMVC 2018, Eq. 4.

    Example:
        >>> scorer = GlobalCosine()
        >>> scorer(Tokens(torch.randn(2, 5, 8)), Tokens(torch.randn(3, 4, 8))).shape
        torch.Size([2, 3])
    """

    requires = ("image_tokens", "text_tokens")
    provides = ("scores",)
    _parameter_constraints: ClassVar[dict[str, list]] = {}  # no constructor argument

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (Example({}, padding=True),)

    def __init__(self, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)

    def _tokens(self, x, what: str) -> Tokens:
        name = type(self).__name__
        if isinstance(x, torch.Tensor):
            if x.dim() != 3:
                raise ValueError(
                    f"{name}: expected {what} of shape (B, N, D), got {tuple(x.shape)}"
                )
            x = Tokens(x)
        elif not isinstance(x, Tokens):
            raise TypeError(
                f"{name}: expected {what} as Tokens or a (B, N, D) tensor, got {type(x).__name__}"
            )
        return x.check(f"{name} ({what})")

    def forward(self, image_tokens, text_tokens) -> torch.Tensor:
        images = self._tokens(image_tokens, "image tokens")
        texts = self._tokens(text_tokens, "text tokens")
        if images.dim != texts.dim:
            raise ValueError(
                f"{type(self).__name__}: image tokens have dimension {images.dim} but text tokens have "
                f"{texts.dim}; project both into one space (out_dim) first"
            )
        common = autocast_common_dtype(images.feats, texts.feats)
        if (
            common is not None
        ):  # under autocast: a GRU's float32 words, a linear layer's bf16 regions
            images, texts = images.to(common), texts.to(common)
        if images.dtype != texts.dtype:
            raise TypeError(
                f"{type(self).__name__}: image tokens are {images.dtype} but text tokens are {texts.dtype}"
                " (outside autocast, cast one to the other's dtype)"
            )
        return global_cosine_scores(images.feats, texts.feats, images.mask, texts.mask)
