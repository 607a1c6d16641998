"""GRUTextEncoder: word embeddings and a (bi-directional) GRU over each caption (SCAN, CHAN)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from numbers import Real
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from imtm.component import Component, is_restoring_saved_weights
from imtm.contract import EXAMPLE_WORDS, POSITIVE_INT, Example, Interval, Options, Satisfies
from imtm.tokens import Tokens, l2_normalize

__all__ = ["GRUTextEncoder", "UNKNOWN_WORD_INITS", "read_word_vectors"]

#: Half-width of the uniform initialisation of the word embeddings (SCAN's value).
EMBEDDING_INIT_RANGE = 0.1
#: How words missing from the word-vector file are initialised: ``"normal"`` keeps
#: ``nn.Embedding``'s N(0, 1), as CHAN's ``EncoderTextBigru.init_weights`` (lib/encoders.py of
#: ppanzx/CHAN) leaves them; ``"uniform"`` draws them from SCAN's U(-0.1, 0.1); ``"zeros"``.
UNKNOWN_WORD_INITS = ("normal", "uniform", "zeros")


def _clean(word: str) -> str:
    """CHAN's second try for a word the vectors lack: drop '-', '.', and "'", keep what precedes a '/'."""
    word = word.replace("-", "").replace(".", "").replace("'", "")
    return word.split("/")[0] if "/" in word else word


