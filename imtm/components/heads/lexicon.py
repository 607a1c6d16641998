"""ELA's lexicon heads: patch-to-lexicon and word-to-lexicon, tied to the text encoder's word embeddings.

The tie: both heads multiply by the text encoder's word-embedding matrix
:math:`W_{we}` ``(V, D_{we})``, the very parameter the encoder reads its input
ids from, not a copy. A head takes ``embedding`` as

- a block *name* (``embedding="text"``, the default): inside a :class:`~imtm.Matcher`
  the head finds that block's ``word_embeddings`` module when the pipeline is
  built (:meth:`~imtm.Component.link`); ``"text.embed"`` names another attribute
  path of the block (e.g. the ``embed`` of a :class:`~imtm.components.GRUTextEncoder`). A name survives ``sklearn.base.clone``,
  ``get_config`` / ``from_config`` and ``save`` / ``load``, where an object
  reference would be copied (and safetensors refuses shared storage). The head does
  not register the module, so the parameter has one owner (the encoder): one
  optimizer entry, one checkpoint entry, gradients from both heads and the encoder
  summed into it;
- an ``nn.Embedding`` (or any module with a ``weight`` of shape ``(V, D_we)``) for
  use outside a Matcher. It is not registered either: optimise it through its owner.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import nn

from imtm.component import Component
from imtm.components.heads._layers import transformer_layers
from imtm.contract import EXAMPLE_DIM, EXAMPLE_VOCAB_SIZE, Example, Interval, Satisfies
from imtm.tokens import Tokens

__all__ = ["LexiconLogits", "PatchToLexiconHead", "TiedEmbedding", "WordToLexiconHead"]


@dataclass(frozen=True)
class LexiconLogits:
    """Lexicon logits of selected tokens, packed: never ``(B, N, V)`` for every token.

    Attributes:
        logits: ``(K, V)`` logits of the ``K`` selected tokens.
        batch_index: ``(K,)`` long, the row (image) of each.
        token_index: ``(K,)`` long, its position in the image tokens.
    """

    logits: torch.Tensor
    batch_index: torch.Tensor
    token_index: torch.Tensor


class TiedEmbedding(Component, abstract=True):
    """Base of blocks that multiply by a text encoder's word-embedding matrix (see the module docstring).

    Subclasses take ``embedding`` (a block name or a module), ``vocab_size`` and
    ``embed_dim`` and call :meth:`embedding_weight` in ``forward``.
    """

    #: Constructor arguments stored without nn.Module registration (a module here is borrowed).
    _borrowed = ("embedding", "_tied")

    def __setattr__(self, name, value):
        if name in self._borrowed:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _set_embedding(self, embedding) -> None:
        self._tied = None if isinstance(embedding, str) else embedding

    def link(self, blocks) -> None:
        if not isinstance(self.embedding, str):
            return
        # "text" ties to block text's word_embeddings; "text.embed" to another attribute path of it.
        block_name, _, path = self.embedding.partition(".")
        if block_name not in blocks:
            raise KeyError(
                f"{type(self).__name__}: embedding={self.embedding!r} names no block of this pipeline "
                f"(blocks: {sorted(blocks)}); name the text encoder block"
            )
        owner = blocks[block_name]
        module = owner
        for attr in (path or "word_embeddings").split("."):
            module = getattr(module, attr, None)
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise TypeError(
                f"{type(self).__name__}: block {block_name!r} ({type(owner).__name__}) has no "
                f"{path or 'word_embeddings'} module to tie to; use a text encoder such as HFTextEncoder, or "
                "name the embedding's attribute path, e.g. embedding='text.embed'"
            )
        self._check_shape(module.weight)
        self._tied = module

    def _check_shape(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != (self.vocab_size, self.embed_dim):
            raise ValueError(
                f"{type(self).__name__}: vocabulary mismatch: the head expects a word-embedding matrix of "
                f"shape (vocab_size, embed_dim) = ({self.vocab_size}, {self.embed_dim}), the encoder's is "
                f"{tuple(weight.shape)}; pass vocab_size=encoder.vocab_size and the embedding width"
            )

    def embedding_weight(self) -> torch.Tensor:
        """``(V, D_we)``, the tied word-embedding matrix itself."""
        module = self._tied
        if module is None:
            raise RuntimeError(
                f"{type(self).__name__}: embedding={self.embedding!r} is not linked yet; use the head inside "
                "a Matcher (which links blocks by name), call head.link({name: encoder}), or pass the "
                "embedding module itself"
            )
        weight = module.weight
        self._check_shape(weight)
        return weight

    _parameter_constraints = {
        "dim": [Interval(Integral, 1, None, closed="left")],
        "embed_dim": [Interval(Integral, 1, None, closed="left")],
        "vocab_size": [Interval(Integral, 1, None, closed="left")],
        "embedding": [
            Satisfies(lambda e: isinstance(e, (str, nn.Module)), "a block name or an nn.Embedding")
        ],
    }

    def validate(self):
        """Check the declared constraints and the embedding module's shape; return ``self``."""
        if isinstance(self.embedding, nn.Module):
            self._check_shape(self.embedding.weight)
        return self


