"""Pooling blocks: reduce per-token scores to one score per set (CHAN, Sec. 3.3).

Thin modules over :mod:`imtm.functional.pooling`, for codebases that compose
their own scorer from blocks. CHAN's scorers take the pooling by name instead
(``HardAssignmentCoding(pooling="lse")``).
"""

from __future__ import annotations

import torch

from imtm.component import Component
from imtm.contract import POSITIVE, Example, InstanceOf, ValueSpec
from imtm.functional.pooling import masked_pool

__all__ = ["LSEPooling", "MaxPooling", "MeanPooling", "SoftmaxPooling", "SumPooling"]


class _Pooling(Component, abstract=True):
    """Shared body: ``forward(token_scores, token_mask=None)`` pools along ``dim``.

    Reads the method-specific values ``token_scores`` (per-token scores, for
    example the best region of every word, ``(Bi, Bt, M)``) and ``token_mask``
    (True where a token counts, broadcastable to the scores) and provides
    ``scores``.
    """

    requires = ("token_scores", "token_mask")
    provides = ("scores",)
    values = (
        ValueSpec(
            "token_scores",
            "pair",
            "tensor",
            ("Bi", "Bt", "M"),
            "(Bi, Bt, M) per-token scores to pool, e.g. each word's best region (any (*, M) works)",
        ),
        ValueSpec(
            "token_mask",
            "pair",
            "tensor",
            ("Bi", "Bt", "M"),
            "(Bi, Bt, M) bool: the tokens that count (anything broadcastable to token_scores works)",
        ),
    )
    _pooling: str = ""

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        # Max, mean and sum pooling take no argument but dim; Softmax and LSE pooling add theirs.
        return (Example({}),)

    def _temperature(self) -> float:
        return 1.0

    # ``temperature`` applies to the poolings that take one (softmax, log-sum-exp).
    _parameter_constraints = {"dim": [InstanceOf(int)], "temperature": [POSITIVE]}

    def forward(
        self, token_scores: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # masked_pool checks the temperature and dim itself on every call.
        try:
            return masked_pool(
                token_scores, token_mask, self._pooling, self._temperature(), self.dim
            )
        except (TypeError, ValueError) as err:
            raise type(err)(f"{type(self).__name__}: {err}") from err


class MaxPooling(_Pooling):
    r"""Largest valid score of each set: :math:`S = \max_{i : m_i} s_i`.

    Args:
        dim: the axis to pool.

    Shape:
        - token_scores: ``(*, M)`` with ``M`` at ``dim``; token_mask: broadcastable to it
        - output: ``token_scores``' shape without ``dim``

    References:
        CHAN (Pan et al., CVPR 2023), Sec. 3.3.

    Example:
        >>> MaxPooling()(torch.tensor([[0.1, 0.9, 5.0]]), torch.tensor([[True, True, False]]))
        tensor([0.9000])
    """

    _pooling = "max"

    def __init__(self, dim: int = -1, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim


class MeanPooling(_Pooling):
    r"""Mean of the valid scores of each set: :math:`S = \frac{1}{|m|} \sum_{i : m_i} s_i`.

    Args:
        dim: the axis to pool.

    Shape:
        - token_scores: ``(*, M)`` with ``M`` at ``dim``; token_mask: broadcastable to it
        - output: ``token_scores``' shape without ``dim``

    References:
        CHAN (Pan et al., CVPR 2023), Sec. 3.3.

    Example:
        >>> MeanPooling()(torch.tensor([[0.1, 0.9, 5.0]]), torch.tensor([[True, True, False]]))
        tensor([0.5000])
    """

    _pooling = "mean"

    def __init__(self, dim: int = -1, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim


class SumPooling(_Pooling):
    r"""Sum of the valid scores of each set: :math:`S = \sum_{i : m_i} s_i` (ColBERT's MaxSim).

    Args:
        dim: the axis to pool.

    Shape:
        - token_scores: ``(*, M)`` with ``M`` at ``dim``; token_mask: broadcastable to it
        - output: ``token_scores``' shape without ``dim``

    References:
        CHAN (Pan et al., CVPR 2023), Sec. 3.3.

    Example:
        >>> SumPooling()(torch.tensor([[0.1, 0.9, 5.0]]), torch.tensor([[True, True, False]]))
        tensor([1.])
    """

    _pooling = "sum"

    def __init__(self, dim: int = -1, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim


class SoftmaxPooling(_Pooling):
    r"""Softmax-weighted mean of the valid scores: :math:`S = \sum_i \operatorname{softmax}_i(s / T)\, s_i`.

    Args:
        temperature: ``T > 0``; small ``T`` approaches the max, large ``T`` the mean.
        dim: the axis to pool.

    Shape:
        - token_scores: ``(*, M)`` with ``M`` at ``dim``; token_mask: broadcastable to it
        - output: ``token_scores``' shape without ``dim``

    References:
        CHAN (Pan et al., CVPR 2023), Sec. 3.3.

    Example:
        >>> SoftmaxPooling(temperature=1e-3)(torch.tensor([[0.0, 1.0]]))
        tensor([1.])
    """

    _pooling = "softmax"

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (Example({"temperature": 0.1}),)

    def __init__(self, temperature: float = 0.1, dim: int = -1, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.temperature = temperature
        self.dim = dim

    def _temperature(self) -> float:
        return self.temperature


class LSEPooling(_Pooling):
    r"""Log-sum-exp of the valid scores, in the paper's scale.

    .. math::

        S = \frac{1}{\lambda} \log \sum_{i : m_i} \exp(\lambda s_i), \qquad \lambda = 1 / T
        \qquad \text{(CHAN, Eq. 3 and 8)}

    Args:
        temperature: ``T = 1 / lambda > 0``; stable for very small values.
        dim: the axis to pool.

    Shape:
        - token_scores: ``(*, M)`` with ``M`` at ``dim``; token_mask: broadcastable to it
        - output: ``token_scores``' shape without ``dim``

    References:
        CHAN (Pan et al., CVPR 2023), Eq. 3 and 8 (the authors' code omits the
        ``1 / lambda`` factor; the paper's form is kept).

    Example:
        >>> LSEPooling(temperature=1.0)(torch.tensor([[0.5, 0.5]]))
        tensor([1.1931])
    """

    _pooling = "lse"

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (Example({"temperature": 0.01}),)

    def __init__(self, temperature: float = 0.1, dim: int = -1, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.temperature = temperature
        self.dim = dim

    def _temperature(self) -> float:
        return self.temperature
