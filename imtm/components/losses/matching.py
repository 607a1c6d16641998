"""Image-text matching and masked-LM losses (ALBEF-style objectives of ELA's Eq. 11)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imtm.component import Loss
from imtm.contract import Example
from imtm.functional.lexicon import IGNORE_INDEX

__all__ = ["ImageTextMatchingLoss", "MaskedLanguageModelingLoss"]


class ImageTextMatchingLoss(Loss):
    r"""Cross-entropy of the matching head over its sampled pairs.

    .. math::

        \mathcal L_{itm} = \frac1P \sum_p -\log p^{itm}_{y_p}(I_p, T_p) \qquad \text{(ELA, Eq. 11)}

    Args:
        weight: factor of this loss in the Matcher's total.

    Shape:
        - itm_logits: ``(P, 2)``; itm_labels: ``(P,)`` long in {0, 1}
        - output: ``()``

    References:
        Li et al., "Align before Fuse" (ALBEF), NeurIPS 2021, Eq. 3.

    Example:
        >>> ImageTextMatchingLoss()(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))
        tensor(0.6931)
    """

    requires = ("itm_logits", "itm_labels")
    provides = ("itm_loss",)

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (Example({}),)

    def __init__(self, weight: float = 1.0, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.weight = weight

    def forward(self, itm_logits, itm_labels) -> torch.Tensor:
        name = type(self).__name__
        if (
            itm_logits.dim() != 2
            or itm_logits.shape[1] != 2
            or itm_labels.shape != itm_logits.shape[:1]
        ):
            raise ValueError(
                f"{name}: expected itm_logits (P, 2) and itm_labels (P,), got "
                f"{tuple(itm_logits.shape)} and {tuple(itm_labels.shape)}"
            )
        if itm_labels.dtype != torch.long:
            raise TypeError(
                f"{name}: itm_labels must be long (0: not a match, 1: a match), got {itm_labels.dtype}"
            )
        return F.cross_entropy(itm_logits, itm_labels)


class MaskedLanguageModelingLoss(Loss):
    r"""Masked-LM cross-entropy on the picked words of the (image-aware) word-to-lexicon logits.

    .. math::

        \mathcal L_{mlm} = \frac{1}{|\mathcal M|} \sum_{j \in \mathcal M} -\log P^{mlm}_{j, w_j}
        \qquad \text{(ELA, Eq. 11)}

    Positions whose label is ``-100`` do not count; a batch without any picked word gives 0.

    Args:
        weight: factor of this loss in the Matcher's total.

    Shape:
        - cross_lexicon: ``(B, L, V)`` logits; mlm_labels: ``(B, L)`` long
        - output: ``()``

    References:
        Devlin et al., "BERT", NAACL 2019; Li et al., "Align before Fuse", NeurIPS 2021.

    Example:
        >>> MaskedLanguageModelingLoss()(torch.zeros(1, 2, 4), torch.tensor([[-100, 3]]))
        tensor(1.3863)
    """

    requires = ("cross_lexicon", "mlm_labels")
    provides = ("mlm_loss",)

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (Example({}),)

    def __init__(self, weight: float = 1.0, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.weight = weight

    def forward(self, cross_lexicon, mlm_labels) -> torch.Tensor:
        name = type(self).__name__
        if cross_lexicon.dim() != 3 or mlm_labels.shape != cross_lexicon.shape[:2]:
            raise ValueError(
                f"{name}: expected cross_lexicon (B, L, V) and mlm_labels (B, L), got "
                f"{tuple(cross_lexicon.shape)} and {tuple(mlm_labels.shape)}"
            )
        # Summed over the picked words and divided by their count (at least 1): the mean of Eq. 11
        # without selecting the picked rows, whose number depends on the data and would break a
        # torch.compile(fullgraph=True) graph; a batch with no picked word gives 0 (not NaN).
        nll = F.cross_entropy(
            cross_lexicon.flatten(0, 1),
            mlm_labels.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return nll / (mlm_labels != IGNORE_INDEX).sum().clamp_min(1)
