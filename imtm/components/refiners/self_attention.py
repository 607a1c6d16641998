"""SelfAttentionContext: the one residual self-attention layer CHAN puts on region features."""

from __future__ import annotations

import torch
from torch import nn

from imtm.component import Component
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

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.0, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim
        self.heads = heads
        self.dropout = dropout
        # The parameters are built here (a module must own them before fit), so the arguments are
        # checked first; nn.MultiheadAttention would otherwise stop on a bare assert.
        self.validate()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=float(dropout), batch_first=True)

    def validate(self) -> SelfAttentionContext:
        """Check ``dim``, ``heads`` (dividing ``dim``) and ``dropout``; return ``self``."""
        name, dim, heads, dropout = type(self).__name__, self.dim, self.heads, self.dropout
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{name}: dim must be a positive int, got {dim!r}")
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or dim % heads:
            raise ValueError(f"{name}: heads must be a positive int dividing dim={dim}, got {heads!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must lie in [0, 1), got {dropout!r}")
        return self

    def forward(self, image_tokens) -> Tokens:
        name = type(self).__name__
        if isinstance(image_tokens, torch.Tensor):
            if image_tokens.dim() != 3:
                raise ValueError(f"{name}: expected image tokens of shape (B, N, {self.dim}), got {tuple(image_tokens.shape)}")
            image_tokens = Tokens(image_tokens)
        elif not isinstance(image_tokens, Tokens):
            raise TypeError(f"{name}: expected image tokens as Tokens or a (B, N, D) tensor, got {type(image_tokens).__name__}")
        tokens = image_tokens.check(name, dim=self.dim)
        mask = tokens.mask.unsqueeze(-1)
        zero = torch.zeros((), dtype=tokens.feats.dtype, device=tokens.feats.device)
        # where() rather than a product: padding may hold NaN, which LayerNorm and the value
        # projection would otherwise carry into the (zero-weighted, but 0 * NaN) attention sum.
        x = torch.where(mask, tokens.feats, zero)
        h = self.norm(x)
        context, _ = self.attn(h, h, h, key_padding_mask=~tokens.mask, need_weights=False)
        return tokens.with_feats(torch.where(mask, x + context, zero))
