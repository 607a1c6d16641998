"""SelfAttentionContext: the one residual self-attention layer CHAN puts on region features."""

from __future__ import annotations

from numbers import Integral, Real

import torch
from torch import nn

from imtm.component import Component
from imtm.contract import EXAMPLE_DIM, Example, Interval
from imtm.tokens import Tokens

__all__ = ["SelfAttentionContext"]


class SelfAttentionContext(Component):
    r"""One pre-norm residual multi-head self-attention layer over an image's tokens.

    .. math::

        v'_j = v_j + \operatorname{MHA}\big(\operatorname{LN}(V)\big)_j

    Every region gathers context from the other real regions of its image;
    padded regions are excluded as keys (``key_padding_mask``), so padding
    never changes a real token's output, and padded outputs are set to zero.
    There is no feed-forward sub-layer. This is the form of the ``SelfAttention``
    module in ``lib/modules.py`` of CHAN's released code (ppanzx/CHAN: a LayerNorm,
    ``nn.MultiheadAttention`` with a key padding mask, a residual sum), which
    ``EncoderImagePrecomp`` in ``lib/encoders.py`` applies to the projected region
    features when ``precomp_enc_type="selfattention"``, before L2 normalisation.

    Args:
        dim: token feature size ``D``.
        heads: attention heads (must divide ``dim``); CHAN uses 8.
        dropout: dropout on the attention weights (training only).

    Shape:
        - image_tokens: Tokens ``(Bi, N, D)`` (or a ``(Bi, N, D)`` tensor, all tokens real)
        - output: Tokens ``(Bi, N, D)`` with the same mask

    References:
        Pan, Wu and Zhang, "Fine-grained Image-text Matching by Cross-modal Hard
        Aligning Network", CVPR 2023 (image encoder; the layer is not given an
        equation number in the paper; its form is that of ``SelfAttention`` in
        ``lib/modules.py`` of the authors' repository).
        Vaswani et al., "Attention Is All You Need", NeurIPS 2017, Eq. 1.

    Example:
        >>> layer = SelfAttentionContext(dim=16, heads=4)
        >>> out = layer(Tokens.from_lengths(torch.randn(2, 5, 16), [5, 3]))
        >>> out.feats.shape, out.mask.sum(1).tolist()
        (torch.Size([2, 5, 16]), [5, 3])
    """

    requires = ("image_tokens",)
    provides = ("image_tokens",)

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (Example({"dim": EXAMPLE_DIM, "heads": 2}, padding=True),)

    def __init__(
        self, dim: int, heads: int = 8, dropout: float = 0.0, *, requires=None, provides=None
    ):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim
        self.heads = heads
        self.dropout = dropout
        # The parameters are built here (a module must own them before fit), so the arguments are
        # checked first; nn.MultiheadAttention would otherwise stop on a bare assert.
        self.validate()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=float(dropout), batch_first=True)

    _parameter_constraints = {
        "dim": [Interval(Integral, 1, None, closed="left")],
        "heads": [Interval(Integral, 1, None, closed="left")],
        "dropout": [Interval(Real, 0, 1, closed="left")],
    }

    def validate(self) -> SelfAttentionContext:
        """Check the declared constraints and that ``heads`` divides ``dim``; return ``self``."""
        if self.dim % self.heads:
            raise ValueError(
                f"{type(self).__name__}: heads must be a positive int dividing dim={self.dim}, "
                f"got {self.heads!r}"
            )
        return self

    def forward(self, image_tokens) -> Tokens:
        name = type(self).__name__
        if isinstance(image_tokens, torch.Tensor):
            if image_tokens.dim() != 3:
                raise ValueError(
                    f"{name}: expected image tokens of shape (B, N, {self.dim}), got {tuple(image_tokens.shape)}"
                )
            image_tokens = Tokens(image_tokens)
        elif not isinstance(image_tokens, Tokens):
            raise TypeError(
                f"{name}: expected image tokens as Tokens or a (B, N, D) tensor, got {type(image_tokens).__name__}"
            )
        tokens = image_tokens.check(name, dim=self.dim)
        mask = tokens.mask.unsqueeze(-1)
        zero = torch.zeros((), dtype=tokens.feats.dtype, device=tokens.feats.device)
        # where() rather than a product: padding may hold NaN, which LayerNorm and the value
        # projection would otherwise carry into the (zero-weighted, but 0 * NaN) attention sum.
        x = torch.where(mask, tokens.feats, zero)
        h = self.norm(x)
        context, _ = self.attn(h, h, h, key_padding_mask=~tokens.mask, need_weights=False)
        return tokens.with_feats(torch.where(mask, x + context, zero))
