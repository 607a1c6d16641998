"""Word vocabulary for the GRU text encoder (built from training captions)."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Iterable, Sequence

import torch

from imtm.tokens import Tokens

__all__ = ["Vocabulary", "tokenize"]

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def tokenize(caption: str) -> list[str]:
    """Lower-case word tokens of a caption: runs of letters/digits, punctuation kept apart.

    >>> tokenize("A red circle, left of a BLUE square.")
    ['a', 'red', 'circle', ',', 'left', 'of', 'a', 'blue', 'square', '.']
    """
    if not isinstance(caption, str):
        raise TypeError(f"tokenize: expected a caption string, got {type(caption).__name__}")
    return _WORD.findall(caption.lower())


class Vocabulary:
    """A word-to-index map with reserved ``<pad>`` (0) and ``<unk>`` (1) entries.

    Args:
        words: the words, in index order after the reserved entries.

    Example:
        >>> v = Vocabulary.build(["a red circle", "a blue square"])
        >>> len(v), v["red"], v["zebra"]
        (7, 3, 1)
        >>> v.encode_batch(["a red square", "blue"]).feats.shape
        torch.Size([2, 3])
    """

    PAD, UNK = "<pad>", "<unk>"
    pad_index, unk_index = 0, 1

    def __init__(self, words: Sequence[str] = ()):
        self.itos: list[str] = [self.PAD, self.UNK]
        self.stoi: dict[str, int] = {self.PAD: 0, self.UNK: 1}
        for w in words:
            if w not in self.stoi:
                self.stoi[w] = len(self.itos)
                self.itos.append(w)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> "Vocabulary":
        """Words seen at least ``min_count`` times in ``captions``, most frequent first (ties alphabetical)."""
        counts = Counter(w for c in captions for w in tokenize(c))
        if not counts:
            raise ValueError("Vocabulary.build: no words in the given captions")
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def __getitem__(self, word: str) -> int:
        return self.stoi.get(word, self.unk_index)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and other.itos == self.itos

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)})"

    def encode(self, caption: str) -> list[int]:
        """Token ids of one caption; raises ``ValueError`` on an empty caption."""
        ids = [self[w] for w in tokenize(caption)]
        if not ids:
            raise ValueError(f"Vocabulary.encode: caption {caption!r} has no words (empty captions are not allowed)")
        return ids

    def encode_batch(self, captions: Sequence[str], device=None) -> Tokens:
        """Tokens of integer ids ``(B, M)`` with a mask, padded with ``<pad>``."""
        if isinstance(captions, str):
            raise TypeError("Vocabulary.encode_batch: expected a list of captions, got one string")
        if len(captions) == 0:
            raise ValueError("Vocabulary.encode_batch: got no captions")
        seqs = [torch.tensor(self.encode(c), dtype=torch.long) for c in captions]
        toks = Tokens.pad_sequence(seqs)
        return toks.to(device) if device is not None else toks

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.itos[int(i)] for i in ids if int(i) != self.pad_index)

    # JSON round trip (checkpoints never pickle)
    def to_dict(self) -> dict:
        return {"words": self.itos[2:]}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        return cls(d["words"])

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path) -> "Vocabulary":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
