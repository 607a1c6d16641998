r"""ELA's lexicon objectives as pure functions: expansive soft labels, the lexicon KL loss,
masked-LM word masking, and hard-negative sampling for image-text matching.

Shape glossary: ``B`` pairs (image ``b`` with caption ``b``), ``N`` patches,
``M`` words, ``V`` vocabulary, ``K`` selected patches (the masked ones).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
import torch.nn.functional as F

from imtm._checks import suggest

__all__ = [
    "AUTHORS_SCALE",
    "DEFAULT_LABEL_WEIGHTS",
    "IGNORE_INDEX",
    "KL_DIRECTIONS",
    "LABEL_WEIGHTS",
    "expansive_soft_labels",
    "lexicon_kl_loss",
    "mask_words",
    "sample_hard_negatives",
]

#: The two orders of Eq. 7's KL divergence (see :func:`lexicon_kl_loss`).
KL_DIRECTIONS = ("prediction_first", "target_first")

#: Label value of positions that a masked-LM loss ignores (PyTorch's cross-entropy default).
IGNORE_INDEX = -100


#: The authors' scale of the plan-times-cosine product before its softmax: ``scale = 2e3`` in
#: ``ALBEF.get_p2w_loss`` of ``model/model_pretrain.py`` (github.com/Lydia-yang/ELA).
AUTHORS_SCALE = 2e3


def _need_cost(cost, label_weights):
    if cost is None:
        raise ValueError(
            f"label_weights={label_weights!r} needs the transport cost (cost=...), the cosine "
            "distance the plan was solved with"
        )


def _spread_over_picks(values, picked_real):
    """Weights ``values`` normalised; a row without mass spreads evenly over its real picks."""
    total = values.sum(-1, keepdim=True)
    values = torch.where(total > 0, values, picked_real.to(values.dtype))
    return values / values.sum(-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)


def _plan_topk_weights(plan, cost, word_mask, top_k, scale):
    """The plan row over its ``top_k`` largest words, renormalised (a simplification of this library)."""
    k = min(top_k, plan.shape[-1])
    masked = plan.masked_fill(~word_mask, float("-inf"))
    values, index = masked.topk(k, dim=-1)
    # A caption with fewer real words than k: the extra picks are padding (-inf) and weigh 0.
    real = torch.isfinite(values)
    values = torch.where(real, values, torch.zeros_like(values))
    # A row without mass (IPOT can flush a far-away patch row to zero): spread over the picks.
    return _spread_over_picks(values, real), index


def _plan_cosine_softmax_weights(plan, cost, word_mask, top_k, scale):
    """The authors' released rule (``ALBEF.get_p2w_loss`` and ``optimal_transport_dist`` in
    model/model_pretrain.py of Lydia-yang/ELA): softmax over the ``top_k`` words of ``scale * T_ij * cos_ij``."""
    _need_cost(cost, "plan_cosine_softmax")
    k = min(top_k, plan.shape[-1])
    # optimal_transport_dist returns T * cos; get_p2w_loss scales it by 2e3 and sends exact zeros (padding,
    # and plan entries that vanished) to -inf before the top-3 and the softmax.
    product = scale * plan * (1.0 - cost)
    kept = word_mask & (product != 0)
    # The picks rank real words before padding even where no product survives (a row of zeros), so that
    # such a row can spread over real words; the weights still read -inf for every entry the authors drop.
    key = product.masked_fill(~kept, torch.finfo(product.dtype).min)
    _, index = key.masked_fill(~word_mask, float("-inf")).topk(k, dim=-1)
    values = product.gather(-1, index).masked_fill(~kept.gather(-1, index), float("-inf"))
    real = torch.isfinite(values)
    # Departure: a row with no finite pick is NaN in the authors' softmax; here it spreads evenly over the
    # picks that are real words (or, without any, it is renormalised to zero weight by _spread_over_picks).
    shifted = values - torch.where(real, values, torch.zeros_like(values)).amax(-1, keepdim=True)
    weights = torch.where(real, shifted.exp(), torch.zeros_like(values))
    picked_real = word_mask.gather(-1, index)
    return _spread_over_picks(weights, picked_real), index


def _one_minus_plan_weights(plan, cost, word_mask, top_k, scale):
    """Eq. 6 as printed with ``c_ij`` the transport output of Eq. 5: weights ``1 - T_ij`` over the real words."""
    w = (1.0 - plan).clamp_min(0.0).masked_fill(~word_mask, 0.0)
    index = torch.arange(w.shape[-1], device=w.device).expand_as(w)
    return _spread_over_picks(w, word_mask), index


def _one_minus_cost_weights(plan, cost, word_mask, top_k, scale):
    """Weights ``1 - C_ij`` over the real words, ``C`` the cosine cost of Eq. 5 (the plan takes no part)."""
    _need_cost(cost, "one_minus_cost")
    w = (1.0 - cost).clamp_min(0.0).masked_fill(~word_mask, 0.0)
    index = torch.arange(w.shape[-1], device=w.device).expand_as(w)
    # All words at distance >= 1 from the patch: fall back to a uniform mean over the real words.
    return _spread_over_picks(w, word_mask), index


#: How Eq. 6 weighs each word's lexicon distribution for a patch (see :func:`expansive_soft_labels`).
LABEL_WEIGHTS = {
    "plan_cosine_softmax": _plan_cosine_softmax_weights,
    "one_minus_plan": _one_minus_plan_weights,
    "plan_topk": _plan_topk_weights,
    "one_minus_cost": _one_minus_cost_weights,
}

#: The rule used unless another is named: the authors' released rule, ``ALBEF.get_p2w_loss`` in
#: model/model_pretrain.py of Lydia-yang/ELA (see :func:`expansive_soft_labels`).
DEFAULT_LABEL_WEIGHTS = "plan_cosine_softmax"


def expansive_soft_labels(
    plan: torch.Tensor,
    word_probs: torch.Tensor,
    word_mask: torch.Tensor | None = None,
    *,
    batch_index: torch.Tensor | None = None,
    cost: torch.Tensor | None = None,
    label_weights: str = DEFAULT_LABEL_WEIGHTS,
    top_k: int = 3,
    scale: float = AUTHORS_SCALE,
) -> torch.Tensor:
    r"""Soft lexicon labels of patches: a weighted mean of their caption's word distributions.

    .. math::

        \hat y_i = \sum_j w_{ij}\, P^{w2l}_j, \qquad \sum_j w_{ij} = 1
        \qquad \text{(ELA, Eq. 6)}

    The paper prints the weights as :math:`1 - c_{ij}`, with :math:`c_{ij}` the output of
    its transport step (Eq. 5); the authors' released code (model/model_pretrain.py of
    Lydia-yang/ELA) weighs differently. Each reading
    has its own name (``T`` the plan of Eq. 5, ``C`` its cosine cost, ``cos = 1 - C``):

    - ``"plan_cosine_softmax"`` (default), the authors' released rule, read in
      ``model/model_pretrain.py`` of github.com/Lydia-yang/ELA: ``optimal_transport_dist``
      returns the plan times the cosine, ``T * sim``; ``ALBEF.get_p2w_loss`` multiplies it
      by ``scale = 2e3``, sends exact zeros to :math:`-\infty`, keeps the 3 largest entries of
      each patch row and takes their softmax:
      :math:`w_{ij} = \mathrm{softmax}_{j \in \mathrm{top3}}(s\, T_{ij} \cos_{ij})`;
    - ``"one_minus_plan"``, Eq. 6 as printed with :math:`c_{ij} = T_{ij}` the transport
      output of Eq. 5: :math:`w_{ij} \propto 1 - T_{ij}` over every real word (nearly uniform,
      since plan entries are of order :math:`1/(NM)`);
    - ``"one_minus_cost"``: :math:`w_{ij} \propto \max(0, 1 - C_{ij})` over every real word,
      with :math:`C` the cost matrix of Eq. 5 (the cosine distance); the plan takes no part;
    - ``"plan_topk"``: the plan row restricted to its ``top_k`` largest words and renormalised
      (a simplification of this library, neither the paper's nor the authors').

    The default is the authors' rule: it is the one their reported numbers were trained with,
    and on a seeded measurement (``tests/functional/test_ela_lexicon.py::test_label_rules_on_known_alignments``:
    patches that are noisy copies of one word each, one-hot word distributions) it puts the
    most label mass on the right word of the four rules, where ``"one_minus_plan"`` is close to
    the uniform mean of the caption.

    A row without mass spreads evenly over its real picks (the authors' softmax would give NaN
    for a row of zeros). Only the selected patches are computed: with ``batch_index`` the plan
    rows are ``(K, M)`` and the labels ``(K, V)``, so ``(B, N, V)`` is never built. The gather
    loops over the ``top_k`` picks (or the ``M`` words), never over patches.

    Args:
        plan: ``(K, M)`` plan rows of the selected patches (with ``batch_index``), or
            ``(B, N, M)`` plans of every patch.
        word_probs: ``(B, M, V)`` word-to-lexicon distributions :math:`P^{w2l}` (rows sum to 1).
        word_mask: ``(B, M)`` bool, True for the caption's real words (``None``: all).
        batch_index: ``(K,)`` long, the caption (row of ``word_probs``) of each plan row.
        cost: the transport cost, shaped like ``plan`` (needed by ``"plan_cosine_softmax"`` and
            ``"one_minus_cost"``).
        label_weights: one of :data:`LABEL_WEIGHTS`.
        top_k: words per patch of ``"plan_cosine_softmax"`` and ``"plan_topk"`` (the authors: 3).
        scale: factor of ``T * cos`` before the softmax of ``"plan_cosine_softmax"`` (the authors: 2e3).

    Returns:
        ``(K, V)`` (or ``(B, N, V)``) distributions: non-negative, rows sum to 1.

    Shape:
        - plan: ``(K, M)`` or ``(B, N, M)``; word_probs: ``(B, M, V)``; word_mask: ``(B, M)``
        - output: ``(K, V)`` or ``(B, N, V)``

    References:
        Yang et al., "Pre-training Cross-Modal Retrieval by Expansive Lexicon-Patch
        Alignment", LREC-COLING 2024, Eq. 5-6.

    Example:
        >>> probs = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]])
        >>> plan = torch.tensor([[0.1, 0.3]])
        >>> expansive_soft_labels(plan, probs, batch_index=torch.tensor([0]), label_weights="plan_topk", top_k=2)
        tensor([[0.2500, 0.3750, 0.3750]])
    """
    fn = "expansive_soft_labels"
    if label_weights not in LABEL_WEIGHTS:
        raise ValueError(
            f"{fn}: label_weights must be one of {sorted(LABEL_WEIGHTS)}, got {label_weights!r}."
            + suggest(label_weights, LABEL_WEIGHTS)
        )
    if isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1:
        raise ValueError(f"{fn}: top_k must be a positive integer, got {top_k!r}")
    if isinstance(scale, bool) or not isinstance(scale, Real) or not 0 < scale < math.inf:
        raise ValueError(f"{fn}: scale must be a finite number > 0, got {scale!r}")
    if word_probs.dim() != 3:
        raise ValueError(
            f"{fn}: word_probs must have shape (B, M, V), got {tuple(word_probs.shape)}"
        )
    b, m, v = word_probs.shape
    if word_mask is None:
        word_mask = torch.ones(b, m, dtype=torch.bool, device=word_probs.device)
    if tuple(word_mask.shape) != (b, m) or word_mask.dtype != torch.bool:
        raise ValueError(
            f"{fn}: word_mask must be a bool tensor of shape {(b, m)}, got "
            f"{word_mask.dtype} {tuple(word_mask.shape)}"
        )
    if cost is not None and cost.shape != plan.shape:
        raise ValueError(
            f"{fn}: cost must have the plan's shape {tuple(plan.shape)}, got {tuple(cost.shape)}"
        )
    if batch_index is None:
        if plan.dim() != 3 or plan.shape[0] != b or plan.shape[2] != m:
            raise ValueError(
                f"{fn}: without batch_index, plan must have shape (B, N, M) = ({b}, N, {m}), "
                f"got {tuple(plan.shape)}"
            )
        n = plan.shape[1]
        batch_index = torch.arange(b, device=plan.device).repeat_interleave(n)
        rows = plan.reshape(b * n, m)
        cost_rows = None if cost is None else cost.reshape(b * n, m)
        return expansive_soft_labels(
            rows,
            word_probs,
            word_mask,
            batch_index=batch_index,
            cost=cost_rows,
            label_weights=label_weights,
            top_k=top_k,
            scale=scale,
        ).reshape(b, n, v)
    if plan.dim() != 2 or plan.shape[1] != m:
        raise ValueError(
            f"{fn}: with batch_index, plan must have shape (K, M) = (K, {m}), got {tuple(plan.shape)}"
        )
    if batch_index.dim() != 1 or batch_index.shape[0] != plan.shape[0]:
        raise ValueError(
            f"{fn}: batch_index must have shape ({plan.shape[0]},), got {tuple(batch_index.shape)}"
        )
    row_mask = word_mask.index_select(0, batch_index)
    try:
        weights, index = LABEL_WEIGHTS[label_weights](plan, cost, row_mask, top_k, float(scale))
    except ValueError as err:
        raise ValueError(f"{fn}: {err}") from None
    flat = word_probs.reshape(b * m, v)
    base = batch_index * m
    labels = word_probs.new_zeros(plan.shape[0], v)
    # A loop over the picks (top_k, or M words), each one gather of (K, V): memory stays 2 x (K, V).
    for r in range(index.shape[1]):
        labels = labels + weights[:, r : r + 1].to(labels.dtype) * flat.index_select(
            0, base + index[:, r]
        )
    return labels


def lexicon_kl_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str = "mean",
    eps: float = 1e-8,
    direction: str = "prediction_first",
) -> torch.Tensor:
    r"""KL divergence of predicted lexicon distributions from (detached) soft labels.

    .. math::

        \mathcal L_{ELA} = \sum_{i \in \text{masked}} \mathrm{KL}\big(P^{p2l}_i \,\|\, \hat y_i\big)
        = \sum_i \sum_w P^{p2l}_{iw} \big(\log P^{p2l}_{iw} - \log \hat y_{iw}\big)
        \qquad \text{(ELA, Eq. 7; Eq. 10 for distillation)}

    The direction is the paper's: the prediction first. No gradient reaches the
    target (``target`` is detached here). Label entries are floored at ``eps``
    before the log, so a word with zero label mass costs a finite penalty.

    Args:
        logits: ``(K, V)`` unnormalised predictions (:math:`P = \mathrm{softmax}`).
        target: ``(K, V)`` target distributions (rows sum to 1).
        reduction: ``"mean"`` over the ``K`` rows (default, independent of the batch),
            ``"sum"`` (Eq. 7 as printed) or ``"none"`` (``(K,)``). ``K = 0`` gives 0.
        eps: floor of the target before its log.
        direction: ``"prediction_first"`` (default), :math:`\mathrm{KL}(P \| \hat y)` as Eq. 7
            prints it; or ``"target_first"``, :math:`\mathrm{KL}(\hat y \| P)`, what
            ``torch.nn.functional.kl_div(log P, y)`` computes (cross-entropy to the soft
            labels up to a constant): its gradient :math:`P - \hat y` stays bounded, where the
            printed direction charges :math:`-\log \varepsilon` for mass on words the label
            leaves out (one-hot labels).

    Shape:
        - logits, target: ``(K, V)``
        - output: ``()`` or ``(K,)``

    References:
        Yang et al., "Pre-training Cross-Modal Retrieval by Expansive Lexicon-Patch
        Alignment", LREC-COLING 2024, Eq. 7 and 10.

    Example:
        >>> lexicon_kl_loss(torch.zeros(1, 2), torch.tensor([[0.5, 0.5]]))
        tensor(0.)
    """
    fn = "lexicon_kl_loss"
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(
            f"{fn}: reduction must be one of ['mean', 'none', 'sum'], got {reduction!r}."
            + suggest(reduction, ("mean", "sum", "none"))
        )
    if logits.dim() != 2 or logits.shape != target.shape:
        raise ValueError(
            f"{fn}: logits and target must both have shape (K, V), got {tuple(logits.shape)} "
            f"and {tuple(target.shape)}"
        )
    if isinstance(eps, bool) or not isinstance(eps, Real) or not eps > 0:
        raise ValueError(f"{fn}: eps must be a number > 0, got {eps!r}")
    if direction not in KL_DIRECTIONS:
        raise ValueError(
            f"{fn}: direction must be one of {sorted(KL_DIRECTIONS)}, got {direction!r}."
            + suggest(direction, KL_DIRECTIONS)
        )
    # At least float32: a bf16 / fp16 log-softmax over a vocabulary loses the small probabilities.
    log_p = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    y = target.detach().to(log_p.dtype)
    log_y = y.clamp_min(eps).log()
    if direction == "prediction_first":
        per_row = (log_p.exp() * (log_p - log_y)).sum(-1)
    else:
        # xlogy: words with zero label mass contribute exactly 0.
        per_row = (torch.xlogy(y, y) - y * log_p).sum(-1)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / max(per_row.shape[0], 1)


def mask_words(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    prob: float = 0.15,
    replace_mask: float = 0.8,
    replace_random: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""BERT's masked-LM corruption: pick ``prob`` of the maskable words; of those,
    80% become [MASK], 10% a random token, 10% stay (ELA Eq. 11, as BERT).

    Args:
        ids: ``(B, L)`` long token ids.
        maskable: ``(B, L)`` bool, True for the words that may be picked (not [CLS],
            [SEP] or padding).
        mask_token_id: id of [MASK]. vocab_size: ``V`` (random replacements lie in ``[0, V)``).
        prob, replace_mask, replace_random: the three fractions (BERT: 0.15, 0.8, 0.1).
        generator: a ``torch.Generator`` for reproducible draws (``None``: the global one).

    Returns:
        ``(masked_ids, labels)``: labels hold the original id at picked positions and
        :data:`IGNORE_INDEX` elsewhere.

    Shape:
        - ids, maskable: ``(B, L)``; outputs: ``(B, L)``

    References:
        Devlin et al., "BERT", NAACL 2019, Sec. 3.1.

    Example:
        >>> ids = torch.tensor([[101, 7, 8, 102]])
        >>> masked, labels = mask_words(ids, ids > 102, mask_token_id=103, vocab_size=200, prob=0.0)
        >>> labels.tolist()
        [[-100, -100, -100, -100]]
    """
    fn = "mask_words"
    if ids.shape != maskable.shape or maskable.dtype != torch.bool:
        raise ValueError(f"{fn}: maskable must be a bool tensor shaped like ids {tuple(ids.shape)}")
    for name, value in (
        ("prob", prob),
        ("replace_mask", replace_mask),
        ("replace_random", replace_random),
    ):
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= 1:
            raise ValueError(f"{fn}: {name} must be a number in [0, 1], got {value!r}")
    if replace_mask + replace_random > 1:
        raise ValueError(
            f"{fn}: replace_mask + replace_random must be at most 1, got {replace_mask + replace_random}"
        )
    draw = torch.rand(
        ids.shape, generator=generator, device=ids.device if generator is None else "cpu"
    ).to(ids.device)
    picked = maskable & (draw < prob)
    how = torch.rand(
        ids.shape, generator=generator, device=ids.device if generator is None else "cpu"
    ).to(ids.device)
    random_ids = torch.randint(
        0,
        vocab_size,
        ids.shape,
        generator=generator,
        device=ids.device if generator is None else "cpu",
    ).to(ids.device)
    out = torch.where(picked & (how < replace_mask), torch.full_like(ids, mask_token_id), ids)
    out = torch.where(
        picked & (how >= replace_mask) & (how < replace_mask + replace_random), random_ids, out
    )
    labels = torch.where(picked, ids, torch.full_like(ids, IGNORE_INDEX))
    return out, labels


