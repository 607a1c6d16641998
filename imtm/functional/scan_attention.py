r"""SCAN's text-to-image cross-attention score, for every image-caption pair in blocks.

LAPS's Table 4 swaps its sparse alignment for SCAN's; this is that alignment, as the LAPS
authors' code runs it (``xattn_score_t2i`` and ``func_attention`` in lib/xttn.py of
CrossmodalGroup/LAPS, read for this module): for each word, LeakyReLU(0.1) of the
region-word cosines, L2-normalised over the caption's words for each region, a softmax over
the regions with the smoothing factor ``lambda_1 = 9``, the cosine of the word with the
attended region vector, and the mean over the words.

References:
    Lee, Chen, Hua, Hu and He, "Stacked Cross Attention for Image-Text Matching", ECCV 2018,
    Eq. 1-4 (text-to-image, average pooling); Fu et al., "Linguistic-Aware Patch Slimming
    Framework for Fine-grained Cross-Modal Alignment", CVPR 2024, Table 4.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F

from imtm.functional.blocking import (
    blocked_pair_scores,
    check_block_args,
    check_pair_inputs,
    normalize_tokens,
)

__all__ = ["SCAN_SMOOTH", "scan_t2i_scores"]

#: SCAN's lambda_1, the inverse temperature of the attention softmax (``smooth=9.0`` in ``xattn_score_t2i``).
SCAN_SMOOTH = 9.0

#: SCAN's LeakyReLU slope on the region-word cosines (``negative_slope=0.1`` in ``func_attention``).
SCAN_NEGATIVE_SLOPE = 0.1


def scan_t2i_scores(
    images: torch.Tensor,
    texts: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    *,
    smooth: float = SCAN_SMOOTH,
    max_block_elements: int | None = None,
) -> torch.Tensor:
    r"""SCAN's text-to-image score of every image-caption pair (words attend over regions, AVG pooling).

    .. math::

        s_{ij} = \mathrm{LeakyReLU}_{0.1}(\cos(v_i, e_j)), \quad
        \bar s_{ij} = s_{ij} \Big/ \sqrt{\textstyle\sum_{j'} s_{ij'}^2}, \quad
        \alpha_{ij} = \mathrm{softmax}_i(\lambda_1 \bar s_{ij}), \quad
        a_j = \sum_i \alpha_{ij} \hat v_i

        S(I, T) = \frac{1}{M} \sum_j \cos(e_j, a_j) \qquad \text{(SCAN Eq. 1-4, t2i, AVG)}

    with :math:`\hat v_i` the unit region features (the authors normalise both sides first).
    The attended vectors are never built: :math:`\cos(e_j, a_j) = \sum_i \alpha_{ij} (\hat v_i
    \cdot \hat e_j) / \sqrt{\alpha_j^\top G \alpha_j}` with :math:`G` the regions' Gram matrix.
    Padded regions get no attention; padded words enter neither the normalisation nor the mean.

    Args:
        images: region (patch) features. texts: word features.
        image_mask, text_mask: True where a token is real; ``None``: all are.
        smooth: :math:`\lambda_1` (9 for text-to-image in SCAN and in LAPS's code).
        max_block_elements: at most about this many numbers per ``(b_i, N, Bt, M)`` block; ``None``:
            the device default.

    Returns:
        ``(Bi, Bt)`` scores in ``[-1, 1]``.

    Shape:
        - images: ``(Bi, N, D)``, image_mask: ``(Bi, N)``
        - texts: ``(Bt, M, D)``, text_mask: ``(Bt, M)``
        - output: ``(Bi, Bt)``

    Example:
        >>> scan_t2i_scores(torch.randn(2, 5, 8), torch.randn(3, 4, 8)).shape
        torch.Size([2, 3])
    """
    where = "scan_t2i_scores"
    if isinstance(smooth, bool) or not isinstance(smooth, Real) or not 0 < smooth < math.inf:
        raise ValueError(f"{where}: smooth must be a finite number > 0, got {smooth!r}")
    check_block_args(max_block_elements, None, where=where)
    images, texts, image_mask, text_mask = check_pair_inputs(
        images, texts, image_mask, text_mask, where=where
    )
    Bi, N, D = images.shape
    Bt, M, _ = texts.shape
    if Bi == 0 or Bt == 0:
        return torch.zeros(Bi, Bt, dtype=images.dtype, device=images.device)
    v = normalize_tokens(images, image_mask)  # (Bi, N, D), padding zero
    e = normalize_tokens(texts, text_mask)  # (Bt, M, D)
    gram = torch.bmm(v, v.transpose(1, 2))  # (Bi, N, N), image-only
    count = (
        torch.full((Bt,), float(M), dtype=images.dtype, device=images.device)
        if text_mask is None
        else text_mask.sum(1).to(images.dtype)
    )

    def reduce(cos, vm, tm, rows, cols):
        # cos: (nb, N, bt, M) region-word cosines of the block
        nb, _, bt, _ = cos.shape
        s = F.leaky_relu(cos, SCAN_NEGATIVE_SLOPE)
        wmask = None if tm is None else tm.view(1, 1, bt, M)
        if wmask is not None:
            s = s.masked_fill(~wmask, 0.0)
        # For each region, L2-normalise over the caption's words (func_attention's l2norm(attn, 2), eps 1e-8).
        # A row of zeros (a padded region) stays zero; sqrt is taken of 1 there, so no inf gradient.
        sq = s.pow(2).sum(-1, keepdim=True)
        s = s / (
            torch.where(sq > 0, sq, torch.ones((), dtype=sq.dtype, device=sq.device)).sqrt() + 1e-8
        )
        logits = smooth * s
        if vm is not None:
            logits = logits.masked_fill(~vm.view(nb, N, 1, 1), -math.inf)
        attn = logits.softmax(1)  # over the regions
        dots = (attn * cos).sum(1)  # (nb, bt, M): sum_i alpha_ij (v_i . e_j)
        ga = torch.bmm(gram[rows], attn.reshape(nb, N, bt * M)).view(nb, N, bt, M)
        sq_norm = (attn * ga).sum(1)  # |a_j|^2
        one = torch.ones((), dtype=sq_norm.dtype, device=sq_norm.device)
        word = dots / torch.where(sq_norm > 0, sq_norm, one).sqrt()
        if tm is not None:
            word = word.masked_fill(~tm.view(1, bt, M), 0.0)
        return word.sum(-1) / count[cols]

    return blocked_pair_scores(
        v,
        e,
        image_mask,
        text_mask,
        reduce=reduce,
        max_block_elements=max_block_elements,
        normalize=False,
        with_blocks=True,
    )
