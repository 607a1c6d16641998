r"""DIAS's local matching framework (Eq. 1-3): both sides updated from the other, pooled, then one cosine.

For an image with regions :math:`v_i` and a caption with words :math:`t_j`, with
:math:`s_{ij} = \sigma_l(v_i, t_j)` the cosine (the paper's default correlation
function, Sec. 4.1):

.. math::

    \hat v_i = \sum_j \frac{s_{ij}}{\sum_{j'} s_{ij'}}\, t_j, \qquad
    \hat t_j = \sum_i \frac{s_{ij}}{\sum_{i'} s_{i'j}}\, v_i \qquad (1)

    \hat V = \frac{1}{N} \sum_i \hat v_i, \qquad \hat T = \frac{1}{M} \sum_j \hat t_j \qquad (2)

    S(V, T) = \sigma_g(\hat V, \hat T) = \cos(\hat V, \hat T) \qquad (3)

Shape letters follow :mod:`imtm.tokens`: ``Bi`` images, ``Bt`` captions, ``N``
regions, ``M`` words, ``D`` feature dimension.

References:
    Ma, Li, Fang and Zhang, "Bridging the Modality Gap: Dimension Information Alignment and
    Sparse Spatial Constraint for Image-Text Matching", ACM MM 2024, Eq. 1-3 and Sec. 4.1.
"""

from __future__ import annotations

import math

import torch

from imtm.functional.blocking import (
    EPS,
    blocked_pair_scores,
    check_block_args,
    check_pair_inputs,
    normalize_tokens,
    resolve_option,
)
from imtm.functional.pooling import check_temperature

__all__ = ["LOCAL_WEIGHTINGS", "local_matching_scores", "local_weights"]


def _linear(s: torch.Tensor, mask: torch.Tensor, dim: int, tau: float) -> torch.Tensor:
    # Eq. 1 as printed, s_ij / sum_j s_ij, over clamped cosines: a negative cosine would
    # otherwise give a negative weight, and a sum that vanishes or turns negative a weight
    # of either sign and any size. Clamping at 0 is SCAN's treatment of negative
    # similarities (Lee et al. 2018, Sec. 3.1: max(x, 0) before normalising).
    # ``mask`` broadcasts against ``s`` and has its full size along ``dim`` (never expanded here:
    # the full-size copies would cost more than the arithmetic).
    keep = mask.to(s.dtype)
    # where(), not a product with the mask: a NaN or inf in a padded position must not reach the sums.
    pos = torch.where(mask, s.clamp_min(0), torch.zeros((), dtype=s.dtype, device=s.device))
    total = pos.sum(dim, keepdim=True)
    uniform = keep / keep.sum(dim, keepdim=True).clamp_min(1)
    # Where every clamped cosine is 0 (all similarities <= 0) the weights are uniform: the
    # limit of s_ij / sum_j s_ij when all s_ij are equal.
    return torch.where(total > EPS, pos / total.clamp_min(EPS), uniform)


def _softmax(s: torch.Tensor, mask: torch.Tensor, dim: int, tau: float) -> torch.Tensor:
    return torch.softmax((s / tau).masked_fill(~mask, -math.inf), dim=dim)


#: :math:`\sigma_l`'s normalisation in Eq. 1: ``"linear"`` (as printed, with negative cosines
#: clamped to 0) or ``"softmax"`` (:math:`\operatorname{softmax}(s / \tau)`, SCAN's attention).
LOCAL_WEIGHTINGS = {"linear": _linear, "softmax": _softmax}


