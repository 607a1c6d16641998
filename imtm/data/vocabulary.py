"""Word vocabulary for the GRU text encoder (built from training captions)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence

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
        >>> len(v), v["a"], v["red"], v["zebra"]
        (7, 2, 5, 1)
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
    def build(cls, captions: Iterable[str], min_count: int = 1) -> Vocabulary:
        """Words seen at least ``min_count`` times in ``captions``, most frequent first (ties alphabetical)."""
        counts = Counter(w for c in captions for w in tokenize(c))
        if not counts:
            raise ValueError("Vocabulary.build: no words in the given captions")
        words = sorted(
            (w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w)
        )
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
            raise ValueError(
                f"Vocabulary.encode: caption {caption!r} has no words (empty captions are not allowed)"
            )
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
    def from_dict(cls, d: dict, source: str = "Vocabulary.from_dict") -> Vocabulary:
        """The vocabulary of :meth:`to_dict`'s ``{"words": [...]}``.

        Args:
            d: ``{"words": [word, ...]}``, the words after ``<pad>`` and ``<unk>`` in index order.
            source: where ``d`` came from, put into errors.

        Raises:
            ValueError: ``d`` is not such a dict, or a word is not a non-empty string, is
                repeated or is a reserved entry (each would shift the indices of the words
                after it, so a model would read other words than it was trained on).
        """
        words = d.get("words") if isinstance(d, dict) else None
        if not isinstance(words, list):
            got = f"keys {sorted(d)}" if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"{source}: expected {{'words': [word, ...]}}, got {got}")
        seen = {cls.PAD: -1, cls.UNK: -1}  # word -> its index in words; -1 for the reserved entries
        for k, w in enumerate(words):
            if not isinstance(w, str) or not w:
                raise ValueError(f"{source}: word {k} is {w!r}, expected a non-empty string")
            if w in seen:
                first = "a reserved entry" if seen[w] < 0 else f"word {seen[w]}"
                raise ValueError(
                    f"{source}: word {k} {w!r} repeats {first}; every word must appear once"
                )
            seen[w] = k
        return cls(words)

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path) -> Vocabulary:
        """Read a vocabulary written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not UTF-8 JSON or not a valid vocabulary (see :meth:`from_dict`).
        """
        from imtm._io import read_json

        try:
            data = read_json(path, who="Vocabulary.load", max_bytes=1 << 28)
        except FileNotFoundError:
            raise
        except (
            ValueError
        ) as e:  # not a regular file, too large, not UTF-8, not JSON, nested too deeply
            raise ValueError(
                f"Vocabulary.load: {str(path)!r} is not a UTF-8 JSON vocabulary ({e})"
            ) from e
        return cls.from_dict(data, source=f"Vocabulary.load({str(path)!r})")
