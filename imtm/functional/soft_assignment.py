"""Soft-assignment coding (cross-attention), the baseline CHAN compares hard assignment with.

References:
    Pan, Wu and Zhang, "Fine-grained Image-text Matching by Cross-modal Hard
    Aligning Network", CVPR 2023, Sec. 3.1, Eq. 1-4.
"""

from __future__ import annotations

import functools
import math

import torch

from imtm.functional.blocking import (
    EPS,
    blocked_query_scores,
    check_block_args,
    check_pair_inputs,
    normalize_tokens,
    resolve_option,
)
from imtm.functional.hard_assignment import CODEBOOKS
from imtm.functional.pooling import check_temperature, resolve_pooling

__all__ = ["attended_cosine", "soft_assignment_scores"]


def attended_cosine(
    sims: torch.Tensor, key_mask: torch.Tensor | None, gram: torch.Tensor, *, tau: float
) -> torch.Tensor:
    r"""Cosine between each query token and its attention-weighted sum of key tokens.

    With unit-norm tokens, :math:`a_{ij} = \operatorname{softmax}_j(s_{ij}/\tau)`
    and :math:`\hat t_i = \sum_j a_{ij} v_j`,

    .. math::

        \cos(t_i, \hat t_i) = \frac{\sum_j a_{ij} s_{ij}}{\sqrt{a_i^\top G a_i}},
        \qquad G_{jk} = v_j^\top v_k

    so the attended vectors :math:`\hat t_i` (a ``(b, w, D)`` tensor) are never
    built: the numerator needs only the similarities and the norm only the
    ``K x K`` Gram matrix of each key set, ``K / D`` of the work of forming them.
    The :func:`~imtm.functional.blocking.blocked_query_scores` callback of
    :func:`soft_assignment_scores`.

    Args:
        sims: cosines of every key token with every query token (unit tokens,
            padded keys exactly zero).
        key_mask: True where a key token is real; ``None``: all are.
        gram: Gram matrices of the unit key tokens.
        tau: softmax temperature.

    Shape:
        - sims: ``(b, K, w)``, key_mask: ``(b, K)``, gram: ``(b, K, K)``
        - output: ``(b, w)``

    References:
        CHAN (Pan et al., CVPR 2023), Eq. 1, 2 and 4.

    Example:
        >>> v = torch.eye(2).unsqueeze(0)                     # two orthogonal unit keys
        >>> s = torch.tensor([[[1.0], [0.0]]])                # the query equals key 0
        >>> attended_cosine(s, None, v @ v.transpose(1, 2), tau=1e-3)
        tensor([[1.]])
    """
    sims = sims.to(gram.dtype)
    logits = sims / tau
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.unsqueeze(-1), -math.inf)
    attn = torch.softmax(logits, dim=1)
    # Padded keys are zero vectors, so their similarities are 0 (finite) and their weights 0.
    dot = (attn * sims).sum(1)
    sq_norm = (attn * torch.bmm(gram, attn)).sum(1)
    return dot / sq_norm.clamp_min(EPS * EPS).sqrt()


def soft_assignment_scores(
    images: torch.Tensor,
    texts: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    *,
    tau: float = 0.1,
    pooling: str = "lse",
    temperature: float = 0.1,
    codebook: str = "visual",
    max_block_elements: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Image-caption scores by soft assignment (cross-attention) coding, for every pair.

    With the visual codebook (default) every word ``t_i`` attends over the
    image's regions, and its score is the cosine with what it attended to:

    .. math::

        \hat t_i = \sum_j \operatorname{softmax}_j(s_{ij} / \tau)\, v_j \quad \text{(Eq. 2)},
        \qquad s(t_i, V) = \cos(t_i, \hat t_i) \quad \text{(Eq. 4, 1)}

    followed by the pooling over words (as in :func:`hard_assignment_scores`).
    Tokens are L2-normalised first, as CHAN's encoders do, so ``v_j`` are unit
    vectors. The textual codebook swaps the roles (regions attend over words,
    pooled over regions); that is the direction of the authors' ``VSACoding``.

    Computed blocked like hard assignment, and without any ``(Bi, Bt, M, D)``
    tensor: see :func:`attended_cosine`.

    Args:
        images: region or patch features (need not be normalised).
        texts: word features (need not be normalised).
        image_mask: True where a region is real; ``None``: all are.
        text_mask: True where a word is real; ``None``: all are.
        tau: temperature of the attention softmax.
        pooling: ``"max"``, ``"mean"``, ``"sum"``, ``"softmax"`` or ``"lse"``.
        temperature: ``T = 1 / lambda`` of the softmax and log-sum-exp poolings.
        codebook: ``"visual"`` (words attend over regions) or ``"textual"``.
        max_block_elements: at most this many token similarities exist at once.
        compute_dtype: dtype of the matrix products (e.g. ``torch.bfloat16``); the
            attention and cosines run in the inputs' dtype. ``None``: the inputs'.

    Returns:
        ``scores[i, t]`` for every image ``i`` and caption ``t``, in the inputs' dtype.

    Raises:
        ValueError / TypeError: as :func:`hard_assignment_scores`, and for ``tau`` not > 0.

    Shape:
        - images: ``(Bi, N, D)``, image_mask: ``(Bi, N)``
        - texts: ``(Bt, M, D)``, text_mask: ``(Bt, M)``
        - output: ``(Bi, Bt)``

    References:
        Pan, Wu and Zhang, "Fine-grained Image-text Matching by Cross-modal
        Hard Aligning Network", CVPR 2023, Eq. 1-4 (soft assignment, their
        cross-attention baseline, as in SCAN by Lee et al., ECCV 2018).

    Example:
        >>> soft_assignment_scores(torch.randn(4, 36, 64), torch.randn(6, 12, 64), tau=0.1).shape
        torch.Size([4, 6])
    """
    where = "soft_assignment_scores"
    textual = resolve_option(codebook, CODEBOOKS, name="codebook", where=where)
    pool = resolve_pooling(pooling, temperature, where=where)
    tau = check_temperature(tau, name="tau", where=where)
    budget, compute_dtype = check_block_args(max_block_elements, compute_dtype, where=where)
    images, texts, image_mask, text_mask = check_pair_inputs(
        images, texts, image_mask, text_mask, where=where
    )
    if textual:
        images, texts, image_mask, text_mask = texts, images, text_mask, image_mask
    # Normalised once here (not in the engine) because the Gram matrices need the unit keys too.
    keys = normalize_tokens(images, image_mask)
    queries = normalize_tokens(texts, text_mask)
    gram = torch.bmm(keys, keys.transpose(1, 2))
    scores = blocked_query_scores(
        keys,
        queries,
        image_mask,
        text_mask,
        token_scores=functools.partial(attended_cosine, tau=tau),
        pool=pool,
        key_context=gram,
        max_block_elements=budget,
        compute_dtype=compute_dtype,
        normalize=False,
    )
    return scores.t().contiguous() if textual else scores