def sample_hard_negatives(
    scores: torch.Tensor,
    positives: torch.Tensor,
    *,
    temperature: float = 0.07,
    sample: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One hard negative caption per image and one hard negative image per caption.

    Negatives are drawn with probability :math:`\mathrm{softmax}(s / \tau)` over the
    non-positives of each row (image -> caption) and each column (caption -> image),
    as ALBEF and ELA sample them for image-text matching; ``sample=False`` takes the
    highest-scoring negative instead (deterministic, for evaluation). A row without any
    negative gets index ``-1``.

    Args:
        scores: ``(Bi, Bt)`` contrastive similarities (detached here).
        positives: ``(Bi, Bt)`` bool.
        temperature: :math:`\tau > 0` of the sampling softmax.

    Returns:
        ``(neg_text_of_image (Bi,), neg_image_of_text (Bt,))`` long indices.

    Raises:
        ValueError: shapes that disagree, an empty batch (``Bi`` or ``Bt`` is 0), or a
            temperature that is not > 0.

    References:
        Li et al., "Align before Fuse" (ALBEF), NeurIPS 2021, Sec. 3.2.

    Example:
        >>> s = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.9, 0.0], [0.1, 0.3, 0.9]])
        >>> sample_hard_negatives(s, torch.eye(3, dtype=torch.bool), sample=False)
        (tensor([1, 0, 1]), tensor([1, 0, 0]))
    """
    fn = "sample_hard_negatives"
    if scores.dim() != 2 or positives.shape != scores.shape or positives.dtype != torch.bool:
        raise ValueError(
            f"{fn}: scores must be (Bi, Bt) with a bool positives of the same shape, got "
            f"{tuple(scores.shape)} and {positives.dtype} {tuple(positives.shape)}"
        )
    if scores.numel() == 0:
        raise ValueError(
            f"{fn}: needs at least one image and one caption, got scores of shape {tuple(scores.shape)}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not temperature > 0:
        raise ValueError(f"{fn}: temperature must be a number > 0, got {temperature!r}")
    s = scores.detach().float()

    def pick(sim, pos):
        has_neg = (~pos).any(1)
        logits = (sim / temperature).masked_fill(pos, float("-inf"))
        # A row of positives only: pick index 0 from a finite row, report -1 below.
        logits = torch.where(has_neg.unsqueeze(1), logits, torch.zeros_like(logits))
        if sample:
            idx = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
        else:
            idx = logits.argmax(1)
        return torch.where(has_neg, idx, torch.full_like(idx, -1))

    return pick(s, positives), pick(s.t(), positives.t())