def local_weights(
    sims: torch.Tensor,
    mask: torch.Tensor,
    dim: int,
    *,
    weighting: str = "softmax",
    tau: float = 0.1,
) -> torch.Tensor:
    r"""The weights of Eq. 1 along ``dim``: each row of ``sims`` turned into a distribution.

    ``"linear"``: :math:`w_{j} = s^+_{j} / \sum_{j'} s^+_{j'}` with :math:`s^+ = \max(s, 0)`,
    uniform over the real tokens where every :math:`s^+` is 0; ``"softmax"``:
    :math:`\operatorname{softmax}_j(s_j / \tau)`. Positions where ``mask`` is False get 0.

    Shape:
        - sims: any shape; mask: broadcastable to it
        - output: the shape of ``sims``; sums to 1 along ``dim`` wherever ``mask`` has a True

    Example:
        >>> local_weights(torch.tensor([[0.6, -0.2, 0.2]]), torch.ones(1, 3, dtype=torch.bool), -1, weighting="linear")
        tensor([[0.7500, 0.0000, 0.2500]])
    """
    where = "local_weights"
    fn = resolve_option(weighting, LOCAL_WEIGHTINGS, name="weighting", where=where)
    tau = check_temperature(tau, name="tau", where=where)
    return fn(sims, mask.expand_as(sims), dim, tau)


def _block_scores(s, vm, tm, gram_v, gram_t, weigh, tau):
    """Eq. 1-3 for every pair of a block, from its unit-token cosines ``s`` (bi, bt, N, M) -> (bi, bt)."""
    word_mask = tm[None, :, None, :]
    region_mask = vm[:, None, :, None]
    # Eq. 1: region i becomes the weighted mean of the words (weights along M), word j the
    # weighted mean of the regions (weights along N).
    to_words = weigh(s, word_mask, -1, tau)
    to_regions = weigh(s, region_mask, -2, tau)
    # Eq. 2: V_hat = mean_i v_hat_i = sum_j alpha_j t_j and T_hat = mean_j t_hat_j = sum_i beta_i v_i.
    n_regions = vm.sum(1).to(s.dtype)[:, None, None]
    n_words = tm.sum(1).to(s.dtype)[None, :, None]
    # Padded tokens are zero vectors, so their cosines are 0 and, above, their weights 0 along the
    # normalised axis; the masks here drop the padded rows of the other axis.
    alpha = (to_words * region_mask).sum(-2) / n_regions  # (bi, bt, M)
    beta = (to_regions * word_mask).sum(-1) / n_words  # (bi, bt, N)
    # Eq. 3: cos(V_hat, T_hat) without forming the (bi, bt, D) vectors: V_hat . T_hat = beta^T s alpha,
    # |V_hat|^2 = alpha^T G_t alpha, |T_hat|^2 = beta^T G_v beta (G the Gram matrices of the unit tokens).
    dot = ((s * alpha.unsqueeze(-2)).sum(-1) * beta).sum(-1)
    sq_v = (torch.einsum("itm,tmk->itk", alpha, gram_t) * alpha).sum(-1)
    sq_t = (torch.einsum("itn,ink->itk", beta, gram_v) * beta).sum(-1)
    return dot / (sq_v.clamp_min(EPS * EPS).sqrt() * sq_t.clamp_min(EPS * EPS).sqrt())


