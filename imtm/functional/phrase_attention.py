"""DCPA's inter-modal phrase attention, scored for every image-caption pair in blocks.

One branch of DCPA (Eq. 11-14) runs a standard Transformer decoder layer per
pair: the query tokens (regions for image-to-text, words for text-to-image)
attend to each other, then query the other modality's tokens, then pass a
position-wise feed-forward sub-layer; each output is compared with every token
of the other modality. The self-attention depends
on one side only and runs once per query set; the key and value projections
run once per key set. Only the cross-attention itself is pairwise, and it is
computed for blocks of ``(b_q query sets) x (b_k key sets)`` at once with
batched matrix products: no loop over images or captions, and the block size
comes from a memory budget.

References:
    Shi et al., "Decoupled Cross-modal Phrase-Attention Network for
    Image-Sentence Matching", IEEE TIP 2022, Eq. 11-14.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from imtm.functional.blocking import (
    EPS,
    check_pair_inputs,
    default_block_elements,
    normalize_tokens,
)
from imtm.functional.topk import DEFAULT_TOPK, check_average, check_k, topk_mean

__all__ = [
    "AttentionWeights",
    "FeedForwardWeights",
    "feed_forward",
    "phrase_attention_scores",
    "phrase_attention_token_scores",
    "self_attention",
]

#: LayerNorm epsilon (torch's default, as in nn.TransformerDecoderLayer).
LAYER_NORM_EPS = 1e-5

#: On CPU, when no budget is given: at most this many numbers in one block's largest intermediate,
#: so that a block's intermediates stay in the cache (``benchmarks/bench_dcpa.py`` measures it).
CPU_BLOCK_ELEMENTS = 1 << 20

#: Query tokens aimed at per block: the rows of each key set's value product ``A (V W_O)``.
BLOCK_ROWS = 256


@dataclass(frozen=True)
class AttentionWeights:
    """The weights of one multi-head attention sub-layer with its residual LayerNorm.

    The layout is ``nn.MultiheadAttention``'s (packed ``in_proj``), so
    :meth:`from_modules` reads a module's tensors without copying them and
    gradients flow back to the module.

    Attributes:
        in_proj_weight: ``(3D, D)`` query, key and value projections, stacked.
        in_proj_bias: ``(3D,)``.
        out_proj_weight: ``(D, D)``. out_proj_bias: ``(D,)``.
        norm_weight, norm_bias: ``(D,)`` the LayerNorm after the residual sum.

    Example:
        >>> w = AttentionWeights.from_modules(torch.nn.MultiheadAttention(8, 2), torch.nn.LayerNorm(8))
        >>> tuple(w.in_proj_weight.shape), tuple(w.norm_bias.shape)
        ((24, 8), (8,))
    """

    in_proj_weight: torch.Tensor
    in_proj_bias: torch.Tensor
    out_proj_weight: torch.Tensor
    out_proj_bias: torch.Tensor
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor

    @classmethod
    def from_modules(
        cls, attention: torch.nn.MultiheadAttention, norm: torch.nn.LayerNorm
    ) -> AttentionWeights:
        """The weights of an ``nn.MultiheadAttention`` (with biases) and its ``nn.LayerNorm``."""
        return cls(
            attention.in_proj_weight,
            attention.in_proj_bias,
            attention.out_proj.weight,
            attention.out_proj.bias,
            norm.weight,
            norm.bias,
        )

    def projections(self):
        """``(W_q, W_k, W_v), (b_q, b_k, b_v)``."""
        return self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)


@dataclass(frozen=True)
class FeedForwardWeights:
    """The weights of a position-wise feed-forward sub-layer with its residual LayerNorm.

    The layout is ``nn.TransformerDecoderLayer``'s (``linear1``, ``linear2``, ``norm3``), read
    without copies by :meth:`from_modules`, so gradients reach the modules.

    Attributes:
        linear1_weight: ``(F, D)``. linear1_bias: ``(F,)``.
        linear2_weight: ``(D, F)``. linear2_bias: ``(D,)``.
        norm_weight, norm_bias: ``(D,)`` the LayerNorm after the residual sum.

    Example:
        >>> w = FeedForwardWeights.from_modules(torch.nn.Linear(8, 32), torch.nn.Linear(32, 8), torch.nn.LayerNorm(8))
        >>> tuple(w.linear1_weight.shape)
        (32, 8)
    """

    linear1_weight: torch.Tensor
    linear1_bias: torch.Tensor
    linear2_weight: torch.Tensor
    linear2_bias: torch.Tensor
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor

    @classmethod
    def from_modules(
        cls, linear1: torch.nn.Linear, linear2: torch.nn.Linear, norm: torch.nn.LayerNorm
    ) -> FeedForwardWeights:
        """The weights of two ``nn.Linear`` (with biases) and the ``nn.LayerNorm`` after them."""
        return cls(
            linear1.weight, linear1.bias, linear2.weight, linear2.bias, norm.weight, norm.bias
        )


def feed_forward(y: torch.Tensor, weights: FeedForwardWeights) -> torch.Tensor:
    r"""Post-norm residual feed-forward sub-layer (the third sub-layer of a Transformer decoder layer).

    .. math::

        Y' = \operatorname{LN}_3\big(Y + W_2 \max(0, W_1 Y + b_1) + b_2\big)

    ReLU, as ``nn.TransformerDecoderLayer``'s default.

    Shape:
        - y: ``(*, D)``, output: ``(*, D)``

    References:
        Vaswani et al., "Attention Is All You Need", NeurIPS 2017, Sec. 3.3.

    Example:
        >>> w = FeedForwardWeights.from_modules(torch.nn.Linear(8, 32), torch.nn.Linear(32, 8), torch.nn.LayerNorm(8))
        >>> feed_forward(torch.randn(2, 3, 8), w).shape
        torch.Size([2, 3, 8])
    """
    hidden = F.relu(F.linear(y, weights.linear1_weight, weights.linear1_bias))
    out = F.linear(hidden, weights.linear2_weight, weights.linear2_bias)
    return F.layer_norm(
        y + out, (y.shape[-1],), weights.norm_weight, weights.norm_bias, LAYER_NORM_EPS
    )


#: The sub-layer under a name the ``feed_forward=`` arguments below do not shadow.
_feed_forward = feed_forward


def _check_feed_forward(w, dim: int, where: str, like: torch.Tensor) -> int:
    """The hidden width ``F`` of feed-forward weights for ``D = dim``, after checking them."""
    if not isinstance(w, FeedForwardWeights):
        raise TypeError(
            f"{where}: feed_forward must be a FeedForwardWeights or None, got {type(w).__name__}"
        )
    hidden = w.linear1_weight.shape[0] if w.linear1_weight.dim() == 2 else -1
    shapes = {
        "linear1_weight": (hidden, dim),
        "linear1_bias": (hidden,),
        "linear2_weight": (dim, hidden),
        "linear2_bias": (dim,),
        "norm_weight": (dim,),
        "norm_bias": (dim,),
    }
    for name, shape in shapes.items():
        tensor = getattr(w, name)
        if tuple(tensor.shape) != shape or hidden < 1:
            raise ValueError(
                f"{where}: feed_forward.{name} must have shape {shape} for D={dim}, "
                f"got {tuple(tensor.shape)}"
            )
        if tensor.device != like.device:
            raise ValueError(
                f"{where}: feed_forward.{name} is on {tensor.device} but the tokens are on {like.device}"
            )
    return hidden


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, L, D) -> (B, D)``, the mean of the valid tokens (0 for a set without one)."""
    if mask is None:
        return x.mean(1)
    x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum(1) / mask.sum(1, keepdim=True).clamp_min(1).to(x.dtype)


