r"""Word slimming: LAPS's selection and aggregation applied to the caption's words (Table 4's word rows).

LAPS's Table 4 also slims the text side: selecting words, aggregating words, or both, before the
alignment. These are text-only refiners (they read a caption's own tokens, not the image), built
from the same functions as the patch side:

- :class:`WordSelection`: significance :math:`a_w = (1 - \beta)\, \sigma(\mathrm{MLP}(t_w)) + \beta\,
  \mathrm{Norm}(t_w \cdot t_{glo} / d)` (Eq. 1-3 with the caption's own mean word as the context),
  Gumbel keep decisions in training and the top :math:`\lceil \rho M \rceil` real words at
  inference (Eq. 4-5); the kept words pass as they are (times their decision, 1, so the
  straight-through gradient reaches the MLP), the others are masked out;
- :class:`WordAggregation`: ``num_out`` tokens, each a softmax-weighted mean of the (kept) real
  words with weights from an MLP (Eq. 6-7 on words).

Chain them for "both" (``WordSelection(provides=("selected_text_tokens",))`` then
``WordAggregation(requires=("selected_text_tokens",))``); :func:`imtm.presets.laps` does it with
``word_selection`` / ``word_aggregation``.

References:
    Fu et al., "Linguistic-Aware Patch Slimming Framework for Fine-grained Cross-Modal
    Alignment", CVPR 2024, Table 4.
"""

from __future__ import annotations

from dataclasses import replace
from numbers import Integral, Real

import torch
from torch import nn

from imtm._block_inputs import as_tokens
from imtm.component import Component
from imtm.contract import EXAMPLE_DIM, POSITIVE, Example, Interval, ValueSpec, check_param
from imtm.functional.patch_slimming import (
    aggregate_tokens,
    aggregation_weights,
    combine_significance,
    gumbel_keep_decisions,
    self_attentive_scores,
    top_keep_decisions,
)
from imtm.tokens import Tokens

__all__ = ["WordAggregation", "WordSelection"]