def local_matching_scores(
    images: torch.Tensor,
    texts: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    *,
    weighting: str = "softmax",
    tau: float = 0.1,
    max_block_elements: int | None = None,
) -> torch.Tensor:
    r"""Image-caption scores of DIAS's local matching framework (Eq. 1-3), for every pair.

    For image ``b`` with unit regions :math:`v_i` and caption ``c`` with unit words
    :math:`t_j`, :math:`s_{ij} = \cos(v_i, t_j)`:

    .. math::

        \hat v_i = \sum_j w^{T}_{ij}\, t_j,\ w^{T}_{ij} = \frac{s_{ij}}{\sum_{j'} s_{ij'}}; \qquad
        \hat t_j = \sum_i w^{V}_{ij}\, v_i,\ w^{V}_{ij} = \frac{s_{ij}}{\sum_{i'} s_{i'j}} \qquad (1)

        \hat V = \operatorname{mean}_i \hat v_i, \quad \hat T = \operatorname{mean}_j \hat t_j \quad (2),
        \qquad S = \cos(\hat V, \hat T) \quad (3)

    ``weighting`` chooses the normalisation of Eq. 1 (:func:`local_weights`):

    - ``"linear"``: the printed :math:`s_{ij} / \sum_{j'} s_{ij'}`, on cosines clamped at 0
      (as SCAN clamps negative similarities). The printed ratio is undefined where the
      sum vanishes and changes sign with it; clamped, every weight is in ``[0, 1]``, and a
      row whose cosines are all at most 0 gets uniform weights.
    - ``"softmax"``: :math:`\operatorname{softmax}_j(s_{ij} / \tau)`.

    Tokens are L2-normalised first (padded ones are exact zeros and take no weight).
    The scores are cosines, in ``[-1, 1]``. Memory: one block holds at most
    ``max_block_elements`` token similarities (a few tensors of that size); no
    ``(Bi, Bt, D)`` tensor is built. The same pair gets the same score in any block.

    Args:
        images: region features.
        texts: word features.
        image_mask: True where a region is real; ``None``: all are.
        text_mask: True where a word is real; ``None``: all are.
        weighting: ``"softmax"`` (default, measured better in ``docs/dias.md``) or ``"linear"`` (as printed).
        tau: temperature of ``"softmax"``.
        max_block_elements: at most this many token similarities at once; ``None``: the default.

    Returns:
        ``scores[b, c]`` for every image ``b`` and caption ``c``.

    Raises:
        ValueError / TypeError: inputs as :func:`~imtm.functional.blocking.check_pair_inputs`
            refuses them, an unknown ``weighting``, ``tau`` not > 0, a bad budget.

    Shape:
        - images: ``(Bi, N, D)``, image_mask: ``(Bi, N)``
        - texts: ``(Bt, M, D)``, text_mask: ``(Bt, M)``
        - output: ``(Bi, Bt)``

    References:
        Ma et al., "Bridging the Modality Gap: Dimension Information Alignment and Sparse
        Spatial Constraint for Image-Text Matching", ACM MM 2024, Eq. 1-3; Lee et al., "Stacked
        Cross Attention for Image-Text Matching" (SCAN), ECCV 2018 (the clamp and the softmax).

    Example:
        >>> s = local_matching_scores(torch.randn(3, 5, 8), torch.randn(4, 6, 8))
        >>> s.shape, bool((s.abs() <= 1 + 1e-6).all())
        (torch.Size([3, 4]), True)
    """
    where = "local_matching_scores"
    weigh = resolve_option(weighting, LOCAL_WEIGHTINGS, name="weighting", where=where)
    tau = check_temperature(tau, name="tau", where=where)
    budget, _ = check_block_args(max_block_elements, None, where=where)
    images, texts, image_mask, text_mask = check_pair_inputs(
        images, texts, image_mask, text_mask, where=where
    )
    bi_all, n, _ = images.shape
    bt_all, m, _ = texts.shape
    if image_mask is None:
        image_mask = torch.ones(bi_all, n, dtype=torch.bool, device=images.device)
    if text_mask is None:
        text_mask = torch.ones(bt_all, m, dtype=torch.bool, device=texts.device)
    if bi_all == 0 or bt_all == 0:
        return images.new_zeros(bi_all, bt_all)
    v = normalize_tokens(images, image_mask)
    t = normalize_tokens(texts, text_mask)
    gram_v = torch.bmm(v, v.transpose(1, 2))
    gram_t = torch.bmm(t, t.transpose(1, 2))

    def reduce(sims, _vm, _tm, rows, cols):
        s = sims.permute(0, 2, 1, 3)  # (bi, bt, N, M): s_ij for every pair of the block
        return _block_scores(
            s, image_mask[rows], text_mask[cols], gram_v[rows], gram_t[cols], weigh, tau
        )

    # The block holds a few (bi, bt, N, M) tensors at once (weights along both axes).
    return blocked_pair_scores(
        v,
        t,
        reduce=reduce,
        max_block_elements=budget,
        normalize=False,
        with_blocks=True,
    )
