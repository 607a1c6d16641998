r"""DIAS regularisers: dimension alignment, inter- and intra-modality spatial constraints, sparse correlation.

Plain functions on ``(B, D)`` global embeddings, for any codebase. Row ``b`` of
``image_embedding`` and row ``b`` of ``text_embedding`` are a matched pair: in an
imtm training batch row ``b`` of the images is the image of caption ``b`` (an image
with several captions in the batch appears once per caption), so the pairs need
no ``image_ids``; the spatial constraints take ``positives`` (from ``image_ids``)
to know which other rows belong to the same image. Outside imtm, give each
caption's embedding next to its image's.

- :func:`dimension_alignment_loss` (Eq. 4-6): per-dimension correlations between
  the two modalities across the batch; each dimension's correlation with its own
  counterpart should dominate its row and column.
- :func:`spatial_constraint_loss` (Eq. 7-10): the image-to-text distance matrix
  should be symmetric (``kind="inter"``) and the image-image distances should
  equal the text-text distances (``kind="intra"``), over the unmatched pairs,
  optionally restricted by
- :func:`sparse_correlation_mask` (Eq. 11-14): a soft selection of the pairs with
  strong correlation, with a learnable threshold scale :math:`\beta`, in either
  reading of Eq. 14 (``rule="intent"`` or ``"printed"``).
- :func:`word_region_pairs`: the other reading of Eq. 4's paired samples (every
  word with its best region of the matched image).

Shape letters follow :mod:`imtm.tokens`: ``B`` batch, ``D`` feature dimension,
``N`` regions, ``M`` words.

References:
    Ma, Li, Fang and Zhang, "Bridging the Modality Gap: Dimension Information
    Alignment and Sparse Spatial Constraint for Image-Text Matching", ACM MM 2024.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F

from imtm._checks import suggest
from imtm.tokens import autocast_common_dtype, check_finite

__all__ = [
    "DIAS_REDUCTIONS",
    "DIMENSION_CORRELATIONS",
    "DIMENSION_OBJECTIVES",
    "DISTANCES",
    "MASK_RULES",
    "SPATIAL_KINDS",
    "dimension_alignment_loss",
    "dimension_correlation",
    "sparse_correlation_mask",
    "spatial_constraint_loss",
    "spatial_differences",
    "word_region_pairs",
]

#: Variance floor of the per-dimension standardisation: a dimension that does not vary
#: across the batch gets zero correlations (finite values and gradients) instead of 0 / 0.
VARIANCE_EPS = 1e-6
#: Floor of the squared Euclidean distance before its square root (finite gradient at 0).
DISTANCE_EPS = 1e-12
#: Norm floor of the cosine distance (a zero vector has distance 1 to everything).
NORM_EPS = 1e-8


def _resolve(value, options, name: str, fn: str):
    if isinstance(value, str) and value in options:
        return options[value]
    raise ValueError(
        f"{fn}: {name} must be one of {sorted(options)}, got {value!r}." + suggest(value, options)
    )


def _check_positive(value, name: str, fn: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{fn}: {name} must be a positive number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_embeddings(
    image_embedding, text_embedding, fn: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boundary checks shared by the losses: two floating (B, D) tensors, same shape and dtype, B >= 2, finite."""
    for x, what in ((image_embedding, "image_embedding"), (text_embedding, "text_embedding")):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {what} must be a (B, D) tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{fn}: {what} must have shape (B, D), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{fn}: {what} must be floating point, got {x.dtype}")
    if image_embedding.shape != text_embedding.shape:
        raise ValueError(
            f"{fn}: image_embedding {tuple(image_embedding.shape)} and text_embedding "
            f"{tuple(text_embedding.shape)} must have the same shape (B, D): row b of each is a matched pair "
            "(in a Matcher batch, row b of the images is the image of caption b)"
        )
    common = autocast_common_dtype(image_embedding, text_embedding)
    if common is not None:  # under autocast, blocks may return different dtypes: promote both
        image_embedding, text_embedding = image_embedding.to(common), text_embedding.to(common)
    if image_embedding.dtype != text_embedding.dtype:
        raise TypeError(
            f"{fn}: image_embedding is {image_embedding.dtype} but text_embedding is {text_embedding.dtype}; "
            "cast one to the other's dtype"
        )
    if image_embedding.shape[0] < 2:
        raise ValueError(
            f"{fn}: needs a batch of at least 2 pairs (statistics across the batch), got {image_embedding.shape[0]}"
        )
    if image_embedding.device != text_embedding.device:
        raise ValueError(
            f"{fn}: image_embedding is on {image_embedding.device} but text_embedding is on {text_embedding.device}"
        )
    check_finite(image_embedding, f"{fn}: image_embedding")
    check_finite(text_embedding, f"{fn}: text_embedding")
    return image_embedding, text_embedding


