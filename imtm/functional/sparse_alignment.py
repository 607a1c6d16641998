"""LAPS's sparse patch-word alignment: bidirectional max-mean over the token cosine matrix.

References:
    Fu, Zhang, Chen, Sun and Xie, "Linguistic-Aware Patch Slimming Framework
    for Fine-grained Cross-Modal Alignment", CVPR 2024, Sec. 3.4, Eq. 8.
"""

from __future__ import annotations

import math

import torch

from imtm.functional.blocking import (
    blocked_pair_scores,
    check_block_args,
    check_pair_inputs,
    resolve_option,
)

__all__ = ["DIRECTIONS", "sparse_alignment_from_cosines", "sparse_alignment_scores"]

#: Which halves of Eq. 8 to sum: both (the paper), or one of them (the ablations of its Table 4).
#: Each value is ``(patch_to_word, word_to_patch)``.
DIRECTIONS: dict[str, tuple[bool, bool]] = {
    "both": (True, True),
    "patch_to_word": (True, False),
    "word_to_patch": (False, True),
}


def _masked_max_mean(sims: torch.Tensor, max_mask, mean_mask, max_dim: int) -> torch.Tensor:
    # max over max_dim (padding excluded), then the mean over the remaining token axis (padding
    # excluded). where() rather than products: padding may hold NaN or inf.
    if max_mask is not None:
        sims = sims.masked_fill(~max_mask, -math.inf)
    best = sims.amax(dim=max_dim)
    if mean_mask is None:
        return best.mean(-1)
    best = torch.where(mean_mask, best, torch.zeros((), dtype=best.dtype, device=best.device))
    return best.sum(-1) / mean_mask.sum(-1).clamp_min(1).to(best.dtype)


def sparse_alignment_from_cosines(
    sims: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    *,
    direction: str = "both",
) -> torch.Tensor:
    r"""Eq. 8 of LAPS on given cosine matrices, one score per matrix.

    .. math::

        S(I, T) = \frac{1}{N} \sum_{i=1}^{N} \max_j A_{ij}
                + \frac{1}{M} \sum_{j=1}^{M} \max_i A_{ij} \qquad \text{(Eq. 8)}

    over the valid tokens only. The reduction under :func:`sparse_alignment_scores`
    and under :class:`~imtm.components.PatchSlimming`, whose slimmed token sets
    differ for every pair. No validation (it runs inside blocked loops); every set
    must hold at least one valid token of each kind.

    Args:
        sims: cosines ``A`` of image tokens (rows) and words (columns).
        image_mask: True where an image token is real; broadcasts against ``(..., N)``.
        text_mask: True where a word is real; broadcasts against ``(..., M)``.
        direction: ``"both"`` (Eq. 8), ``"patch_to_word"`` (first sum only) or
            ``"word_to_patch"`` (second sum only).

    Shape:
        - sims: ``(..., N, M)``, image_mask: ``(..., N)``, text_mask: ``(..., M)``
        - output: ``(...)``

    Example:
        >>> A = torch.tensor([[[0.9, 0.1], [0.2, 0.4], [5.0, 5.0]]])
        >>> sparse_alignment_from_cosines(A, torch.tensor([[True, True, False]]))
        tensor([1.3000])
    """
    p2w, w2p = resolve_option(
        direction, DIRECTIONS, name="direction", where="sparse_alignment_from_cosines"
    )
    if image_mask is not None and text_mask is not None:
        # One fill serves both halves: a padded word is -inf for every token's max and a padded
        # token for every word's, and the rows or columns of padding itself are left out of the
        # means. One pass over the cosines instead of two (and one in the backward), and padding
        # that holds NaN gets a zero gradient (a row of padding with NaN left in it would not).
        sims = sims.masked_fill(~(image_mask.unsqueeze(-1) & text_mask.unsqueeze(-2)), -math.inf)
        image_mask_for_max = text_mask_for_max = None
    else:
        image_mask_for_max, text_mask_for_max = image_mask, text_mask
    total = None
    if p2w:
        # every image token takes its best word; mean over image tokens
        wm = None if text_mask_for_max is None else text_mask_for_max.unsqueeze(-2)
        total = _masked_max_mean(sims, wm, image_mask, max_dim=-1)
    if w2p:
        # every word takes its best image token; mean over words
        im = None if image_mask_for_max is None else image_mask_for_max.unsqueeze(-1)
        part = _masked_max_mean(sims, im, text_mask, max_dim=-2)
        total = part if total is None else total + part
    assert total is not None  # DIRECTIONS maps every option to at least one direction
    return total


