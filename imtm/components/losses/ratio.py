"""RatioLoss: LAPS's constraint on the fraction of kept patches."""

from __future__ import annotations

from numbers import Real

import torch

from imtm._block_inputs import as_tokens
from imtm.component import Loss
from imtm.contract import Example, Interval
from imtm.functional.patch_slimming import ratio_loss

__all__ = ["RatioLoss"]


class RatioLoss(Loss):
    r"""Keeps the fraction of kept patches of every pair near :math:`\rho` (LAPS Eq. 10).

    .. math::

        \mathcal{L}_{ratio} = \Big(\rho - \frac{1}{N} \sum_{i=1}^{N} D_i\Big)^2 \qquad \text{(Eq. 10)}

    averaged over the image-caption pairs of the batch; added to the triplet loss
    (Eq. 9) by the Matcher with ``weight``. The decisions carry straight-through
    gradients (see :class:`~imtm.components.GumbelSelector`), so this loss trains
    the patch scorer.

    It reads the image tokens too, for which positions are patches: ``N`` counts the
    real patches only, never [CLS] (``num_prefix_tokens``) or padding.

    Args:
        rho: target ratio in ``(0, 1]`` (LAPS: 0.5 for ViT, 0.8 for Swin).
        weight: factor of this loss in the Matcher's total.

    Shape:
        - keep_decisions: ``(Bi, Bt, N)``, image_tokens: Tokens ``(Bi, N, D)``
        - output: ``()``

    References:
        Fu et al., "Linguistic-Aware Patch Slimming Framework for Fine-grained
        Cross-Modal Alignment", CVPR 2024, Eq. 9-10.

    Example:
        >>> from imtm import Tokens
        >>> decisions = torch.tensor([[[1.0, 1.0, 0.0, 0.0, 0.0]]])  # [CLS] and 1 of 4 patches kept
        >>> RatioLoss(rho=0.5)(decisions, Tokens(torch.randn(1, 5, 8), num_prefix_tokens=1))
        tensor(0.0625)
    """

    requires = ("keep_decisions", "image_tokens")
    provides = ("ratio_loss",)

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (
            Example(
                {}, nan_unused="reads the image tokens' mask and prefix count, not their features"
            ),
        )

    def __init__(self, rho: float = 0.5, weight: float = 1.0, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.rho = rho
        self.weight = weight

    _parameter_constraints = {"rho": [Interval(Real, 0, 1, closed="right")]}

    def forward(self, keep_decisions: torch.Tensor, image_tokens) -> torch.Tensor:
        images = as_tokens(self, image_tokens, "image tokens")
        name = type(self).__name__
        if (
            not isinstance(keep_decisions, torch.Tensor)
            or keep_decisions.dim() != 3
            or (keep_decisions.shape[0], keep_decisions.shape[2])
            != (images.batch_size, images.num_tokens)
        ):
            raise ValueError(
                f"{name}: expected keep_decisions of shape (Bi, Bt, N) = ({images.batch_size}, Bt, {images.num_tokens}) "
                f"to match the image tokens, got {tuple(getattr(keep_decisions, 'shape', ())) or type(keep_decisions).__name__}"
            )
        mask = images.mask.clone()
        mask[:, : images.num_prefix_tokens] = False
        try:
            return ratio_loss(keep_decisions, self.rho, mask.unsqueeze(1))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {err}") from err

    def extra_repr(self) -> str:
        return f"rho={self.rho}, weight={self.weight}, " + super().extra_repr()
