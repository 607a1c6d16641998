"""GRUTextEncoder: word embeddings and a (bi-directional) GRU over each caption (SCAN, CHAN)."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral, Real

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from imtm.component import Component
from imtm.tokens import Tokens, l2_normalize

__all__ = ["GRUTextEncoder"]

#: Half-width of the uniform initialisation of the word embeddings (SCAN's value).
EMBEDDING_INIT_RANGE = 0.1


class GRUTextEncoder(Component):
    r"""Captions -> word tokens: word embeddings, then a GRU; both directions averaged.

    Every word :math:`w_m` is embedded, and a (bi-directional) GRU reads the caption.
    With ``bidirectional=True`` the word feature is the mean of the two directions'
    hidden states (SCAN, Sec. 3, representing sentences; also CHAN's text encoder):

    .. math::

        e_m = \frac{\overrightarrow{h}_m + \overleftarrow{h}_m}{2}

    Captions run as packed sequences, so padding never changes a result; the
    real words of a Tokens input need not be a prefix (they are read in order).
    Padded positions of the output are exactly zero.

    Args:
        vocab: an :class:`imtm.data.Vocabulary` (anything with ``encode_batch`` and ``__len__``).
        out_dim: GRU hidden size, the size of the output word features.
        word_dim: word-embedding size.
        num_layers: stacked GRU layers.
        bidirectional: run the GRU both ways and average.
        dropout: dropout on the word embeddings and between GRU layers (training only).
        normalize: L2-normalise every output word feature.

    Shape:
        - texts: ``list[str]`` of ``Bt`` captions, or Tokens ``(Bt, M)`` of integer word ids
        - output: Tokens ``(Bt, M, out_dim)``, mask True on real words

    References:
        Lee et al., "Stacked Cross Attention for Image-Text Matching" (SCAN), ECCV 2018, Sec. 3;
        Pan et al., "Fine-Grained Image-Text Matching by Cross-Modal Hard Aligning Network" (CHAN), CVPR 2023.

    Example:
        >>> from imtm.data import Vocabulary
        >>> enc = GRUTextEncoder(Vocabulary.build(["a red circle", "a blue square"]), out_dim=8, word_dim=6)
        >>> out = enc(["a red square", "blue"])
        >>> out.feats.shape, out.mask.sum(1).tolist()
        (torch.Size([2, 3, 8]), [3, 1])
    """

    requires = ("texts",)
    provides = ("text_tokens",)

    def __init__(
        self,
        vocab,
        out_dim: int,
        word_dim: int = 300,
        num_layers: int = 1,
        bidirectional: bool = True,
        dropout: float = 0.0,
        normalize: bool = False,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.vocab = vocab
        self.out_dim = out_dim
        self.word_dim = word_dim
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.dropout = dropout
        self.normalize = normalize
        # The embedding and the GRU are built from these arguments below, so they are checked first.
        self.validate()

        self.embed = nn.Embedding(len(vocab), word_dim)
        self.word_dropout = nn.Dropout(dropout)
        self.rnn = nn.GRU(
            word_dim,
            out_dim,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            # torch only applies (and warns about) GRU dropout between stacked layers.
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.reset_parameters()

    def validate(self) -> GRUTextEncoder:
        """Check the vocabulary, the sizes, ``bidirectional`` and ``dropout``; return ``self``."""
        name, vocab = type(self).__name__, self.vocab
        if not (callable(getattr(vocab, "encode_batch", None)) and hasattr(vocab, "__len__")):
            raise TypeError(
                f"{name}: vocab must be an imtm.data.Vocabulary (build one with "
                f"Vocabulary.build(train_captions)), got {type(vocab).__name__}"
            )
        for arg in ("out_dim", "word_dim", "num_layers"):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive integer, got {value!r}")
        if not isinstance(self.bidirectional, bool):
            raise TypeError(f"{name}: bidirectional must be True or False, got {self.bidirectional!r}")
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0 <= dropout < 1:
            raise ValueError(f"{name}: dropout must be a number in [0, 1), got {dropout!r}")
        if len(vocab) < 1:
            raise ValueError(f"{name}: the vocabulary is empty")
        return self

    def reset_parameters(self) -> None:
        """Uniform word embeddings in [-0.1, 0.1] (SCAN); the GRU keeps torch's initialisation."""
        nn.init.uniform_(self.embed.weight, -EMBEDDING_INIT_RANGE, EMBEDDING_INIT_RANGE)
        self.rnn.reset_parameters()

    def _word_ids(self, texts) -> Tokens:
        """Validate the input and return Tokens of word ids on the module's device."""
        name = type(self).__name__
        device = self.embed.weight.device
        if isinstance(texts, str):
            raise TypeError(
                f"{name}: expected a list of captions, got one string; wrap it in a list"
            )
        if isinstance(texts, Tokens):
            ids = texts
            if (
                ids.feats.dim() != 2
                or ids.feats.is_floating_point()
                or ids.feats.dtype == torch.bool
            ):
                raise TypeError(
                    f"{name}: Tokens input must hold integer word ids of shape (B, M), "
                    f"got {ids.feats.dtype} of shape {tuple(ids.feats.shape)}"
                )
            ids = ids.to(device)
            empty = ~ids.mask.any(1)
            if bool(empty.any()):
                raise ValueError(
                    f"{name}: captions {empty.nonzero().flatten().tolist()[:5]} are empty (no real word)"
                )
            real = ids.feats[ids.mask]
            if bool((real < 0).any()) or bool((real >= len(self.vocab)).any()):
                raise ValueError(
                    f"{name}: word ids must lie in [0, {len(self.vocab)}) for this vocabulary, "
                    f"got min {int(real.min())}, max {int(real.max())}"
                )
            return ids
        if isinstance(texts, Sequence):
            if len(texts) == 0:
                raise ValueError(f"{name}: got no captions")
            for k, c in enumerate(texts):
                if not isinstance(c, str):
                    raise TypeError(f"{name}: caption {k} is {type(c).__name__}, expected str")
            try:
                return self.vocab.encode_batch(list(texts), device=device)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from err
        raise TypeError(
            f"{name}: expected captions as list[str] or Tokens of word ids (B, M), got {type(texts).__name__}"
        )

    @torch.compiler.disable
    def prepare(self, texts) -> tuple[torch.Tensor, torch.Tensor]:
        """The host-side half of :meth:`forward`: check and tokenise the captions.

        Returns ``(word_ids, mask)`` on the module's device for :meth:`compute`. It
        never runs inside a compiled region (``torch.compile`` of the encoder, or
        ``Matcher(compile=True)``, compiles :meth:`compute` only), so new captions
        never trigger a recompilation.
        """
        ids = self._word_ids(texts)
        return ids.feats, ids.mask

    def forward(self, texts) -> Tokens:
        return self.compute(*self.prepare(texts))

    def compute(self, word_ids: torch.Tensor, mask: torch.Tensor) -> Tokens:
        """The tensor half of :meth:`forward`: word ids ``(Bt, M)`` and their mask -> word tokens."""
        num_words = mask.shape[1]
        # Move real words to the front, in order (a stable sort), so any mask packs correctly.
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
        front_mask = mask.gather(1, order)
        front_ids = word_ids.gather(1, order)
        # Padding may hold any id (even one outside the vocabulary): read the pad id instead.
        pad = getattr(self.vocab, "pad_index", 0)
        front_ids = torch.where(front_mask, front_ids, torch.full_like(front_ids, pad))
        x = self.word_dropout(self.embed(front_ids))
        # pack_padded_sequence takes its lengths on the CPU: one small copy per batch.
        lengths = front_mask.sum(1).cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=num_words)
        if self.bidirectional:
            out = (out[..., : self.out_dim] + out[..., self.out_dim :]) / 2
        # Back to the caller's positions: the inverse permutation of `order`.
        inverse = order.argsort(dim=1)
        out = out.gather(1, inverse.unsqueeze(-1).expand_as(out))
        if self.normalize:
            out = l2_normalize(out, dim=-1)
        out = torch.where(
            mask.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device)
        )
        return Tokens(out, mask)
