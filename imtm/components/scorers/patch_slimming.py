"""LAPS blocks: patch scorer, Gumbel selector, token aggregation, redundant fusion, and the
pairwise :class:`PatchSlimming` scorer built from them.

References:
    Fu, Zhang, Xia and Mao, "Linguistic-Aware Patch Slimming Framework for
    Fine-grained Cross-Modal Alignment", CVPR 2024, Sec. 3.2-3.5, Eq. 1-10.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn as nn

from imtm.component import Component
from imtm.components.scorers.hard_assignment import HardAssignmentCoding, as_tokens, named_errors
from imtm.functional.blocking import (
    check_block_args,
    check_pair_inputs,
    default_block_elements,
    normalize_tokens,
)
from imtm.functional.hard_assignment import CODEBOOKS
from imtm.functional.patch_slimming import (
    aggregate_tokens,
    aggregated_cosines,
    aggregation_weights,
    combine_significance,
    dpc_knn_weights,
    fusion_weights,
    gumbel_keep_decisions,
    logistic_noise,
    masked_softmax,
    self_attentive_scores,
    slimmed_cosines,
    text_attentive_scores,
    top_keep_decisions,
    weighted_cosine,
)
from imtm.functional.pooling import resolve_pooling
from imtm.tokens import Tokens, check_finite

__all__ = [
    "DPCKNNAggregation",
    "GumbelSelector",
    "PatchScorer",
    "PatchSlimming",
    "RedundantFusion",
    "TokenAggregation",
]


def _check_number(
    block, name: str, value, lo: float, hi: float, *, lo_open: bool, hi_open: bool = False
) -> None:
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = (
        ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    )
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(
            f"{type(block).__name__}: {name} must be a number in {lb}{lo}, {hi}{rb}, got {value!r}"
        )


def _check_int(block, name: str, value, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{type(block).__name__}: {name} must be an int >= {lo}, got {value!r}")


def _split_patches(block, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The patch part of image tokens (prefix tokens left out) and its mask."""
    p = tokens.num_prefix_tokens
    if tokens.num_tokens <= p:
        raise ValueError(
            f"{type(block).__name__}: image tokens hold {tokens.num_tokens} position(s) and "
            f"num_prefix_tokens={p}, so no patch is left to select"
        )
    mask = tokens.mask[:, p:]
    return tokens.feats[:, p:], (None if bool(mask.all()) else mask)


def _pair_layout(
    x: torch.Tensor, p: int, fill: float, prefix_mask: torch.Tensor | None
) -> torch.Tensor:
    """``(Bi, Np, Bt)`` patch values -> ``(Bi, Bt, N)`` over all token positions (prefix first)."""
    x = x.permute(0, 2, 1)
    if not p:
        return x
    pre = torch.full((*x.shape[:2], p), fill, dtype=x.dtype, device=x.device)
    if prefix_mask is not None:
        pre = torch.where(
            prefix_mask.unsqueeze(1), pre, torch.zeros((), dtype=x.dtype, device=x.device)
        )
    return torch.cat([pre, x], dim=-1)


