"""MatchingReranker: ALBEF / ELA two-stage retrieval as a pairwise scorer block."""

from __future__ import annotations

from numbers import Integral

import torch

from imtm.component import LinkedComponent
from imtm.components.heads.cross_modal import ImageTextMatchingHead
from imtm.contract import EXAMPLE_DIM, Example, Interval, block_or_name
from imtm.tokens import Tokens

__all__ = ["MatchingReranker"]

#: Non-candidates are pushed this far below: contrastive scores lie in [-1, 1] and candidate
#: scores (match probability + contrastive score) in [-1, 2], so every candidate ranks first.
NON_CANDIDATE_SHIFT = 3.0


class MatchingReranker(LinkedComponent):
    r"""Rank all pairs by the contrastive similarity, re-rank each query's top-``k`` with the matching head.

    For each image (row) its ``k`` best captions, and for each caption (column) its
    ``k`` best images, by ``itc_scores``, are scored by the
    :class:`~imtm.components.ImageTextMatchingHead` (through its cross-modal encoder);
    those candidates get :math:`p^{itm}_{match} + s^{itc}` (ALBEF's sum of both
    stages), every other pair :math:`s^{itc} - 3`, below every candidate:

    .. math::

        s_{i2t}(I, T) = \begin{cases} p^{itm}(I, T) + s(I, T) & T \in \mathrm{top}_k(I) \\
        s(I, T) - 3 & \text{otherwise} \end{cases}

    and :math:`s_{t2i}` alike with the images' top-``k`` per caption. Only the
    candidate pairs reach the cross-modal encoder (at most ``(Bi + Bt) k`` per block,
    in chunks of ``chunk`` pairs), never all pairs.

    Relation to blocked evaluation and :mod:`imtm.retrieval`: ``Matcher.similarity``
    hands this block one image block x caption block at a time, so its top-``k`` is
    taken within the block. With ``image_block >= n_images`` and ``text_block >=
    n_captions`` this is exactly two-stage retrieval; with smaller blocks every
    block contributes its own top-``k`` (a superset of the global top-``k``, each
    member scored the same way). The general ``TwoStageRetriever`` of
    :mod:`imtm.retrieval` takes the global top-``k`` over all blocks first.

    Args:
        head: name of the :class:`~imtm.components.ImageTextMatchingHead` block, or the head.
        k: candidates per query (ALBEF: 128 / 256 on Flickr30K / COCO).
        chunk: candidate pairs per cross-modal forward (bounds memory).

    Shape:
        - image_tokens: Tokens ``(Bi, N, D)``; text_tokens: Tokens ``(Bt, M, D)``
        - itc_scores: ``(Bi, Bt)``
        - output: ``scores_i2t (Bi, Bt)``, ``scores_t2i (Bi, Bt)``

    References:
        Li et al., "Align before Fuse" (ALBEF), NeurIPS 2021, Sec. 4; Yang et al.,
        "Pre-training Cross-Modal Retrieval by Expansive Lexicon-Patch Alignment", LREC-COLING 2024.

    Example:
        >>> from imtm.components import CrossModalEncoder, ImageTextMatchingHead
        >>> head = ImageTextMatchingHead(16, encoder=CrossModalEncoder(16, layers=1, heads=2)).eval()
        >>> img, txt = Tokens(torch.randn(3, 5, 16)), Tokens(torch.randn(4, 6, 16), num_prefix_tokens=1)
        >>> i2t, t2i = MatchingReranker(head=head, k=2)(img, txt, torch.randn(3, 4).tanh())
        >>> i2t.shape, int((i2t > -2).sum(1).max())  # two candidates per image
        (torch.Size([3, 4]), 2)
    """

    requires = ("image_tokens", "text_tokens", "itc_scores")
    provides = ("scores_i2t", "scores_t2i")
    _borrowed = ("head", "_linked")
    _target_param = "head"

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        from imtm.components.heads.cross_modal import CrossModalEncoder, ImageTextMatchingHead

        head = ImageTextMatchingHead(
            EXAMPLE_DIM, encoder=CrossModalEncoder(EXAMPLE_DIM, layers=1, heads=2)
        )
        return (Example({"head": head, "k": 2}, padding=True),)

    def __init__(self, head="itm", k: int = 16, chunk: int = 1024, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.head = head
        self.k = k
        self.chunk = chunk
        self._set_target(head)

    _parameter_constraints = {
        "head": [block_or_name(ImageTextMatchingHead, description="an ImageTextMatchingHead")],
        "k": [Interval(Integral, 1, None, closed="left")],
        "chunk": [Interval(Integral, 1, None, closed="left")],
    }

    def _check_target(self, block, name=None) -> None:
        if not isinstance(block, ImageTextMatchingHead):
            raise TypeError(
                f"{type(self).__name__}: block {name!r} is a {type(block).__name__}, "
                "not an ImageTextMatchingHead"
            )

    def forward(self, image_tokens, text_tokens, itc_scores):
        head = self.target()
        if not isinstance(image_tokens, Tokens) or not isinstance(text_tokens, Tokens):
            raise TypeError(f"{type(self).__name__}: expected image and text tokens as Tokens")
        bi, bt = image_tokens.batch_size, text_tokens.batch_size
        if tuple(itc_scores.shape) != (bi, bt):
            raise ValueError(
                f"{type(self).__name__}: itc_scores must have shape ({bi}, {bt}), "
                f"got {tuple(itc_scores.shape)}"
            )
        s = itc_scores
        rows = torch.zeros(bi, bt, dtype=torch.bool, device=s.device)
        rows.scatter_(1, s.topk(min(self.k, bt), dim=1).indices, True)
        cols = torch.zeros(bi, bt, dtype=torch.bool, device=s.device)
        cols.scatter_(0, s.topk(min(self.k, bi), dim=0).indices, True)
        img_idx, txt_idx = (rows | cols).nonzero(as_tuple=True)
        match = s.new_empty(img_idx.shape[0])
        for start in range(
            0, img_idx.shape[0], self.chunk
        ):  # chunks of candidate pairs bound the memory
            sl = slice(start, start + self.chunk)
            logits = head.pair_logits(image_tokens, text_tokens, img_idx[sl], txt_idx[sl])
            match[sl] = torch.softmax(logits.float(), dim=-1)[:, 1].to(s.dtype)
        reranked = s.clone()
        reranked[img_idx, txt_idx] = match + s[img_idx, txt_idx]
        low = s - NON_CANDIDATE_SHIFT
        return torch.where(rows, reranked, low), torch.where(cols, reranked, low)

    def extra_repr(self) -> str:
        ref = self.head if isinstance(self.head, str) else "module"
        return f"head={ref!r}, k={self.k}, " + super().extra_repr()
