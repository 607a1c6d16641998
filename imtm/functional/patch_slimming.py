r"""LAPS's language-context patch slimming, as pure tensor functions.

For one image ``I`` (patches :math:`v_1..v_N`, optionally a [CLS] token) and one
caption ``T`` (words :math:`t_1..t_M`), LAPS

1. scores every patch with a learned prediction :math:`a^p` (Eq. 1), the
   image's own attention :math:`a^s` and the caption's attention :math:`a^r` (both Eq. 2),
   combined (Eq. 3);
2. keeps patches by Gumbel-softmax decisions in training (Eq. 4-5), the top
   :math:`N_s = \lceil \rho N \rceil` at inference;
3. merges the kept patches into :math:`N_c` tokens with learned softmax weights
   (Eq. 6-7, the semantic-spatial patch calibration of Sec. 3.3) and the dropped ones
   into one fused token;
4. aligns the slimmed set with the words (Eq. 8).

Only :math:`a^r`, the decisions and the masked softmaxes depend on the pair.
:func:`slimmed_cosines` gives the cosines of the slimmed tokens with the words
without building them: the aggregated token's dot product with a word is
:math:`W^\top` applied to the patch-word dot products, and its norm comes from the
image's Gram matrix.

Positions: every function here works on *patch* positions only (prefix tokens
such as [CLS] are not scored; :class:`~imtm.components.PatchSlimming` keeps them).

References:
    Fu, Zhang, Xia and Mao, "Linguistic-Aware Patch Slimming Framework
    for Fine-grained Cross-Modal Alignment", CVPR 2024, Sec. 3.2-3.5, Eq. 1-10.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real

import torch

from imtm.functional.blocking import (
    blocked_pair_scores,
    check_block_args,
    check_pair_inputs,
    normalize_tokens,
    order_by_extent,
)
from imtm.functional.sparse_alignment import sparse_alignment_from_cosines

__all__ = [
    "COSINE_ROUTES",
    "NORM_EPS",
    "masked_softmax",
    "SIGNIFICANCE_EPS",
    "aggregate_tokens",
    "aggregated_cosines",
    "aggregated_tokens",
    "aggregation_weights",
    "cheaper_cosine_route",
    "combine_significance",
    "cosine_route_costs",
    "dpc_knn_weights",
    "fusion_weights",
    "gumbel_keep_decisions",
    "logistic_noise",
    "minmax_normalize",
    "num_kept",
    "patch_slimming_scores",
    "ratio_loss",
    "SlimmingOutput",
    "self_attentive_scores",
    "slimmed_cosines",
    "text_attentive_scores",
    "token_cosines",
    "top_keep_decisions",
    "weighted_cosine",
    "weighted_tokens",
]

#: Clamp of the significance before its logarithm (Eq. 4): a score of exactly 0 or 1 gives
#: log(1e-6) = -13.8 instead of -inf, so the Gumbel logits (and their gradients) stay finite.
SIGNIFICANCE_EPS = 1e-6

#: Floor of the range in the min-max normalisation (Eq. 2): constant scores map to 0, not NaN.
NORM_EPS = 1e-12

#: Slack of ceil(rho * N): 0.7 * 10 is 7.000000000000001 in floating point and must keep 7, not 8.
_CEIL_SLACK = 1e-6


def _fill(x: torch.Tensor, mask: torch.Tensor | None, value: float) -> torch.Tensor:
    if mask is None:
        return x
    return torch.where(mask, x, torch.full((), value, dtype=x.dtype, device=x.device))


# ---------------------------------------------------------------------------- significance (Eq. 1-3)
def minmax_normalize(
    x: torch.Tensor, mask: torch.Tensor | None = None, *, dim: int = -1
) -> torch.Tensor:
    r"""``Norm`` of LAPS Eq. 2 (both scores): map the valid entries along ``dim`` linearly onto ``[0, 1]``.

    .. math::

        \operatorname{Norm}(x)_i = \frac{x_i - \min_k x_k}{\max_k x_k - \min_k x_k}

    The paper leaves ``Norm`` unspecified beyond "to [0, 1]"; min-max over the valid
    patches of each image is the reading settled here. Constant inputs give 0;
    invalid positions give 0.

    Shape:
        - x: ``(..., N, ...)``, mask: broadcastable to ``x``, output: as ``x``

    Example:
        >>> minmax_normalize(torch.tensor([2.0, 4.0, 3.0, 99.0]), torch.tensor([True, True, True, False]))
        tensor([0.0000, 1.0000, 0.5000, 0.0000])
    """
    lo = _fill(x, mask, math.inf).amin(dim, keepdim=True)
    hi = _fill(x, mask, -math.inf).amax(dim, keepdim=True)
    span = (hi - lo).clamp_min(NORM_EPS)
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    return _fill((x - lo) / span, mask, 0.0)


def self_attentive_scores(
    patches: torch.Tensor, patch_mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""LAPS Eq. 2 (its first score): :math:`a^s_i = \operatorname{Norm}(v_i \cdot v_{glo} / d)`, the image's own attention.

    :math:`v_{glo}` is the mean of the image's real patches. Image-only: computed once
    per image.

    Shape:
        - patches: ``(Bi, N, D)``, patch_mask: ``(Bi, N)``, output: ``(Bi, N)``

    Example:
        >>> self_attentive_scores(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5])
    """
    d = patches.shape[-1]
    if patch_mask is None:
        glo = patches.mean(1)
    else:
        w = patch_mask.to(patches.dtype).unsqueeze(-1)
        glo = _fill(patches, patch_mask.unsqueeze(-1), 0.0).sum(1) / w.sum(1).clamp_min(1)
    raw = torch.einsum("bnd,bd->bn", patches, glo) / d
    return minmax_normalize(raw, patch_mask, dim=1)


