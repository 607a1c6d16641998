"""SparseCorrelation: DIAS's learned soft selection of strongly correlated pairs, usable alone."""

from __future__ import annotations

from numbers import Real

import torch
from torch import nn

from imtm._block_inputs import named_errors
from imtm.component import Component
from imtm.components.losses.dias import too_few_pairs
from imtm.contract import POSITIVE, Example, Interval, Options
from imtm.functional.dias import (
    DISTANCES,
    MASK_RULES,
    SPATIAL_KINDS,
    sparse_correlation_mask,
    spatial_differences,
)

__all__ = ["SparseCorrelation"]


class SparseCorrelation(Component):
    r"""The sparse-correlation mask of DIAS (Eq. 11-14) over the pairs of a batch.

    From the differences :math:`d` of the spatial constraint of ``kind``
    (inter: :math:`x_{ij} - x_{ji}`; intra: :math:`y_{ij} - z_{ij}`):

    .. math::

        p_{ij} = \operatorname{sigmoid}(-|d_{ij}|) \quad (11), \qquad
        m_{ij} = \operatorname{sigmoid}\Big(\frac{\min(z^V_{ij}, z^T_{ij}) - \beta}{T}\Big)

    where :math:`z^V_{ij}` standardises :math:`p_{ij}` with the mean and standard
    deviation of row ``i`` and :math:`z^T_{ij}` with those of column ``j``, so that
    :math:`m_{ij} > 1/2` exactly when :math:`p_{ij} > \max(\kappa^V_i, \kappa^T_j)`,
    :math:`\kappa = \mu + \beta\theta` with :math:`\mu, \theta` the statistics of
    :math:`p` (Eq. 12-13): the text's intent for Eq. 14. The hard mask is the limit
    :math:`T \to 0`; the relaxation is what gives :math:`\beta` a gradient (see
    :func:`imtm.functional.sparse_correlation_mask`, which quotes both readings). :math:`\beta` is one scalar,
    the parameter ``learned_beta`` initialised to ``beta`` (``learnable=False``: the
    constant ``beta``). The diagonal (matched pairs) is 0.

    Reads the method-specific value name ``sparse_mask`` into the pipeline (for a
    loss of one's own); :class:`~imtm.components.SpatialConstraintLoss` computes the
    same mask itself with ``sparse=True``.

    Args:
        kind: ``"inter"`` or ``"intra"``.
        beta: initial (or fixed) threshold scale.
        learnable: learn :math:`\beta`.
        temperature: :math:`T > 0`, in standard deviations of :math:`p`.
        distance: ``"cosine"`` or ``"euclidean"``.
        rule: ``"printed"`` (default) or ``"intent"``.

    Shape:
        - image_embedding, text_embedding: ``(B, D)``, row ``b`` of each a matched pair, ``B >= 2``
        - output: ``(B, B)`` weights in ``[0, 1]``

    Raises:
        ValueError: fewer than 2 pairs (the statistics run across the batch), or inputs of the
            wrong shape.

    References:
        Ma et al., "Bridging the Modality Gap: Dimension Information Alignment and Sparse
        Spatial Constraint for Image-Text Matching", ACM MM 2024, Eq. 11-14.

    Example:
        >>> block = SparseCorrelation(kind="inter", beta=0.5)
        >>> block(torch.randn(6, 8), torch.randn(6, 8)).shape
        torch.Size([6, 6])
    """

    requires = ("image_embedding", "text_embedding")
    provides = ("sparse_mask",)

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        intra = {"kind": "intra", "distance": "euclidean", "learnable": False, "beta": 0.5}
        return (
            Example({}, paired=True, error=too_few_pairs),
            Example(intra, paired=True, error=too_few_pairs),
        )

    def __init__(
        self,
        kind: str = "inter",
        beta: float = 0.0,
        learnable: bool = True,
        temperature: float = 0.1,
        distance: str = "cosine",
        rule: str = "printed",
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.kind = kind
        self.beta = beta
        self.learnable = learnable
        self.temperature = temperature
        self.distance = distance
        self.rule = rule
        if learnable is True and isinstance(beta, Real) and not isinstance(beta, bool):
            self.learned_beta = nn.Parameter(torch.tensor(float(beta)))
        else:
            self.register_parameter("learned_beta", None)

    _parameter_constraints = {
        "kind": [Options(SPATIAL_KINDS)],
        "distance": [Options(DISTANCES)],
        "rule": [Options(MASK_RULES)],
        "temperature": [POSITIVE],
        "learnable": ["boolean"],
        "beta": [Interval(Real, None, None)],
    }

    def current_beta(self):
        """The threshold scale in use: the learned parameter (a 0-d tensor) or ``beta``."""
        return self.beta if self.learned_beta is None else self.learned_beta

    def forward(self, image_embedding, text_embedding) -> torch.Tensor:
        with named_errors(self):
            diff = spatial_differences(
                image_embedding, text_embedding, kind=self.kind, distance=self.distance
            )
            return sparse_correlation_mask(
                diff, self.current_beta(), temperature=self.temperature, rule=self.rule
            )

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, rule={self.rule!r}, beta={self.beta}, learnable={self.learnable}, "
            + super().extra_repr()
        )