def _check_weights(
    w, dim: int, heads, where: str, what: str, like: torch.Tensor | None = None
) -> None:
    if not isinstance(w, AttentionWeights):
        raise TypeError(f"{where}: {what} must be an AttentionWeights, got {type(w).__name__}")
    shapes = {
        "in_proj_weight": (3 * dim, dim),
        "in_proj_bias": (3 * dim,),
        "out_proj_weight": (dim, dim),
        "out_proj_bias": (dim,),
        "norm_weight": (dim,),
        "norm_bias": (dim,),
    }
    # Under autocast the products cast both sides themselves; otherwise the weights must match the tokens.
    same_dtype = like is not None and not torch.is_autocast_enabled(like.device.type)
    for name, shape in shapes.items():
        tensor = getattr(w, name)
        got = tuple(tensor.shape)
        if got != shape:
            raise ValueError(
                f"{where}: {what}.{name} must have shape {shape} for D={dim}, got {got}"
            )
        if like is not None and tensor.device != like.device:
            raise ValueError(
                f"{where}: {what}.{name} is on {tensor.device} but the tokens are on {like.device}"
            )
        if same_dtype and like is not None and tensor.dtype != like.dtype:
            raise TypeError(
                f"{where}: {what}.{name} is {tensor.dtype} but the tokens are {like.dtype}; "
                "cast the weights (or the tokens) to one dtype"
            )
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or dim % heads:
        raise ValueError(f"{where}: heads must be a positive int dividing D={dim}, got {heads!r}")