def read_word_vectors(
    path: str | os.PathLike, words: Sequence[str] | None = None
) -> tuple[dict[str, int], torch.Tensor]:
    """Read word vectors from a GloVe / fastText text file or a ``.npy`` array.

    Text files hold one word per line followed by its numbers (GloVe's ``glove.840B.300d.txt``;
    fastText's ``.vec``, whose first line ``"count dim"`` is skipped). Only the words in ``words``
    (and their cleaned forms) are kept when it is given, so a 2-million-word file never sits in
    memory. A ``.npy`` file is a ``(V, D)`` array whose row ``i`` is the vector of vocabulary
    word ``i`` (already aligned; ``words`` then names the rows).

    Returns:
        ``(index, vectors)``: word -> row, and the ``(rows, D)`` float tensor.

    Raises:
        FileNotFoundError: no such file. ValueError: lines of different lengths, or no vector.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word_vectors {str(path)!r} does not exist or is not a file")
    if path.suffix == ".npy":
        import numpy as np

        array = np.load(str(path), allow_pickle=False)
        if array.ndim != 2:
            raise ValueError(
                f"{str(path)!r}: expected a (V, D) array of word vectors, got shape {array.shape}"
            )
        names = list(words) if words is not None else []
        return {w: i for i, w in enumerate(names[: array.shape[0]])}, torch.as_tensor(
            array, dtype=torch.float32
        )
    wanted = None if words is None else set(words) | {_clean(w) for w in words}
    index: dict[str, int] = {}
    rows: list[list[float]] = []
    dim = None
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle):
            parts = line.rstrip("\n").rstrip().split(" ")
            if number == 0 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # fastText's header: count and dimension
            if len(parts) < 2:
                continue
            # GloVe 840B has a few "words" with spaces: the vector is always the last ``dim`` numbers.
            if dim is None:
                dim = len(parts) - 1
            word, numbers = " ".join(parts[:-dim]), parts[-dim:]
            if len(parts) - 1 < dim:
                raise ValueError(
                    f"{str(path)!r} line {number + 1}: {len(parts) - 1} numbers, expected {dim}"
                )
            if (wanted is not None and word not in wanted) or word in index:
                continue
            index[word] = len(rows)
            rows.append([float(x) for x in numbers])
    if dim is None:
        raise ValueError(f"{str(path)!r} holds no word vectors")
    return index, torch.tensor(rows, dtype=torch.float32).reshape(len(rows), dim)


def _is_vocabulary(vocab) -> bool:
    """Anything with ``encode_batch`` and at least one word (an :class:`imtm.data.Vocabulary`)."""
    return callable(getattr(vocab, "encode_batch", None)) and len(vocab) >= 1


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

    Word vectors (CHAN's BiGRU runs on GloVe, ``--wemb_type=glove``): with
    ``word_vectors`` a GloVe / fastText text file or an aligned ``.npy``, every
    vocabulary word found in it (as it is, else cleaned as CHAN's
    ``EncoderTextBigru.init_weights`` does: ``-``, ``.``, ``'`` removed, the part
    before a ``/``) starts from its vector; the others are initialised by
    ``unknown_words``. The embeddings then train with the rest, as in CHAN's
    code (its ``self.embed.requires_grad = False`` sets a module attribute, not the
    weight's flag); ``freeze_embeddings=True`` keeps them fixed instead.
    :attr:`word_vector_hits` says how many words were found.

    Args:
        vocab: an :class:`imtm.data.Vocabulary` (anything with ``encode_batch`` and ``__len__``).
        out_dim: GRU hidden size, the size of the output word features.
        word_dim: word-embedding size.
        num_layers: stacked GRU layers.
        bidirectional: run the GRU both ways and average.
        dropout: dropout on the word embeddings and between GRU layers (training only).
        normalize: L2-normalise every output word feature.
        word_vectors: a GloVe / fastText text file (``.txt``, ``.vec``) or a ``.npy`` array aligned
            with the vocabulary (``len(vocab)`` rows); its dimension must equal ``word_dim``.
            ``None``: SCAN's U(-0.1, 0.1) for every word. A saved model keeps the file's base name
            only (the vectors are in its weights; loading never reads the file).
        unknown_words: initialisation of words the file lacks, one of :data:`UNKNOWN_WORD_INITS`.
        freeze_embeddings: keep the word embeddings fixed (no gradient).

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
    _parameter_constraints = {
        "vocab": [
            Satisfies(
                _is_vocabulary,
                "a non-empty imtm.data.Vocabulary (build one with Vocabulary.build(train_captions))",
                refused=[{"a": 1}, "vocab.json"],
            )
        ],
        "out_dim": [POSITIVE_INT],
        "word_dim": [POSITIVE_INT],
        "num_layers": [POSITIVE_INT],
        "bidirectional": ["boolean"],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "normalize": ["boolean"],
        "word_vectors": [str, os.PathLike, None],
        "unknown_words": [Options(UNKNOWN_WORD_INITS)],
        "freeze_embeddings": ["boolean"],
    }
    # Its cost is the packed GRU kernel, which torch.compile leaves as it is; compiling the rest adds
    # graph breaks (pack_padded_sequence reads the lengths on the host): 16.1 ms eager against
    # 19.1 ms compiled per vsepp step on 2 CPU cores, so Matcher(compile=True) keeps it eager.
    compiles = False

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        from imtm.data import Vocabulary

        vocab = Vocabulary.build([" ".join(EXAMPLE_WORDS)])
        small = {"vocab": vocab, "out_dim": 6, "word_dim": 5}
        return (
            Example(small, vocab_size=len(vocab), padding=True),
            Example(
                {
                    **small,
                    "num_layers": 2,
                    "bidirectional": False,
                    "dropout": 0.2,
                    "normalize": True,
                },
                vocab_size=len(vocab),
                padding=True,
            ),
        )

    def __init__(
        self,
        vocab,
        out_dim: int,
        word_dim: int = 300,
        num_layers: int = 1,
        bidirectional: bool = True,
        dropout: float = 0.0,
        normalize: bool = False,
        word_vectors: str | os.PathLike | None = None,
        unknown_words: str = "normal",
        freeze_embeddings: bool = False,
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
        self.word_vectors = word_vectors
        self.unknown_words = unknown_words
        self.freeze_embeddings = freeze_embeddings
        # The embedding and the GRU are built from these arguments below, so they are checked first.
        self.validate()
        self._word_vector_hits: int | None = None

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
        if freeze_embeddings:
            self.embed.weight.requires_grad_(False)

    @property
    def word_vector_hits(self) -> int | None:
        """Vocabulary words initialised from ``word_vectors`` (``None`` without a file, or after loading)."""
        return self._word_vector_hits

    def portable_params(self) -> dict:
        """A saved model keeps ``word_vectors`` by its base name only (its vectors are in the saved weights)."""
        if self.word_vectors is None:
            return {}
        return {"word_vectors": os.path.basename(os.fspath(self.word_vectors).rstrip("/\\"))}

    def reset_parameters(self) -> None:
        """Word embeddings: from ``word_vectors`` where given (unknown words by ``unknown_words``),
        else uniform in [-0.1, 0.1] (SCAN); the GRU keeps torch's initialisation."""
        self.rnn.reset_parameters()
        if self.word_vectors is None or is_restoring_saved_weights():
            # Matcher.load restores the trained embeddings: the file need not exist there.
            nn.init.uniform_(self.embed.weight, -EMBEDDING_INIT_RANGE, EMBEDDING_INIT_RANGE)
            return
        self._load_word_vectors()

    def _load_word_vectors(self) -> None:
        name = type(self).__name__
        words = list(getattr(self.vocab, "itos", None) or [])
        if not words:
            raise TypeError(
                f"{name}: word_vectors needs a vocabulary that lists its words (an imtm.data.Vocabulary)"
            )
        path = Path(self.word_vectors)
        index, vectors = read_word_vectors(path, words)
        if vectors.shape[1] != self.word_dim:
            raise ValueError(
                f"{name}: {str(path)!r} holds {vectors.shape[1]}-d vectors, but word_dim={self.word_dim}; "
                f"set word_dim={vectors.shape[1]}"
            )
        weight = self.embed.weight
        with torch.no_grad():
            if self.unknown_words == "normal":
                nn.init.normal_(weight)
            elif self.unknown_words == "uniform":
                nn.init.uniform_(weight, -EMBEDDING_INIT_RANGE, EMBEDDING_INIT_RANGE)
            else:
                nn.init.zeros_(weight)
            if path.suffix == ".npy":
                if vectors.shape[0] != len(words):
                    raise ValueError(
                        f"{name}: {str(path)!r} has {vectors.shape[0]} rows; an aligned .npy needs one "
                        f"per vocabulary word ({len(words)}, padding and unknown included)"
                    )
                weight.copy_(vectors)
                self._word_vector_hits = len(words)
                return
            rows, targets = [], []
            for i, word in enumerate(words):
                row = index.get(word, index.get(_clean(word)))
                if row is not None:
                    rows.append(row)
                    targets.append(i)
            if rows:
                weight[torch.tensor(targets)] = vectors[torch.tensor(rows)].to(weight.dtype)
            self._word_vector_hits = len(rows)

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
