"""LAPS blocks: patch scorer, Gumbel selector, token aggregation, redundant fusion, and the
pairwise :class:`PatchSlimming` scorer built from them.

References:
    Fu, Zhang, Xia and Mao, "Linguistic-Aware Patch Slimming Framework for
    Fine-grained Cross-Modal Alignment", CVPR 2024, Sec. 3.2-3.5, Eq. 1-10.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any, ClassVar

import torch
import torch.nn as nn

from imtm._block_inputs import as_tokens, named_errors
from imtm.component import Component
from imtm.contract import (
    BLOCK_BUDGET,
    EXAMPLE_DIM,
    Example,
    InstanceOf,
    Interval,
    Options,
    Satisfies,
    check_param,
)
from imtm.functional.patch_slimming import (
    COSINE_ROUTES,
    TokenAlign,
    aggregate_tokens,
    aggregation_weights,
    combine_significance,
    dpc_knn_weights,
    fusion_weights,
    gumbel_keep_decisions,
    patch_slimming_scores,
    self_attentive_scores,
    text_attentive_scores,
    top_keep_decisions,
)
from imtm.tokens import Tokens, check_finite

__all__ = [
    "DPCKNNAggregation",
    "GumbelSelector",
    "PatchScorer",
    "PatchSlimming",
    "RedundantFusion",
    "TokenAggregation",
    "no_patch_left",
]


def _check_has_patches(block, tokens: Tokens) -> None:
    """Raise unless the image tokens hold a patch after their prefix tokens (shapes only)."""
    p = tokens.num_prefix_tokens
    if tokens.num_tokens <= p:
        raise ValueError(
            f"{type(block).__name__}: image tokens hold {tokens.num_tokens} position(s) and "
            f"num_prefix_tokens={p}, so no patch is left to select"
        )


def _split_patches(block, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The patch part of image tokens (prefix tokens left out) and its mask."""
    _check_has_patches(block, tokens)
    p = tokens.num_prefix_tokens
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


