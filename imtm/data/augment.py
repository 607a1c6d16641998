"""Training-time caption augmentation as in VSE-infinity: words masked, replaced or deleted.

Each word is selected with probability ``p`` (0.2); a selected word is replaced by
the mask token with probability ``mask_prob`` (0.5), by a random vocabulary word
with probability ``replace_prob`` (0.1), and deleted otherwise (0.4).

.. math::

    u_j \\sim U(0, 1);\\quad u_j < p \\Rightarrow
    \\begin{cases} \\text{mask} & u_j / p < m \\\\ \\text{replace} & m \\le u_j / p < m + r \\\\
    \\text{delete} & \\text{otherwise} \\end{cases}

Settled here (VSE-infinity gives no equation; its ``process_caption`` is the reference):

- its comment calls the last 40 % "randomly keep current token", but its code
  deletes those words; the code is followed (deletion, as the paper says);
- it acts on the word pieces of each basic-tokenizer word (every piece of a masked
  word becomes ``[MASK]``); here words are whitespace-separated words of the
  caption string and a masked word becomes one mask token, so the output is still a
  caption string that any tokenizer (``HFTextEncoder``'s or a
  :class:`~imtm.data.Vocabulary`) encodes afterwards;
- it can delete every word of a short caption; here a caption never comes out empty:
  when every word would go, one original word (chosen with the same generator) is kept.

References:
    Chen et al., "Learning the Best Pooling Strategy for Visual Semantic Embedding"
    (VSE-infinity), CVPR 2021, Sec. 4 and ``lib/datasets/image_caption.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from imtm.data.seeding import current_item_seed, fit_epoch_key, fit_epoch_serial

__all__ = ["CaptionAugment", "augment_caption"]

#: VSE-infinity's rates: a word is selected with probability 0.2; a selected word is masked
#: with probability 0.5, replaced by a random word with probability 0.1, deleted otherwise.
SELECT_PROB, MASK_PROB, REPLACE_PROB = 0.2, 0.5, 0.1


def _check_rates(p: float, mask_prob: float, replace_prob: float, who: str) -> None:
    for name, v in (("p", p), ("mask_prob", mask_prob), ("replace_prob", replace_prob)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{who}: {name} must be a probability in [0, 1], got {v!r}")
    if mask_prob + replace_prob > 1.0:
        raise ValueError(
            f"{who}: mask_prob + replace_prob must be at most 1 (the rest are deletions), "
            f"got {mask_prob} + {replace_prob}"
        )


def augment_caption(
    caption: str,
    words: Sequence[str],
    generator: torch.Generator | None = None,
    *,
    p: float = SELECT_PROB,
    mask_token: str = "[MASK]",
    mask_prob: float = MASK_PROB,
    replace_prob: float = REPLACE_PROB,
) -> str:
    """One augmented copy of ``caption`` (whitespace words masked, replaced or deleted).

    Args:
        caption: the caption.
        words: the replacement vocabulary (non-empty).
        generator: the random source (``None``: torch's global generator).
        p: probability that a word is selected.
        mask_token: what a masked word becomes (``"[MASK]"`` for BERT tokenizers).
        mask_prob: probability that a selected word is masked.
        replace_prob: probability that a selected word is replaced by a word of ``words``;
            the rest of the selected words are deleted.

    Returns:
        the augmented caption, never empty (see the module docstring).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> augment_caption("a dog runs on the grass", ["cat", "sits"], g, p=0.0)
        'a dog runs on the grass'
        >>> len(augment_caption("a dog runs", ["cat"], g, p=1.0, mask_prob=0.0, replace_prob=0.0).split())
        1
    """
    if not isinstance(caption, str):
        raise TypeError(f"augment_caption: expected a caption string, got {type(caption).__name__}")
    if isinstance(words, str) or len(words) == 0:
        raise ValueError("augment_caption: words must be a non-empty sequence of replacement words")
    _check_rates(p, mask_prob, replace_prob, "augment_caption")
    tokens = caption.split()
    n = len(tokens)
    if n == 0:
        raise ValueError(
            f"augment_caption: caption {caption!r} has no words (empty captions are not allowed)"
        )
    # One draw per word for the decision (re-used, as in VSE-infinity: u / p is uniform given u < p),
    # one for the replacement word, and one for the word kept when all would be deleted.
    u = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
    pick = torch.randint(len(words), (n,), generator=generator).tolist()
    keep_one = int(torch.randint(n, (1,), generator=generator))
    out = []
    for tok, uj, wj in zip(tokens, u, pick):
        if uj >= p:
            out.append(tok)
            continue
        a = uj / p
        if a < mask_prob:
            out.append(mask_token)
        elif a < mask_prob + replace_prob:
            out.append(words[wj])
        # else: deleted
    if not out:
        out = [tokens[keep_one]]
    return " ".join(out)


class CaptionAugment:
    """VSE-infinity caption augmentation as a callable ``str -> str`` for the datasets' ``augment=``.

    Args:
        words: the replacement vocabulary (non-empty; see :meth:`from_captions`,
            :meth:`from_vocabulary`, :meth:`from_tokenizer`).
        p: probability that a word is selected (0.2).
        mask_token: what a masked word becomes (``"[MASK]"``, the BERT mask token).
        mask_prob: probability that a selected word is masked (0.5).
        replace_prob: probability that a selected word is replaced (0.1); the rest are deleted.
        seed: seeds the generator. Inside ``Matcher.fit`` every item is loaded with a seed of
            its own, fixed by the run's seed, the epoch and the item
            (:mod:`imtm.data.seeding`): the draws are those of a generator seeded from ``seed``
            and that item seed (``None``, what ``augment=True`` gives: torch's generator, seeded
            for the item). So they do not depend on the worker, on ``num_workers``, on an earlier
            fit in the same process, or on where a run was interrupted and resumed. Outside a
            fit (and for a DataLoader that ``fit`` iterates as given, see ``docs/robustness.md``)
            each process draws from its own generator; in a DataLoader worker it is seeded from
            ``seed`` and the worker's seed, in the main process from ``seed`` (and the epoch,
            during a fit); ``None``: the worker's seed, or torch's global generator.

    Calling ``aug(caption, generator=g)`` draws from ``g`` instead.

    .. math::

        u_j < p:\\ \\text{mask w.p. } m,\\ \\text{replace w.p. } r,\\ \\text{delete w.p. } 1 - m - r
        \\quad\\text{(VSE-infinity, Sec. 4)}

    References:
        Chen et al., VSE-infinity, CVPR 2021.

    Example:
        >>> aug = CaptionAugment(["cat", "grass"], seed=0)
        >>> out = aug("a dog runs on the grass")
        >>> out == CaptionAugment(["cat", "grass"], seed=0)("a dog runs on the grass")
        True
    """

    def __init__(
        self,
        words: Sequence[str],
        *,
        p: float = SELECT_PROB,
        mask_token: str = "[MASK]",
        mask_prob: float = MASK_PROB,
        replace_prob: float = REPLACE_PROB,
        seed: int | None = None,
    ):
        if isinstance(words, str) or not hasattr(words, "__len__") or len(words) == 0:
            raise ValueError(
                "CaptionAugment: words must be a non-empty sequence of replacement words"
            )
        if (
            not isinstance(mask_token, str)
            or not mask_token.strip()
            or len(mask_token.split()) != 1
        ):
            raise ValueError(
                f"CaptionAugment: mask_token must be one non-empty word, got {mask_token!r}"
            )
        _check_rates(p, mask_prob, replace_prob, "CaptionAugment")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(
                f"CaptionAugment: seed must be an int or None, got {type(seed).__name__}"
            )
        self.words = list(words)
        self.p = p
        self.mask_token = mask_token
        self.mask_prob = mask_prob
        self.replace_prob = replace_prob
        self.seed = seed
        self._generator = None
        self._owner = None

    # ------------------------------------------------------------------ vocabularies
    @classmethod
    def from_captions(cls, captions: Sequence[str], **kw) -> CaptionAugment:
        """Replacement words: the alphabetic words of ``captions``, lower-cased and sorted."""
        words = sorted({w.lower() for c in captions for w in c.split() if w.isalpha()})
        if not words:
            raise ValueError("CaptionAugment.from_captions: the captions hold no alphabetic words")
        return cls(words, **kw)

    @classmethod
    def from_vocabulary(cls, vocab, **kw) -> CaptionAugment:
        """For :class:`imtm.data.Vocabulary` (the GRU text encoder).

        Replacement words are the vocabulary's alphabetic words; the mask token defaults
        to ``"unk"`` when it is not a vocabulary word, so a masked word encodes to ``<unk>``
        (``"[MASK]"`` would split into three tokens under :func:`imtm.data.tokenize`).
        """
        words = [w for w in vocab.itos[2:] if w.isalpha()]
        if not words:
            raise ValueError(
                "CaptionAugment.from_vocabulary: the vocabulary has no alphabetic words"
            )
        if "mask_token" not in kw:
            if "unk" in vocab:
                raise ValueError(
                    "CaptionAugment.from_vocabulary: 'unk' is a word of this vocabulary; pass mask_token= "
                    "a single word outside it (it encodes to <unk>)"
                )
            kw["mask_token"] = "unk"
        return cls(words, **kw)

    @classmethod
    def from_tokenizer(cls, tokenizer, **kw) -> CaptionAugment:
        """For a transformers tokenizer: its mask token, and its whole alphabetic words as replacements."""
        special = set(getattr(tokenizer, "all_special_tokens", []))
        words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w not in special)
        if not words:
            raise ValueError(
                "CaptionAugment.from_tokenizer: the tokenizer vocabulary has no alphabetic words"
            )
        mask = getattr(tokenizer, "mask_token", None)
        if mask and "mask_token" not in kw:
            kw["mask_token"] = mask
        return cls(words, **kw)

    # ------------------------------------------------------------------ randomness
    def _own_generator(self) -> torch.Generator | None:
        item = current_item_seed()
        if item is not None:
            # Inside Matcher.fit: the item's own seed, fixed by (run seed, epoch, item), so the draws do
            # not depend on the worker, num_workers, what was drawn before, or an interrupted run.
            if self.seed is None:
                return None  # torch's generator, seeded for this item
            return torch.Generator().manual_seed((self.seed * 1_000_003 + item) % 2**63)
        info = torch.utils.data.get_worker_info()
        if info is None and self.seed is None:
            return None  # torch's generator: whoever seeds torch (Matcher.fit) seeds this
        epoch = fit_epoch_key() if info is None else None
        owner = (
            os.getpid(),
            None if info is None else (info.id, info.seed),
            epoch,
            epoch and fit_epoch_serial(),
        )
        if self._generator is None or self._owner != owner:
            if info is not None:
                base = info.seed if self.seed is None else (self.seed * 1_000_003 + info.seed)
            elif epoch is not None:
                # A DataLoader imtm iterates as given, in the main process: a new stream each epoch of
                # each fit, so two fits agree and a run resumed at an epoch's end continues alike.
                base = self.seed * 1_000_003 + epoch
            else:
                base = self.seed
            self._generator = torch.Generator().manual_seed(base % 2**63)
            self._owner = owner
        return self._generator

    def __call__(self, caption: str, generator: torch.Generator | None = None) -> str:
        return augment_caption(
            caption,
            self.words,
            generator if generator is not None else self._own_generator(),
            p=self.p,
            mask_token=self.mask_token,
            mask_prob=self.mask_prob,
            replace_prob=self.replace_prob,
        )

    def __getstate__(self) -> dict:
        # Generators do not pickle; a worker process builds its own from the seed.
        state = dict(self.__dict__)
        state["_generator"], state["_owner"] = None, None
        return state

    def __repr__(self) -> str:
        return (
            f"CaptionAugment(words=<{len(self.words)} words>, p={self.p}, mask_token={self.mask_token!r}, "
            f"mask_prob={self.mask_prob}, replace_prob={self.replace_prob}, seed={self.seed})"
        )