def _sum(cost: torch.Tensor, count: int) -> torch.Tensor:
    return cost.sum()


def _mean(cost: torch.Tensor, count: int) -> torch.Tensor:
    return cost.sum() / count


#: How the DIAS losses reduce their terms: ``"sum"`` as the paper writes them, or ``"mean"``
#: over the terms (the ``D`` dimensions of Eq. 6, the ``B (B - 1)`` ordered pairs of Eq. 8 / 10).
DIAS_REDUCTIONS = {"sum": _sum, "mean": _mean}


# ---------------------------------------------------------------------- dimension alignment
def _standardize(x: torch.Tensor) -> torch.Tensor:
    """Each column to zero mean and unit (biased) variance across the batch; constant columns to 0."""
    centred = x - x.mean(0, keepdim=True)
    return centred * torch.rsqrt(centred.square().mean(0, keepdim=True) + VARIANCE_EPS)


def _unit_columns(x: torch.Tensor) -> torch.Tensor:
    """Each column divided by its root mean square across the batch; an all-zero column stays 0."""
    return x * torch.rsqrt(x.square().mean(0, keepdim=True) + VARIANCE_EPS)


def _cosine_columns(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _unit_columns(v).transpose(0, 1) @ _unit_columns(t) / v.shape[0]


def _pearson_columns(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _standardize(v).transpose(0, 1) @ _standardize(t) / v.shape[0]


#: The correlation :math:`\sigma` of Eq. 4 between an image dimension and a text dimension, over
#: the batch: ``"cosine"`` (the paper's default correlation function, Sec. 4.1) or ``"pearson"``
#: (the cosine of the centred columns).
DIMENSION_CORRELATIONS = {"cosine": _cosine_columns, "pearson": _pearson_columns}


def dimension_correlation(
    image_embedding: torch.Tensor, text_embedding: torch.Tensor, *, correlation: str = "cosine"
) -> torch.Tensor:
    r"""The ``(D, D)`` correlation matrix :math:`C` of DIAS Eq. 4 between image and text dimensions.

    Column ``k`` of the images, :math:`v_{:k}`, holds dimension ``k`` of the ``B``
    matched pairs, and :math:`C_{kl} = \sigma(v_{:k}, t_{:l})`. Sec. 4.1 of the paper
    sets every correlation function to the cosine (default):

    .. math::

        C_{kl} = \frac{\sum_b v_{bk}\, t_{bl}}{\sqrt{\sum_b v_{bk}^2 + B\epsilon}\,
                 \sqrt{\sum_b t_{bl}^2 + B\epsilon}} \qquad (4)

    ``correlation="pearson"`` centres each column first (the Pearson correlation).
    :math:`\epsilon` (``VARIANCE_EPS``) keeps an all-zero (cosine) or constant
    (Pearson) column finite: its correlations are 0.

    Shape:
        - image_embedding, text_embedding: ``(B, D)``, row ``b`` of each a matched pair
        - output: ``(D, D)``, entries in ``[-1, 1]``

    Example:
        >>> v = torch.randn(16, 4)
        >>> dimension_correlation(v, v).diagonal().round(decimals=3)
        tensor([1., 1., 1., 1.])
    """
    fn = "dimension_correlation"
    return _resolve(correlation, DIMENSION_CORRELATIONS, "correlation", fn)(
        image_embedding, text_embedding
    )


def _softmax_shares(C: torch.Tensor, tau: float, off_weight) -> torch.Tensor:
    logits = C / tau
    # exp(C_ii / tau) / sum_j exp(C_ij / tau) is a softmax share: log-softmax keeps it exact.
    return -(
        torch.log_softmax(logits, dim=1).diagonal().exp()
        + torch.log_softmax(logits, dim=0).diagonal().exp()
    )


def _intuitive(C: torch.Tensor, tau: float, off_weight) -> torch.Tensor:
    d = C.shape[0]
    eye = torch.eye(d, dtype=torch.bool, device=C.device)
    lam = 1.0 / max(d - 1, 1) if off_weight is None else off_weight
    return (1 - C.diagonal()).square() + lam * C.masked_fill(eye, 0).square().sum(1)


#: The dimension-alignment objective: ``"softmax"`` the share form of Eq. 6, ``"intuitive"`` the
#: regulariser of Eq. 5 (each dimension's own correlation to 1, the others to 0). One term per dimension.
DIMENSION_OBJECTIVES = {"softmax": _softmax_shares, "intuitive": _intuitive}


def dimension_alignment_loss(
    image_embedding: torch.Tensor,
    text_embedding: torch.Tensor,
    *,
    temperature: float = 0.1,
    reduction: str = "sum",
    correlation: str = "cosine",
    objective: str = "softmax",
    off_diagonal_weight: float | None = None,
) -> torch.Tensor:
    r"""DIAS dimension alignment (Eq. 4-6): each dimension's correlation with its counterpart dominates.

    With :math:`C` the correlation matrix of :func:`dimension_correlation` (Eq. 4,
    cosine by default) and :math:`c_{ij} = \exp(C_{ij} / \tau)`, the default
    ``objective="softmax"`` is Eq. 6:

    .. math::

        \mathcal L_{dim} = -\sum_i \Big(\frac{c_{ii}}{\sum_j c_{ij}} + \frac{c_{ii}}{\sum_j c_{ji}}\Big)
        \qquad (6)

    i.e. minus the softmax share of the diagonal in its row plus in its column.
    ``objective="intuitive"`` is the direct regulariser the paper starts from
    (Eq. 5): pull each dimension's correlation with its counterpart to 1 and its
    correlations with the other dimensions to 0,

    .. math::

        \mathcal L_{5} = \sum_i (1 - C_{ii})^2 + \lambda \sum_i \sum_{j \ne i} C_{ij}^2

    with :math:`\lambda` = ``off_diagonal_weight`` (default :math:`1 / (D - 1)`, so
    that a row's off-diagonal part weighs like its diagonal term). The squares are
    this library's reading of that description (a signed sum would reward
    correlations of -1 off the diagonal, not their absence).

    Two points the paper leaves open, settled here:

    1. *Which samples pair up.* Image dimensions and text dimensions are correlated
       over the ``B`` matched pairs of global embeddings (row ``b`` with row ``b``),
       not over ``N`` regions against ``M`` words, which do not pair up. The other
       reading, every word against its best region, is :func:`word_region_pairs`:
       pass its two outputs here.
    2. *Signed correlations.* The paper's :math:`c_{ii} / \sum_j c_{ij}` with raw
       correlations divides by a row sum that can be zero or negative. The
       correlations are mapped to positive values by :math:`\exp(C / \tau)`
       (order-preserving, sign-aware), which makes every share a softmax in
       ``(0, 1)``: the loss lies in ``(-2D, 0)`` (``reduction="sum"``) and stays
       finite for any input, including a batch of 2, identical rows and constant
       dimensions. A diagonal :math:`C = I` gives every share
       :math:`e^{1/\tau} / (e^{1/\tau} + D - 1)`, within :math:`(D - 1) e^{-1/\tau}`
       of the bound 1.

    Args:
        image_embedding: ``(B, D)`` image vectors.
        text_embedding: ``(B, D)`` text vectors; row ``b`` matches row ``b`` of the images.
        temperature: :math:`\tau > 0` of the positive mapping (``"softmax"`` only).
        reduction: ``"sum"`` over the ``D`` dimensions (Eq. 5-6) or ``"mean"``.
        correlation: ``"cosine"`` (default, Sec. 4.1) or ``"pearson"``.
        objective: ``"softmax"`` (Eq. 6, default) or ``"intuitive"`` (Eq. 5).
        off_diagonal_weight: :math:`\lambda \ge 0` of ``"intuitive"``; ``None``: :math:`1 / (D - 1)`.

    Returns:
        A scalar; ``"softmax"``: in ``(-2D, 0)`` (``"sum"``) or ``(-2, 0)`` (``"mean"``);
        ``"intuitive"``: at least 0.

    Raises:
        ValueError: shapes that are not one ``(B, D)`` for both, ``B < 2``, NaN or inf, a
            temperature not > 0, an unknown ``reduction``, ``correlation`` or ``objective``,
            an ``off_diagonal_weight`` below 0.
        TypeError: inputs that are not floating tensors, or of two different dtypes.

    Shape:
        - image_embedding, text_embedding: ``(B, D)`` with ``B >= 2``
        - output: ``()``

    References:
        Ma et al., "Bridging the Modality Gap: Dimension Information Alignment and Sparse
        Spatial Constraint for Image-Text Matching", ACM MM 2024, Eq. 4-6 and Sec. 4.1.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> v = torch.randn(64, 8, generator=g)
        >>> aligned = dimension_alignment_loss(v, v + 0.1 * torch.randn(64, 8, generator=g))
        >>> shuffled = dimension_alignment_loss(v, v[:, torch.randperm(8, generator=g)])
        >>> bool(aligned < shuffled)
        True
    """
    fn = "dimension_alignment_loss"
    image_embedding, text_embedding = _check_embeddings(image_embedding, text_embedding, fn)
    tau = _check_positive(temperature, "temperature", fn)
    reduce = _resolve(reduction, DIAS_REDUCTIONS, "reduction", fn)
    corr = _resolve(correlation, DIMENSION_CORRELATIONS, "correlation", fn)
    terms = _resolve(objective, DIMENSION_OBJECTIVES, "objective", fn)
    if off_diagonal_weight is not None:
        if isinstance(off_diagonal_weight, bool) or not isinstance(off_diagonal_weight, Real):
            raise TypeError(
                f"{fn}: off_diagonal_weight must be None or a number >= 0, got {off_diagonal_weight!r}"
            )
        if not math.isfinite(off_diagonal_weight) or off_diagonal_weight < 0:
            raise ValueError(
                f"{fn}: off_diagonal_weight must be a finite number >= 0, got {off_diagonal_weight!r}"
            )
    C = corr(image_embedding, text_embedding)
    return reduce(terms(C, tau, off_diagonal_weight), C.shape[0])


def word_region_pairs(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Paired samples for Eq. 4 at the token level: every real word with its best region.

    For each matched pair ``b`` (image tokens row ``b``, text tokens row ``b``) and
    each real word :math:`t_{bm}`, the region of image ``b`` with the largest cosine
    :math:`\arg\max_n \cos(v_{bn}, t_{bm})` is its partner. Feed the two outputs to
    :func:`dimension_alignment_loss` to correlate dimensions over words instead of
    over global embeddings. The choice of the region passes no gradient; the
    features do.

    Args:
        image_tokens: ``(B, N, D)`` region features.
        text_tokens: ``(B, M, D)`` word features; row ``b`` describes image ``b``.
        image_mask, text_mask: ``(B, N)`` / ``(B, M)`` bool, True for real tokens
            (``None``: all real).

    Returns:
        ``(regions, words)``, each ``(W, D)`` with ``W`` the number of real words.

    Raises:
        ValueError: inputs that are not floating ``(B, N, D)`` tensors with the same ``B`` and
            ``D``, masks that are not bool of shape ``(B, N)`` / ``(B, M)``, an image without a
            real region.
        TypeError: image and text tokens of two different dtypes.

    Shape:
        - image_tokens: ``(B, N, D)``; text_tokens: ``(B, M, D)``
        - output: two ``(W, D)`` tensors

    References:
        Ma et al., ACM MM 2024, Eq. 4 (the token-level reading of its paired samples).

    Example:
        >>> v, t = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
        >>> regions, words = word_region_pairs(v, t, text_mask=torch.tensor([[1, 1, 1], [1, 0, 0]]).bool())
        >>> regions.shape, words.shape
        (torch.Size([4, 8]), torch.Size([4, 8]))
    """
    fn = "word_region_pairs"
    for x, what in ((image_tokens, "image_tokens"), (text_tokens, "text_tokens")):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{fn}: {what} must be a floating (B, N, D) tensor, got {got}")
    if (
        image_tokens.shape[0] != text_tokens.shape[0]
        or image_tokens.shape[2] != text_tokens.shape[2]
    ):
        raise ValueError(
            f"{fn}: image_tokens {tuple(image_tokens.shape)} and text_tokens {tuple(text_tokens.shape)} must "
            "have the same batch size (row b of each is a matched pair) and feature dimension"
        )
    common = autocast_common_dtype(image_tokens, text_tokens)
    if common is not None:  # under autocast, blocks may return different dtypes: promote both
        image_tokens, text_tokens = image_tokens.to(common), text_tokens.to(common)
    if image_tokens.dtype != text_tokens.dtype:
        raise TypeError(
            f"{fn}: image_tokens are {image_tokens.dtype} but text_tokens are {text_tokens.dtype}; "
            "cast one to the other's dtype"
        )
    b, n, _ = image_tokens.shape
    m = text_tokens.shape[1]
    if image_mask is None:
        image_mask = torch.ones(b, n, dtype=torch.bool, device=image_tokens.device)
    if text_mask is None:
        text_mask = torch.ones(b, m, dtype=torch.bool, device=text_tokens.device)
    for mask, shape, what in ((image_mask, (b, n), "image_mask"), (text_mask, (b, m), "text_mask")):
        if (
            not isinstance(mask, torch.Tensor)
            or mask.dtype != torch.bool
            or tuple(mask.shape) != shape
        ):
            raise ValueError(f"{fn}: {what} must be a bool tensor of shape {shape}")
    if not torch.compiler.is_compiling() and not bool(image_mask.any(1).all()):
        raise ValueError(
            f"{fn}: an image has no real region (every position of its image_mask is False)"
        )
    with torch.no_grad():
        sims = F.normalize(text_tokens, dim=-1, eps=NORM_EPS) @ F.normalize(
            image_tokens, dim=-1, eps=NORM_EPS
        ).transpose(1, 2)
        best = sims.masked_fill(~image_mask[:, None, :], float("-inf")).argmax(-1)  # (B, M)
    regions = image_tokens.gather(1, best.unsqueeze(-1).expand(-1, -1, image_tokens.shape[2]))
    return regions[text_mask], text_tokens[text_mask]


# ---------------------------------------------------------------------- spatial constraints
def _cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - F.normalize(a, dim=-1, eps=NORM_EPS) @ F.normalize(
        b, dim=-1, eps=NORM_EPS
    ).transpose(0, 1)


def _euclidean_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    sq = a.square().sum(1, keepdim=True) + b.square().sum(1)[None, :] - 2 * a @ b.transpose(0, 1)
    return sq.clamp_min(DISTANCE_EPS).sqrt()


#: Distances :math:`\sigma` of Eq. 7 and 9 (cosine by default).
DISTANCES = {"cosine": _cosine_distance, "euclidean": _euclidean_distance}


def _inter(v: torch.Tensor, t: torch.Tensor, distance) -> torch.Tensor:
    x = distance(v, t)  # x_ij = sigma(V_i, T_j), Eq. 7
    return x - x.transpose(0, 1)


def _intra(v: torch.Tensor, t: torch.Tensor, distance) -> torch.Tensor:
    diff = distance(v, v) - distance(t, t)  # y_ij - z_ij, Eq. 9
    # y_ii = z_ii = 0 by definition; computed, the Euclidean one is the square root of a rounding
    # residue (up to ~1e-3 in float32), so the diagonal is set to its exact value.
    eye = torch.eye(diff.shape[0], dtype=torch.bool, device=diff.device)
    return torch.where(eye, torch.zeros((), dtype=diff.dtype, device=diff.device), diff)


#: The two constraints: the matrix whose squares Eq. 8 (inter) and Eq. 10 (intra) sum.
SPATIAL_KINDS = {"inter": _inter, "intra": _intra}


def spatial_differences(
    image_embedding: torch.Tensor,
    text_embedding: torch.Tensor,
    *,
    kind: str = "inter",
    distance: str = "cosine",
) -> torch.Tensor:
    r"""The ``(B, B)`` matrix of differences whose squares the spatial constraints sum.

    .. math::

        \text{inter: } x_{ij} - x_{ji},\ x_{ij} = \sigma(V_i, T_j) \quad (7);\qquad
        \text{intra: } y_{ij} - z_{ij},\ y_{ij} = \sigma(V_i, V_j),\ z_{ij} = \sigma(T_i, T_j) \quad (9)

    Raises:
        ValueError / TypeError: as :func:`dimension_alignment_loss`, and for an unknown ``kind``
            or ``distance``.

    Shape:
        - image_embedding, text_embedding: ``(B, D)``
        - output: ``(B, B)``, zero on the diagonal

    Example:
        >>> v = torch.randn(3, 4)
        >>> spatial_differences(v, v, kind="intra").abs().max().item()
        0.0
    """
    fn = "spatial_differences"
    image_embedding, text_embedding = _check_embeddings(image_embedding, text_embedding, fn)
    build = _resolve(kind, SPATIAL_KINDS, "kind", fn)
    dist = _resolve(distance, DISTANCES, "distance", fn)
    return build(image_embedding, text_embedding, dist)


def _check_beta(beta, fn: str, b: int | None = None):
    if isinstance(beta, torch.Tensor):
        if not beta.is_floating_point() or not (
            beta.numel() == 1 or (beta.dim() == 1 and b is not None and beta.numel() == b)
        ):
            raise ValueError(
                f"{fn}: beta must be a number, a one-element floating tensor or a floating (B,) tensor of one "
                f"beta per instance (B = {b}), got {tuple(beta.shape)}"
            )
        return beta.reshape(()) if beta.numel() == 1 and beta.dim() != 1 else beta
    if isinstance(beta, bool) or not isinstance(beta, Real) or not math.isfinite(beta):
        raise ValueError(
            f"{fn}: beta must be a finite number (or a one-element tensor), got {beta!r}"
        )
    return float(beta)


def _statistics(
    x: torch.Tensor, unmatched: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each row (dim=1) or column (dim=0) of ``p`` over the unmatched pairs."""
    count = unmatched.sum(dim, keepdim=True).clamp_min(1).to(x.dtype)
    mean = (x * unmatched).sum(dim, keepdim=True) / count
    var = ((x - mean).square() * unmatched).sum(dim, keepdim=True) / count
    return mean, torch.sqrt(var + VARIANCE_EPS)


def _keep_intent(p: torch.Tensor, diff_abs: torch.Tensor, unmatched: torch.Tensor):
    """Standardised margins of ``p`` above the row (V) and column (T) statistics of ``p``."""
    (mv, sv), (mt, st) = _statistics(p, unmatched, 1), _statistics(p, unmatched, 0)
    return (p - mv) / sv, (p - mt) / st


def _keep_printed(p: torch.Tensor, diff_abs: torch.Tensor, unmatched: torch.Tensor):
    """Standardised margins of ``|d|`` above thresholds built from the row (V) and column (T) statistics of ``p``."""
    (mv, sv), (mt, st) = _statistics(p, unmatched, 1), _statistics(p, unmatched, 0)
    return (diff_abs - mv) / sv, (diff_abs - mt) / st


#: The two readings of DIAS Eq. 11-14 (see :func:`sparse_correlation_mask`): what is compared with
#: the thresholds :math:`\kappa = \mu + \beta\theta` built from the statistics of :math:`p`.
MASK_RULES = {"intent": _keep_intent, "printed": _keep_printed}


def _unmatched_pairs(b: int, positives, device, fn: str) -> torch.Tensor:
    off = ~torch.eye(b, dtype=torch.bool, device=device)
    if positives is None:
        return off
    if (
        not isinstance(positives, torch.Tensor)
        or positives.dtype != torch.bool
        or tuple(positives.shape) != (b, b)
    ):
        raise ValueError(
            f"{fn}: positives must be a bool (B, B) tensor with B = {b} (True where row i's image matches "
            f"caption j, e.g. image_ids[:, None] == image_ids[None, :]), got "
            f"{tuple(positives.shape) if isinstance(positives, torch.Tensor) else type(positives).__name__}"
            + (f" of {positives.dtype}" if isinstance(positives, torch.Tensor) else "")
        )
    if positives.device != device:
        raise ValueError(
            f"{fn}: positives are on {positives.device} but the embeddings are on {device}"
        )
    # A caption of the same image is a matched pair, not an unmatched one, whatever its row.
    return off & ~positives & ~positives.transpose(0, 1)


def sparse_correlation_mask(
    differences: torch.Tensor,
    beta=0.0,
    *,
    temperature: float = 0.1,
    rule: str = "printed",
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""DIAS sparse correlation (Eq. 11-14): a soft mask of the strongly correlated unmatched pairs.

    With :math:`d` the differences of :func:`spatial_differences` (inter:
    :math:`x_{ij} - x_{ji}`; intra: :math:`y_{ij} - z_{ij}`), the paper defines

    .. math::

        p_{ij} = \operatorname{sigmoid}(-|d_{ij}|) \quad (11), \qquad
        \kappa^V_i = \mu^V_i + \beta_i\, \theta^V_i, \quad \kappa^T_j = \mu^T_j + \beta_j\, \theta^T_j \quad (12\text{-}13)

    with :math:`\mu, \theta` the mean and standard deviation of :math:`p` (row
    ``i`` for the image side, column ``j`` for the text side, over the unmatched
    pairs). The text says a larger :math:`p` is a stronger dependency, yet Eq. 14
    keeps pair :math:`(i, j)` when

    .. math::

        |x_{ij} - x_{ji}| > \max(\kappa^V_i, \kappa^T_j) \qquad (14)

    i.e. the *large* asymmetries, comparing a distance with thresholds on the
    scale of :math:`p`. The two readings, by name (``rule``):

    - ``"printed"``: Eq. 14 as printed, :math:`|d_{ij}| > \max(\kappa^V_i, \kappa^T_j)`;
    - ``"intent"``: the text's intent, keep the strong dependencies,
      :math:`p_{ij} > \max(\kappa^V_i, \kappa^T_j)` (the small asymmetries).

    On random inputs the two selections are disjoint (``p`` falls as ``|d|``
    grows). Both are relaxed for a gradient in :math:`\beta`: with
    :math:`a_{ij}` the compared value (:math:`p_{ij}` or :math:`|d_{ij}|`),
    :math:`z^V_{ij} = (a_{ij} - \mu^V_i) / \theta^V_i - \beta_i` and
    :math:`z^T_{ij} = (a_{ij} - \mu^T_j) / \theta^T_j - \beta_j`,

    .. math::

        m_{ij} = \operatorname{sigmoid}\big(\min(z^V_{ij}, z^T_{ij}) / T\big)

    which is above 1/2 exactly when the hard rule keeps the pair and tends to it
    as :math:`T \to 0` (``T`` in standard deviations of :math:`p`).
    :math:`\beta` is one number (the default) or one per instance (Eq. 12's
    :math:`\beta_i`, a ``(B,)`` tensor).

    Matched pairs get 0: the diagonal, and with ``positives`` every pair whose
    caption belongs to the row's image (several captions of one image in a batch
    are not unmatched); they are also left out of the statistics. A row whose
    values are all equal (a batch of 2, identical embeddings) has
    :math:`\theta = \sqrt{\epsilon}` and :math:`z = -\beta`.

    Args:
        differences: ``(B, B)`` matrix :math:`d`.
        beta: :math:`\beta`: a number, a one-element tensor (a learnable one), or a ``(B,)`` tensor.
        temperature: :math:`T > 0` of the relaxation.
        rule: ``"printed"`` (default: Eq. 14 as printed; the measurement in ``docs/dias.md`` does not separate the two) or ``"intent"``.
        positives: ``(B, B)`` bool, True where row ``i``'s image matches caption ``j``; ``None``:
            only the diagonal matches.

    Returns:
        ``(B, B)`` weights in ``[0, 1]``, zero on the matched pairs.

    Raises:
        TypeError: ``differences`` not a floating tensor.
        ValueError: a shape other than ``(B, B)`` with ``B >= 2``, a ``beta`` that is not finite
            or of the wrong shape, a temperature not > 0, an unknown ``rule``, bad ``positives``.

    Shape:
        - differences: ``(B, B)`` with ``B >= 2``; positives: ``(B, B)``; beta: ``()`` or ``(B,)``
        - output: ``(B, B)``

    References:
        Ma et al., ACM MM 2024, Eq. 11-14.

    Example:
        >>> d = torch.tensor([[0.0, 0.01, 0.5], [-0.01, 0.0, 0.2], [-0.5, -0.2, 0.0]])
        >>> (sparse_correlation_mask(d, beta=0.0, temperature=0.01, rule="intent") > 0.5).int()
        tensor([[0, 1, 0],
                [1, 0, 0],
                [0, 0, 0]], dtype=torch.int32)
        >>> (sparse_correlation_mask(d, beta=0.0, temperature=0.01, rule="printed") > 0.5).int()
        tensor([[0, 0, 1],
                [0, 0, 0],
                [1, 0, 0]], dtype=torch.int32)
    """
    fn = "sparse_correlation_mask"
    if not isinstance(differences, torch.Tensor) or not differences.is_floating_point():
        raise TypeError(
            f"{fn}: differences must be a floating (B, B) tensor, got {type(differences).__name__}"
        )
    if (
        differences.dim() != 2
        or differences.shape[0] != differences.shape[1]
        or differences.shape[0] < 2
    ):
        raise ValueError(
            f"{fn}: differences must have shape (B, B) with B >= 2, got {tuple(differences.shape)}"
        )
    b = differences.shape[0]
    beta = _check_beta(beta, fn, b)
    t = _check_positive(temperature, "temperature", fn)
    margins = _resolve(rule, MASK_RULES, "rule", fn)
    unmatched = _unmatched_pairs(b, positives, differences.device, fn)
    diff_abs = differences.abs()
    p = torch.sigmoid(-diff_abs)  # Eq. 11
    z_v, z_t = margins(p, diff_abs, unmatched)
    if isinstance(beta, torch.Tensor) and beta.dim() == 1:
        z_v, z_t = z_v - beta[:, None], z_t - beta[None, :]
    else:
        z_v, z_t = z_v - beta, z_t - beta
    return torch.sigmoid(torch.minimum(z_v, z_t) / t) * unmatched


def spatial_constraint_loss(
    image_embedding: torch.Tensor,
    text_embedding: torch.Tensor,
    *,
    kind: str = "inter",
    sparse: bool = True,
    beta=0.0,
    temperature: float = 0.1,
    distance: str = "cosine",
    reduction: str = "sum",
    rule: str = "printed",
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""DIAS spatial constraint on unmatched pairs (Eq. 7-10), optionally sparse (Eq. 11-14).

    .. math::

        \mathcal L_{inter} = \sum_{i,j} w_{ij} (x_{ij} - x_{ji})^2 \quad (8), \qquad
        \mathcal L_{intra} = \sum_{i,j} w_{ij} (y_{ij} - z_{ij})^2 \quad (10)

    with :math:`x_{ij} = \sigma(V_i, T_j)`, :math:`y_{ij} = \sigma(V_i, V_j)`,
    :math:`z_{ij} = \sigma(T_i, T_j)` (cosine distance :math:`1 - \cos` by
    default), :math:`w = 1` on the unmatched pairs without sparsity and the soft
    mask of :func:`sparse_correlation_mask` with it. Identical modalities
    (``image_embedding == text_embedding``) give 0 for both kinds.

    *Unmatched pairs.* Without ``positives`` every off-diagonal pair is unmatched.
    In a training batch an image with several captions fills several rows; pass
    ``positives = image_ids[:, None] == image_ids[None, :]`` so that two captions of
    one image are not constrained (nor counted in the mask's statistics) as an
    unmatched pair.

    The mask selects pairs and passes no gradient to the embeddings (it is
    computed from detached differences): otherwise the loss could also fall by
    making a pair *less* symmetric, pushing it under the threshold. :math:`\beta`
    does receive a gradient; note that the loss alone always pulls it up (a
    higher threshold masks more pairs), so a learned :math:`\beta` drifts upward
    at the pace of the optimiser.

    Args:
        image_embedding: ``(B, D)``; row ``b`` matches row ``b`` of ``text_embedding``.
        text_embedding: ``(B, D)``.
        kind: ``"inter"`` (Eq. 7-8) or ``"intra"`` (Eq. 9-10).
        sparse: weight the pairs with the sparse-correlation mask (Eq. 11-14).
        beta: threshold scale :math:`\beta` of the mask (number, one-element tensor, or ``(B,)``).
        temperature: relaxation temperature of the mask (standard-deviation units).
        distance: ``"cosine"`` or ``"euclidean"``.
        reduction: ``"sum"`` over pairs (as the paper) or ``"mean"`` over the unmatched ordered pairs.
        rule: the mask's reading of Eq. 14, ``"printed"`` (default) or ``"intent"`` (see :func:`sparse_correlation_mask`).
        positives: ``(B, B)`` bool, True where row ``i``'s image matches caption ``j``; ``None``: the diagonal.

    Raises:
        ValueError / TypeError: as :func:`spatial_differences` and :func:`sparse_correlation_mask`, and
            for a ``sparse`` that is not a bool (TypeError).

    Shape:
        - image_embedding, text_embedding: ``(B, D)`` with ``B >= 2``; positives: ``(B, B)``
        - output: ``()``

    References:
        Ma et al., ACM MM 2024, Eq. 7-14.

    Example:
        >>> v = torch.randn(8, 16)
        >>> spatial_constraint_loss(v, v, kind="intra").item()
        0.0
        >>> bool(spatial_constraint_loss(v, torch.randn(8, 16), kind="inter", sparse=False) > 0)
        True
    """
    fn = "spatial_constraint_loss"
    if not isinstance(sparse, bool):
        raise TypeError(f"{fn}: sparse must be True or False, got {sparse!r}")
    reduce = _resolve(reduction, DIAS_REDUCTIONS, "reduction", fn)
    diff = spatial_differences(image_embedding, text_embedding, kind=kind, distance=distance)
    b = diff.shape[0]
    unmatched = _unmatched_pairs(b, positives, diff.device, fn)
    if sparse:
        weights = sparse_correlation_mask(
            diff.detach(), beta, temperature=temperature, rule=rule, positives=positives
        )
    else:
        _check_beta(beta, fn, b)
        _check_positive(temperature, "temperature", fn)
        _resolve(rule, MASK_RULES, "rule", fn)
        weights = unmatched.to(diff.dtype)
    return reduce(weights * diff.square(), unmatched.sum().clamp_min(1))
