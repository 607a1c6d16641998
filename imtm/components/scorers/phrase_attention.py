"""InterModalPhraseAttention: one of DCPA's decoupled inter-modal branches (image-to-text or text-to-image)."""

from __future__ import annotations

from numbers import Integral

from torch import nn

from imtm._block_inputs import as_tokens, named_errors
from imtm.component import Component
from imtm.components.refiners.visual_phrase import check_attention_args
from imtm.contract import BLOCK_BUDGET, EXAMPLE_DIM, POSITIVE_INT, Example, Interval, Options
from imtm.functional.blocking import resolve_option
from imtm.functional.phrase_attention import (
    LAYER_NORM_EPS,
    AttentionWeights,
    FeedForwardWeights,
    phrase_attention_scores,
)
from imtm.functional.topk import AVERAGES, DEFAULT_TOPK

__all__ = ["DIRECTIONS", "InterModalPhraseAttention"]

#: Each branch's query side (True: the images query the captions) and the score it provides.
DIRECTIONS: dict[str, tuple[bool, str]] = {
    "i2t": (True, "scores_inter_i2t"),
    "t2i": (False, "scores_inter_t2i"),
}


class _DirectionProvides:
    """``provides`` of a branch: ``scores_inter_<direction>`` unless renamed.

    Read on the class it lists both names (so a pipeline error can say which
    block provides them); read on a block it follows ``direction``, also after
    ``set_params(direction=...)``. A renamed value is kept in the instance
    ``__dict__``, where the serialiser looks for renamed values.
    """

    def __get__(self, obj, owner=None):
        if obj is None:
            return tuple(value for _, value in DIRECTIONS.values())
        if "provides" in obj.__dict__:
            return obj.__dict__["provides"]
        return (
            (DIRECTIONS[obj.direction][1],)
            if obj.direction in DIRECTIONS
            else (f"scores_inter_{obj.direction}",)
        )

    def __set__(self, obj, value):
        obj.__dict__["provides"] = value