def self_attention(
    x: torch.Tensor, mask: torch.Tensor | None, weights: AttentionWeights, heads: int
) -> torch.Tensor:
    r"""Post-norm residual multi-head self-attention within each set (the first sub-layer of DCPA's decoder, Eq. 11-14).

    .. math::

        X = \operatorname{LN}\big(Q + \operatorname{MHA}(Q, Q, Q)\big)

    Padded tokens are never attended to (their features are zeroed first, so
    NaN in padding cannot leak); their outputs are defined but meaningless.

    Shape:
        - x: ``(B, L, D)``, mask: ``(B, L)``, output: ``(B, L, D)``

    References:
        Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (post-norm sub-layer).

    Example:
        >>> mha, ln = torch.nn.MultiheadAttention(8, 2, batch_first=True), torch.nn.LayerNorm(8)
        >>> self_attention(torch.randn(3, 4, 8), None, AttentionWeights.from_modules(mha, ln), 2).shape
        torch.Size([3, 4, 8])
    """
    D = x.shape[-1]
    dh = D // heads
    if mask is not None:
        x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    (wq, wk, wv), (bq, bk, bv) = weights.projections()
    # head split: the D channels are H heads of dh, each head attends on its own
    q = rearrange(F.linear(x, wq, bq), "b l (h d) -> b h l d", h=heads) / math.sqrt(dh)
    k = rearrange(F.linear(x, wk, bk), "b l (h d) -> b h l d", h=heads)
    v = rearrange(F.linear(x, wv, bv), "b l (h d) -> b h l d", h=heads)
    logits = q @ k.transpose(-1, -2)  # (B, H, L, L)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], -math.inf)
    out = rearrange(logits.softmax(-1) @ v, "b h l d -> b l (h d)")
    out = F.linear(out, weights.out_proj_weight, weights.out_proj_bias)
    return F.layer_norm(x + out, (D,), weights.norm_weight, weights.norm_bias, LAYER_NORM_EPS)


