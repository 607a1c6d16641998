"""MeanEmbedding: one global vector per image or caption, the masked mean of its tokens."""

from __future__ import annotations

import torch

from imtm._block_inputs import as_tokens
from imtm.component import Component
from imtm.contract import Example, Options

__all__ = ["SIDES", "MeanEmbedding"]

#: The values each side reads and provides by default.
SIDES = {
    "image": (("image_tokens",), ("image_embedding",)),
    "text": (("text_tokens",), ("text_embedding",)),
}


def _side_defaults(side):
    if not isinstance(side, str) or side not in SIDES:
        return None
    return {"requires": SIDES[side][0], "provides": SIDES[side][1]}


class MeanEmbedding(Component):
    r"""Global embedding of one modality: the mean of its real tokens.

    .. math::

        e_b = \frac{1}{|\{n : m_{bn}\}|} \sum_{n : m_{bn}} x_{bn}

    A single-modality block: in a Matcher it runs on images (``side="image"``:
    ``image_tokens`` -> ``image_embedding``) or captions (``side="text"``:
    ``text_tokens`` -> ``text_embedding``); renaming ``requires`` / ``provides``
    overrides the side's defaults. It has no parameters. Pipelines whose scorer
    works on tokens (CHAN) use it to give global losses, such as DIAS's, their
    inputs; since only losses read its output, evaluation never runs it. The
    mean is not normalised: each loss normalises as its equation says.

    Args:
        side: ``"image"`` or ``"text"``: which defaults ``requires`` / ``provides`` take.
        skip_prefix: leave prefix tokens ([CLS], ``num_prefix_tokens``) out of the mean.

    Shape:
        - tokens: Tokens ``(B, N, D)`` (or a ``(B, N, D)`` tensor, all tokens real)
        - output: ``(B, D)``

    References:
        Faghri et al., "VSE++", BMVC 2018 (average-pooled global vectors); used for the
        global embeddings of DIAS (Ma et al., ACM MM 2024, Eq. 3).

    Example:
        >>> from imtm import Tokens
        >>> MeanEmbedding(side="text")(Tokens.from_lengths(torch.ones(2, 4, 3), [4, 1])).shape
        torch.Size([2, 3])
    """

    requires = SIDES["image"][0]
    provides = SIDES["image"][1]

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (
            Example({"side": "text"}, padding=True),
            Example({"skip_prefix": True}, padding=True),
        )

    def __init__(
        self, side: str = "image", skip_prefix: bool = False, *, requires=None, provides=None
    ):
        if isinstance(side, str) and side in SIDES:
            requires = SIDES[side][0] if requires is None else requires
            provides = SIDES[side][1] if provides is None else provides
        super().__init__(requires=requires, provides=provides)
        self.side = side
        self.skip_prefix = skip_prefix

    def default_names(self) -> dict[str, tuple[str, ...]]:
        """The names of ``side`` (the class defaults for an unknown side, which validate() refuses)."""
        return _side_defaults(self.side) or super().default_names()

    def set_params(self, **params) -> MeanEmbedding:
        """As :meth:`Component.set_params`; a new ``side`` moves unrenamed ``requires`` / ``provides`` along."""
        old = self.side
        super().set_params(**params)
        self._follow_option(old, "side", _side_defaults, params)
        return self

    _parameter_constraints = {"side": [Options(SIDES)], "skip_prefix": ["boolean"]}

    def forward(self, tokens) -> torch.Tensor:
        tokens = as_tokens(self, tokens, f"{self.side} tokens").check(type(self).__name__)
        return tokens.masked_mean(skip_prefix=self.skip_prefix)

    def extra_repr(self) -> str:
        return f"side={self.side!r}, " + super().extra_repr()
