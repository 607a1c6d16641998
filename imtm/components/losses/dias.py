"""DIAS losses as pipeline blocks: dimension alignment and the inter- / intra-modality spatial constraints.

Both read the global embeddings ``image_embedding`` and ``text_embedding``: add a
:class:`~imtm.components.MeanEmbedding` per side to a pipeline that has only
tokens (``presets.dias_losses()`` does), so any Matcher can take them::

    components = presets.chan(vocab=train.vocab, region_dim=train.region_dim) + presets.dias_losses()
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

import torch
from torch import nn

from imtm._block_inputs import as_tokens, named_errors
from imtm.component import Loss
from imtm.contract import POSITIVE, Example, Interval, Options
from imtm.functional.dias import (
    DIAS_REDUCTIONS,
    DIMENSION_CORRELATIONS,
    DIMENSION_OBJECTIVES,
    DISTANCES,
    MASK_RULES,
    SPATIAL_KINDS,
    dimension_alignment_loss,
    spatial_constraint_loss,
    word_region_pairs,
)

__all__ = ["DIMENSION_PAIRS", "DimensionAlignmentLoss", "SpatialConstraintLoss", "too_few_pairs"]

#: Which samples Eq. 4 correlates, and the values each reading requires.
DIMENSION_PAIRS = {
    "embeddings": ("image_embedding", "text_embedding"),
    "words": ("image_tokens", "text_tokens"),
}


def _pairs_defaults(pairs):
    if not isinstance(pairs, str) or pairs not in DIMENSION_PAIRS:
        return None
    return {"requires": DIMENSION_PAIRS[pairs]}


def too_few_pairs(values: Mapping[str, Any]) -> tuple[type, str] | None:
    """The error the DIAS blocks document for a batch of fewer than 2 pairs (their Shape: ``B >= 2``).

    They standardise over the other pairs of the batch; with ``pairs="words"`` the pairs are the
    real words of the batch, each with its best region. For :class:`imtm.contract.Example`.
    """
    texts = values.get("text_tokens")
    b = int(texts.mask.sum()) if texts is not None else len(values["image_embedding"])
    return (ValueError, "at least 2") if b < 2 else None


class DimensionAlignmentLoss(Loss):
    r"""DIAS dimension alignment: each embedding dimension should mean the same in both modalities.

    With :math:`C` the ``(D, D)`` correlation, across the matched pairs of the
    batch, of image dimension ``i`` with text dimension ``j`` (Eq. 4) and
    :math:`c_{ij} = \exp(C_{ij} / \tau)`:

    .. math::

        \mathcal L_{dim} = -\sum_i \Big(\frac{c_{ii}}{\sum_j c_{ij}} + \frac{c_{ii}}{\sum_j c_{ji}}\Big)
        \qquad (6)

    A thin module over :func:`imtm.functional.dimension_alignment_loss`, whose
    docstring settles the paper's two open points: the paired samples (row ``b``
    of the image embeddings with row ``b`` of the text embeddings: in a Matcher
    batch that is each caption with its image) and the positive mapping
    :math:`\exp(C / \tau)` that keeps the shares well-posed and finite.
    ``pairs="words"`` takes the other reading, every word with its best region
    (:func:`imtm.functional.word_region_pairs`), and then requires
    ``("image_tokens", "text_tokens")``.

    The correlation of Eq. 4 is the cosine across the batch (the paper's default
    correlation function, Sec. 4.1); ``correlation="pearson"`` centres the columns
    first. ``objective="intuitive"`` replaces Eq. 6 by the direct regulariser of
    Eq. 5 (see :func:`imtm.functional.dimension_alignment_loss`).

    Args:
        temperature: :math:`\tau > 0` of the positive mapping.
        reduction: ``"sum"`` over dimensions (Eq. 6) or ``"mean"``.
        pairs: ``"embeddings"`` (default) or ``"words"``.
        correlation: ``"cosine"`` (default) or ``"pearson"``.
        objective: ``"softmax"`` (Eq. 6, default) or ``"intuitive"`` (Eq. 5).
        off_diagonal_weight: :math:`\lambda` of ``"intuitive"``; ``None``: ``1 / (D - 1)``.
        weight: :math:`\omega_{dim}`, factor in the Matcher's total (the paper uses 10;
            ``presets.dias_losses`` sets it).

    Shape:
        - image_embedding, text_embedding: ``(B, D)``, row ``b`` of each a matched pair, ``B >= 2``
          (``pairs="words"``: image_tokens ``(B, N, D)``, text_tokens ``(B, M, D)``)
        - output: ``()``

    Raises:
        ValueError: fewer than 2 pairs (the statistics run across the batch), or inputs of the
            wrong shape.

    References:
        Ma, Li, Fang and Zhang, "Bridging the Modality Gap: Dimension Information Alignment and
        Sparse Spatial Constraint for Image-Text Matching", ACM MM 2024, Eq. 4-6.

    Example:
        >>> loss = DimensionAlignmentLoss()
        >>> v = torch.randn(32, 8)
        >>> bool(loss(v, v) < loss(v, torch.randn(32, 8)))
        True
    """

    requires = DIMENSION_PAIRS["embeddings"]
    provides = ("dimension_alignment_loss",)

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (
            Example({}, paired=True, error=too_few_pairs),
            Example({"reduction": "mean", "pairs": "words"}, paired=True, error=too_few_pairs),
        )

    def __init__(
        self,
        temperature: float = 0.1,
        reduction: str = "sum",
        pairs: str = "embeddings",
        weight: float = 1.0,
        correlation: str = "cosine",
        objective: str = "softmax",
        off_diagonal_weight: float | None = None,
        *,
        requires=None,
        provides=None,
    ):
        if (
            requires is None
            and isinstance(pairs, str)
            and pairs in DIMENSION_PAIRS
            and pairs != "embeddings"
        ):
            requires = DIMENSION_PAIRS[pairs]
        super().__init__(requires=requires, provides=provides)
        self.temperature = temperature
        self.reduction = reduction
        self.pairs = pairs
        self.weight = weight
        self.correlation = correlation
        self.objective = objective
        self.off_diagonal_weight = off_diagonal_weight

    def default_names(self) -> dict[str, tuple[str, ...]]:
        """The names of ``pairs`` (the class defaults for an unknown value, which validate() refuses)."""
        return {**super().default_names(), **(_pairs_defaults(self.pairs) or {})}

    def set_params(self, **params) -> DimensionAlignmentLoss:
        """As :meth:`Component.set_params`; a new ``pairs`` moves an unrenamed ``requires`` along."""
        old = self.pairs
        super().set_params(**params)
        self._follow_option(old, "pairs", _pairs_defaults, params)
        return self

    _parameter_constraints = {
        "temperature": [POSITIVE],
        "reduction": [Options(DIAS_REDUCTIONS)],
        "pairs": [Options(DIMENSION_PAIRS)],
        "correlation": [Options(DIMENSION_CORRELATIONS)],
        "objective": [Options(DIMENSION_OBJECTIVES)],
        "off_diagonal_weight": [None, Interval(Real, 0, None, closed="left")],
    }

    def validate(self) -> DimensionAlignmentLoss:
        """Check the declared constraints and the arity; return ``self``."""
        where = type(self).__name__
        if len(tuple(self.requires)) != 2:
            raise ValueError(f"{where}: requires must name 2 values, got {tuple(self.requires)!r}")
        return self

    def forward(self, image_values, text_values) -> torch.Tensor:
        with named_errors(self):
            if self.pairs == "words":
                images = as_tokens(self, image_values, "image tokens")
                texts = as_tokens(self, text_values, "text tokens")
                image_values, text_values = word_region_pairs(
                    images.feats, texts.feats, images.mask, texts.mask
                )
            return dimension_alignment_loss(
                image_values,
                text_values,
                temperature=self.temperature,
                reduction=self.reduction,
                correlation=self.correlation,
                objective=self.objective,
                off_diagonal_weight=self.off_diagonal_weight,
            )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, pairs={self.pairs!r}, correlation={self.correlation!r}, "
            f"objective={self.objective!r}, weight={self.weight}, " + super().extra_repr()
        )


class SpatialConstraintLoss(Loss):
    r"""DIAS spatial constraint on unmatched pairs: inter-modality symmetry or intra-modality agreement.

    .. math::

        \mathcal L_{inter} = \sum_{i,j} w_{ij} (x_{ij} - x_{ji})^2 \quad (8), \qquad
        \mathcal L_{intra} = \sum_{i,j} w_{ij} (y_{ij} - z_{ij})^2 \quad (10)

    with :math:`x_{ij} = \sigma(V_i, T_j)` (Eq. 7), :math:`y_{ij} = \sigma(V_i, V_j)`,
    :math:`z_{ij} = \sigma(T_i, T_j)` (Eq. 9), :math:`\sigma` the cosine distance by
    default, over the *unmatched* pairs: ``positives`` (which a Matcher builds from
    ``image_ids``) says which rows and captions belong to one image, so two captions of
    one image in a batch are never constrained as unmatched. With ``sparse=True`` the
    weights :math:`w` are the sparse-correlation mask of Eq. 11-14, in the reading
    ``rule`` (``"printed"``, the default, or ``"intent"``; see
    :func:`imtm.functional.sparse_correlation_mask`, which quotes the paper). The
    threshold scale :math:`\beta` is one learnable scalar, the parameter
    ``learned_beta`` initialised to ``beta`` (``learn_beta=False``: a constant), or with
    ``beta_instances=n`` one per batch position (Eq. 12's :math:`\beta_i`, ``n`` at least
    the batch size; a smaller batch uses the first entries).

    A thin module over :func:`imtm.functional.spatial_constraint_loss`.

    Args:
        kind: ``"inter"`` or ``"intra"``.
        sparse: weight pairs with the sparse-correlation mask.
        beta: initial (or fixed) threshold scale :math:`\beta`.
        learn_beta: learn :math:`\beta` with the model (only with ``sparse=True``).
        temperature: relaxation temperature of the mask, in standard deviations.
        distance: ``"cosine"`` or ``"euclidean"``.
        reduction: ``"sum"`` over pairs (as the paper) or ``"mean"``.
        weight: :math:`\omega_{inter}` or :math:`\omega_{intra}` (the paper: 0.05 and 0.1;
            ``presets.dias_losses`` sets them).
        rule: ``"printed"`` (default: Eq. 14 as printed; ``docs/dias.md`` measured no difference) or ``"intent"``.
        beta_instances: ``None`` (one :math:`\beta`) or the number of per-instance :math:`\beta_i`.

    Shape:
        - image_embedding, text_embedding: ``(B, D)``, row ``b`` of each a matched pair, ``B >= 2``
        - positives: ``(B, B)`` bool (optional outside a Matcher: ``None`` means only row ``b``
          matches caption ``b``)
        - output: ``()``

    Raises:
        ValueError: fewer than 2 pairs (the statistics run across the batch), inputs of the
            wrong shape, a batch larger than ``beta_instances``.

    References:
        Ma et al., ACM MM 2024, Eq. 7-14.

    Example:
        >>> loss = SpatialConstraintLoss(kind="intra")
        >>> v = torch.randn(8, 16)
        >>> loss(v, v).item()
        0.0
    """

    requires = ("image_embedding", "text_embedding", "positives")
    provides = ("spatial_constraint_loss",)

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (
            Example({}, paired=True, error=too_few_pairs),
            Example(
                {"kind": "intra", "sparse": False, "distance": "euclidean"},
                paired=True,
                error=too_few_pairs,
            ),
            Example(
                {"learn_beta": False, "beta": 1.0, "reduction": "mean"},
                paired=True,
                error=too_few_pairs,
            ),
        )

    def __init__(
        self,
        kind: str = "inter",
        sparse: bool = True,
        beta: float = 0.0,
        learn_beta: bool = True,
        temperature: float = 0.1,
        distance: str = "cosine",
        reduction: str = "sum",
        weight: float = 1.0,
        rule: str = "printed",
        beta_instances: int | None = None,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.kind = kind
        self.sparse = sparse
        self.beta = beta
        self.learn_beta = learn_beta
        self.temperature = temperature
        self.distance = distance
        self.reduction = reduction
        self.weight = weight
        self.rule = rule
        self.beta_instances = beta_instances
        if (
            sparse is True
            and learn_beta is True
            and isinstance(beta, Real)
            and not isinstance(beta, bool)
        ):
            shape = (beta_instances,) if _is_count(beta_instances) else ()
            self.learned_beta = nn.Parameter(torch.full(shape, float(beta)))
        else:
            self.register_parameter("learned_beta", None)

    _parameter_constraints = {
        "kind": [Options(SPATIAL_KINDS)],
        "distance": [Options(DISTANCES)],
        "reduction": [Options(DIAS_REDUCTIONS)],
        "rule": [Options(MASK_RULES)],
        "temperature": [POSITIVE],
        "sparse": ["boolean"],
        "learn_beta": ["boolean"],
        "beta": [Interval(Real, None, None)],
        # None: one beta; an int >= 2: one beta per batch position (at least the batch size).
        "beta_instances": [None, Interval(Integral, 2, None, closed="left")],
    }

    def validate(self) -> SpatialConstraintLoss:
        """Check the declared constraints and the arity; return ``self``."""
        where = type(self).__name__
        if len(tuple(self.requires)) not in (2, 3):
            raise ValueError(
                f"{where}: requires must name 2 values (embeddings) or 3 (embeddings, positives), "
                f"got {tuple(self.requires)!r}"
            )
        return self

    def current_beta(self, batch: int | None = None):
        """The threshold scale in use: the learned parameter (a 0-d tensor), or ``beta``.

        With ``beta_instances`` it is one value per batch position: ``batch`` of them.
        """
        if self.learned_beta is not None:
            beta = self.learned_beta
        elif _is_count(self.beta_instances):
            beta = torch.full((self.beta_instances,), float(self.beta))
        else:
            return self.beta
        if beta.dim() == 1 and batch is not None:
            if batch > beta.shape[0]:
                raise ValueError(
                    f"{type(self).__name__}: a batch of {batch} pairs but beta_instances={beta.shape[0]}; "
                    "set beta_instances to at least the batch size"
                )
            beta = beta[:batch]
        return beta

    def forward(self, image_embedding, text_embedding, positives=None) -> torch.Tensor:
        with named_errors(self):
            batch = image_embedding.shape[0] if isinstance(image_embedding, torch.Tensor) else None
            beta = self.current_beta(batch)
            if isinstance(beta, torch.Tensor) and isinstance(image_embedding, torch.Tensor):
                beta = beta.to(image_embedding.device)
            return spatial_constraint_loss(
                image_embedding,
                text_embedding,
                kind=self.kind,
                sparse=self.sparse,
                beta=beta,
                temperature=self.temperature,
                distance=self.distance,
                reduction=self.reduction,
                rule=self.rule,
                positives=positives,
            )

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, sparse={self.sparse}, rule={self.rule!r}, beta={self.beta}, "
            f"learn_beta={self.learn_beta}, weight={self.weight}, " + super().extra_repr()
        )


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 2