def phrase_attention_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    *,
    self_attn: AttentionWeights,
    cross_attn: AttentionWeights,
    heads: int,
    k: int | None = DEFAULT_TOPK,
    max_block_elements: int | None = None,
    feed_forward: FeedForwardWeights | None = None,
    average: str = "features",
) -> torch.Tensor:
    r"""One DCPA inter-modal branch, scored for every (query set, key set) pair.

    For the image-to-text branch the query sets are images (regions ``v``) and
    the key sets captions (words ``w``); the text-to-image branch swaps them.
    For every pair:

    .. math::

        X &= \operatorname{LN}_1\big(V + \operatorname{MHA}_1(V, V, V)\big) \\
        Y &= \operatorname{LN}_2\big(X + \operatorname{MHA}_2(X, W, W)\big) \\
        VP^T &= \operatorname{LN}_3\big(Y + \operatorname{FFN}(Y)\big) \\
        s_k &= \max_{m} \cos(vp^T_k, w_m) \\
        S(i^T, c) &= \frac{1}{K'} \sum_{k \in \operatorname{top}_{K'}} s_k \qquad \text{(Eq. 11-14)}

    The layer is a standard (post-norm) Transformer decoder layer, as the paper's decoder
    is: self-attention, cross-attention, feed-forward, each with residual and LayerNorm;
    with ``feed_forward`` weights it equals ``nn.TransformerDecoderLayer`` (dropout 0, ReLU)
    run on every pair (a test checks this). ``feed_forward=None`` leaves the feed-forward
    sub-layer out (the layer of earlier versions of this library).

    The key and value projections of ``MHA_2`` are computed once per key set,
    its query projection once per query set (after ``MHA_1``, which is
    per set too); the output projection is folded into the values
    (``sum_h A_h (V_h W_O^h)``), so the pairwise work is the attention
    itself, ``O(H * L * M * D)`` per pair, plus the feed-forward sub-layer,
    ``O(L * D * F)`` per pair. ``K' = min(K, valid queries)``.

    ``k=None`` is the "global average" of DCPA's Table IV ("w/o local-agg"): with
    ``average="features"`` (default) the outputs are averaged first and one cosine taken with
    the mean of the other modality's tokens, :math:`\cos(\frac1L \sum_k vp^T_k, \frac1M \sum_m w_m)`;
    ``average="cosines"`` averages the :math:`s_k` instead.

    A paper ambiguity settled here: each output is compared with the *input* tokens of
    the other modality.

    Args:
        queries: query token features (regions for image-to-text).
        keys: key token features (words for image-to-text).
        query_mask: True where a query token is real; ``None``: all are.
        key_mask: True where a key token is real; ``None``: all are. Padded keys
            are never attended to and never compared.
        self_attn: weights of ``MHA_1`` and ``LN_1``.
        cross_attn: weights of ``MHA_2`` and ``LN_2``.
        heads: attention heads ``H`` (divides ``D``).
        k: query tokens averaged per pair; ``None``: the global average (see ``average``).
        max_block_elements: at most about this many numbers in one block's largest
            intermediate (``b_q * b_k * L * max(D, H * M, F)``) and in a key block's values
            with the output projection folded in (``b_k * H * M * D``); ``None``: the
            device default.
        feed_forward: weights of the feed-forward sub-layer (:class:`FeedForwardWeights`,
            hidden width ``F``); ``None``: no feed-forward sub-layer.
        average: with ``k=None``, ``"features"`` (pool, then one cosine) or ``"cosines"``.

    Returns:
        ``(Bq, Bk)`` scores in ``[-1, 1]``.

    Raises:
        TypeError, ValueError: bad tensors or masks (see
            :func:`~imtm.functional.blocking.check_pair_inputs`), weights of the wrong
            shape, device or (outside autocast) dtype, ``heads`` not dividing ``D``, a bad
            ``k`` or budget.

    Shape:
        - queries: ``(Bq, L, D)``, query_mask: ``(Bq, L)``
        - keys: ``(Bk, M, D)``, key_mask: ``(Bk, M)``
        - output: ``(Bq, Bk)``

    References:
        Shi et al., "Decoupled Cross-modal Phrase-Attention Network for
        Image-Sentence Matching", IEEE TIP 2022, Eq. 11-14.
        Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (decoder layer).

    Example:
        >>> mk = lambda: AttentionWeights.from_modules(torch.nn.MultiheadAttention(8, 2), torch.nn.LayerNorm(8))
        >>> regions, words = torch.randn(3, 5, 8), torch.randn(4, 6, 8)
        >>> phrase_attention_scores(regions, words, self_attn=mk(), cross_attn=mk(), heads=2, k=3).shape
        torch.Size([3, 4])
    """
    where = "phrase_attention_scores"
    check_k(k, where=where)
    check_average(average, where=where)
    if max_block_elements is not None and (
        isinstance(max_block_elements, bool)
        or not isinstance(max_block_elements, int)
        or max_block_elements < 1
    ):
        raise ValueError(
            f"{where}: max_block_elements must be a positive int or None, got {max_block_elements!r}"
        )
    queries, keys, query_mask, key_mask = check_pair_inputs(
        queries, keys, query_mask, key_mask, where=where
    )
    D = queries.shape[-1]
    _check_weights(self_attn, D, heads, where, "self_attn", like=queries)
    _check_weights(cross_attn, D, heads, where, "cross_attn", like=queries)
    hidden = 0 if feed_forward is None else _check_feed_forward(feed_forward, D, where, queries)
    budget = max_block_elements
    if budget is None:
        budget = default_block_elements(queries.device)
        if queries.device.type == "cpu":
            budget = min(budget, CPU_BLOCK_ELEMENTS)
    Bq, L, _ = queries.shape
    Bk, M, _ = keys.shape
    if Bq == 0 or Bk == 0:
        return torch.zeros(Bq, Bk, dtype=queries.dtype, device=queries.device)
    H, dh = heads, D // heads
    zero = torch.zeros((), dtype=keys.dtype, device=keys.device)

    # Per query set: self-attention, then the cross-attention's query projection.
    x = self_attention(queries, query_mask, self_attn, heads)  # (Bq, L, D)
    (wq, wk, wv), (bq_, bk_, bv_) = cross_attn.projections()
    q = (F.linear(x, wq, bq_) / math.sqrt(dh)).view(Bq, L, H, dh)
    # Per key set: key projection, and values with the output projection folded in:
    # concat_h(A_h V_h) W_O^T = sum_h A_h (V_h W_O^h) with W_O^h the head's columns of W_O.
    kz = keys if key_mask is None else torch.where(key_mask.unsqueeze(-1), keys, zero)
    kp = F.linear(kz, wk, bk_).view(Bk, M, H, dh)
    vp = F.linear(kz, wv, bv_).view(Bk, M, H, dh)
    w_out = cross_attn.out_proj_weight.view(D, H, dh)
    key_unit = normalize_tokens(keys, key_mask)  # (Bk, M, D), zero at padding
    pooled = k is None and average == "features"
    if pooled:
        key_mean = F.normalize(_masked_mean(kz, key_mask), dim=-1, eps=EPS)
    # Padded keys get -inf added inside the products (beta * bias + A @ B in one pass), instead of a
    # masked_fill over each product afterwards.
    key_bias = None
    if key_mask is not None:
        key_bias = torch.zeros(Bk, M, dtype=keys.dtype, device=keys.device).masked_fill_(
            ~key_mask, -math.inf
        )
    x_bias = x + cross_attn.out_proj_bias  # the residual and the output bias enter the product once

    # Sets sorted by extent (the position after their last real token), longest first, so that each
    # block is cut to the extent of its longest set: a block of short captions does not compute the
    # padding of the longest caption of the batch. Undone on the scores at the end.
    q_order, q_ext = _by_extent(query_mask, L, Bq)
    k_order, k_ext = _by_extent(key_mask, M, Bk)
    if q_order is not None:
        q, x_bias, query_mask = q[q_order], x_bias[q_order], query_mask[q_order]
    if k_order is not None:
        kp, vp, key_unit = kp[k_order], vp[k_order], key_unit[k_order]
        key_bias = None if key_bias is None else key_bias[k_order]
        if pooled:
            key_mean = key_mean[k_order]
    # Keys as (H, M, Bk, dh): a block's logits then come out as (H, b_q, L, M, b_k), and the softmax
    # over M runs along a strided axis, vectorised over the key sets (a softmax over a short
    # contiguous last axis of M ~ 10-40 words is several times slower on CPU).
    kp = kp.permute(2, 1, 0, 3)  # (H, M, Bk, dh)
    q = q.permute(2, 0, 1, 3)  # (H, Bq, L, dh)

    # Block sizes from the budget: a block of b_k key sets holds its folded values (b_k * H * M * D
    # numbers, made once per key block), and the largest pairwise intermediate of a block holds
    # b_q * b_k * L * max(D, H * M, F). A query block aims at BLOCK_ROWS query tokens (the rows of
    # the per-key-set value products); the key sets fill the rest of the budget.
    per_pair = L * max(D, H * M, hidden)
    rows = min(Bq, max(1, -(-BLOCK_ROWS // L)))
    bk = max(1, min(Bk, budget // max(1, per_pair * rows, H * M * D)))
    bq = max(1, min(Bq, budget // max(1, per_pair * bk)))
    cols = []
    for k0 in range(0, Bk, bk):
        k1 = min(Bk, k0 + bk)
        nk, Mb = k1 - k0, k_ext[k0]
        # The key block's values with the output projection folded in (per key set, not per pair).
        u = torch.einsum("bmhj,ehj->bhme", vp[k0:k1, :Mb], w_out).reshape(nk, H * Mb, D)
        kt = kp[:, :Mb, k0:k1].reshape(H, Mb * nk, dh).transpose(1, 2)
        kb = None if key_bias is None else key_bias[k0:k1, :Mb]
        logit_bias = None if kb is None else kb.t().reshape(1, 1, Mb * nk)
        dot_bias = None if kb is None else kb.unsqueeze(-1)
        units = key_unit[k0:k1, :Mb]
        parts = []
        for q0 in range(0, Bq, bq):
            q1 = min(Bq, q0 + bq)
            nq, Lb = q1 - q0, q_ext[q0]
            # Cross-attention: every query token of every query set attends to the tokens of every key set.
            qb = q[:, q0:q1, :Lb].reshape(H, nq * Lb, dh)
            logits = torch.bmm(qb, kt) if logit_bias is None else torch.baddbmm(logit_bias, qb, kt)
            attn = (
                logits.view(H, nq, Lb, Mb, nk)
                .softmax(-2)
                .permute(4, 1, 2, 0, 3)
                .reshape(nk, nq * Lb, H * Mb)
            )
            # sum_h A_h (V_h W_O^h) + b_O + X: the output projection, its bias and the residual at once.
            y = torch.baddbmm(x_bias[q0:q1, :Lb].reshape(1, nq * Lb, D), attn, u)
            y = F.layer_norm(y, (D,), cross_attn.norm_weight, cross_attn.norm_bias, LAYER_NORM_EPS)
            if feed_forward is not None:
                y = _feed_forward_rows(y, feed_forward)
            qmask = None if query_mask is None else query_mask[q0:q1, :Lb].unsqueeze(0)
            if pooled:
                # The global average of Table IV: pool the outputs, then one cosine with the pooled keys.
                y_mean = F.normalize(
                    _masked_mean(
                        y.view(nk * nq, Lb, D),
                        None if qmask is None else qmask.expand(nk, nq, Lb).reshape(nk * nq, Lb),
                    ),
                    dim=-1,
                    eps=EPS,
                )
                parts.append((y_mean.view(nk, nq, D) * key_mean[k0:k1].unsqueeze(1)).sum(-1).t())
                continue
            # Cosine of each output with every key token of the same set (the *input* tokens of the other
            # modality, a settled ambiguity), best key token. The norm of
            # the output divides the (smaller) best dot product, not the output itself: the same cosine.
            if dot_bias is None:
                dots = torch.bmm(units, y.transpose(1, 2))  # (nk, M, nq * L)
            else:
                dots = torch.baddbmm(dot_bias, units, y.transpose(1, 2))
            best = (dots.amax(1) / torch.linalg.vector_norm(y, dim=-1).clamp_min(EPS)).view(
                nk, nq, Lb
            )
            # Top-K mean over the query tokens.
            parts.append(topk_mean(best, qmask, k, dim=-1).t())  # (nq, nk)
        cols.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=0))
    out = cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)
    if q_order is not None:
        out = out[torch.argsort(q_order)]
    if k_order is not None:
        out = out[:, torch.argsort(k_order)]
    return out


def _by_extent(
    mask: torch.Tensor | None, n: int, count: int
) -> tuple[torch.Tensor | None, list[int]]:
    """Sets ordered by extent, longest first, and the extents in that order (one host read).

    The extent of a set is one past its last real token (masks need not be prefixes); ``None``
    for the order when nothing is padded.
    """
    if mask is None:
        return None, [n] * count
    last = torch.where(mask, torch.arange(1, n + 1, device=mask.device), 0).amax(1)
    ext, order = torch.sort(last, descending=True, stable=True)
    extents = [max(1, e) for e in ext.tolist()]
    if extents[-1] == n:  # no set is padded at its end: keep the order, cut nothing
        return None, [n] * len(extents)
    return order, extents


def _feed_forward_rows(y: torch.Tensor, weights: FeedForwardWeights) -> torch.Tensor:
    """:func:`feed_forward` over a block's rows, with the bias, ReLU and residual fused into the products."""
    D = y.shape[-1]
    flat = y.reshape(-1, D)
    hidden = torch.addmm(weights.linear1_bias, flat, weights.linear1_weight.t()).relu_()
    out = torch.addmm(flat, hidden, weights.linear2_weight.t()).add_(weights.linear2_bias)
    return F.layer_norm(out, (D,), weights.norm_weight, weights.norm_bias, LAYER_NORM_EPS).view_as(
        y
    )


def phrase_attention_token_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    *,
    self_attn: AttentionWeights,
    cross_attn: AttentionWeights,
    heads: int,
    feed_forward: FeedForwardWeights | None = None,
) -> torch.Tensor:
    r"""Per query token, the score :math:`s_k` that :func:`phrase_attention_scores` averages, for matched pairs.

    Query set ``b`` is paired with key set ``b`` only (one image with one caption),
    and the score of every query token comes back before the top-K mean, so a
    picture can show which tokens each branch chose (DCPA Fig. 6):

    .. math::

        s_k = \max_m \cos(vp^T_k, w_m) \qquad \text{(Eq. 13)}

    ``topk_mean(s, query_mask, k)`` equals the diagonal of
    ``phrase_attention_scores(queries, keys, ...)`` with the same ``feed_forward`` (a test
    checks this).

    Shape:
        - queries: ``(B, L, D)``, query_mask: ``(B, L)``
        - keys: ``(B, M, D)``, key_mask: ``(B, M)``
        - output: ``(B, L)``, ``-inf`` at padded query tokens

    References:
        Shi et al., "Decoupled Cross-modal Phrase-Attention Network for
        Image-Sentence Matching", IEEE TIP 2022, Eq. 11-14.

    Example:
        >>> mk = lambda: AttentionWeights.from_modules(torch.nn.MultiheadAttention(8, 2), torch.nn.LayerNorm(8))
        >>> phrase_attention_token_scores(torch.randn(3, 5, 8), torch.randn(3, 6, 8), self_attn=mk(),
        ...                               cross_attn=mk(), heads=2).shape
        torch.Size([3, 5])
    """
    where = "phrase_attention_token_scores"
    queries, keys, query_mask, key_mask = check_pair_inputs(
        queries, keys, query_mask, key_mask, where=where
    )
    if queries.shape[0] != keys.shape[0]:
        raise ValueError(
            f"{where}: queries and keys pair row by row; got {queries.shape[0]} query sets and "
            f"{keys.shape[0]} key sets"
        )
    D = queries.shape[-1]
    _check_weights(self_attn, D, heads, where, "self_attn", like=queries)
    _check_weights(cross_attn, D, heads, where, "cross_attn", like=queries)
    if feed_forward is not None:
        _check_feed_forward(feed_forward, D, where, queries)
    H, dh = heads, D // heads
    x = self_attention(queries, query_mask, self_attn, heads)  # (B, L, D)
    kz = (
        keys
        if key_mask is None
        else torch.where(
            key_mask.unsqueeze(-1), keys, torch.zeros((), dtype=keys.dtype, device=keys.device)
        )
    )
    (wq, wk, wv), (bq, bk, bv) = cross_attn.projections()
    q = rearrange(F.linear(x, wq, bq) / math.sqrt(dh), "b l (h d) -> b h l d", h=H)
    k = rearrange(F.linear(kz, wk, bk), "b m (h d) -> b h m d", h=H)
    v = rearrange(F.linear(kz, wv, bv), "b m (h d) -> b h m d", h=H)
    logits = q @ k.transpose(-1, -2)  # (B, H, L, M)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    out = rearrange(logits.softmax(-1) @ v, "b h l d -> b l (h d)")
    y = F.layer_norm(
        x + F.linear(out, cross_attn.out_proj_weight, cross_attn.out_proj_bias),
        (D,),
        cross_attn.norm_weight,
        cross_attn.norm_bias,
        LAYER_NORM_EPS,
    )
    if feed_forward is not None:
        y = _feed_forward(y, feed_forward)
    # As in phrase_attention_scores: each output against the other modality's *input* tokens.
    cos = F.normalize(y, dim=-1, eps=EPS) @ normalize_tokens(keys, key_mask).transpose(
        1, 2
    )  # (B, L, M)
    if key_mask is not None:
        cos = cos.masked_fill(~key_mask.unsqueeze(1), -math.inf)
    best = cos.amax(-1)
    if query_mask is not None:
        best = best.masked_fill(~query_mask, -math.inf)
    return best