def no_patch_left(values: Mapping[str, Any]) -> tuple[type, str] | None:
    """The error the LAPS blocks document for image tokens that hold prefix tokens only.

    For :class:`imtm.contract.Example`: ``(ValueError, message)`` when ``values["image_tokens"]``
    leaves no patch to select, else ``None``.
    """
    images = values["image_tokens"]
    if images.num_tokens <= images.num_prefix_tokens:
        return ValueError, "no patch is left to select"
    return None


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

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (Example({"dim": EXAMPLE_DIM}, padding=True, error=no_patch_left),)

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
        check_param(self, "dim", dim)
        check_param(self, "hidden_dim", hidden_dim)
        hidden = hidden_dim if hidden_dim is not None else max(1, dim // 4)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    _parameter_constraints = {
        "dim": [Interval(Integral, 1, None)],
        "beta": [Interval(Real, 0, 1)],
        "hidden_dim": [Interval(Integral, 1, None), None],
        "language_context": ["boolean"],
        "self_attention": ["boolean"],
    }

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

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        unused = "reads the image tokens' mask and prefix count, not their features"
        return (Example({"ratio": 0.5}, error=no_patch_left, nan_unused=unused),)

    def __init__(self, ratio: float = 0.5, tau: float = 1.0, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.ratio = ratio
        self.tau = tau

    _parameter_constraints = {
        "ratio": [Interval(Real, 0, 1, closed="right")],
        "tau": [Interval(Real, 0, None, closed="neither")],
    }

    def decide(
        self, scores: torch.Tensor, patch_mask: torch.Tensor | None, *, dim: int, noise=None
    ) -> torch.Tensor:
        """Decisions on patch positions along ``dim`` (training: Gumbel with ``noise``; eval: top-k)."""
        if self.training:
            return gumbel_keep_decisions(scores, self.tau, True, mask=patch_mask, noise=noise)
        return top_keep_decisions(scores, self.ratio, patch_mask, dim=dim)

    def forward(self, patch_scores: torch.Tensor, image_tokens) -> torch.Tensor:
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

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (Example({"dim": EXAMPLE_DIM, "num_out": 2}, error=no_patch_left),)

    def __init__(
        self, dim: int, num_out: int, hidden_ratio: float = 0.2, *, requires=None, provides=None
    ):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim
        self.num_out = num_out
        self.hidden_ratio = hidden_ratio
        # The MLP is built from these arguments below, so they are checked first.
        for name in ("dim", "num_out", "hidden_ratio"):
            check_param(self, name, getattr(self, name))
        hidden = max(1, int(dim * hidden_ratio))
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_out)
        )

    _parameter_constraints = {
        "dim": [Interval(Integral, 1, None)],
        "num_out": [Interval(Integral, 1, None)],
        "hidden_ratio": [Interval(Real, 0, None, closed="neither")],
    }

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

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        # The cluster centres are a discrete choice (the top density x distance scores): float32
        # rounding can pick another centre than float64 where two scores are close.
        discrete = {"dtypes": "float32 rounding can flip DPC-KNN's choice of a cluster centre"}
        return (
            Example({"num_out": 2}, error=no_patch_left, skip=discrete),
            Example({"num_out": 3, "k": 1}, error=no_patch_left, skip=discrete),
        )

    def __init__(self, num_out: int, k: int = 5, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.num_out = num_out
        self.k = k

    _parameter_constraints = {
        "num_out": [Interval(Integral, 1, None)],
        "k": [Interval(Integral, 1, None)],
    }

    def pair_weights(self, patches, patch_mask, decisions):
        """``(weights (Bi, Np, Bt, Nc), valid (Bi, Bt, Nc))`` for decisions ``(Bi, Np, Bt)``."""
        return dpc_knn_weights(patches, decisions, self.num_out, k=self.k, mask=patch_mask)

    def forward(self, image_tokens, keep_decisions: torch.Tensor) -> torch.Tensor:
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
    _parameter_constraints: ClassVar[dict[str, list]] = {}  # no constructor argument

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (Example({}, error=no_patch_left),)

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
def _alignment_is_scorer(alignment) -> bool:
    return isinstance(alignment, Component) and tuple(alignment.provides) == ("scores",)


def _token_align(alignment: Component) -> TokenAlign:
    """Run ``alignment`` on the built slimmed sets of a block (each set against its own caption)."""

    def align(tokens, token_mask, words, word_mask):
        bi, bt, k, d = tokens.shape
        flat = Tokens(tokens.reshape(bi * bt, k, d), token_mask.reshape(bi * bt, k))
        texts = Tokens(words, word_mask)
        all_pairs = alignment(flat, texts)  # (bi * bt, bt): each set against each caption
        return all_pairs.view(bi, bt, bt).diagonal(dim1=1, dim2=2)

    return align


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

    A thin module over :func:`~imtm.functional.patch_slimming.patch_slimming_scores`: it runs
    the scorer MLP and the aggregation MLP once per image and hands the rest to the functional,
    which computes all pairs in blocks, never caption by caption. Alignments that reduce cosine
    matrices (those with a ``reduce_cosines`` method: sparse alignment, CHAN's hard assignment
    coding) get the slimmed tokens' cosines without the tokens being built; any other scorer is
    run on the built tokens of each pair.

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
        cosine_route: how an alignment that scores cosines (Eq. 8) gets those of the aggregated
            and fused tokens: ``"gram"`` from the patch-word products and each image's Gram
            matrix, ``"tokens"`` from the tokens built by one matrix product per image, ``"auto"``
            (default) whichever needs fewer multiply-adds for the shapes at hand
            (:func:`~imtm.functional.patch_slimming.cheaper_cosine_route`: the Gram route at the
            papers' widths, the tokens at small ones). The same scores up to rounding.

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

    _parameter_constraints = {
        "scorer": [InstanceOf(PatchScorer)],
        "selector": [InstanceOf(GumbelSelector)],
        "aggregation": [InstanceOf(TokenAggregation, DPCKNNAggregation), None],
        "alignment": [
            Satisfies(
                _alignment_is_scorer,
                "a Component that provides ('scores',) from (image_tokens, text_tokens), "
                "e.g. SparsePatchWordAlignment()",
                refused=[None, nn.Identity()],
            )
        ],
        "fusion": ["boolean"],
        "max_block_elements": BLOCK_BUDGET,
        "cosine_route": [Options(COSINE_ROUTES)],
    }

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        from imtm.components.scorers.hard_assignment import HardAssignmentCoding
        from imtm.components.scorers.scan_attention import ScanAttention
        from imtm.components.scorers.sparse_alignment import SparsePatchWordAlignment

        def laps(aggregation="learned", alignment=None, **more):
            aggregation = (
                TokenAggregation(EXAMPLE_DIM, 2) if aggregation == "learned" else aggregation
            )
            return {
                "scorer": PatchScorer(EXAMPLE_DIM),
                "selector": GumbelSelector(0.5),
                "aggregation": aggregation,
                "alignment": alignment or SparsePatchWordAlignment(),
                **more,
            }

        discrete = {"dtypes": "float32 rounding can flip DPC-KNN's choice of a cluster centre"}
        return (
            *Example.variants(
                laps(),
                laps(fusion=False, max_block_elements=60),
                laps(cosine_route="tokens"),
                laps(cosine_route="gram", max_block_elements=60),
                laps(alignment=HardAssignmentCoding(pooling="mean")),
                laps(aggregation=None),
                laps(alignment=ScanAttention()),
                error=no_patch_left,
            ),
            Example(
                laps(aggregation=DPCKNNAggregation(2, k=2)), error=no_patch_left, skip=discrete
            ),
        )

    def __init__(
        self,
        scorer: PatchScorer,
        selector: GumbelSelector,
        aggregation: TokenAggregation | DPCKNNAggregation | None,
        alignment: Component,
        fusion: bool = True,
        max_block_elements: int | None = None,
        cosine_route: str = "auto",
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
        self.cosine_route = cosine_route

    def _parts(self) -> tuple:
        return tuple(
            part
            for part in (self.scorer, self.selector, self.aggregation, self.alignment)
            if isinstance(part, Component)
        )

    def validate(self) -> PatchSlimming:
        """Check the parts (their declared constraints too) and how they fit together; return ``self``."""
        if (
            isinstance(self.aggregation, TokenAggregation)
            and self.scorer.dim != self.aggregation.dim
        ):
            raise ValueError(
                f"{type(self).__name__}: scorer.dim={self.scorer.dim} and aggregation.dim="
                f"{self.aggregation.dim} must be equal"
            )
        for part in self._parts():
            part.validate()
        return self

    def forward(self, image_tokens, text_tokens) -> tuple[torch.Tensor, torch.Tensor]:
        # The parts are not called as modules, so a part changed after validation (set_params on
        # the selector, say) is caught here: a flag read per part, no check is repeated.
        if not torch.compiler.is_compiling() and not all(
            part._contract_checked for part in self._parts()
        ):
            self.validate()
        images = as_tokens(self, image_tokens, "image tokens")
        texts = as_tokens(self, text_tokens, "text tokens")
        if images.dim != self.scorer.dim:
            raise ValueError(
                f"{type(self).__name__}: expected image tokens of shape (Bi, N, {self.scorer.dim}), got "
                f"{tuple(images.feats.shape)}"
            )
        _check_has_patches(
            self, images
        )  # (no host read of the mask: it would break a compiled graph)
        p = images.num_prefix_tokens
        # The image-only MLPs run once per image (under autocast if enabled); padding zeroed so
        # that NaN padding never reaches them.
        patches = images.zero_padding().feats[:, p:]
        predicted = torch.sigmoid(self.scorer.mlp(patches).squeeze(-1))
        agg = self.aggregation
        logits = agg.logits(patches) if isinstance(agg, TokenAggregation) else None
        dpc = (agg.num_out, agg.k) if isinstance(agg, DPCKNNAggregation) else None
        reduce = getattr(self.alignment, "reduce_cosines", None)
        with named_errors(self):
            out = patch_slimming_scores(
                images.feats,
                texts.feats,
                images.mask,
                texts.mask,
                predicted=predicted,
                num_prefix_tokens=p,
                beta=self.scorer.beta,
                self_attention=self.scorer.self_attention,
                language_context=self.scorer.language_context,
                ratio=self.selector.ratio,
                tau=self.selector.tau,
                training=self.training,
                aggregation_logits=logits,
                dpc_knn=dpc,
                fusion=self.fusion,
                reduce=reduce,
                align=None if reduce is not None else _token_align(self.alignment),
                max_block_elements=self.max_block_elements,
                cosine_route=self.cosine_route,
            )
        return out.scores, out.keep_decisions

    def extra_repr(self) -> str:
        return f"fusion={self.fusion}, " + super().extra_repr()
