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
    order_by_extent,
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

    Padded tokens are never attended to and never read (NaN in padding cannot leak); their
    outputs are zero. The projections, the residual and the LayerNorm run on the real tokens
    only.

    Shape:
        - x: ``(B, L, D)``, mask: ``(B, L)``, output: ``(B, L, D)``

    References:
        Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (post-norm sub-layer).

    Example:
        >>> mha, ln = torch.nn.MultiheadAttention(8, 2, batch_first=True), torch.nn.LayerNorm(8)
        >>> self_attention(torch.randn(3, 4, 8), None, AttentionWeights.from_modules(mha, ln), 2).shape
        torch.Size([3, 4, 8])
    """
    rows = _real_rows(mask)
    out = _self_attention_rows(x, mask, rows, weights, heads)
    return _unpack(out, rows, x.shape[:2])


def _real_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Flat indices of the real tokens of ``(B, L)`` sets (one host read); ``None`` when all are real."""
    if mask is None:
        return None
    return mask.reshape(-1).nonzero().squeeze(1)


def _pack(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``(B, L, D) -> (n, D)``: the real tokens' rows (all rows when ``rows`` is ``None``)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if rows is None else flat.index_select(0, rows)


def _unpack(packed: torch.Tensor, rows: torch.Tensor | None, sets: torch.Size) -> torch.Tensor:
    """``(n, E) -> (B, L, E)``, the inverse of :func:`_pack`, with zeros at padded tokens."""
    if rows is None:
        return packed.reshape(*sets, packed.shape[-1])
    out = packed.new_zeros(sets[0] * sets[1], packed.shape[-1])
    return out.index_copy(0, rows, packed).view(*sets, packed.shape[-1])


def _self_attention_rows(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    rows: torch.Tensor | None,
    weights: AttentionWeights,
    heads: int,
) -> torch.Tensor:
    """:func:`self_attention` for the real tokens only, ``(n, D)`` in :func:`_pack`'s order.

    The projections, the residual and the LayerNorm run on the real tokens (padding costs no
    product there); only the attention itself needs the padded layout.
    """
    B, L, D = x.shape
    dh = D // heads
    real = _pack(x, rows)  # padding never enters: NaN there cannot leak
    # one product for the three projections; padded tokens get zero queries, keys and values
    qkv = _unpack(F.linear(real, weights.in_proj_weight, weights.in_proj_bias), rows, x.shape[:2])
    q, k, v = (
        rearrange(t, "b l (h d) -> b h l d", h=heads) for t in qkv.chunk(3, dim=-1)
    )  # head split: the D channels are H heads of dh, each head attends on its own
    logits = (q / math.sqrt(dh)) @ k.transpose(-1, -2)  # (B, H, L, L)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], -math.inf)
    out = _pack(rearrange(logits.softmax(-1) @ v, "b h l d -> b l (h d)"), rows)
    out = torch.addmm(weights.out_proj_bias, out, weights.out_proj_weight.t())
    return F.layer_norm(real + out, (D,), weights.norm_weight, weights.norm_bias, LAYER_NORM_EPS)


@torch.compiler.disable
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

    Like the blocked engines of :mod:`imtm.functional.blocking`, it plans its blocks on the
    host and runs eagerly, also inside a ``torch.compile``-d block.

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

    # Per query set: self-attention, then the cross-attention's query projection, on the real
    # tokens only (padded tokens get zero rows).
    q_rows, k_rows = _real_rows(query_mask), _real_rows(key_mask)
    x = _self_attention_rows(queries, query_mask, q_rows, self_attn, heads)  # (n_q, D)
    (wq, wk, wv), (bq_, bk_, bv_) = cross_attn.projections()
    q = _unpack(F.linear(x, wq, bq_) / math.sqrt(dh), q_rows, queries.shape[:2]).view(Bq, L, H, dh)
    # the residual and the output bias enter the value product once
    x_bias = _unpack(x + cross_attn.out_proj_bias, q_rows, queries.shape[:2])
    # Per key set: key and value projections in one product, on the real tokens only; the values
    # then get the output projection folded in:
    # concat_h(A_h V_h) W_O^T = sum_h A_h (V_h W_O^h) with W_O^h the head's columns of W_O.
    kv = F.linear(_pack(keys, k_rows), cross_attn.in_proj_weight[D:], cross_attn.in_proj_bias[D:])
    kp, vp = (t.reshape(Bk, M, H, dh) for t in _unpack(kv, k_rows, keys.shape[:2]).chunk(2, -1))
    w_out = cross_attn.out_proj_weight.view(D, H, dh)
    key_unit = normalize_tokens(keys, key_mask)  # (Bk, M, D), zero at padding
    pooled = k is None and average == "features"
    if pooled:
        kz = keys if key_mask is None else torch.where(key_mask.unsqueeze(-1), keys, zero)
        key_mean = F.normalize(_masked_mean(kz, key_mask), dim=-1, eps=EPS)
    # Padded keys get -inf added inside the products (beta * bias + A @ B in one pass), instead of a
    # masked_fill over each product afterwards.
    key_bias = None
    if key_mask is not None:
        key_bias = torch.zeros(Bk, M, dtype=keys.dtype, device=keys.device).masked_fill_(
            ~key_mask, -math.inf
        )

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
    # Keys as (H, Bk, M, dh): a block's logits come out as (H, b_q, L, b_k, M), each key set's words
    # contiguous, so that the softmax over the words is a few in-place passes (see _attention_weights).
    kp = kp.permute(2, 0, 1, 3)  # (H, Bk, M, dh)
    q = q.permute(2, 0, 1, 3)  # (H, Bq, L, dh)
    shift = _logits_need_shift(q, kp, M)
    # Without autograd or autocast, every block's large intermediates go into buffers reused from
    # block to block (fresh buffers of a few MiB cost page faults on every block).
    weights = [*vars(self_attn).values(), *vars(cross_attn).values()]
    if feed_forward is not None:
        weights += vars(feed_forward).values()
    scratch: dict[str, torch.Tensor] | None = (
        None if _tracks_grad_or_autocast([queries, keys, *weights]) else {}
    )
    if scratch is not None:
        x_bias = x_bias - x_bias.mean(-1, keepdim=True)

    # Block sizes from the budget: a block of b_k key sets holds its folded values (b_k * H * M * D
    # numbers, made once per key block), and the largest pairwise intermediate of a block holds
    # b_q * b_k * L * max(D, H * M, F). A query block aims at BLOCK_ROWS query tokens (the rows of
    # the per-key-set value products); the key sets fill the rest of the budget.
    per_pair = L * max(D, H * M, hidden)
    rows = min(Bq, max(1, -(-BLOCK_ROWS // L)))
    bk = max(1, min(Bk, budget // max(1, per_pair * rows, H * M * D)))
    bq = max(1, min(Bq, budget // max(1, per_pair * bk)))
    # Each query block's queries and residual rows, laid out for the products once (not once per
    # key block): (H, nq * Lb, dh) and (1, nq * Lb, D).
    q_blocks = []
    for q0 in range(0, Bq, bq):
        q1 = min(Bq, q0 + bq)
        Lb = q_ext[q0]
        q_blocks.append(
            (
                q0,
                q1,
                Lb,
                q[:, q0:q1, :Lb].reshape(H, (q1 - q0) * Lb, dh),
                x_bias[q0:q1, :Lb].reshape(1, (q1 - q0) * Lb, D),
            )
        )
    cols = []
    for k0 in range(0, Bk, bk):
        k1 = min(Bk, k0 + bk)
        nk, Mb = k1 - k0, k_ext[k0]
        # The key block's values with the output projection folded in (per key set, not per pair).
        u = torch.einsum("bmhj,ehj->bhme", vp[k0:k1, :Mb], w_out).reshape(nk, H * Mb, D)
        if scratch is not None:
            # Rows of u and of x_bias centred: the value product then comes out centred (each
            # output row is a weighted sum of rows of u plus a row of x_bias), ready for the
            # in-place LayerNorm.
            u = u.sub_(u.mean(-1, keepdim=True))
        kt = kp[:, k0:k1, :Mb].reshape(H, nk * Mb, dh).transpose(1, 2)
        kb = None if key_bias is None else key_bias[k0:k1, :Mb]
        logit_bias = None if kb is None else kb.reshape(1, 1, nk * Mb)
        dot_bias = None if kb is None else kb.unsqueeze(-1)
        units = key_unit[k0:k1, :Mb]
        parts = []
        for q0, q1, Lb, qb, xb in q_blocks:
            nq = q1 - q0
            # Cross-attention: every query token of every query set attends to the tokens of every key set.
            R = nq * Lb
            logits = _scratch(scratch, "logits", (H, R, nk * Mb), qb)
            if logit_bias is None:
                logits = torch.bmm(qb, kt, out=logits)
            else:
                logits = torch.baddbmm(logit_bias, qb, kt, out=logits)
            # (nk, nq * Lb, H * Mb)
            attn = _attention_weights(
                logits, nk, Mb, shift, _scratch(scratch, "attn", (nk, R, H * Mb), qb)
            )
            # sum_h A_h (V_h W_O^h) + b_O + X: the output projection, its bias and the residual at once.
            y = torch.baddbmm(xb, attn, u, out=_scratch(scratch, "z", (nk, R, D), xb))
            y = _layer_norm(
                y,
                cross_attn.norm_weight,
                cross_attn.norm_bias,
                in_place=scratch is not None,
                centered=True,
            )
            if feed_forward is not None:
                y = _feed_forward_rows(y, feed_forward, scratch)
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


def _tracks_grad_or_autocast(tensors: list[torch.Tensor]) -> bool:
    """Whether results must stay in fresh tensors: autograd records a graph, or autocast casts."""
    if torch.is_autocast_enabled(tensors[0].device.type):
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _scratch(
    store: dict[str, torch.Tensor] | None, name: str, shape: tuple[int, ...], like: torch.Tensor
) -> torch.Tensor | None:
    """A ``shape`` view of the reusable buffer ``name`` (grown when too small); ``None`` without a store."""
    if store is None:
        return None
    n = math.prod(shape)
    buf = store.get(name)
    if buf is None or buf.numel() < n:
        buf = store[name] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(shape)


def _layer_norm(
    z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, in_place: bool, centered: bool
) -> torch.Tensor:
    """LayerNorm over the last axis (torch's, or written in place into ``z`` without autograd).

    In place: ``z - mean`` (skipped when ``centered``: the caller made every row's mean zero by
    linearity), one norm for the variance, then ``z * rstd * weight + bias`` in two in-place
    passes. A fresh output of a few MiB costs a page fault per 4 KiB on every block; this
    writes none.
    """
    D = z.shape[-1]
    if not in_place:
        return F.layer_norm(z, (D,), weight, bias, LAYER_NORM_EPS)
    if not centered:
        z.sub_(z.mean(-1, keepdim=True))
    rstd = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
    rstd = rstd.square_().div_(D).add_(LAYER_NORM_EPS).rsqrt_()
    return torch.addcmul(bias, z.mul_(rstd), weight, out=z)


def _attention_weights(
    logits: torch.Tensor, nk: int, m: int, shift: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax over each key set's words, laid out for the value product: ``(H, R, nk * m) -> (nk, R, H * m)``.

    Written out as in-place passes (``exp``, sum) with the division fused into the layout copy:
    on CPU several times faster than ``softmax`` over a short last axis followed by the copy.
    With ``shift`` each key set's logits are first shifted by their largest (detached: the
    softmax does not depend on it); without, the caller has bounded every logit so that ``exp``
    can neither overflow nor underflow (:func:`_logits_need_shift`). Every key set has a real
    word (checked at the boundary), so no sum is zero.
    """
    H, R, _ = logits.shape
    e = logits.view(H, R, nk, m)
    if shift:
        e = e.sub_(e.detach().amax(-1, keepdim=True))
    e = e.exp_()
    total = e.sum(-1, keepdim=True)
    if torch.is_grad_enabled() and e.requires_grad:  # out= takes no part in autograd
        return (e / total).permute(2, 1, 0, 3).reshape(nk, R, H * m)
    if out is None:
        out = torch.empty(nk, R, H * m, dtype=e.dtype, device=e.device)
    torch.div(e.permute(2, 1, 0, 3), total.permute(2, 1, 0, 3), out=out.view(nk, R, H, m))
    return out


def _logits_need_shift(q: torch.Tensor, kp: torch.Tensor, words: int) -> bool:
    """Whether the cross-attention logits need the softmax's shift (one host read per call).

    Every logit is a per-head dot product, so ``|q_h . k_h| <= max |q_h| * max |k_h|``
    (Cauchy-Schwarz). When that bound is small enough that ``exp`` of any logit, and a sum of
    ``words`` of them, stays a normal number of the dtype (about 80 in float32 and bfloat16,
    6 in float16), the shift changes nothing but the rounding, and is skipped.

    Shape:
        - q: ``(H, Bq, L, dh)``, kp: ``(H, Bk, M, dh)``
    """
    info = torch.finfo(q.dtype)
    limit = min(math.log(info.max / max(1, words)), -math.log(info.tiny)) - 2.0
    with torch.no_grad():
        q_max = torch.linalg.vector_norm(q.float(), dim=-1).flatten(1).amax(1)  # (H,)
        k_max = torch.linalg.vector_norm(kp.float(), dim=-1).flatten(1).amax(1)  # (H,)
        bound = float((q_max * k_max).amax())
    return not bound < limit  # NaN or inf in the bound: shift


def _by_extent(
    mask: torch.Tensor | None, n: int, count: int
) -> tuple[torch.Tensor | None, list[int]]:
    """:func:`~imtm.functional.blocking.order_by_extent`, with every extent at least 1 and ``[n] *
    count`` when nothing is cut (a set without real tokens still gets one column)."""
    order, extents = order_by_extent(mask, n)
    if order is None or extents is None:
        return None, [n] * count
    return order, [max(1, e) for e in extents]


def _feed_forward_rows(
    y: torch.Tensor, weights: FeedForwardWeights, scratch: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """:func:`feed_forward` over a block's rows, with the bias, ReLU and residual fused into the
    products; with ``scratch`` (no autograd) into reused buffers and the LayerNorm in place."""
    D = y.shape[-1]
    flat = y.reshape(-1, D)
    n, hidden_dim = flat.shape[0], weights.linear1_weight.shape[0]
    hidden = torch.addmm(
        weights.linear1_bias,
        flat,
        weights.linear1_weight.t(),
        out=_scratch(scratch, "hidden", (n, hidden_dim), flat),
    ).relu_()
    out = torch.addmm(
        flat, hidden, weights.linear2_weight.t(), out=_scratch(scratch, "ffn", (n, D), flat)
    ).add_(weights.linear2_bias)
    out = _layer_norm(
        out, weights.norm_weight, weights.norm_bias, in_place=scratch is not None, centered=False
    )
    return out.view_as(y)


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