# ---------------------------------------------------------------------------- blocks
class PatchScorer(Component):
    r"""Significance of every patch for every caption (LAPS Eq. 1-3).

    .. math::

        a^p_i = \sigma(\operatorname{MLP}(v_i)) \quad \text{(Eq. 1)}, \qquad
        a^s_i = \operatorname{Norm}(v_i \cdot v_{glo} / d), \quad
        a^r_i = \operatorname{Norm}(v_i \cdot t_{glo} / d) \quad \text{(Eq. 2)}

        a_i = (1 - \beta)\, a^p_i + \frac{\beta}{2} (a^s_i + a^r_i) \quad \text{(Eq. 3)}

    ``MLP`` is Linear-GELU-Linear (``dim -> hidden_dim -> 1``); :math:`v_{glo}` the
    image's mean patch and :math:`t_{glo}` the caption's mean word; ``Norm`` min-max
    over the image's real patches (the paper says only "to [0, 1]": this reading is
    settled here). :math:`a^p` and :math:`a^s` depend on the image alone;
    :math:`a^r` makes the score, and so the selection, pair-specific.

    Prefix tokens ([CLS], ``num_prefix_tokens``) are not scored: their score is 0
    (a selector always keeps them). Padding scores 0.

    Args:
        dim: feature size ``D`` of the image tokens.
        beta: :math:`\beta` in ``[0, 1]``.
        hidden_dim: MLP width; ``None``: ``max(1, dim // 4)``.
        language_context: include :math:`a^r` (False: the "without language context" ablation).
        self_attention: include the image self-attention :math:`a^s` (False: a^r alone). Without
            one of :math:`a^s, a^r` the other gets the whole weight :math:`\beta`. (The paper's
            "without patch calibration" row removes the aggregation of Eq. 6-7, not this score:
            :class:`PatchSlimming` with ``aggregation=None``.) ``beta=1`` leaves the prediction
            :math:`a^p` out: the "only attentive scores" row of Table 4.

    Shape:
        - image_tokens: Tokens ``(Bi, N, D)``, text_tokens: Tokens ``(Bt, M, D)``
        - output ``patch_scores``: ``(Bi, Bt, N)`` in ``[0, 1]``

    Raises:
        ValueError: the image tokens hold prefix tokens only (no patch left to select), or
            inputs of the wrong shape.

    References:
        Fu et al., "Linguistic-Aware Patch Slimming Framework for Fine-grained
        Cross-Modal Alignment", CVPR 2024, Eq. 1-3.

    Example:
        >>> scorer = PatchScorer(dim=16)
        >>> scorer(Tokens(torch.randn(2, 5, 16), num_prefix_tokens=1), Tokens(torch.randn(3, 4, 16))).shape
        torch.Size([2, 3, 5])
    """

    requires = ("image_tokens", "text_tokens")
    provides = ("patch_scores",)

    def __init__(
        self,
        dim: int,
        beta: float = 0.8,
        hidden_dim: int | None = None,
        language_context: bool = True,
        self_attention: bool = True,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim
        self.beta = beta
        self.hidden_dim = hidden_dim
        self.language_context = language_context
        self.self_attention = self_attention
        # The MLP is built from dim and hidden_dim below, so they are checked first.
        self._check_sizes()
        hidden = hidden_dim if hidden_dim is not None else max(1, dim // 4)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def _check_sizes(self) -> None:
        _check_int(self, "dim", self.dim)
        if self.hidden_dim is not None:
            _check_int(self, "hidden_dim", self.hidden_dim)

    def validate(self) -> PatchScorer:
        """Check the hyper-parameters; return ``self``."""
        self._check_sizes()
        _check_number(self, "beta", self.beta, 0.0, 1.0, lo_open=False)
        for name in ("language_context", "self_attention"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"{type(self).__name__}: {name} must be True or False, got {getattr(self, name)!r}"
                )
        return self

    def image_scores(self, patches: torch.Tensor, patch_mask: torch.Tensor | None):
        """The image-only parts ``(a^p, a^s)``, each ``(Bi, Np)`` (``a^s`` is None without self-attention)."""
        predicted = torch.sigmoid(self.mlp(patches).squeeze(-1))
        own = self_attentive_scores(patches, patch_mask) if self.self_attention else None
        return predicted, own

    def pair_scores(self, image_part, patches, text_context, patch_mask) -> torch.Tensor:
        """``a`` for every (image, caption) in layout ``(Bi, Np, Bt)``, from :meth:`image_scores`' output."""
        predicted, own = image_part
        text = (
            text_attentive_scores(patches, text_context, patch_mask)
            if self.language_context
            else None
        )
        score = combine_significance(
            predicted.unsqueeze(-1),
            None if own is None else own.unsqueeze(-1),
            text,
            beta=self.beta,
        )
        if patch_mask is not None:
            score = torch.where(
                patch_mask.unsqueeze(-1),
                score,
                torch.zeros((), dtype=score.dtype, device=score.device),
            )
        if text is None:
            # Without the caption the score is the same for every caption.
            score = score.expand(-1, -1, text_context.shape[0])
        return score

    def forward(self, image_tokens, text_tokens) -> torch.Tensor:
        self.validate()  # used alone, a bad beta or flag would otherwise weigh the scores silently
        images = as_tokens(self, image_tokens, "image tokens").check(type(self).__name__, self.dim)
        texts = as_tokens(self, text_tokens, "text tokens").check(type(self).__name__, self.dim)
        patches, patch_mask = _split_patches(self, images)
        score = self.pair_scores(
            self.image_scores(patches, patch_mask), patches, texts.masked_mean(), patch_mask
        )
        return _pair_layout(score, images.num_prefix_tokens, 0.0, None)


class GumbelSelector(Component):
    r"""Keep/drop decisions for every patch of every pair (LAPS Eq. 4-5 and Sec. 3.5).

    In training, two-class Gumbel-softmax over {keep, drop} with logits
    :math:`\log a_i, \log(1 - a_i)` and temperature :math:`\tau`, hard 0/1 forward
    with straight-through gradients (:func:`~imtm.functional.gumbel_keep_decisions`;
    the paper's :math:`\log(m + G)` is read as :math:`(\log m + G)/\tau`). At
    inference, no noise: the top :math:`N_s = \lceil \rho N \rceil` patches by
    ``a`` (``N`` the real patches of the image). Prefix tokens are always kept
    (decision 1), padding never (0).

    The noise comes from torch's default generator, which ``Matcher.fit`` seeds; the
    functional takes an explicit ``generator``.

    Args:
        ratio: :math:`\rho`, the kept fraction at inference, in ``(0, 1]``.
        tau: Gumbel-softmax temperature, > 0.

    Shape:
        - patch_scores: ``(Bi, Bt, N)``, image_tokens: Tokens ``(Bi, N, D)``
        - output ``keep_decisions``: ``(Bi, Bt, N)``, 0/1

    Raises:
        ValueError: the image tokens hold prefix tokens only (no patch left to select), or
            inputs of the wrong shape.

    References:
        Fu et al., CVPR 2024, Eq. 4-5; Jang et al., "Categorical Reparameterization
        with Gumbel-Softmax", ICLR 2017.

    Example:
        >>> sel = GumbelSelector(ratio=0.5).eval()
        >>> d = sel(torch.rand(2, 3, 8), Tokens(torch.randn(2, 8, 4)))
        >>> d.sum(-1)
        tensor([[4., 4., 4.],
                [4., 4., 4.]])
    """

    requires = ("patch_scores", "image_tokens")
    provides = ("keep_decisions",)

    def __init__(self, ratio: float = 0.5, tau: float = 1.0, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.ratio = ratio
        self.tau = tau

    def validate(self) -> GumbelSelector:
        """Check the hyper-parameters; return ``self``."""
        _check_number(self, "ratio", self.ratio, 0.0, 1.0, lo_open=True)
        _check_number(self, "tau", self.tau, 0.0, math.inf, lo_open=True, hi_open=True)
        return self

    def decide(
        self, scores: torch.Tensor, patch_mask: torch.Tensor | None, *, dim: int, noise=None
    ) -> torch.Tensor:
        """Decisions on patch positions along ``dim`` (training: Gumbel with ``noise``; eval: top-k)."""
        if self.training:
            return gumbel_keep_decisions(scores, self.tau, True, mask=patch_mask, noise=noise)
        return top_keep_decisions(scores, self.ratio, patch_mask, dim=dim)

    def forward(self, patch_scores: torch.Tensor, image_tokens) -> torch.Tensor:
        self.validate()
        images = as_tokens(self, image_tokens, "image tokens")
        if (
            not isinstance(patch_scores, torch.Tensor)
            or patch_scores.dim() != 3
            or tuple((patch_scores.shape[0], patch_scores.shape[2]))
            != (images.batch_size, images.num_tokens)
        ):
            raise ValueError(
                f"{type(self).__name__}: expected patch_scores of shape (Bi, Bt, N) = ({images.batch_size}, Bt, "
                f"{images.num_tokens}), got {tuple(getattr(patch_scores, 'shape', ())) or type(patch_scores).__name__}"
            )
        p = images.num_prefix_tokens
        _, patch_mask = _split_patches(self, images)
        scores = patch_scores[..., p:].permute(0, 2, 1)  # (Bi, Np, Bt)
        pm = None if patch_mask is None else patch_mask.unsqueeze(-1)
        # A NaN score would otherwise come out as a plain 0/1 decision (top-k and Gumbel both hide it).
        check_finite(
            scores if pm is None else scores[pm.expand_as(scores)],
            f"{type(self).__name__}: patch_scores",
        )
        decisions = self.decide(scores, pm, dim=1)
        return _pair_layout(decisions, p, 1.0, images.mask[:, :p])

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, tau={self.tau}, " + super().extra_repr()


class TokenAggregation(Component):
    r"""Merges the kept patches of every pair into ``num_out`` tokens (LAPS Eq. 6-7, Sec. 3.3).

    .. math::

        W = \operatorname{softmax}_{i : D_i = 1}\big(\operatorname{MLP}(V)\big), \qquad
        \hat v_j = \sum_i W_{ij} v_i, \quad j = 1..N_c \quad \text{(Eq. 6-7)}

    ``MLP`` is LayerNorm-Linear-GELU-Linear (``dim -> hidden -> num_out``), applied to
    every patch of the image once; the decisions mask the dropped patches before
    the softmax, so each column of ``W`` sums to 1 over the kept patches. The
    decisions multiply the exponentials, so straight-through gradients reach the
    selector.

    Args:
        dim: feature size ``D``.
        num_out: :math:`N_c`, the aggregated tokens (LAPS: :math:`\lambda N_s`).
        hidden_ratio: MLP width as a fraction of ``dim`` (default: a fifth).

    Shape:
        - image_tokens: Tokens ``(Bi, N, D)``, keep_decisions: ``(Bi, Bt, N)``
        - output ``aggregated_tokens``: ``(Bi, Bt, Nc, D)``

    Raises:
        ValueError: the image tokens hold prefix tokens only (no patch left to select), or
            inputs of the wrong shape.

    References:
        Fu et al., CVPR 2024, Eq. 6-7 (Sec. 3.3, semantic-spatial patch calibration).

    Example:
        >>> agg = TokenAggregation(dim=16, num_out=3)
        >>> agg(Tokens(torch.randn(2, 6, 16)), torch.ones(2, 4, 6)).shape
        torch.Size([2, 4, 3, 16])
    """

    requires = ("image_tokens", "keep_decisions")
    provides = ("aggregated_tokens",)

    def __init__(
        self, dim: int, num_out: int, hidden_ratio: float = 0.2, *, requires=None, provides=None
    ):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim
        self.num_out = num_out
        self.hidden_ratio = hidden_ratio
        # The MLP is built from these arguments below, so they are checked first.
        self.validate()
        hidden = max(1, int(dim * hidden_ratio))
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_out)
        )

    def validate(self) -> TokenAggregation:
        """Check ``dim``, ``num_out`` and ``hidden_ratio``; return ``self``."""
        _check_int(self, "dim", self.dim)
        _check_int(self, "num_out", self.num_out)
        _check_number(
            self, "hidden_ratio", self.hidden_ratio, 0.0, math.inf, lo_open=True, hi_open=True
        )
        return self

    def logits(self, patches: torch.Tensor) -> torch.Tensor:
        """``MLP(V)``: ``(Bi, Np, D) -> (Bi, Np, Nc)``, image-only."""
        return self.mlp(patches)

    def forward(self, image_tokens, keep_decisions: torch.Tensor) -> torch.Tensor:
        images = as_tokens(self, image_tokens, "image tokens").check(type(self).__name__, self.dim)
        patches, patch_mask = _split_patches(self, images)
        p = images.num_prefix_tokens
        decisions = _check_decisions(self, keep_decisions, images)[..., p:]
        if patch_mask is not None:
            decisions = torch.where(
                patch_mask.unsqueeze(1),
                decisions,
                torch.zeros((), dtype=decisions.dtype, device=decisions.device),
            )
        safe = images.zero_padding().feats[:, p:]
        return aggregate_tokens(safe, aggregation_weights(self.logits(safe), decisions))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_out={self.num_out}, " + super().extra_repr()


class DPCKNNAggregation(Component):
    r"""Merges the kept patches of every pair into ``num_out`` clusters by DPC-KNN (LAPS Table 4's alternative).

    The clustering alternative to the learned aggregation of Eq. 6-7 in the paper's Table 4:
    density-peak clustering with ``k`` nearest neighbours over the patches a pair keeps, each
    token the mean of one cluster (see :func:`imtm.functional.patch_slimming.dpc_knn_weights`).
    It has no parameters; pass it as :class:`PatchSlimming`'s ``aggregation``.

    Args:
        num_out: clusters ``N_c``.
        k: neighbours of the density estimate (5, as TCFormer's token clustering).

    Shape:
        - image_tokens: Tokens ``(Bi, N, D)``; keep_decisions: ``(Bi, Bt, N)``
        - output ``aggregated_tokens``: ``(Bi, Bt, Nc, D)`` (an empty cluster is a zero token)

    References:
        Du, Ding and Jia, Knowledge-Based Systems 2016 (DPC-KNN); Zeng et al., "Not All Tokens
        Are Equal: Human-centric Visual Analysis via Token Clustering Transformer", CVPR 2022;
        Fu et al., CVPR 2024, Table 4.

    Example:
        >>> agg = DPCKNNAggregation(num_out=2)
        >>> agg(Tokens(torch.randn(2, 6, 8)), torch.ones(2, 3, 6)).shape
        torch.Size([2, 3, 2, 8])
    """

    requires = ("image_tokens", "keep_decisions")
    provides = ("aggregated_tokens",)

    def __init__(self, num_out: int, k: int = 5, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.num_out = num_out
        self.k = k

    def validate(self) -> DPCKNNAggregation:
        """Check ``num_out`` and ``k``; return ``self``."""
        _check_int(self, "num_out", self.num_out)
        _check_int(self, "k", self.k)
        return self

    def pair_weights(self, patches, patch_mask, decisions):
        """``(weights (Bi, Np, Bt, Nc), valid (Bi, Bt, Nc))`` for decisions ``(Bi, Np, Bt)``."""
        return dpc_knn_weights(patches, decisions, self.num_out, k=self.k, mask=patch_mask)

    def forward(self, image_tokens, keep_decisions: torch.Tensor) -> torch.Tensor:
        self.validate()
        images = as_tokens(self, image_tokens, "image tokens")
        patches, patch_mask = _split_patches(self, images)
        p = images.num_prefix_tokens
        decisions = _check_decisions(self, keep_decisions, images)[..., p:]
        safe = images.zero_padding().feats[:, p:]
        weights, _ = self.pair_weights(safe, patch_mask, decisions.permute(0, 2, 1))
        return aggregate_tokens(safe, weights.permute(0, 2, 1, 3))

    def extra_repr(self) -> str:
        return f"num_out={self.num_out}, k={self.k}, " + super().extra_repr()


def _check_decisions(block, decisions, images: Tokens) -> torch.Tensor:
    if (
        not isinstance(decisions, torch.Tensor)
        or decisions.dim() != 3
        or decisions.shape[0] != images.batch_size
        or decisions.shape[2] != images.num_tokens
    ):
        raise ValueError(
            f"{type(block).__name__}: expected keep_decisions of shape (Bi, Bt, N) = ({images.batch_size}, Bt, "
            f"{images.num_tokens}), got {tuple(getattr(decisions, 'shape', ())) or type(decisions).__name__}"
        )
    return decisions.to(images.dtype)


class RedundantFusion(Component):
    r"""Fuses the dropped patches of every pair into one token (LAPS's redundant-patch fusion).

    .. math::

        \hat v_f = \sum_{i : D_i = 0} \operatorname{softmax}(a)_i\, v_i

    the softmax of the significance over the dropped patches only (the paper prints
    :math:`D_i` in the weights; :math:`1 - D_i` is meant). A pair that drops nothing
    gets a zero vector. No parameters.

    Shape:
        - image_tokens: Tokens ``(Bi, N, D)``, patch_scores, keep_decisions: ``(Bi, Bt, N)``
        - output ``fused_tokens``: ``(Bi, Bt, D)``

    Raises:
        ValueError: the image tokens hold prefix tokens only (no patch left to select), or
            inputs of the wrong shape.

    References:
        Fu et al., CVPR 2024 (the fused token of the redundant patches; ``TokenSparse.forward``
        in lib/cross_net.py of CrossmodalGroup/LAPS builds it the same way, a softmax of the
        dropped patches' scores).

    Example:
        >>> fuse = RedundantFusion()
        >>> fuse(Tokens(torch.randn(2, 6, 16)), torch.rand(2, 3, 6), torch.zeros(2, 3, 6)).shape
        torch.Size([2, 3, 16])
    """

    requires = ("image_tokens", "patch_scores", "keep_decisions")
    provides = ("fused_tokens",)

    def __init__(self, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)

    def forward(
        self, image_tokens, patch_scores: torch.Tensor, keep_decisions: torch.Tensor
    ) -> torch.Tensor:
        images = as_tokens(self, image_tokens, "image tokens")
        patches, patch_mask = _split_patches(self, images)
        p = images.num_prefix_tokens
        decisions = _check_decisions(self, keep_decisions, images)[..., p:]
        if not isinstance(patch_scores, torch.Tensor) or patch_scores.shape != keep_decisions.shape:
            raise ValueError(
                f"{type(self).__name__}: patch_scores must have the shape of keep_decisions "
                f"{tuple(keep_decisions.shape)}, got {tuple(getattr(patch_scores, 'shape', ())) or type(patch_scores).__name__}"
            )
        weights = fusion_weights(
            patch_scores[..., p:].to(images.dtype),
            decisions,
            None if patch_mask is None else patch_mask.unsqueeze(1),
        )
        safe = images.zero_padding().feats[:, p:]
        return torch.einsum("itn,ind->itd", weights, safe)


# ---------------------------------------------------------------------------- alignments on slimmed sets
#: ``reduce(cosines (..., K, M), token_mask (..., K), word_mask (..., M)) -> (...)``.
PairReduce = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _hard_assignment_reduce(coding: HardAssignmentCoding) -> PairReduce:
    """CHAN's hard assignment coding on per-pair cosine matrices (its Eq. 5-8)."""
    textual = CODEBOOKS[coding.codebook]
    pool = resolve_pooling(coding.pooling, coding.temperature, where=type(coding).__name__)

    def reduce(sims, token_mask, word_mask):
        if textual:  # every token takes its best word, pooled over tokens
            if word_mask is not None:
                sims = sims.masked_fill(~word_mask.unsqueeze(-2), -math.inf)
            return pool(sims.amax(-1), token_mask, -1)
        sims = sims.masked_fill(~token_mask.unsqueeze(-1), -math.inf)
        return pool(sims.amax(-2), word_mask, -1)

    return reduce


def pair_reducer(alignment: Component) -> PairReduce | None:
    """How ``alignment`` scores one slimmed set from its cosines, or None (then tokens are built)."""
    if hasattr(alignment, "reduce_cosines"):
        return alignment.reduce_cosines
    if isinstance(alignment, HardAssignmentCoding):
        return _hard_assignment_reduce(alignment)
    return None


@dataclass
class _ImageSide:
    """What :class:`PatchSlimming` computes once per image."""

    feats: torch.Tensor  # (Bi, N, D), padding zeroed
    prefix_mask: torch.Tensor  # (Bi, P)
    patches: torch.Tensor  # (Bi, Np, D)
    patch_mask: torch.Tensor | None  # (Bi, Np)
    scores: tuple  # (a^p, a^s)
    logits: torch.Tensor | None  # (Bi, Np, Nc), with a TokenAggregation
    exp_logits: torch.Tensor | None  # (Bi, Np, Nc): exp(logits - the image's max), in (0, 1]
    gram: torch.Tensor | None  # (Bi, Np, Np), when the alignment reduces cosines
    inv_norm: torch.Tensor  # (Bi, N) 1 / |v|


class PatchSlimming(Component):
    r"""LAPS's pairwise scorer: slim the patches for each caption, then align (Eq. 1-8).

    For every image-caption pair: significance ``a`` (:class:`PatchScorer`,
    Eq. 1-3); decisions ``D`` (:class:`GumbelSelector`: Gumbel in training, top
    :math:`N_s` at inference, Eq. 4-5); the slimmed set
    :math:`\{v_{cls}, \hat v_1..\hat v_{N_c}, \hat v_f\}` (:class:`TokenAggregation`,
    Eq. 6-7, and the fused token of the dropped patches); and the alignment of that set with the
    caption's words (:class:`SparsePatchWordAlignment`, Eq. 8, or another scorer:
    the plug-in use of the paper's Table 4, e.g. CHAN's
    :class:`~imtm.components.HardAssignmentCoding`):

    .. math::

        \hat V(I, T) = \{v_{cls}, \hat v_1, \dots, \hat v_{N_c}, \hat v_f\}
        \quad \text{(Eq. 6-7)}, \qquad
        S(I, T) = \frac{1}{|\hat V|} \sum_{i} \max_j A_{ij}
                + \frac{1}{M} \sum_{j} \max_i A_{ij} \quad \text{(Eq. 8)}

    with :math:`A` the cosines of :math:`\hat V(I, T)` and the caption's words.

    Computed for all pairs in blocks, never caption by caption: the scorer MLP,
    :math:`a^s`, the aggregation MLP and the Gram matrix run once per image;
    per pair only :math:`a^r`, the decisions and the masked softmaxes. Alignments
    that reduce cosine matrices (sparse alignment, hard assignment coding) get the
    slimmed tokens' cosines from :func:`~imtm.functional.patch_slimming.aggregated_cosines`, without
    building the tokens; any other scorer is run on the built tokens of each pair.

    The slimmed set's mask: [CLS] (each of ``num_prefix_tokens``) always, the
    :math:`N_c` aggregated tokens where the pair keeps a patch, the fused token where
    it drops one (so with :math:`\rho = 1` it holds :math:`N_c + 1` tokens). Without
    fusion and without a prefix token, a pair whose Gumbel draw keeps nothing keeps its
    most significant patch (training only; otherwise its set would be empty).

    ``keep_decisions`` feed :class:`~imtm.components.RatioLoss` in training;
    ``Matcher.similarity`` keeps only the scores of each block and drops them.

    Args:
        scorer: a :class:`PatchScorer`.
        selector: a :class:`GumbelSelector`.
        aggregation: a :class:`TokenAggregation` (Eq. 6-7), a :class:`DPCKNNAggregation` (the
            clustering alternative of Table 4), or ``None``: the "without patch calibration" row of
            Table 4, which removes the aggregation: the selected patches are aligned as they are
            (the set is ``{v_cls, v_i : D_i = 1, v_f}``), as the line ``aggr_tokens = select_tokens``
            left commented out in ``CrossSparseAggrNet_v2.forward`` (lib/cross_net.py of
            CrossmodalGroup/LAPS) would run it.
        alignment: the pair scorer of the slimmed sets (``requires`` image and text tokens,
            provides scores), e.g. :class:`SparsePatchWordAlignment`.
        fusion: add the fused token of the dropped patches (False: "without redundant fusion").
        max_block_elements: memory budget of one block of pairs (numbers per pairwise
            intermediate); ``None``: :func:`~imtm.functional.blocking.default_block_elements`.

    Shape:
        - image_tokens: Tokens ``(Bi, N, D)`` (``num_prefix_tokens`` marks [CLS])
        - text_tokens: Tokens ``(Bt, M, D)``
        - output: ``scores`` ``(Bi, Bt)`` and ``keep_decisions`` ``(Bi, Bt, N)`` (prefix 1, padding 0)

    Raises:
        ValueError: the image tokens hold prefix tokens only (no patch left to select), or
            inputs of the wrong shape.

    References:
        Fu et al., "Linguistic-Aware Patch Slimming Framework for Fine-grained
        Cross-Modal Alignment", CVPR 2024, Eq. 1-8.

    Example:
        >>> from imtm.components import SparsePatchWordAlignment
        >>> slim = PatchSlimming(PatchScorer(16), GumbelSelector(0.5), TokenAggregation(16, 2),
        ...                      SparsePatchWordAlignment()).eval()
        >>> scores, keep = slim(Tokens(torch.randn(2, 9, 16), num_prefix_tokens=1), Tokens(torch.randn(3, 4, 16)))
        >>> scores.shape, keep.shape, keep[..., 1:].sum(-1).unique().tolist()
        (torch.Size([2, 3]), torch.Size([2, 3, 9]), [4.0])
    """

    requires = ("image_tokens", "text_tokens")
    provides = ("scores", "keep_decisions")

    def __init__(
        self,
        scorer: PatchScorer,
        selector: GumbelSelector,
        aggregation: TokenAggregation | DPCKNNAggregation | None,
        alignment: Component,
        fusion: bool = True,
        max_block_elements: int | None = None,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.scorer = scorer
        self.selector = selector
        self.aggregation = aggregation
        self.alignment = alignment
        self.fusion = fusion
        self.max_block_elements = max_block_elements

    def validate(self) -> PatchSlimming:
        """Check the parts and how they fit together; return ``self``."""
        name = type(self).__name__
        for attr, cls in (("scorer", PatchScorer), ("selector", GumbelSelector)):
            if not isinstance(getattr(self, attr), cls):
                raise TypeError(
                    f"{name}: {attr} must be a {cls.__name__}, got {type(getattr(self, attr)).__name__}"
                )
        if self.aggregation is not None and not isinstance(
            self.aggregation, (TokenAggregation, DPCKNNAggregation)
        ):
            raise TypeError(
                f"{name}: aggregation must be a TokenAggregation, a DPCKNNAggregation or None (no "
                f"aggregation), got {type(self.aggregation).__name__}"
            )
        if not isinstance(self.alignment, Component) or tuple(self.alignment.provides) != (
            "scores",
        ):
            raise TypeError(
                f"{name}: alignment must be a Component that provides ('scores',) from (image_tokens, text_tokens), "
                f"e.g. SparsePatchWordAlignment(); got {self.alignment!r}"
            )
        if (
            isinstance(self.aggregation, TokenAggregation)
            and self.scorer.dim != self.aggregation.dim
        ):
            raise ValueError(
                f"{name}: scorer.dim={self.scorer.dim} and aggregation.dim={self.aggregation.dim} must be equal"
            )
        if not isinstance(self.fusion, bool):
            raise TypeError(f"{name}: fusion must be True or False, got {self.fusion!r}")
        check_block_args(self.max_block_elements, None, where=name)
        for part in (self.scorer, self.selector, self.alignment, self.aggregation):
            if hasattr(part, "validate"):
                part.validate()
        return self

    # ------------------------------------------------------------------ the computation
    def _image_side(self, images: Tokens) -> _ImageSide:
        p = images.num_prefix_tokens
        feats = images.zero_padding().feats
        patches, patch_mask = feats[:, p:], images.mask[:, p:]
        patch_mask = None if bool(patch_mask.all()) else patch_mask
        norms = feats.norm(dim=-1)
        inv = torch.where(
            images.mask,
            1 / norms.clamp_min(1e-8),
            torch.zeros((), dtype=feats.dtype, device=feats.device),
        )
        # The MLPs may run under autocast; what follows stays in the features' dtype (see forward).
        a_p, a_s = self.scorer.image_scores(patches, patch_mask)
        logits = exp_logits = None
        if isinstance(self.aggregation, TokenAggregation):
            logits = self.aggregation.logits(patches).to(feats.dtype)
            top = (
                logits
                if patch_mask is None
                else logits.masked_fill(~patch_mask.unsqueeze(-1), -math.inf)
            )
            shift = top.amax(1, keepdim=True).detach()
            # An image whose only real tokens are prefix tokens has no patch: shift by 0, not -inf (exp(inf)).
            shift = torch.where(
                torch.isfinite(shift),
                shift,
                torch.zeros((), dtype=shift.dtype, device=shift.device),
            )
            exp_logits = torch.exp(logits - shift)
        return _ImageSide(
            feats=feats,
            prefix_mask=images.mask[:, :p],
            patches=patches,
            patch_mask=patch_mask,
            scores=(a_p.to(feats.dtype), None if a_s is None else a_s.to(feats.dtype)),
            logits=logits,
            exp_logits=exp_logits,
            gram=None,  # computed in _pairs, outside autocast
            inv_norm=inv,
        )

    def _plan(
        self, n_images: int, n_captions: int, n_patches: int, n_tokens: int, n_words: int, device
    ) -> tuple[int, int]:
        budget = (
            default_block_elements(device)
            if self.max_block_elements is None
            else self.max_block_elements
        )
        per_pair = n_patches * (n_tokens + n_words) + n_tokens * n_words
        if isinstance(self.aggregation, DPCKNNAggregation):
            per_pair += 2 * n_patches * n_patches  # the pair's distances and density comparisons
        pairs = max(1, budget // max(per_pair, 1))
        bt = max(1, min(n_captions, pairs))
        bi = max(1, min(n_images, pairs // bt))
        return bi, bt

    def forward(self, image_tokens, text_tokens) -> tuple[torch.Tensor, torch.Tensor]:
        name = type(self).__name__
        self.validate()
        images = as_tokens(self, image_tokens, "image tokens")
        texts = as_tokens(self, text_tokens, "text tokens")
        with named_errors(self):
            check_pair_inputs(images.feats, texts.feats, images.mask, texts.mask, where="inputs")
        if images.dim != self.scorer.dim:
            raise ValueError(
                f"{name}: expected image tokens of shape (Bi, N, {self.scorer.dim}), got "
                f"{tuple(images.feats.shape)}"
            )
        _split_patches(self, images)
        dtype = torch.promote_types(images.dtype, texts.dtype)
        images, texts = images.to(dtype), texts.to(dtype)
        reduce = pair_reducer(self.alignment)
        side = self._image_side(images)
        # The pairwise arithmetic runs in the features' dtype even under autocast: the cosines come
        # from differences of products (norms through the Gram matrix), which bf16 would blur by
        # about 0.1 on scores in [-2, 2].
        with torch.autocast(images.device.type, enabled=False):
            return self._pairs(images, texts, side, reduce, dtype)

    def _pairs(self, images: Tokens, texts: Tokens, side: _ImageSide, reduce, dtype):
        if reduce is not None:
            side.gram = torch.bmm(side.patches, side.patches.transpose(1, 2))
        p = images.num_prefix_tokens
        Bi, N, D = images.feats.shape
        Bt, M = texts.batch_size, texts.num_tokens
        Np = N - p
        words = normalize_tokens(texts.feats, texts.mask)  # (Bt, M, D), padding zero
        word_mask = None if bool(texts.mask.all()) else texts.mask
        context = texts.masked_mean()  # t_glo, (Bt, D)
        n_agg = Np if self.aggregation is None else self.aggregation.num_out
        n_slim = n_agg + (1 if self.fusion else 0)
        noise = None
        if self.training:
            # Drawn once for all pairs, so the decisions do not depend on the block size.
            noise = logistic_noise((Bi, Np, Bt), dtype=dtype, device=images.device)
        bi, bt = self._plan(Bi, Bt, Np, n_slim + p, M, images.device)
        rows_s, rows_d = [], []
        for i0 in range(0, Bi, bi):
            i1 = min(Bi, i0 + bi)
            parts_s, parts_d = [], []
            for t0 in range(0, Bt, bt):
                t1 = min(Bt, t0 + bt)
                s, d = self._block(
                    side,
                    i0,
                    i1,
                    t0,
                    t1,
                    words,
                    word_mask,
                    context,
                    texts,
                    None if noise is None else noise[i0:i1, :, t0:t1],
                    reduce,
                )
                parts_s.append(s)
                parts_d.append(d)
            rows_s.append(torch.cat(parts_s, dim=1) if len(parts_s) > 1 else parts_s[0])
            rows_d.append(
                torch.cat(parts_d, dim=2) if len(parts_d) > 1 else parts_d[0]
            )  # (bi, Np, Bt)
        scores = torch.cat(rows_s) if len(rows_s) > 1 else rows_s[0]
        decisions = torch.cat(rows_d) if len(rows_d) > 1 else rows_d[0]
        return scores, _pair_layout(decisions, p, 1.0, side.prefix_mask)

    def _block(
        self, side: _ImageSide, i0, i1, t0, t1, words, word_mask, context, texts, noise, reduce
    ):
        sl = slice(i0, i1)
        patches = side.patches[sl]
        pm = None if side.patch_mask is None else side.patch_mask[sl]
        pm3 = None if pm is None else pm.unsqueeze(-1)
        a_p, a_s = side.scores
        a = self.scorer.pair_scores(
            (a_p[sl], None if a_s is None else a_s[sl]), patches, context[t0:t1], pm
        )  # (bi, Np, bt)
        decisions = self.selector.decide(a, pm3, dim=1, noise=noise)  # (bi, Np, bt)
        p = side.prefix_mask.shape[1]
        if not self.fusion and not p:
            # Nothing else would be left of a pair whose Gumbel draw keeps no patch (possible in
            # training only): it keeps its most significant patch instead of an empty set.
            none_kept = ~(decisions > 0).any(1, keepdim=True)
            decisions = decisions + top_keep_decisions(a, 1e-9, pm3, dim=1) * none_kept
        drop = None
        if self.fusion:
            drop = 1 - decisions
            if pm3 is not None:
                drop = torch.where(pm3, drop, torch.zeros((), dtype=drop.dtype, device=drop.device))
        bi, Np, bt = decisions.shape
        agg = self.aggregation
        dpc = None
        if isinstance(agg, DPCKNNAggregation):
            dpc = agg.pair_weights(
                patches, pm, decisions
            )  # (weights (bi, Np, bt, Nc), valid (bi, bt, Nc))
        # The slimmed set's mask: prefix tokens where real; aggregated tokens where something is kept
        # (clusters: where they hold a patch; no aggregation: the kept patches themselves); the fused
        # token where something is dropped.
        if agg is None:
            agg_mask = (decisions > 0).permute(0, 2, 1)
        elif dpc is not None:
            agg_mask = dpc[1]
        else:
            agg_mask = (decisions > 0).any(1).unsqueeze(-1).expand(bi, bt, agg.num_out)
        masks = [side.prefix_mask[sl].unsqueeze(1).expand(bi, bt, p), agg_mask]
        if self.fusion:
            masks.append((drop > 0).any(1).unsqueeze(-1))
        token_mask = torch.cat(masks, dim=-1)  # (bi, bt, p + K)
        wm = None if word_mask is None else word_mask[t0:t1].unsqueeze(0)
        if reduce is not None:
            w = words[t0:t1]
            M = w.shape[1]
            dots = torch.mm(side.feats[sl].reshape(-1, w.shape[-1]), w.reshape(-1, w.shape[-1]).t())
            dots = dots.view(bi, -1, bt, M)  # (bi, N, bt, M)
            pw, gram = dots[:, p:], side.gram[sl]
            parts = []
            if p:
                parts.append((dots[:, :p] * side.inv_norm[sl, :p, None, None]).permute(0, 2, 1, 3))
            if agg is None:
                # The kept patches as they are: their cosines, times D (1 when kept) for the
                # straight-through gradient; dropped ones are masked out.
                own = pw * side.inv_norm[sl, p:, None, None] * decisions.unsqueeze(-1)
                parts.append(own.permute(0, 2, 1, 3))  # (bi, bt, Np, M)
            elif dpc is not None:
                parts.append(slimmed_cosines(pw, gram, dpc[0]))  # (bi, bt, Nc, M)
            else:
                parts.append(
                    aggregated_cosines(pw, gram, side.exp_logits[sl], decisions)
                )  # (bi, bt, Nc, M)
            if self.fusion:
                # The fused token's softmax of a over the dropped patches, unnormalised: a lies in [0, 1],
                # so exp(a) needs no shift, and the cosine ignores the normaliser.
                parts.append(weighted_cosine(pw, gram, drop * torch.exp(a)))
            scores = reduce(torch.cat(parts, dim=2), token_mask, wm)
        else:
            if agg is None:
                tokens = decisions.permute(0, 2, 1).unsqueeze(-1) * patches.unsqueeze(
                    1
                )  # (bi, bt, Np, D)
            else:
                if dpc is not None:
                    weights = dpc[0]
                else:
                    weights = masked_softmax(
                        side.logits[sl].unsqueeze(2), decisions.unsqueeze(-1), dim=1
                    )
                tokens = aggregate_tokens(patches, weights.permute(0, 2, 1, 3))  # (bi, bt, Nc, D)
            if self.fusion:
                fused = masked_softmax(
                    a.unsqueeze(-1), drop.unsqueeze(-1), dim=1
                )  # (bi, Np, bt, 1)
                tokens = torch.cat(
                    [tokens, aggregate_tokens(patches, fused.permute(0, 2, 1, 3))], dim=2
                )
            K = tokens.shape[2]
            if p:
                pre = side.feats[sl, :p].unsqueeze(1).expand(bi, bt, p, tokens.shape[-1])
                tokens = torch.cat([pre, tokens], dim=2)
            flat = Tokens(tokens.reshape(bi * bt, p + K, -1), token_mask.reshape(bi * bt, p + K))
            all_pairs = self.alignment(
                flat, texts[t0:t1]
            )  # (bi * bt, bt): each set against each caption
            scores = all_pairs.view(bi, bt, bt).diagonal(dim1=1, dim2=2)
        return scores, decisions

    def extra_repr(self) -> str:
        return f"fusion={self.fusion}, " + super().extra_repr()
