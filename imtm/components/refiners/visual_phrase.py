"""VisualPhraseEncoder: DCPA's visual phrases, a Transformer encoder layer over an image's regions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imtm._block_inputs import as_tokens
from imtm.component import Component
from imtm.contract import EXAMPLE_DIM, POSITIVE_INT, Example
from imtm.functional.blocking import EPS
from imtm.functional.phrase_attention import LAYER_NORM_EPS, AttentionWeights, self_attention
from imtm.tokens import Tokens

__all__ = ["VisualPhraseEncoder", "check_attention_args"]


def check_attention_args(block: Component, dim, heads) -> None:
    """The relation DCPA's attention blocks add to their declared constraints: ``heads`` divides ``dim``."""
    if dim % heads:
        raise ValueError(
            f"{type(block).__name__}: heads must be a positive int dividing dim={dim}, got {heads!r}"
        )


class VisualPhraseEncoder(Component):
    r"""Visual phrases: one post-norm Transformer encoder layer over the regions, L2-normalised.

    .. math::

        X = \operatorname{LN}_1\big(V + \operatorname{MHA}(V, V, V)\big), \qquad
        r^V = \operatorname{LN}_2\big(X + \operatorname{FFN}(X)\big), \qquad
        \operatorname{FFN}(x) = W_2 \max(0, W_1 x + b_1) + b_2
        \qquad \text{(Eq. 1-6)}

    and every ``r^V_k`` is L2-normalised. Each region gathers the context of
    the other regions of its image, so a region becomes a "visual phrase".
    Padded regions are never attended to (their features, NaN included, never
    reach a real output) and come out as zero vectors.

    Args:
        dim: region feature size ``D``.
        heads: attention heads (must divide ``dim``).
        ffn_dim: hidden size of the feed-forward sub-layer; ``None``: ``4 * dim``
            (the Transformer's ratio; the paper does not give it).

    Shape:
        - image_tokens: Tokens ``(Bi, N, D)`` (or a ``(Bi, N, D)`` tensor, all tokens real)
        - output: Tokens ``(Bi, N, D)`` with the same mask, unit-norm real tokens

    References:
        Shi et al., "Decoupled Cross-modal Phrase-Attention Network for
        Image-Sentence Matching", IEEE TIP 2022, Eq. 1-6.
        Vaswani et al., "Attention Is All You Need", NeurIPS 2017.

    Example:
        >>> enc = VisualPhraseEncoder(dim=16, heads=4)
        >>> out = enc(Tokens.from_lengths(torch.randn(2, 5, 16), [5, 3]))
        >>> out.feats.shape, out.mask.sum(1).tolist()
        (torch.Size([2, 5, 16]), [5, 3])
    """

    requires = ("image_tokens",)
    provides = ("visual_phrases",)
    #: Measured slower compiled than eager on the CPU (a self-attention layer, as ELA's transformer
    #: layers: 1.36 against 1.17 ms a step in DCPA's benchmark step); it compiles elsewhere.
    compiles_on_cpu = False

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (Example({"dim": EXAMPLE_DIM, "heads": 2}, padding=True),)

    def __init__(
        self, dim: int, heads: int = 8, ffn_dim: int | None = None, *, requires=None, provides=None
    ):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim
        self.heads = heads
        self.ffn_dim = ffn_dim
        # The layers are built from these arguments below, so they are checked first.
        self.validate()
        # The paper does not give the feed-forward width: the Transformer's 4 * dim (a settled ambiguity).
        hidden = 4 * dim if ffn_dim is None else ffn_dim
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    _parameter_constraints = {
        "dim": [POSITIVE_INT],
        "heads": [POSITIVE_INT],
        "ffn_dim": [POSITIVE_INT, None],
    }

    def validate(self) -> VisualPhraseEncoder:
        """Check the declared constraints, ``dim`` and ``heads`` (dividing ``dim``); return ``self``."""
        check_attention_args(self, self.dim, self.heads)
        return self

    def forward(self, image_tokens) -> Tokens:
        name = type(self).__name__
        tokens = as_tokens(self, image_tokens, "image tokens").check(name, dim=self.dim)
        mask = tokens.mask
        x = self_attention(
            tokens.feats, mask, AttentionWeights.from_modules(self.attn, self.norm1), self.heads
        )
        x = self.norm2(x + self.ffn(x))
        x = F.normalize(x, dim=-1, eps=EPS)
        return tokens.with_feats(
            torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, ffn_dim={self.ffn_dim}, " + super().extra_repr()
        )