class InterModalPhraseAttention(Component):
    r"""One DCPA inter-modal branch: a Transformer decoder layer per image-caption pair, scored by top-K.

    ``direction="i2t"``: the regions of an image attend to each other, then
    query the caption's words; each output ``vp^T_k`` takes its best word and
    the top-K of those are averaged, giving :math:`S(i^T, c)` (provides
    ``scores_inter_i2t``). ``direction="t2i"``: the same with words querying
    regions, giving :math:`S(i, c^V)` (``scores_inter_t2i``).

    .. math::

        X = \operatorname{LN}_1\big(V + \operatorname{MHA}_1(V, V, V)\big), \quad
        Y = \operatorname{LN}_2\big(X + \operatorname{MHA}_2(X, W, W)\big), \quad
        VP^T = \operatorname{LN}_3\big(Y + \operatorname{FFN}(Y)\big), \quad
        S(i^T, c) = \operatorname{topK\text{-}mean}_k \max_m \cos(vp^T_k, w_m)
        \qquad \text{(Eq. 11-14)}

    A thin module over :func:`imtm.functional.phrase_attention_scores`, which
    batches the pairwise cross-attention over blocks of pairs (no loop over
    images or captions) with the block size from ``max_block_elements``. The layer
    is a standard post-norm Transformer decoder layer (the paper's decoder), the same
    numbers as ``nn.TransformerDecoderLayer(dim, heads, ffn_dim, dropout=0)`` per pair;
    ``feed_forward=False`` leaves its feed-forward sub-layer out. Padded tokens on
    either side are never attended to.

    Args:
        direction: ``"i2t"`` (regions query words) or ``"t2i"`` (words query regions).
        dim: token feature size ``D``.
        heads: attention heads (must divide ``dim``).
        k: query tokens averaged per pair; ``None``: the global average of Table IV
            ("w/o local-agg", see ``average``).
        max_block_elements: memory budget of one block; ``None``: the default.
        feed_forward: include the decoder layer's feed-forward sub-layer (default ``True``).
        ffn_dim: its hidden width; ``None``: ``4 * dim`` (the paper does not give it).
        average: what ``k=None`` averages: ``"features"`` (pool the outputs and the other
            modality's tokens, then one cosine; default) or ``"cosines"`` (the mean of the
            per-token best cosines).

    Shape:
        - image_tokens: Tokens ``(Bi, N, D)`` (or a ``(Bi, N, D)`` tensor, all tokens real)
        - text_tokens: Tokens ``(Bt, M, D)`` (or a ``(Bt, M, D)`` tensor)
        - output: ``(Bi, Bt)`` scores in ``[-1, 1]``

    References:
        Shi et al., "Decoupled Cross-modal Phrase-Attention Network for
        Image-Sentence Matching", IEEE TIP 2022, Eq. 11-14.

    Example:
        >>> import torch
        >>> from imtm import Tokens
        >>> branch = InterModalPhraseAttention("t2i", dim=16, heads=4, k=10)
        >>> branch.provides
        ('scores_inter_t2i',)
        >>> branch(Tokens(torch.randn(2, 36, 16)), Tokens.from_lengths(torch.randn(3, 9, 16), [9, 4, 6])).shape
        torch.Size([2, 3])
    """

    requires = ("image_tokens", "text_tokens")
    provides = _DirectionProvides()
    #: Its work is :func:`~imtm.functional.phrase_attention_scores`, which runs eagerly inside any
    #: compiled region (its blocked engine reuses buffers and plans on the host): compiled, the block
    #: only added graph breaks around it (5.07 against 4.80 ms a step, DCPA's benchmark step).
    compiles = False

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        sizes = {"dim": EXAMPLE_DIM, "heads": 2}
        return Example.variants(
            {**sizes, "direction": "t2i", "k": 2},
            {**sizes, "direction": "i2t", "k": None, "max_block_elements": 50},
            {**sizes, "direction": "i2t", "k": 3, "feed_forward": False},
            {**sizes, "direction": "t2i", "k": None, "average": "cosines", "ffn_dim": 5},
            padding=True,
        )

    def __init__(
        self,
        direction: str = "i2t",
        dim: int = 1024,
        heads: int = 8,
        k: int | None = DEFAULT_TOPK,
        max_block_elements: int | None = None,
        feed_forward: bool = True,
        ffn_dim: int | None = None,
        average: str = "features",
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.direction = direction
        self.dim = dim
        self.heads = heads
        self.k = k
        self.max_block_elements = max_block_elements
        self.feed_forward = feed_forward
        self.ffn_dim = ffn_dim
        self.average = average
        # The layers are built from dim, heads and the feed-forward options below, so they are checked first.
        self.validate()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        if feed_forward:
            hidden = 4 * dim if ffn_dim is None else ffn_dim
            self.linear1 = nn.Linear(dim, hidden)
            self.linear2 = nn.Linear(hidden, dim)
            self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def feed_forward_weights(self) -> FeedForwardWeights | None:
        """The feed-forward sub-layer's weights (``None`` with ``feed_forward=False``)."""
        if not self.feed_forward:
            return None
        return FeedForwardWeights.from_modules(self.linear1, self.linear2, self.norm3)

    _parameter_constraints = {
        "direction": [Options(DIRECTIONS)],
        "k": [Interval(Integral, 1, None, closed="left"), None],  # None: the mean of every token
        "average": [Options(AVERAGES)],
        "max_block_elements": BLOCK_BUDGET,
        "dim": [POSITIVE_INT],
        "heads": [POSITIVE_INT],
        "feed_forward": ["boolean"],
        "ffn_dim": [POSITIVE_INT, None],  # None: 4 * dim
    }

    def validate(self) -> InterModalPhraseAttention:
        """Check the declared constraints and that ``heads`` divides ``dim``; return ``self``."""
        check_attention_args(self, self.dim, self.heads)
        return self

    def forward(self, image_tokens, text_tokens):
        images_query, _ = resolve_option(
            self.direction, DIRECTIONS, name="direction", where=type(self).__name__
        )
        images = as_tokens(self, image_tokens, "image tokens")
        texts = as_tokens(self, text_tokens, "text tokens")
        queries, keys = (images, texts) if images_query else (texts, images)
        with named_errors(self):
            scores = phrase_attention_scores(
                queries.feats,
                keys.feats,
                queries.mask,
                keys.mask,
                self_attn=AttentionWeights.from_modules(self.self_attn, self.norm1),
                cross_attn=AttentionWeights.from_modules(self.cross_attn, self.norm2),
                heads=self.heads,
                k=self.k,
                max_block_elements=self.max_block_elements,
                feed_forward=self.feed_forward_weights(),
                average=self.average,
            )
        return scores if images_query else scores.t().contiguous()

    def extra_repr(self) -> str:
        return (
            f"direction={self.direction!r}, dim={self.dim}, heads={self.heads}, k={self.k}, "
            f"feed_forward={self.feed_forward}, " + super().extra_repr()
        )