def text_attentive_scores(
    patches: torch.Tensor, text_context: torch.Tensor, patch_mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""LAPS Eq. 2 (its second score): :math:`a^r_i = \operatorname{Norm}(v_i \cdot t_{glo} / d)`, for every image and caption.

    :math:`t_{glo}` is a caption's mean word feature (one row of ``text_context``).
    Every image is scored against every caption with one matrix product.

    Shape:
        - patches: ``(Bi, N, D)``, text_context: ``(Bt, D)``, patch_mask: ``(Bi, N)``
        - output: ``(Bi, N, Bt)`` (layout image, patch, caption)

    Example:
        >>> text_attentive_scores(torch.randn(2, 5, 8), torch.randn(3, 8)).shape
        torch.Size([2, 5, 3])
    """
    d = patches.shape[-1]
    raw = torch.matmul(patches, text_context.t()) / d
    return minmax_normalize(raw, None if patch_mask is None else patch_mask.unsqueeze(-1), dim=1)


def combine_significance(
    predicted: torch.Tensor,
    self_scores: torch.Tensor | None,
    text_scores: torch.Tensor | None,
    *,
    beta: float = 0.8,
) -> torch.Tensor:
    r"""LAPS Eq. 3: :math:`a_i = (1 - \beta)\, a^p_i + \frac{\beta}{2} (a^s_i + a^r_i)`.

    Leaving one of :math:`a^s`, :math:`a^r` out (``None``, the ablations of the
    paper's Table 4) gives the other the whole weight :math:`\beta`, so that ``a``
    stays in ``[0, 1]``.

    Shape:
        - all inputs broadcast to one shape, the output's.

    Example:
        >>> combine_significance(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.5]), beta=0.8)
        tensor([0.4000])
    """
    parts = [s for s in (self_scores, text_scores) if s is not None]
    if not parts:
        return predicted
    context = parts[0] if len(parts) == 1 else (parts[0] + parts[1]) / 2
    return (1 - beta) * predicted + beta * context


# ---------------------------------------------------------------------------- decisions (Eq. 4-5)
def logistic_noise(
    shape, *, generator: torch.Generator | None = None, dtype=torch.float32, device=None
) -> torch.Tensor:
    r"""The difference of two independent Gumbel(0, 1) draws (a standard logistic variable).

    Two-class Gumbel-softmax only ever uses :math:`G_{keep} - G_{drop}`. Drawn from
    ``generator`` (torch's ``gumbel_softmax`` takes none), as :math:`-\log E_1 + \log E_2`
    with :math:`E_k \sim \operatorname{Exp}(1)` floored at the smallest normal number.

    Example:
        >>> logistic_noise((2, 3), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([2, 3])
    """
    e = torch.empty((2, *shape), dtype=dtype, device=device).exponential_(generator=generator)
    e = e.clamp_min(torch.finfo(dtype).tiny)
    return e[1].log() - e[0].log()


def gumbel_keep_decisions(
    scores: torch.Tensor,
    tau: float = 1.0,
    hard: bool = True,
    *,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    eps: float = SIGNIFICANCE_EPS,
) -> torch.Tensor:
    r"""Differentiable keep/drop decisions from significance scores (LAPS Eq. 4-5).

    Gumbel-softmax over the two classes {keep, drop} with logits
    :math:`\log a_i` and :math:`\log(1 - a_i)`:

    .. math::

        \tilde D_i = \frac{\exp((\log a_i + G_{i,1}) / \tau)}
                          {\exp((\log a_i + G_{i,1}) / \tau) + \exp((\log(1 - a_i) + G_{i,2}) / \tau)}
        \quad \text{(Eq. 4)}, \qquad
        D_i = \mathbb{1}[\tilde D_i > 1/2] \quad \text{(Eq. 5)}

    The paper prints :math:`\log(m + G)`; the standard form :math:`(\log m + G)/\tau`
    is meant and used here. With ``hard`` the forward value is exactly 0 or 1 and the
    gradient is that of :math:`\tilde D` (straight-through). ``a`` is clamped to
    ``[eps, 1 - eps]`` before the logarithms, so scores of exactly 0 or 1 give finite
    logits and gradients.

    Args:
        scores: significance ``a`` in ``[0, 1]``.
        tau: Gumbel-softmax temperature, > 0.
        hard: exact 0/1 decisions with straight-through gradients, or the soft ones.
        mask: True where a patch may be kept; elsewhere the decision is exactly 0.
        generator: source of the Gumbel noise; ``None``: torch's default generator.
        noise: pre-drawn :func:`logistic_noise` (:math:`G_{i,1} - G_{i,2}`) of ``scores``'
            shape, instead of drawing (so that blocked and unblocked runs agree).
        eps: the clamp of ``a`` (:data:`SIGNIFICANCE_EPS`).

    Shape:
        - scores: ``(*)``, mask: broadcastable to ``(*)``, output: ``(*)``

    References:
        Jang, Gu and Poole, "Categorical Reparameterization with Gumbel-Softmax",
        ICLR 2017; LAPS Eq. 4-5.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> d = gumbel_keep_decisions(torch.tensor([0.0, 0.5, 1.0]), generator=g)
        >>> sorted(set(d.tolist())) <= [0.0, 1.0]
        True
    """
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError(
            f"gumbel_keep_decisions: scores must be a floating tensor, got {getattr(scores, 'dtype', type(scores).__name__)}"
        )
    if isinstance(tau, bool) or not isinstance(tau, Real) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"gumbel_keep_decisions: tau must be a finite number > 0, got {tau!r}")
    if not 0 < eps < 0.5:
        raise ValueError(f"gumbel_keep_decisions: eps must lie in (0, 0.5), got {eps!r}")
    if noise is None:
        noise = logistic_noise(
            scores.shape, generator=generator, dtype=scores.dtype, device=scores.device
        )
    elif noise.shape != scores.shape:
        raise ValueError(
            f"gumbel_keep_decisions: noise has shape {tuple(noise.shape)}, scores {tuple(scores.shape)}"
        )
    # In float32 at least: in bfloat16 / float16 1 - eps rounds to 1, so a score of 1 would give
    # an infinite logit (and NaN gradients on torch 2.4, whose clamp passes them at its bound).
    work = torch.promote_types(scores.dtype, torch.float32)
    a = scores.to(work).clamp(eps, 1 - eps)
    # (log a + G1) - (log(1 - a) + G2): the two-class softmax is the sigmoid of this difference.
    logit = torch.log(a) - torch.log1p(-a) + noise.to(work)
    soft = torch.sigmoid(logit / tau)
    if hard:
        decision = (logit > 0).to(work)
        soft = decision + (soft - soft.detach())
    soft = soft.to(scores.dtype)
    if mask is not None:
        soft = torch.where(mask, soft, torch.zeros((), dtype=soft.dtype, device=soft.device))
    return soft


def num_kept(num_patches: torch.Tensor, ratio: float) -> torch.Tensor:
    r""":math:`N_s = \lceil \rho N \rceil`, at least 1 where ``N >= 1`` (LAPS Sec. 3.5).

    Example:
        >>> num_kept(torch.tensor([196, 10, 1]), 0.5).tolist()
        [98, 5, 1]
    """
    n = num_patches.to(torch.float64)
    k = torch.ceil(n * ratio - _CEIL_SLACK)
    return torch.minimum(k.clamp_min(1), n).to(torch.long)


def top_keep_decisions(
    scores: torch.Tensor, ratio: float = 0.5, mask: torch.Tensor | None = None, *, dim: int = -1
) -> torch.Tensor:
    r"""Inference decisions: keep the :math:`N_s = \lceil \rho N \rceil` most significant patches.

    ``N`` counts the valid patches of each set; ties go to the lower position.

    Shape:
        - scores: ``(*)``, mask: broadcastable to ``scores``, output: as ``scores``
          (0/1, in ``scores``' dtype)

    Example:
        >>> top_keep_decisions(torch.tensor([[0.1, 0.9, 0.5, 0.3]]), 0.5)
        tensor([[0., 1., 1., 0.]])
    """
    dim = dim % scores.dim()
    n_pos = scores.shape[dim]
    if mask is not None:
        mask = mask.expand_as(scores)
    filled = _fill(scores.detach(), mask, -math.inf)
    order = filled.argsort(dim=dim, descending=True, stable=True)
    along = [1] * scores.dim()
    along[dim] = n_pos
    positions = torch.arange(n_pos, device=scores.device).view(along).expand_as(order)
    ranks = torch.empty_like(order).scatter_(dim, order, positions)
    if mask is None:
        one = list(scores.shape)
        one[dim] = 1
        n = torch.full(one, n_pos, dtype=torch.long, device=scores.device)
    else:
        n = mask.sum(dim, keepdim=True)
    keep = ranks < num_kept(n, ratio)
    if mask is not None:
        keep = keep & mask
    return keep.to(scores.dtype)


# ---------------------------------------------------------------------------- aggregation (Eq. 6-7) and fusion
def masked_softmax(logits: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """``keep * exp(logits) / sum(keep * exp(logits))`` along ``dim``; all-zero where nothing is kept.

    ``keep`` may carry straight-through gradients: it multiplies the exponentials, so a 0/1
    forward is the exact masked softmax and the backward reaches ``keep``. The shift is the
    largest kept logit (detached); dropped logits above it are capped at the shift, which
    only touches their gradient with respect to ``keep``, never a value.
    """
    kept = keep > 0
    shift = logits.detach().masked_fill(~kept, -math.inf).amax(dim, keepdim=True)
    shift = torch.where(
        torch.isfinite(shift), shift, torch.zeros((), dtype=shift.dtype, device=shift.device)
    )
    # where(), not clamp_max(0): clamp's gradient is 0 at the bound itself, which is the largest kept
    # logit, so that logit would get no gradient.
    z = logits - shift
    e = keep * torch.exp(torch.where(z > 0, torch.zeros((), dtype=z.dtype, device=z.device), z))
    z = e.sum(dim, keepdim=True)
    # Nothing kept: divide by 1, not by a tiny clamp, whose 1 / tiny (and e / tiny**2 = 0 / 0) would
    # send ~1e38 or NaN gradients into the decisions and the logits.
    return e / torch.where(z > 0, z, torch.ones((), dtype=z.dtype, device=z.device))


def aggregation_weights(logits: torch.Tensor, decisions: torch.Tensor) -> torch.Tensor:
    r"""LAPS Eq. 6-7: the aggregation matrix ``W``, a softmax over the kept patches.

    .. math::

        W_{ij} = \frac{D_i \exp(L_{ij})}{\sum_k D_k \exp(L_{kj})}, \qquad
        \hat v_j = \sum_i W_{ij} v_i, \quad j = 1..N_c \quad \text{(Eq. 6-7)}

    with ``L = MLP(V)`` the image's aggregation logits (see
    :class:`~imtm.components.TokenAggregation`). Each column sums to 1 over the kept
    patches (all zero when none is kept). ``D`` multiplies the exponentials, so
    straight-through gradients of the decisions reach the selector.

    Shape:
        - logits: ``(Bi, N, Nc)``, decisions: ``(Bi, Bt, N)``
        - output: ``(Bi, Bt, N, Nc)``

    Example:
        >>> W = aggregation_weights(torch.randn(2, 6, 3), torch.ones(2, 4, 6))
        >>> torch.allclose(W.sum(2), torch.ones(2, 4, 3))
        True
    """
    return masked_softmax(logits.unsqueeze(1), decisions.unsqueeze(-1), dim=2)


def fusion_weights(
    scores: torch.Tensor, decisions: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""LAPS's fused token: its weights, a softmax of ``a`` over the dropped patches.

    .. math::

        \hat v_f = \sum_{i : D_i = 0} \frac{\exp(a_i)}{\sum_{k : D_k = 0} \exp(a_k)}\, v_i

    The paper writes the weights with :math:`D_i`; :math:`1 - D_i` (the dropped
    patches) is meant and used here. All zero where no patch is dropped.

    Shape:
        - scores, decisions: ``(*, N)``, mask: broadcastable (True where a patch is real)
        - output: ``(*, N)``

    Example:
        >>> fusion_weights(torch.tensor([0.9, 0.1, 0.1]), torch.tensor([1.0, 0.0, 0.0]))
        tensor([0.0000, 0.5000, 0.5000])
    """
    drop = 1 - decisions
    if mask is not None:
        drop = torch.where(mask, drop, torch.zeros((), dtype=drop.dtype, device=drop.device))
    return masked_softmax(scores, drop, dim=-1)


def dpc_knn_weights(
    patches: torch.Tensor,
    decisions: torch.Tensor,
    num_clusters: int,
    *,
    k: int = 5,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Clustering instead of Eq. 6-7: DPC-KNN over each pair's kept patches (the alternative of LAPS Table 4).

    Density-peak clustering with k nearest neighbours, as token merging uses it (Du et al. 2016;
    Zeng et al., TCFormer, CVPR 2022), over the patches each pair keeps:

    .. math::

        d_{nm} = \lVert v_n - v_m \rVert / \sqrt{D}, \quad
        \rho_n = \exp\Big(-\frac1k \sum_{m \in \mathrm{kNN}(n)} d_{nm}^2\Big), \quad
        \delta_n = \min_{m : \rho_m > \rho_n} d_{nm}

        (\delta_n = \max_m d_{nm} \text{ for the densest patch}); \text{ the } N_c \text{ patches of largest }
        \rho_n \delta_n \text{ are centres; every kept patch joins its nearest centre; a token is the mean of its cluster.}

    The k nearest neighbours include the patch itself (distance 0) and count only kept patches
    (all of them when fewer than ``k`` are kept). Ties of density go to the lower position. The
    clusters are hard (no gradient through the assignment); the weights carry the decisions as a
    factor, so straight-through gradients still reach the selector, and the patch features get
    gradients through the means.

    Args:
        patches: the image's patches.
        decisions: ``D`` of every pair (0/1).
        num_clusters: ``N_c``.
        k: neighbours of the density estimate.
        mask: True where a patch is real; ``None``: all are.

    Returns:
        ``(weights, valid)``: ``weights[i, n, t, c] = D_n / |C_c|`` for the patches of cluster ``c``
        (0 elsewhere), and ``valid[i, t, c]``, True for clusters that hold a patch (a pair keeping
        fewer patches than ``N_c`` has empty clusters).

    Shape:
        - patches: ``(Bi, N, D)``, decisions: ``(Bi, N, Bt)``, mask: ``(Bi, N)``
        - weights: ``(Bi, N, Bt, Nc)``, valid: ``(Bi, Bt, Nc)``

    References:
        Du, Ding and Jia, "Study on density peaks clustering based on k-nearest neighbors and
        principal component analysis", Knowledge-Based Systems 2016; Fu et al., LAPS, CVPR 2024, Table 4.

    Example:
        >>> v = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]]])
        >>> w, valid = dpc_knn_weights(v, torch.ones(1, 4, 1), 2, k=2)
        >>> w[0, :, 0].tolist(), valid.tolist()
        ([[0.0, 0.5], [0.0, 0.5], [0.5, 0.0], [0.5, 0.0]], [[[True, True]]])
    """
    where = "dpc_knn_weights"
    for name, value in (("num_clusters", num_clusters), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    if patches.dim() != 3 or decisions.dim() != 3 or decisions.shape[:2] != patches.shape[:2]:
        raise ValueError(
            f"{where}: expected patches (Bi, N, D) and decisions (Bi, N, Bt) with the same Bi and N, "
            f"got {tuple(patches.shape)} and {tuple(decisions.shape)}"
        )
    bi, n, d = patches.shape
    bt = decisions.shape[-1]
    kept = decisions > 0
    if mask is not None:
        kept = kept & mask.unsqueeze(-1)
    kept_t = kept.permute(0, 2, 1)  # (bi, bt, n)
    # At least float32: cdist has no half-precision kernel on every device, and densities need the range.
    work = torch.promote_types(patches.dtype, torch.float32)
    inf = torch.full((), math.inf, dtype=work, device=patches.device)
    with torch.no_grad():
        x = patches.detach().to(work)
        dist = torch.cdist(x, x) / math.sqrt(d)  # (bi, n, n), image-only
        # Per pair: distances to kept patches only.
        dd = torch.where(kept_t.unsqueeze(2), dist.unsqueeze(1), inf)  # (bi, bt, n, n)
        near = dd.topk(min(k, n), dim=-1, largest=False).values
        finite = torch.isfinite(near)
        sq = torch.where(finite, near, torch.zeros((), dtype=near.dtype, device=near.device)) ** 2
        density = torch.exp(-sq.sum(-1) / finite.sum(-1).clamp_min(1).to(near.dtype))
        # Ties of density go to the lower position (a deterministic stand-in for random jitter).
        density = density - torch.arange(n, device=patches.device, dtype=work) * 1e-9
        density = torch.where(kept_t, density, -inf)
        higher = (density.unsqueeze(-2) > density.unsqueeze(-1)) & kept_t.unsqueeze(
            2
        )  # [.., n, m]: rho_m > rho_n
        to_higher = torch.where(higher, dd, inf).amin(-1)
        farthest = torch.where(kept_t.unsqueeze(2), dd, -inf).amax(-1)
        delta = torch.where(torch.isfinite(to_higher), to_higher, farthest)
        score = torch.where(kept_t, density * delta, -inf)
        c = min(num_clusters, n)
        top, centres = score.topk(c, dim=-1)  # (bi, bt, c)
        centre_ok = torch.isfinite(top)
        to_centre = dd.gather(-1, centres.unsqueeze(2).expand(bi, bt, n, c))  # (bi, bt, n, c)
        to_centre = torch.where(centre_ok.unsqueeze(2), to_centre, inf)
        assign = to_centre.argmin(-1)  # (bi, bt, n)
        member = torch.nn.functional.one_hot(assign, c).to(work) * kept_t.unsqueeze(-1).to(work)
        count = member.sum(2)  # (bi, bt, c)
        member = (member / count.clamp_min(1).unsqueeze(2)).to(patches.dtype)
    if c < num_clusters:  # fewer patches than clusters: the extra clusters stay empty
        member = torch.cat([member, member.new_zeros(bi, bt, n, num_clusters - c)], -1)
        count = torch.cat([count, count.new_zeros(bi, bt, num_clusters - c)], -1)
    weights = member.permute(0, 2, 1, 3) * decisions.unsqueeze(
        -1
    )  # straight-through factor D_n (1 when kept)
    return weights, count > 0


def aggregate_tokens(patches: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    r"""Build the weighted tokens :math:`\hat v_j = \sum_i W_{ij} v_i` explicitly.

    The reference for :func:`slimmed_cosines`, which never builds them.

    Shape:
        - patches: ``(Bi, N, D)``, weights: ``(Bi, Bt, N, K)``, output: ``(Bi, Bt, K, D)``

    Example:
        >>> aggregate_tokens(torch.randn(2, 5, 8), torch.rand(2, 3, 5, 4)).shape
        torch.Size([2, 3, 4, 8])
    """
    return torch.einsum("itnk,ind->itkd", weights, patches)


def slimmed_cosines(
    patch_word: torch.Tensor, gram: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    r"""Cosines of weighted patch sums with words, without building the sums.

    For :math:`\hat v_k = \sum_n W_{nk} v_n` and a unit word :math:`\hat t_m`,

    .. math::

        \cos(\hat v_k, \hat t_m) = \frac{\sum_n W_{nk}\, (v_n \cdot \hat t_m)}
                                       {\sqrt{\sum_{n, n'} W_{nk} W_{n'k} G_{nn'}}},
        \qquad G = V V^\top

    so each pair costs :math:`K N (M + N)` instead of :math:`K N D + K D M`, and the
    ``(Bi, Bt, K, D)`` tokens never exist. A token with all-zero weights gets cosine 0.

    Args:
        patch_word: dot products of the patches with the unit words.
        gram: the image's Gram matrix of its patches.
        weights: ``W`` of every pair (layout image, patch, caption, token).

    Shape:
        - patch_word: ``(Bi, N, Bt, M)``, gram: ``(Bi, N, N)``, weights: ``(Bi, N, Bt, K)``
        - output: ``(Bi, Bt, K, M)``

    Example:
        >>> v, t = torch.randn(2, 5, 8), torch.nn.functional.normalize(torch.randn(3, 4, 8), dim=-1)
        >>> W = torch.rand(2, 5, 3, 2)
        >>> c = slimmed_cosines(torch.einsum("ind,tmd->intm", v, t), v @ v.transpose(1, 2), W)
        >>> ref = torch.nn.functional.cosine_similarity(
        ...     aggregate_tokens(v, W.permute(0, 2, 1, 3)).unsqueeze(-2), t[None, :, None], dim=-1)
        >>> torch.allclose(c, ref, atol=1e-5)
        True
    """
    bi, n, bt, k = weights.shape
    dots = torch.einsum("intk,intm->itkm", weights, patch_word)
    gw = torch.bmm(gram, weights.reshape(bi, n, bt * k)).view(bi, n, bt, k)
    sq_norm = (weights * gw).sum(1)  # (bi, bt, k)
    # Zero weights (nothing kept): cosine 0, divided by 1 rather than by sqrt(tiny), which
    # would send gradients of ~1e19 into the weights.
    return dots / torch.where(sq_norm > 0, sq_norm, 1.0).sqrt().unsqueeze(-1)


def aggregated_cosines(
    patch_word: torch.Tensor, gram: torch.Tensor, exp_logits: torch.Tensor, decisions: torch.Tensor
) -> torch.Tensor:
    r"""Cosines of the aggregated tokens of Eq. 6-7 with words, for every pair, from image-only factors.

    :math:`\hat v_k \propto \sum_n D_n E_{nk} v_n` with :math:`E = \exp(L - \max_n L)` the
    image's exponentiated aggregation logits: the softmax's normaliser and shift are a
    positive factor per token and pair, and a cosine ignores it. So

    .. math::

        \cos(\hat v_k, \hat t_m) = \frac{\sum_n E_{nk}\, D_n (v_n \cdot \hat t_m)}
                                       {\sqrt{u_k^\top G\, u_k}}, \qquad u_k = D \odot E_{:, k}

    The numerator is one matrix product per image, :math:`E^\top (D \odot S)`, over all
    captions at once; the denominator one product with the Gram matrix. The same
    numbers as :func:`slimmed_cosines` with :func:`aggregation_weights` (up to rounding),
    in fewer passes over the ``(Bi, N, Bt, K)`` pair tensors. ``E`` underflows only for
    logit gaps above ~87 within one image and token (float32); a token with no kept patch
    gets cosine 0.

    Args:
        patch_word: dot products of the patches with the unit words.
        gram: the image's Gram matrix of its patches.
        exp_logits: ``E``, image-only, in ``(0, 1]``.
        decisions: ``D`` of every pair (0/1, may carry straight-through gradients).

    Shape:
        - patch_word: ``(Bi, N, Bt, M)``, gram: ``(Bi, N, N)``, exp_logits: ``(Bi, N, K)``,
          decisions: ``(Bi, N, Bt)``
        - output: ``(Bi, Bt, K, M)``

    Example:
        >>> v, t = torch.randn(2, 5, 8), torch.nn.functional.normalize(torch.randn(3, 4, 8), dim=-1)
        >>> L, D = torch.randn(2, 5, 2), (torch.rand(2, 5, 3) > 0.5).float()
        >>> pw, G = torch.einsum("ind,tmd->intm", v, t), v @ v.transpose(1, 2)
        >>> W = aggregation_weights(L, D.permute(0, 2, 1)).permute(0, 2, 1, 3)
        >>> torch.allclose(aggregated_cosines(pw, G, (L - L.amax(1, keepdim=True)).exp(), D),
        ...                slimmed_cosines(pw, G, W), atol=1e-5)
        True
    """
    bi, n, bt, m = patch_word.shape
    k = exp_logits.shape[-1]
    masked = patch_word * decisions.unsqueeze(-1)
    dots = torch.bmm(exp_logits.transpose(1, 2), masked.reshape(bi, n, bt * m))  # (bi, k, bt * m)
    u = decisions.unsqueeze(-1) * exp_logits.unsqueeze(2)  # (bi, n, bt, k)
    gu = torch.bmm(gram, u.reshape(bi, n, bt * k)).view(bi, n, bt, k)
    # Without autograd, multiply in place: one fewer pair-sized allocation (about 15% of this function).
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (patch_word, gram, exp_logits, decisions)
    )
    sq_norm = (gu * u if grad else gu.mul_(u)).sum(1)  # (bi, bt, k)
    dots = dots.view(bi, k, bt, m).permute(0, 2, 1, 3)
    # Zero weights (nothing kept): cosine 0, divided by 1 rather than by sqrt(tiny), which
    # would send gradients of ~1e19 into the weights.
    return dots / torch.where(sq_norm > 0, sq_norm, 1.0).sqrt().unsqueeze(-1)


def weighted_cosine(
    patch_word: torch.Tensor, gram: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    r"""Cosines of one weighted patch sum per pair (the fused token) with words.

    :math:`\cos(\sum_n w_n v_n, \hat t_m) = \sum_n w_n (v_n \cdot \hat t_m) / \sqrt{w^\top G w}`;
    the weights need not be normalised. All-zero weights give cosine 0.

    Shape:
        - patch_word: ``(Bi, N, Bt, M)``, gram: ``(Bi, N, N)``, weights: ``(Bi, N, Bt)``
        - output: ``(Bi, Bt, 1, M)``

    Example:
        >>> v = torch.randn(2, 5, 8)
        >>> t = torch.nn.functional.normalize(torch.randn(3, 4, 8), dim=-1)
        >>> w = torch.rand(2, 5, 3)
        >>> c = weighted_cosine(torch.einsum("ind,tmd->intm", v, t), v @ v.transpose(1, 2), w)
        >>> torch.allclose(c, slimmed_cosines(torch.einsum("ind,tmd->intm", v, t), v @ v.transpose(1, 2),
        ...                                   w.unsqueeze(-1)), atol=1e-6)
        True
    """
    dots = (patch_word * weights.unsqueeze(-1)).sum(1)  # (bi, bt, m)
    sq_norm = (weights * torch.bmm(gram, weights)).sum(1)  # (bi, bt)
    # All-zero weights: cosine 0, divided by 1 (not sqrt(tiny): bounded gradients).
    return (dots / torch.where(sq_norm > 0, sq_norm, 1.0).sqrt().unsqueeze(-1)).unsqueeze(2)


#: How :func:`patch_slimming_scores` gets the cosines of the aggregated and fused tokens with the
#: words: ``"gram"`` from the patch-word dot products and the Gram matrix (:func:`aggregated_cosines`),
#: ``"tokens"`` by building the tokens (:func:`token_cosines`), ``"auto"`` whichever needs fewer
#: multiply-adds for the shapes at hand (:func:`cheaper_cosine_route`).
COSINE_ROUTES = ("auto", "gram", "tokens")


def cosine_route_costs(
    num_patches: int, num_words: int, dim: int, num_tokens: int, num_prefix_tokens: int = 0
) -> dict[str, int]:
    r"""Multiply-adds per image-caption pair of the two ways to the slimmed set's cosines.

    With :math:`N` patches, :math:`M` words, :math:`D` features, :math:`K` aggregated tokens,
    :math:`P` prefix tokens and the fused token:

    - ``"gram"``: the patch-word dot products :math:`(N + P) M D`, the aggregated tokens' dot
      products :math:`K N M` and norms :math:`N^2 K` (:func:`aggregated_cosines`), the fused
      token's :math:`N M + N^2` (:func:`weighted_cosine`);
    - ``"tokens"``: the tokens :math:`(K + 1) N D`, their norms :math:`(K + 1) D` and their dot
      products with the words :math:`(K + 1 + P) M D` (:func:`token_cosines`).

    The Gram route wins at the papers' widths (for example :math:`N = 196, M = 12, D = 1024, K = 39`:
    4.04M against 8.56M), building the tokens at small ones (:math:`N = 64, M = 19, D = 64,
    K = 28`: 0.23M against 0.16M).

    Example:
        >>> c = cosine_route_costs(196, 12, 1024, 39)
        >>> c["gram"] < c["tokens"]
        True
    """
    n, m, d, k, p = num_patches, num_words, dim, num_tokens, num_prefix_tokens
    return {
        "gram": (n + p) * m * d + k * n * m + n * n * k + n * m + n * n,
        "tokens": (k + 1) * n * d + (k + 1) * d + (k + 1 + p) * m * d,
    }


def cheaper_cosine_route(
    num_patches: int, num_words: int, dim: int, num_tokens: int, num_prefix_tokens: int = 0
) -> str:
    """``"gram"`` or ``"tokens"``, whichever :func:`cosine_route_costs` counts fewer multiply-adds for
    (``"gram"`` on a tie).

    Example:
        >>> cheaper_cosine_route(196, 12, 1024, 39), cheaper_cosine_route(64, 19, 64, 28)
        ('gram', 'tokens')
    """
    costs = cosine_route_costs(num_patches, num_words, dim, num_tokens, num_prefix_tokens)
    return "tokens" if costs["tokens"] < costs["gram"] else "gram"


def token_cosines(tokens: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    r"""Cosines of every pair's tokens with the pair's caption's unit words.

    :math:`\cos(\hat v_k, \hat t_m) = \hat v_k \cdot \hat t_m / \lVert \hat v_k \rVert`; the tokens
    need not be normalised (a positive factor per token cancels), the words must be. An all-zero
    token gets cosine 0 (divided by 1, not by ``sqrt(tiny)``: bounded gradients).

    Shape:
        - tokens: ``(Bi, Bt, K, D)``, words: ``(Bt, M, D)``, output: ``(Bi, Bt, K, M)``

    Example:
        >>> v, t = torch.randn(2, 3, 4, 8), torch.nn.functional.normalize(torch.randn(3, 5, 8), dim=-1)
        >>> ref = torch.nn.functional.cosine_similarity(v.unsqueeze(-2), t[None, :, None], dim=-1)
        >>> torch.allclose(token_cosines(v, t), ref, atol=1e-6)
        True
    """
    norm = torch.linalg.vector_norm(tokens, dim=-1)  # (bi, bt, k), no squared copy of the tokens
    dots = torch.einsum("itkd,tmd->itkm", tokens, words)
    return dots / torch.where(norm > 0, norm, 1.0).unsqueeze(-1)


def weighted_tokens(patches: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    r"""Every pair's weighted patch sums, one matrix product per image: :math:`\hat v_{tk} = \sum_n W_{ntk} v_n`.

    The tokens :func:`aggregated_cosines` and :func:`weighted_cosine` avoid building; built, their
    cosines with the words cost :math:`K N D + K M D` per pair (:func:`cosine_route_costs`).

    Shape:
        - patches: ``(Bi, N, D)``, weights: ``(Bi, Bt, K, N)``, output: ``(Bi, Bt, K, D)``

    Example:
        >>> v, W = torch.randn(2, 5, 8), torch.rand(2, 3, 4, 5)
        >>> torch.allclose(weighted_tokens(v, W), torch.einsum("itkn,ind->itkd", W, v), atol=1e-6)
        True
    """
    bi, bt, k, n = weights.shape
    return torch.bmm(weights.reshape(bi, bt * k, n), patches).view(bi, bt, k, patches.shape[-1])


def aggregated_tokens(
    patches: torch.Tensor, exp_logits: torch.Tensor, decisions: torch.Tensor
) -> torch.Tensor:
    r"""The aggregated tokens of Eq. 6-7 for every pair, up to a positive factor per token and pair.

    :math:`\hat v_{tk} \propto \sum_n D_{nt} E_{nk} v_n` (``E`` and ``D`` as in
    :func:`aggregated_cosines`), as one matrix product per image: with at least ``D`` captions, of
    the decisions with the image's :math:`Z_{n,(k,d)} = E_{nk} v_{nd}` (nothing of size pairs x
    patches x tokens is formed); with fewer, of the pair's weights :math:`D_{nt} E_{nk}` with the
    patches (:func:`weighted_tokens`), so that ``Z`` (``N K D`` numbers per image) is never larger
    than the pair-sized weights (``Bt N K`` per image) a blocked caller budgets for.

    Shape:
        - patches: ``(Bi, N, D)``, exp_logits: ``(Bi, N, K)``, decisions: ``(Bi, N, Bt)``
        - output: ``(Bi, Bt, K, D)``

    Example:
        >>> v, E, D = torch.randn(2, 5, 8), torch.rand(2, 5, 3), (torch.rand(2, 5, 4) > 0.5).float()
        >>> ref = torch.einsum("int,ink,ind->itkd", D, E, v)
        >>> torch.allclose(aggregated_tokens(v, E, D), ref, atol=1e-6)
        True
    """
    bi, n, d = patches.shape
    k, bt = exp_logits.shape[-1], decisions.shape[-1]
    if bt < d:
        weights = decisions.transpose(1, 2).unsqueeze(2) * exp_logits.transpose(1, 2).unsqueeze(1)
        return weighted_tokens(patches, weights)  # (bi, bt, k, n) weights, no larger than Z
    z = (exp_logits.unsqueeze(-1) * patches.unsqueeze(2)).reshape(bi, n, k * d)
    return torch.bmm(decisions.transpose(1, 2), z).view(bi, bt, k, d)


# ---------------------------------------------------------------------------- objective (Eq. 10)
def ratio_loss(
    decisions: torch.Tensor, rho: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""LAPS Eq. 10: keep the fraction of kept patches near the target ratio.

    .. math::

        \mathcal{L}_{ratio} = \Big(\rho - \frac{1}{N} \sum_{i=1}^{N} D_i\Big)^2 \quad \text{(Eq. 10)}

    for every image-caption pair, averaged over the pairs. ``N`` counts the
    positions where ``mask`` is True (the real patches; not [CLS], not padding).

    Args:
        decisions: keep decisions ``D`` (last axis: patches).
        rho: target ratio in ``(0, 1]``.
        mask: True where a position is a real patch; broadcastable to ``decisions``
            (for example ``(Bi, 1, N)`` against ``(Bi, Bt, N)``). ``None``: all are.

    Shape:
        - decisions: ``(*, N)``, mask: broadcastable, output: ``()``

    Raises:
        TypeError: decisions that are not a floating tensor, a mask that is not bool.
        ValueError: ``rho`` outside ``(0, 1]``, a mask that does not broadcast, or empty
            decisions (no pair or no patch: the mean would be NaN).

    Example:
        >>> ratio_loss(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), 0.25)
        tensor(0.0625)
    """
    where = "ratio_loss"
    if (
        not isinstance(decisions, torch.Tensor)
        or not decisions.is_floating_point()
        or decisions.dim() < 1
    ):
        raise TypeError(
            f"{where}: decisions must be a floating tensor of shape (*, N), got "
            f"{tuple(decisions.shape) if isinstance(decisions, torch.Tensor) else type(decisions).__name__}"
            f"{'' if not isinstance(decisions, torch.Tensor) else f' of dtype {decisions.dtype}'}"
        )
    if isinstance(rho, bool) or not isinstance(rho, Real) or not 0 < rho <= 1:
        raise ValueError(f"{where}: rho must be a number in (0, 1], got {rho!r}")
    if decisions.numel() == 0:
        raise ValueError(
            f"{where}: decisions of shape {tuple(decisions.shape)} hold no pair or no patch"
        )
    if mask is None:
        frac = decisions.mean(-1)
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"{where}: mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}"
            )
        try:
            mask = torch.broadcast_to(mask, decisions.shape)
        except RuntimeError:
            raise ValueError(
                f"{where}: mask of shape {tuple(mask.shape)} does not broadcast to decisions {tuple(decisions.shape)}"
            ) from None
        d = torch.where(
            mask, decisions, torch.zeros((), dtype=decisions.dtype, device=decisions.device)
        )
        frac = d.sum(-1) / mask.sum(-1).clamp_min(1).to(decisions.dtype)
    return ((rho - frac) ** 2).mean()