def sparse_alignment_scores(
    images: torch.Tensor,
    texts: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    *,
    direction: str = "both",
    max_block_elements: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Sparse patch-word alignment scores for every image and caption (LAPS, Eq. 8).

    With :math:`A_{ij} = \cos(v_i, t_j)` the cosine of image token ``i`` and word ``j``,

    .. math::

        S(I, T) = \frac{1}{N} \sum_{i=1}^{N} \max_j A_{ij}
                + \frac{1}{M} \sum_{j=1}^{M} \max_i A_{ij} \qquad \text{(Eq. 8)}

    with the means and maxima over valid tokens only. Computed blocked (see
    :func:`~imtm.functional.blocking.blocked_pair_scores`): one matrix product per
    block of images x captions, never a ``(Bi, Bt, N, M)`` tensor beyond the block
    budget, and the result does not depend on the block size.

    Args:
        images: image token features (need not be normalised).
        texts: word features (need not be normalised).
        image_mask: True where an image token is real; ``None``: all are.
        text_mask: True where a word is real; ``None``: all are.
        direction: ``"both"`` (Eq. 8), ``"patch_to_word"`` or ``"word_to_patch"`` (one half).
        max_block_elements: at most this many token cosines exist at once; ``None``: the default.
        compute_dtype: dtype of the matrix products (e.g. ``torch.bfloat16``); ``None``: the inputs'.

    Returns:
        ``scores[i, t]`` in ``[-2, 2]`` (``[-1, 1]`` for one direction).

    Raises:
        ValueError: unknown ``direction``, mismatched shapes or feature dimensions, a row
            that is all padding, NaN or inf in real tokens, a bad block budget.
        TypeError: non-tensor or non-float features, masks that are not bool.

    Shape:
        - images: ``(Bi, N, D)``, image_mask: ``(Bi, N)``
        - texts: ``(Bt, M, D)``, text_mask: ``(Bt, M)``
        - output: ``(Bi, Bt)``

    References:
        Fu et al., "Linguistic-Aware Patch Slimming Framework for Fine-grained
        Cross-Modal Alignment", CVPR 2024, Eq. 8.

    Example:
        >>> sparse_alignment_scores(torch.randn(3, 10, 16), torch.randn(4, 7, 16)).shape
        torch.Size([3, 4])
    """
    where = "sparse_alignment_scores"
    resolve_option(direction, DIRECTIONS, name="direction", where=where)
    budget, compute_dtype = check_block_args(max_block_elements, compute_dtype, where=where)
    out_dtype = (
        torch.promote_types(images.dtype, texts.dtype)
        if isinstance(images, torch.Tensor) and isinstance(texts, torch.Tensor)
        else None
    )
    images, texts, image_mask, text_mask = check_pair_inputs(
        images, texts, image_mask, text_mask, where=where
    )

    def reduce(sims, vm, tm):
        # (b_i, N, b_t, M) -> (b_i, b_t, N, M), in the inputs' dtype
        sims = sims.permute(0, 2, 1, 3).to(out_dtype)
        vm = None if vm is None else vm[:, None, :]
        tm = None if tm is None else tm[None, :, :]
        return sparse_alignment_from_cosines(sims, vm, tm, direction=direction)

    return blocked_pair_scores(
        images,
        texts,
        image_mask,
        text_mask,
        reduce=reduce,
        max_block_elements=budget,
        compute_dtype=compute_dtype,
    )