class WordSelection(Component):
    r"""Keeps the most significant words of each caption (LAPS's selection on the text side).

    .. math::

        a_w = (1 - \beta)\, \sigma(\mathrm{MLP}(t_w)) + \beta\, \mathrm{Norm}(t_w \cdot t_{glo} / d), \qquad
        D = \text{Gumbel (training) or top-}\lceil \rho M \rceil \text{ (inference)}

    Args:
        dim: word feature size ``D``.
        ratio: :math:`\rho`, the fraction of real words kept at inference.
        beta: weight of the self-attention score.
        tau: Gumbel-softmax temperature.

    Shape:
        - text_tokens: Tokens ``(Bt, M, D)``
        - output: Tokens ``(Bt, M, D)``, the dropped words masked out (at least one word kept)

    Example:
        >>> sel = WordSelection(dim=8, ratio=0.5).eval()
        >>> out = sel(Tokens.from_lengths(torch.randn(2, 6, 8), [6, 3]))
        >>> out.mask.sum(1).tolist()
        [3, 2]
    """

    requires = ("text_tokens",)
    provides = ("slim_text_tokens",)
    values = (
        ValueSpec(
            "slim_text_tokens",
            "text",
            "tokens",
            ("Bt", None, None),
            "LAPS: Tokens (Bt, M', D) of the words kept and merged by word slimming",
        ),
    )

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (
            Example({"dim": EXAMPLE_DIM, "ratio": 0.6}, padding=True),
            Example({"dim": EXAMPLE_DIM, "ratio": 1.0, "beta": 0.0}, padding=True),
        )

    def __init__(
        self,
        dim: int,
        ratio: float = 0.8,
        beta: float = 0.5,
        tau: float = 1.0,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim
        self.ratio = ratio
        self.beta = beta
        self.tau = tau
        check_param(self, "dim", dim)  # the MLP is built from it
        hidden = max(1, dim // 4)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    _parameter_constraints = {
        "dim": [Interval(Integral, 1, None, closed="left")],
        "ratio": [Interval(Real, 0, 1, closed="right")],
        "beta": [Interval(Real, 0, 1, closed="both")],
        "tau": [POSITIVE],
    }

    def significance(self, texts: Tokens) -> torch.Tensor:
        """``(Bt, M)`` word significance in ``[0, 1]`` (0 at padding)."""
        feats = texts.zero_padding().feats
        predicted = torch.sigmoid(self.mlp(feats).squeeze(-1))
        own = self_attentive_scores(feats, texts.mask)
        a = combine_significance(predicted, own, None, beta=self.beta)
        return torch.where(texts.mask, a, torch.zeros((), dtype=a.dtype, device=a.device))

    def forward(self, text_tokens) -> Tokens:
        texts = as_tokens(self, text_tokens, "text tokens").check(type(self).__name__, self.dim)
        a = self.significance(texts)
        if self.training:
            d = gumbel_keep_decisions(a, self.tau, True, mask=texts.mask)
        else:
            d = top_keep_decisions(a, self.ratio, texts.mask, dim=-1)
        # A caption whose draw keeps nothing keeps its most significant word.
        none = ~(d > 0).any(-1, keepdim=True)
        d = d + top_keep_decisions(a, 1e-9, texts.mask, dim=-1) * none
        feats = texts.zero_padding().feats * d.unsqueeze(-1)
        return replace(texts, feats=feats, mask=texts.mask & (d > 0))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, ratio={self.ratio}, beta={self.beta}, " + super().extra_repr()


class WordAggregation(Component):
    r"""Merges each caption's real words into ``num_out`` tokens (LAPS's aggregation on the text side).

    .. math::

        \hat t_j = \sum_w W_{wj} t_w, \qquad W_{wj} = \mathrm{softmax}_{w \text{ real}}\big(\mathrm{MLP}(t)_{wj}\big)

    Args:
        dim: word feature size ``D``. num_out: tokens per caption. hidden_ratio: MLP width / ``dim``.

    Shape:
        - text_tokens: Tokens ``(Bt, M, D)``
        - output: Tokens ``(Bt, num_out, D)``, all real (a caption has at least one real word)

    Example:
        >>> agg = WordAggregation(dim=8, num_out=2)
        >>> agg(Tokens.from_lengths(torch.randn(2, 6, 8), [6, 3])).feats.shape
        torch.Size([2, 2, 8])
    """

    requires = ("text_tokens",)
    provides = ("slim_text_tokens",)

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (
            Example({"dim": EXAMPLE_DIM, "num_out": 2}, padding=True),
            Example({"dim": EXAMPLE_DIM, "num_out": 5}, padding=True),
        )

    def __init__(
        self, dim: int, num_out: int = 4, hidden_ratio: float = 0.2, *, requires=None, provides=None
    ):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim
        self.num_out = num_out
        self.hidden_ratio = hidden_ratio
        check_param(self, "dim", dim)  # the MLP is built from these
        check_param(self, "num_out", num_out)
        hidden = max(1, int(dim * hidden_ratio)) if isinstance(hidden_ratio, Real) else 1
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_out)
        )

    _parameter_constraints = {
        "dim": [Interval(Integral, 1, None, closed="left")],
        "num_out": [Interval(Integral, 1, None, closed="left")],
        "hidden_ratio": [POSITIVE],
    }

    def forward(self, text_tokens) -> Tokens:
        texts = as_tokens(self, text_tokens, "text tokens").check(type(self).__name__, self.dim)
        feats = texts.zero_padding().feats
        weights = aggregation_weights(
            self.mlp(feats), texts.mask.to(feats.dtype).unsqueeze(1)
        )  # (Bt, 1, M, K)
        out = aggregate_tokens(feats, weights)[:, 0]  # (Bt, K, D)
        return Tokens(out, texts.mask.any(1, keepdim=True).expand(-1, self.num_out).clone())

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_out={self.num_out}, " + super().extra_repr()