# ---------------------------------------------------------------------------- the whole scorer (Eq. 1-8)
#: ``reduce(cosines (..., K, M), token_mask (..., K), word_mask (..., M) or None) -> (...)``: how an
#: alignment scores one slimmed set from its cosines with the words (Eq. 8 by default).
CosineReduce = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
#: ``align(tokens (bi, bt, K, D), token_mask (bi, bt, K), words (bt, M, D), word_mask (bt, M) or
#: None) -> (bi, bt)``: an alignment that needs the slimmed tokens themselves.
TokenAlign = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class SlimmingOutput:
    """What :func:`patch_slimming_scores` returns, every time.

    Attributes:
        scores: ``(Bi, Bt)`` alignment scores of every image's slimmed set with every caption.
        keep_decisions: ``(Bi, Bt, N)`` over all image positions: 1 for real prefix tokens, the
            decision ``D`` for patches (0/1, straight-through gradients in training), 0 for padding.
    """

    scores: torch.Tensor
    keep_decisions: torch.Tensor


def _check_slimming_args(where, beta, ratio, tau, num_prefix_tokens, dpc_knn) -> None:
    for name, value, lo, hi, lo_open in (
        ("beta", beta, 0.0, 1.0, False),
        ("ratio", ratio, 0.0, 1.0, True),
        ("tau", tau, 0.0, math.inf, True),
    ):
        ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < lo or (lo_open and value == lo) or value > hi:
            lb = "(" if lo_open else "["
            raise ValueError(
                f"{where}: {name} must be a finite number in {lb}{lo}, {hi}], got {value!r}"
            )
    p = num_prefix_tokens
    if isinstance(p, bool) or not isinstance(p, int) or p < 0:
        raise ValueError(f"{where}: num_prefix_tokens must be an int >= 0, got {p!r}")
    if dpc_knn is not None and (
        not isinstance(dpc_knn, tuple)
        or len(dpc_knn) != 2
        or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in dpc_knn)
    ):
        raise ValueError(
            f"{where}: dpc_knn must be None or (num_clusters, k), two positive ints, got {dpc_knn!r}"
        )


