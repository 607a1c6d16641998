"""CHAN's hard-assignment coding: each word keeps only its best-matching region.

References:
    Pan, Wu and Zhang, "Fine-grained Image-text Matching by Cross-modal Hard
    Aligning Network", CVPR 2023, Sec. 3.2-3.3, Eq. 5-8.
"""

from __future__ import annotations

import math

import torch

from imtm.functional.blocking import (
    blocked_query_scores,
    check_block_args,
    check_pair_inputs,
    max_over_keys,
    resolve_option,
)
from imtm.functional.pooling import resolve_pooling

__all__ = ["CODEBOOKS", "hard_assignment_from_cosines", "hard_assignment_scores"]

#: Which modality is the codebook. ``"visual"``: regions are the codewords and every word
#: is assigned to one region (words query regions, pooled over words). ``"textual"``: words
#: are the codewords and every region is assigned to one word (pooled over regions).
CODEBOOKS: dict[str, bool] = {"visual": False, "textual": True}


def hard_assignment_scores(
    images: torch.Tensor,
    texts: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    *,
    codebook: str = "visual",
    pooling: str = "lse",
    temperature: float = 0.1,
    max_block_elements: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Image-caption scores by hard assignment coding, for every image and caption.

    With the visual codebook (default) every word ``t_i`` of a caption is
    coded by its single most similar region ``v_j`` of the image, and the
    caption's word scores are pooled:

    .. math::

        s_{ij} = \cos(t_i, v_j), \qquad
        s(t_i, V) = \max_{j} s_{ij} \quad \text{(Eq. 5-6)}, \qquad
        S(I, T) = \operatorname{pool}_{i} s(t_i, V) \quad \text{(Eq. 7-8)}

    with ``pool`` one of max, mean, sum, softmax (``sum softmax(s/T) s``) or
    log-sum-exp (``(1/lambda) log sum exp(lambda s)``, ``lambda = 1/T``, Eq. 3
    and 8). The textual codebook swaps the roles: every region takes its best
    word and the region scores are pooled. Padding is excluded on both sides.

    The computation is blocked (see :mod:`imtm.functional.blocking`): tokens
    are normalised once, the words of all captions are packed into one matrix
    without padding, and each block is one matrix product followed by a masked
    max and the pooling, so no ``(Bi, Bt, N, M)`` tensor is ever built and the
    result does not depend on the block size.

    Args:
        images: region or patch features (need not be normalised).
        texts: word features (need not be normalised).
        image_mask: True where a region is real; ``None``: all are.
        text_mask: True where a word is real; ``None``: all are.
        codebook: ``"visual"`` (words query regions) or ``"textual"`` (regions query words).
        pooling: ``"max"``, ``"mean"``, ``"sum"``, ``"softmax"`` or ``"lse"``.
        temperature: ``T = 1 / lambda`` of the softmax and log-sum-exp poolings.
        max_block_elements: at most this many token similarities exist at once; ``None``:
            :func:`~imtm.functional.blocking.default_block_elements` (``2**24`` on CPU,
            ``2**28`` on CUDA).
        compute_dtype: dtype of the matrix products, e.g. ``torch.bfloat16``
            (products accumulate in float32 inside the kernel; maxima and pooling
            run in the inputs' dtype). ``None``: the inputs' dtype.

    Returns:
        ``scores[i, t]`` for every image ``i`` and caption ``t``, in the inputs' dtype.

    Raises:
        ValueError: unknown ``codebook`` / ``pooling``, temperature not > 0, shapes or
            feature dimensions that do not match, a row that is all padding, NaN or
            inf in real tokens.
        TypeError: non-tensor or non-float features, masks that are not bool.

    Shape:
        - images: ``(Bi, N, D)``, image_mask: ``(Bi, N)``
        - texts: ``(Bt, M, D)``, text_mask: ``(Bt, M)``
        - output: ``(Bi, Bt)``

    References:
        Pan, Wu and Zhang, "Fine-grained Image-text Matching by Cross-modal
        Hard Aligning Network", CVPR 2023, Eq. 3, 5-8.

    Example:
        >>> images, texts = torch.randn(4, 36, 64), torch.randn(6, 12, 64)
        >>> text_mask = torch.arange(12) < torch.tensor([[12], [9], [5], [7], [12], [3]])
        >>> hard_assignment_scores(images, texts, text_mask=text_mask).shape
        torch.Size([4, 6])
    """
    where = "hard_assignment_scores"
    textual = resolve_option(codebook, CODEBOOKS, name="codebook", where=where)
    pool = resolve_pooling(pooling, temperature, where=where)
    budget, compute_dtype = check_block_args(max_block_elements, compute_dtype, where=where)
    images, texts, image_mask, text_mask = check_pair_inputs(
        images, texts, image_mask, text_mask, where=where
    )
    if textual:
        # Regions query words: the same engine with the roles swapped, transposed back.
        scores = blocked_query_scores(
            texts,
            images,
            text_mask,
            image_mask,
            token_scores=max_over_keys,
            pool=pool,
            max_block_elements=budget,
            compute_dtype=compute_dtype,
        )
        return scores.t().contiguous()
    return blocked_query_scores(
        images,
        texts,
        image_mask,
        text_mask,
        token_scores=max_over_keys,
        pool=pool,
        max_block_elements=budget,
        compute_dtype=compute_dtype,
    )


def hard_assignment_from_cosines(
    sims: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    *,
    codebook: str = "visual",
    pooling: str = "lse",
    temperature: float = 0.1,
) -> torch.Tensor:
    r"""CHAN's hard assignment coding (Eq. 5-8) on given cosine matrices, one score per matrix.

    The reduction of :func:`hard_assignment_scores` for token sets that are not one image's
    tokens, e.g. LAPS's slimmed sets, different for every pair
    (:class:`~imtm.components.PatchSlimming` with CHAN as its alignment). With the visual codebook
    every word keeps its best image token and the words are pooled; with the textual codebook
    every image token keeps its best word and the image tokens are pooled. Padding is excluded
    on both sides. No input checks beyond the options (it runs inside blocked loops); every
    set must hold at least one valid token of each kind.

    Args:
        sims: cosines of image tokens (rows) and words (columns).
        image_mask: True where an image token is real; broadcasts against ``(..., N)``.
        text_mask: True where a word is real; broadcasts against ``(..., M)``.
        codebook, pooling, temperature: as :func:`hard_assignment_scores`.

    Shape:
        - sims: ``(..., N, M)``, image_mask: ``(..., N)``, text_mask: ``(..., M)``
        - output: ``(...)``

    Example:
        >>> A = torch.tensor([[[0.9, 0.1], [0.2, 0.4], [5.0, 5.0]]])
        >>> hard_assignment_from_cosines(A, torch.tensor([[True, True, False]]), pooling="mean")
        tensor([0.6500])
    """
    where = "hard_assignment_from_cosines"
    textual = resolve_option(codebook, CODEBOOKS, name="codebook", where=where)
    pool = resolve_pooling(pooling, temperature, where=where)
    if textual:  # every image token takes its best word, pooled over image tokens
        if text_mask is not None:
            sims = sims.masked_fill(~text_mask.unsqueeze(-2), -math.inf)
        return pool(sims.amax(-1), image_mask, -1)
    if image_mask is not None:  # every word takes its best image token, pooled over words
        sims = sims.masked_fill(~image_mask.unsqueeze(-1), -math.inf)
    return pool(sims.amax(-2), text_mask, -1)