class PatchToLexiconHead(TiedEmbedding):
    r"""Patch-to-lexicon head: every (masked) patch gets a distribution over the text vocabulary.

    .. math::

        P^{p2l}_i = \mathrm{softmax}\big(W_{we}\,(W v_i + b)\big) \qquad \text{(ELA, Eq. 2)}

    with :math:`W_{we}` the text encoder's word-embedding matrix, tied (see
    :mod:`imtm.components.heads.lexicon`). Only the patches that need it are
    computed: by default the ones masked at the image encoder's input
    (``masked_patches``), packed into :class:`LexiconLogits` ``(K, V)``; the
    ``(B, N, V)`` tensor of all patches is never built. Renaming
    ``requires=("image_tokens",)`` selects every real non-prefix patch.

    Args:
        dim: ``D`` of the patch tokens.
        embed_dim: ``D_we``, the width of the word-embedding matrix.
        vocab_size: ``V``, its rows (checked against the linked matrix).
        embedding: the text encoder block's name (in a Matcher) or an ``nn.Embedding``.

    Shape:
        - image_tokens: Tokens ``(Bi, N, D)``
        - masked_patches: ``(Bi, N)`` bool (optional)
        - output: :class:`LexiconLogits` with ``logits (K, V)``

    References:
        Yang et al., "Pre-training Cross-Modal Retrieval by Expansive Lexicon-Patch
        Alignment", LREC-COLING 2024, Eq. 2.

    Example:
        >>> emb = nn.Embedding(50, 8)
        >>> head = PatchToLexiconHead(dim=16, embed_dim=8, vocab_size=50, embedding=emb)
        >>> masked = torch.tensor([[False, True, True], [True, False, False]])
        >>> head(Tokens(torch.randn(2, 3, 16)), masked).logits.shape
        torch.Size([3, 50])
    """

    requires = ("image_tokens", "masked_patches")
    provides = ("patch_lexicon",)

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        v = EXAMPLE_VOCAB_SIZE
        return (
            Example(
                {
                    "dim": EXAMPLE_DIM,
                    "embed_dim": 4,
                    "vocab_size": v,
                    "embedding": nn.Embedding(v, 4),
                },
                nan_unused="computes the masked patches only, never the others",
            ),
        )

    def __init__(
        self,
        dim: int,
        embed_dim: int,
        vocab_size: int,
        embedding="text",
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim
        self.embed_dim = embed_dim
        self.vocab_size = vocab_size
        self.embedding = embedding
        # The projection is built from these arguments below, so they are checked first.
        self.validate()
        self._set_embedding(embedding)
        self.proj = nn.Linear(dim, embed_dim)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """``(..., D) -> (..., V)`` lexicon logits of the given patch states (Eq. 2 before the softmax)."""
        return self.proj(feats) @ self.embedding_weight().t().to(feats.dtype)

    def forward(self, image_tokens, masked_patches=None) -> LexiconLogits:
        name = type(self).__name__
        if not isinstance(image_tokens, Tokens):
            raise TypeError(
                f"{name}: expected image tokens as Tokens, got {type(image_tokens).__name__}"
            )
        if image_tokens.feats.dim() != 3 or image_tokens.dim != self.dim:
            raise ValueError(
                f"{name}: expected image tokens of shape (B, N, {self.dim}), "
                f"got {tuple(image_tokens.feats.shape)}"
            )
        select = image_tokens.mask.clone()
        select[:, : image_tokens.num_prefix_tokens] = False  # prefix tokens ([CLS]) are not patches
        if masked_patches is not None:
            if (
                not isinstance(masked_patches, torch.Tensor)
                or masked_patches.dtype != torch.bool
                or masked_patches.shape != select.shape
            ):
                raise ValueError(
                    f"{name}: masked_patches must be a bool tensor of shape {tuple(select.shape)}, "
                    f"got {getattr(masked_patches, 'dtype', type(masked_patches).__name__)} "
                    f"{tuple(getattr(masked_patches, 'shape', ()))}"
                )
            select = select & masked_patches
        batch_index, token_index = select.nonzero(as_tuple=True)
        return LexiconLogits(
            self.logits(image_tokens.feats[batch_index, token_index]), batch_index, token_index
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, embed_dim={self.embed_dim}, vocab_size={self.vocab_size}, "
            f"embedding={self.embedding if isinstance(self.embedding, str) else 'module'!r}, "
            + super().extra_repr()
        )


class WordToLexiconHead(TiedEmbedding):
    r"""Word-to-lexicon head: a few transformer layers on the text tokens, then the tied embeddings.

    .. math::

        P^{w2l} = \mathrm{softmax}\big(W_{we}\, W\, \mathrm{TransformerLayers}(U)\big)
        \qquad \text{(ELA, Eq. 4)}

    ``layers`` randomly initialised post-norm transformer layers (the paper's small
    stack) run over the real tokens; a linear map :math:`W` takes them to the
    embedding width (the paper leaves it implicit: needed when ``D != D_we``).
    With ``layers=0`` it is a tied masked-LM head (used on the cross-modal encoder's
    output for Eq. 8-9). Returns logits; padded positions are zero.

    Args:
        dim: ``D`` of the text tokens. embed_dim, vocab_size, embedding: as :class:`PatchToLexiconHead`.
        layers: transformer layers (0: none). heads: attention heads. dropout: their dropout.

    Shape:
        - text_tokens: Tokens ``(Bt, M, D)``
        - output: ``(Bt, M, V)`` logits

    References:
        Yang et al., "Pre-training Cross-Modal Retrieval by Expansive Lexicon-Patch
        Alignment", LREC-COLING 2024, Eq. 4 and 9.

    Example:
        >>> emb = nn.Embedding(50, 8)
        >>> head = WordToLexiconHead(dim=16, embed_dim=8, vocab_size=50, embedding=emb, layers=1, heads=2)
        >>> head(Tokens.from_lengths(torch.randn(2, 5, 16), [5, 3])).shape
        torch.Size([2, 5, 50])
    """

    requires = ("text_tokens",)
    provides = ("word_lexicon",)
    #: Its transformer layers are never compiled on the CPU (``transformer_layers``), nor the block.
    compiles_on_cpu = False

    _parameter_constraints = {
        "layers": [Interval(Integral, 0, None, closed="left")],
        "heads": [Interval(Integral, 1, None, closed="left")],
        "dropout": [Interval(Real, 0, 1, closed="left")],
    }

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        v = EXAMPLE_VOCAB_SIZE
        sizes = {"dim": EXAMPLE_DIM, "embed_dim": 4, "vocab_size": v}
        return (
            Example({**sizes, "embedding": nn.Embedding(v, 4), "layers": 1, "heads": 2}),
            Example({**sizes, "embedding": nn.Embedding(v, 4), "layers": 0}),
        )

    def validate(self) -> WordToLexiconHead:
        """Check the declared constraints, the embedding, and that ``heads`` divides ``dim``."""
        super().validate()
        if self.layers and self.dim % self.heads:
            raise ValueError(
                f"{type(self).__name__}: dim={self.dim} is not divisible by heads={self.heads}"
            )
        return self

    def __init__(
        self,
        dim: int,
        embed_dim: int,
        vocab_size: int,
        embedding="text",
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim
        self.embed_dim = embed_dim
        self.vocab_size = vocab_size
        self.embedding = embedding
        self.layers = layers
        self.heads = heads
        self.dropout = dropout
        # The layers are built from these arguments below, so they are checked first.
        self.validate()
        self._set_embedding(embedding)
        self.encoder = (
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True),
                layers,
                enable_nested_tensor=False,
            )
            if layers
            else None
        )
        self.proj = nn.Linear(dim, embed_dim)

    def forward(self, text_tokens) -> torch.Tensor:
        name = type(self).__name__
        if not isinstance(text_tokens, Tokens):
            raise TypeError(
                f"{name}: expected text tokens as Tokens, got {type(text_tokens).__name__}"
            )
        if text_tokens.feats.dim() != 3 or text_tokens.dim != self.dim:
            raise ValueError(
                f"{name}: expected text tokens of shape (B, M, {self.dim}), "
                f"got {tuple(text_tokens.feats.shape)}"
            )
        mask = text_tokens.mask
        # Padding may hold anything: zero it before attention (masked keys still enter a matmul).
        x = torch.where(
            mask.unsqueeze(-1), text_tokens.feats, torch.zeros((), dtype=text_tokens.feats.dtype)
        )
        if self.encoder is not None:
            x = transformer_layers(self.encoder, x, ~mask)
        logits = self.proj(x) @ self.embedding_weight().t().to(x.dtype)
        return torch.where(
            mask.unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype, device=logits.device)
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, embed_dim={self.embed_dim}, vocab_size={self.vocab_size}, layers={self.layers}, "
            + super().extra_repr()
        )