def patch_slimming_scores(
    images: torch.Tensor,
    texts: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    *,
    predicted: torch.Tensor,
    num_prefix_tokens: int = 0,
    beta: float = 0.8,
    self_attention: bool = True,
    language_context: bool = True,
    ratio: float = 0.5,
    tau: float = 1.0,
    training: bool = False,
    generator: torch.Generator | None = None,
    aggregation_logits: torch.Tensor | None = None,
    dpc_knn: tuple[int, int] | None = None,
    fusion: bool = True,
    reduce: CosineReduce | None = None,
    align: TokenAlign | None = None,
    max_block_elements: int | None = None,
    cosine_route: str = "auto",
) -> SlimmingOutput:
    r"""LAPS's slim-then-align scores for every image and caption (Eq. 1-8), blocked.

    For every pair: the significance :math:`a` (Eq. 1-3, :func:`combine_significance` of the
    given prediction :math:`a^p`, :func:`self_attentive_scores` and
    :func:`text_attentive_scores`); the decisions :math:`D` (Eq. 4-5: Gumbel in training, the
    top :math:`N_s = \lceil \rho N \rceil` otherwise); the slimmed set
    :math:`\{v_{cls}, \hat v_1..\hat v_{N_c}, \hat v_f\}` (Eq. 6-7 and the fused token of the
    dropped patches); and its alignment with the words (Eq. 8 by default):

    .. math::

        S(I, T) = \frac{1}{|\hat V|} \sum_{i} \max_j A_{ij}
                + \frac{1}{M} \sum_{j} \max_i A_{ij} \quad \text{(Eq. 8)}

    The pairs are cut into blocks by :func:`~imtm.functional.blocking.blocked_pair_scores`:
    per block one matrix product gives every patch's dot product with every unit word, and the
    slimmed tokens' cosines follow from them and the image's Gram matrix
    (:func:`aggregated_cosines`), never from the built tokens; or, where that costs fewer
    multiply-adds (small feature widths, :func:`cosine_route_costs`), the aggregated and fused
    tokens are built by one matrix product per image and block (:func:`weighted_tokens`) and their
    cosines taken directly (:func:`token_cosines`): the same numbers up to rounding. An ``align``
    that needs the tokens gets them built per block.

    The image-only parts are inputs, as a module computes them once per image: ``predicted``
    (:math:`a^p`, the scorer MLP) and ``aggregation_logits`` (the aggregation MLP of Eq. 6-7).
    The pairwise arithmetic runs in the features' dtype, also under autocast (the cosines come
    from differences of products, which bf16 would blur).

    Args:
        images: image tokens, ``num_prefix_tokens`` prefix tokens ([CLS]) first, then the patches.
        texts: word features.
        image_mask: True where an image token is real; ``None``: all are.
        text_mask: True where a word is real; ``None``: all are.
        predicted: :math:`a^p` of every patch, in ``[0, 1]``.
        num_prefix_tokens: prefix tokens of ``images``: never scored, always in the slimmed set.
        beta: :math:`\beta` of Eq. 3, in ``[0, 1]``.
        self_attention: include :math:`a^s`; language_context: include :math:`a^r` (Eq. 2-3).
        ratio: :math:`\rho`, the kept fraction at inference, in ``(0, 1]``.
        tau: Gumbel-softmax temperature (training), > 0.
        training: Gumbel decisions with straight-through gradients (else the top :math:`N_s`).
        generator: source of the Gumbel noise, drawn once for all pairs (so the decisions do
            not depend on the blocks); ``None``: torch's default generator.
        aggregation_logits: the image's aggregation logits ``MLP(V)`` of Eq. 6-7, for the learned
            aggregation into :math:`N_c` tokens.
        dpc_knn: ``(num_clusters, k)``: DPC-KNN clusters of the kept patches instead
            (:func:`dpc_knn_weights`, Table 4). Neither this nor ``aggregation_logits``: the kept
            patches are aligned as they are ("without patch calibration").
        fusion: add the fused token of the dropped patches.
        reduce: ``reduce(cosines, token_mask, word_mask)`` scoring one slimmed set from its
            cosines with the words (e.g. :func:`~imtm.functional.hard_assignment_from_cosines`);
            ``None`` (and no ``align``): Eq. 8,
            :func:`~imtm.functional.sparse_alignment_from_cosines`.
        align: instead of ``reduce``, ``align(tokens, token_mask, words, word_mask) -> (bi, bt)``
            for alignments that need the slimmed tokens themselves.
        max_block_elements: memory budget of one block of pairs (numbers per pairwise
            intermediate); ``None``: :func:`~imtm.functional.blocking.default_block_elements`.
        cosine_route: how the aggregated (or clustered) and fused tokens' cosines are computed
            under a ``reduce``: ``"gram"`` (patch-word products and the Gram matrix), ``"tokens"``
            (the tokens built), or ``"auto"`` (:func:`cheaper_cosine_route` of the shapes). The
            kept patches as they are (no calibration) always use the patch-word products.

    Returns:
        A :class:`SlimmingOutput` (scores and keep decisions).

    Raises:
        ValueError: out-of-range hyper-parameters, both ``reduce`` and ``align``, an unknown
            ``cosine_route``, inputs of the wrong shape, images with no patch after their prefix
            tokens, NaN/inf in real tokens.
        TypeError: non-tensor or non-float features, masks that are not bool.

    Shape:
        - images: ``(Bi, N, D)``, image_mask: ``(Bi, N)``, texts: ``(Bt, M, D)``, text_mask: ``(Bt, M)``
        - predicted: ``(Bi, Np)`` with ``Np = N - num_prefix_tokens``; aggregation_logits: ``(Bi, Np, Nc)``
        - scores: ``(Bi, Bt)``, keep_decisions: ``(Bi, Bt, N)``

    References:
        Fu, Zhang, Xia and Mao, "Linguistic-Aware Patch Slimming Framework for Fine-grained
        Cross-Modal Alignment", CVPR 2024, Eq. 1-8.

    Example:
        >>> v, t = torch.randn(2, 9, 16), torch.randn(3, 4, 16)
        >>> out = patch_slimming_scores(v, t, predicted=torch.rand(2, 8), num_prefix_tokens=1,
        ...                             aggregation_logits=torch.randn(2, 8, 2))
        >>> out.scores.shape, out.keep_decisions.shape, out.keep_decisions[..., 1:].sum(-1).unique().tolist()
        (torch.Size([2, 3]), torch.Size([2, 3, 9]), [4.0])
    """
    where = "patch_slimming_scores"
    _check_slimming_args(where, beta, ratio, tau, num_prefix_tokens, dpc_knn)
    check_block_args(max_block_elements, None, where=where)
    if reduce is not None and align is not None:
        raise ValueError(f"{where}: give reduce or align, not both")
    if aggregation_logits is not None and dpc_knn is not None:
        raise ValueError(f"{where}: give aggregation_logits or dpc_knn, not both")
    if not isinstance(cosine_route, str) or cosine_route not in COSINE_ROUTES:
        raise ValueError(
            f"{where}: cosine_route must be one of {', '.join(map(repr, COSINE_ROUTES))}, got {cosine_route!r}"
        )
    images, texts, image_mask, text_mask = check_pair_inputs(
        images, texts, image_mask, text_mask, where=where
    )
    p = num_prefix_tokens
    Bi, N, D = images.shape
    Bt, M = texts.shape[:2]
    Np = N - p
    if Np < 1:
        raise ValueError(
            f"{where}: images hold {N} position(s) and num_prefix_tokens={p}, so no patch is left to select"
        )
    full_mask = (
        torch.ones(Bi, N, dtype=torch.bool, device=images.device)
        if image_mask is None
        else image_mask
    )
    patch_mask = None if image_mask is None else image_mask[:, p:]
    if patch_mask is not None and bool(patch_mask.all()):
        patch_mask = None
    for name, value, want in (
        ("predicted", predicted, (Bi, Np)),
        ("aggregation_logits", aggregation_logits, (Bi, Np, None)),
    ):
        if value is None:
            continue
        if (
            not isinstance(value, torch.Tensor)
            or value.dim() != len(want)
            or any(w is not None and s != w for s, w in zip(value.shape, want))
        ):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{where}: {name} must have shape {tuple('Nc' if w is None else w for w in want)}, got {shape}"
            )
    dtype = images.dtype
    if Bi == 0 or Bt == 0:
        return SlimmingOutput(images.new_zeros(Bi, Bt), images.new_zeros(Bi, Bt, N))
    if reduce is None and align is None:
        reduce = sparse_alignment_from_cosines
    with torch.autocast(images.device.type, enabled=False):
        feats = torch.where(full_mask.unsqueeze(-1), images, torch.zeros((), dtype=dtype))
        patches = feats[:, p:]
        a_p = predicted.to(dtype)
        a_s = self_attentive_scores(patches, patch_mask).to(dtype) if self_attention else None
        exp_logits = logits = None
        if aggregation_logits is not None:
            logits = aggregation_logits.to(dtype)
            top = (
                logits
                if patch_mask is None
                else logits.masked_fill(~patch_mask.unsqueeze(-1), -math.inf)
            )
            shift = top.amax(1, keepdim=True).detach()
            # An image whose only real tokens are prefix tokens has no patch: shift by 0, not -inf.
            shift = torch.where(torch.isfinite(shift), shift, torch.zeros((), dtype=dtype))
            exp_logits = torch.exp(logits - shift)
        if aggregation_logits is not None:
            n_agg = aggregation_logits.shape[-1]
        elif dpc_knn is not None:
            n_agg = dpc_knn[0]
        else:
            n_agg = Np
        # The tokens route serves the calibrated sets (aggregated or clustered) under a reduce.
        route = "gram"
        if reduce is not None and (aggregation_logits is not None or dpc_knn is not None):
            route = (
                cheaper_cosine_route(Np, M, D, n_agg, p) if cosine_route == "auto" else cosine_route
            )
        gram = (
            torch.bmm(patches, patches.transpose(1, 2))
            if reduce is not None and route == "gram"
            else None
        )
        inv_norm = torch.where(
            full_mask, 1 / feats.norm(dim=-1).clamp_min(1e-8), torch.zeros((), dtype=dtype)
        )
        words = normalize_tokens(texts, text_mask)
        context = _masked_mean(texts, text_mask)  # t_glo, (Bt, D)
        noise = None
        if training:
            # Drawn once for all pairs, so the decisions do not depend on the block size.
            noise = logistic_noise(
                (Bi, Np, Bt), generator=generator, dtype=dtype, device=images.device
            )
        n_slim = p + n_agg + (1 if fusion else 0)
        per_pair = Np * (n_slim + M) + n_slim * M
        if route == "tokens":  # the weights, the tokens and their cosines; no patch-word products
            per_pair = Np * n_slim + n_slim * (D + M)
        if dpc_knn is not None:
            per_pair += 2 * Np * Np  # the pair's distances and density comparisons
        if align is not None:
            per_pair += n_slim * D

        def block(sims, _im, tm, rows, cols):
            pm = None if patch_mask is None else patch_mask[rows]
            pm3 = None if pm is None else pm.unsqueeze(-1)
            pv = patches[rows]
            text_part = text_attentive_scores(pv, context[cols], pm) if language_context else None
            a = combine_significance(
                a_p[rows].unsqueeze(-1),
                None if a_s is None else a_s[rows].unsqueeze(-1),
                text_part,
                beta=beta,
            )
            if pm3 is not None:
                a = torch.where(pm3, a, torch.zeros((), dtype=a.dtype))
            bi, bt = pv.shape[0], cols.stop - cols.start
            if text_part is None:  # without the caption the score is the same for every caption
                a = a.expand(-1, -1, bt)
            if training:
                assert noise is not None
                decisions = gumbel_keep_decisions(
                    a, tau, True, mask=pm3, noise=noise[rows, :, cols]
                )
            else:
                decisions = top_keep_decisions(a, ratio, pm3, dim=1)
            if not fusion and not p:
                # Nothing else would be left of a pair whose Gumbel draw keeps no patch (training
                # only): it keeps its most significant patch instead of an empty set.
                none_kept = ~(decisions > 0).any(1, keepdim=True)
                decisions = decisions + top_keep_decisions(a, 1e-9, pm3, dim=1) * none_kept
            drop = None
            if fusion:
                drop = 1 - decisions
                if pm3 is not None:
                    drop = torch.where(pm3, drop, torch.zeros((), dtype=drop.dtype))
            dpc = None
            if dpc_knn is not None:
                dpc = dpc_knn_weights(pv, decisions, dpc_knn[0], k=dpc_knn[1], mask=pm)
            # The slimmed set's mask: prefix tokens where real; aggregated tokens where something is
            # kept (clusters: where they hold a patch; no aggregation: the kept patches themselves);
            # the fused token where something is dropped.
            if dpc is not None:
                agg_mask = dpc[1]
            elif exp_logits is None:
                agg_mask = (decisions > 0).permute(0, 2, 1)
            else:
                agg_mask = (decisions > 0).any(1).unsqueeze(-1).expand(bi, bt, n_agg)
            masks = [full_mask[rows, :p].unsqueeze(1).expand(bi, bt, p), agg_mask]
            if drop is not None:
                masks.append((drop > 0).any(1).unsqueeze(-1))
            token_mask = torch.cat(masks, dim=-1)  # (bi, bt, n_slim)
            wm = None if tm is None else tm.unsqueeze(0)
            if reduce is not None and route == "tokens":
                wv = words[cols]  # (bt, M, D), unit words
                parts = []
                if p:
                    pre = feats[rows, :p] * inv_norm[rows, :p, None]
                    parts.append(torch.einsum("ipd,tmd->itpm", pre, wv))
                if dpc is not None:
                    tokens = weighted_tokens(pv, dpc[0].permute(0, 2, 3, 1))
                else:
                    assert exp_logits is not None  # the tokens route serves calibrated sets only
                    # Eq. 6-7 up to a positive factor per token and pair, which a cosine ignores.
                    tokens = aggregated_tokens(pv, exp_logits[rows], decisions)
                parts.append(token_cosines(tokens, wv))
                if drop is not None:  # the fused token's unnormalised softmax, as below
                    fused_w = (drop * torch.exp(a)).transpose(1, 2).unsqueeze(2)
                    parts.append(token_cosines(weighted_tokens(pv, fused_w), wv))
                return reduce(torch.cat(parts, dim=2), token_mask, wm), decisions.permute(0, 2, 1)
            if reduce is not None:
                assert gram is not None  # computed above whenever there is a reduce
                pw = sims[:, p:]  # (bi, Np, bt, M): patches . unit words
                parts = []
                if p:
                    parts.append((sims[:, :p] * inv_norm[rows, :p, None, None]).permute(0, 2, 1, 3))
                if dpc is not None:
                    parts.append(slimmed_cosines(pw, gram[rows], dpc[0]))
                elif exp_logits is None:
                    # The kept patches as they are: their cosines, times D (1 when kept) for the
                    # straight-through gradient; dropped ones are masked out.
                    own = pw * inv_norm[rows, p:, None, None] * decisions.unsqueeze(-1)
                    parts.append(own.permute(0, 2, 1, 3))
                else:
                    parts.append(aggregated_cosines(pw, gram[rows], exp_logits[rows], decisions))
                if drop is not None:
                    # The fused token's softmax of a over the dropped patches, unnormalised: a lies in
                    # [0, 1], so exp(a) needs no shift, and the cosine ignores the normaliser.
                    parts.append(weighted_cosine(pw, gram[rows], drop * torch.exp(a)))
                return reduce(torch.cat(parts, dim=2), token_mask, wm), decisions.permute(0, 2, 1)
            assert align is not None
            if dpc is not None:
                weights = dpc[0]
            elif logits is not None:
                weights = masked_softmax(logits[rows].unsqueeze(2), decisions.unsqueeze(-1), dim=1)
            else:
                weights = None
            if weights is None:
                tokens = decisions.permute(0, 2, 1).unsqueeze(-1) * pv.unsqueeze(
                    1
                )  # (bi, bt, Np, D)
            else:
                tokens = aggregate_tokens(pv, weights.permute(0, 2, 1, 3))  # (bi, bt, Nc, D)
            if drop is not None:
                fused = masked_softmax(a.unsqueeze(-1), drop.unsqueeze(-1), dim=1)
                tokens = torch.cat([tokens, aggregate_tokens(pv, fused.permute(0, 2, 1, 3))], dim=2)
            if p:
                pre = feats[rows, :p].unsqueeze(1).expand(bi, bt, p, D)
                tokens = torch.cat([pre, tokens], dim=2)
            t_mask = None if text_mask is None else text_mask[cols]
            return align(tokens, token_mask, texts[cols], t_mask), decisions.permute(0, 2, 1)

        # Captions sorted by extent (longest first) and each block of them cut to its longest:
        # the padded words of a block's captions are not multiplied. Undone on the outputs.
        # (The tokens route multiplies no patch by a word: nothing to cut.)
        order, extents = (None, None) if route == "tokens" else order_by_extent(text_mask, M)
        if order is not None:
            texts, words, context = texts[order], words[order], context[order]
            text_mask = None if text_mask is None else text_mask[order]
            if noise is not None:
                noise = noise[:, :, order]
        scores, decisions = blocked_pair_scores(
            feats,
            words,
            image_mask,
            text_mask,
            reduce=block,
            max_block_elements=max_block_elements,
            normalize=False,
            pair_elements=per_pair,
            with_blocks=True,
            products=reduce is not None and route == "gram",
            text_extents=None if reduce is None else extents,
        )
        if order is not None:
            back = torch.argsort(order)
            scores, decisions = scores[:, back], decisions[:, back]
    prefix = full_mask[:, :p].to(decisions.dtype).unsqueeze(1).expand(Bi, Bt, p)
    return SlimmingOutput(scores, torch.cat([prefix, decisions], dim=-1))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens of every set: ``(B, L, D) -> (B, D)``."""
    if mask is None:
        return x.mean(1)
    w = mask.to(x.dtype).unsqueeze(-1)
    return torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype)).sum(1) / w.sum(
        1
    ).clamp_min(1)
