"""Blocked all-pairs token similarity: the engine under token-level (late-interaction) scorers.

Scoring every image against every caption at the token level means one cosine
for every (region, word) pair of every (image, caption) pair. Written
naively that is a ``(Bi, Bt, N, M)`` tensor, or ``(Bi, Bt, M, D)`` once words
attend to regions. This module never builds it. It

1. L2-normalises every token once (padding becomes an exact zero vector);
2. cuts the problem into blocks whose similarity matrix holds at most
   ``max_block_elements`` numbers, so the memory is set by that budget and
   not by the problem size;
3. computes each block with one matrix product ``(b * K, D) x (D, w)`` and
   reduces it in place to ``(b, Bt_block)`` scores.

Two engines share this plan:

- :func:`blocked_query_scores` packs the *query* side: the valid tokens of
  every query set (the words of every caption, say) are concatenated into one
  ``(T, D)`` matrix, so padding costs no arithmetic at all. A callback turns
  each block's similarities into one score per (key set, query token), for
  example the best-matching region of each word (CHAN's hard assignment,
  ColBERT's MaxSim); a pooling then reduces each query set's tokens.
- :func:`blocked_pair_scores` keeps both sides padded and hands the callback
  the full ``(b_i, N, b_t, M)`` block, for scores that need both axes at once
  (bidirectional max-mean alignment, top-k aggregation).

Neither engine validates its inputs (that needs a device synchronisation);
call :func:`check_pair_inputs` once at the boundary. Both engines and the check
plan on the host (lengths, block sizes), so they always run eagerly, also inside
a ``torch.compile``-d block (``torch.compiler.disable``): new caption lengths
never trigger a recompilation, and the products run at ``torch.mm``'s speed either way. Gradients flow through
both engines; the blocks are cut with :func:`torch.split`, whose backward
assembles the gradient in one step, so a blocked training step costs no more
than an unblocked one.

Shape glossary: ``B`` sets (``Bk`` key sets, ``Bq`` query sets), ``K`` tokens
per key set, ``L`` tokens per query set, ``D`` feature dimension, ``T`` valid
query tokens in total.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from imtm._checks import resolve_option
from imtm.tokens import check_finite, l2_normalize

__all__ = [
    "DEFAULT_MAX_BLOCK_ELEMENTS",
    "DEFAULT_MAX_BLOCK_ELEMENTS_CUDA",
    "EPS",
    "BlockPlan",
    "PackedTokens",
    "blocked_pair_scores",
    "blocked_query_scores",
    "check_block_args",
    "check_pair_inputs",
    "default_block_elements",
    "max_over_keys",
    "normalize_tokens",
    "order_by_extent",
    "pack_tokens",
    "plan_query_blocks",
    "resolve_option",
    "check_side",
]

#: Default budget on CPU: numbers in one block's similarity matrix (64 MiB in float32). Each
#: block is then a matrix product of tens of GFLOP at D = 1024, so the few small reductions
#: that follow it (and their thread synchronisations, costly on a busy machine) stay a small
#: fraction of the time; measured on 2 shared cores, 4x smaller blocks lost up to 20%.
DEFAULT_MAX_BLOCK_ELEMENTS = 1 << 24

#: Default budget on CUDA (1 GiB in float32): a GPU needs far larger products to stay busy,
#: and has the memory for them.
DEFAULT_MAX_BLOCK_ELEMENTS_CUDA = 1 << 28

#: Query blocks of :func:`blocked_query_scores` are padded to a multiple of this many tokens (zero rows,
#: dropped after the token scores), so that every row of a block's product starts aligned.
QUERY_ALIGN = 16

#: Floor of a norm before division: an all-zero token gets a zero vector, not NaN.
EPS = 1e-8

#: ``token_scores(sims, key_mask, key_context) -> (b, w)``, see :func:`blocked_query_scores`.
TokenScoreFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]
#: ``pool(x, mask, dim) -> x reduced along dim``, see :func:`imtm.functional.pooling.resolve_pooling`.
PoolFn = Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor]
#: ``reduce(sims, image_mask, text_mask) -> (b_i, b_t)``, see :func:`blocked_pair_scores`.
PairReduceFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


# ---------------------------------------------------------------------------- checks
def _check_real_finite(x: torch.Tensor, mask: torch.Tensor | None, what: str) -> None:
    # One pass over the features (a sum per token: NaN and inf survive it) instead of the three
    # of isfinite(); the exact count runs only when something is wrong. A sum can also overflow
    # for finite values near the float limit; the exact check then lets those through.
    row_ok = torch.isfinite(x.sum(-1))
    if mask is not None:
        row_ok = row_ok | ~mask
    if not bool(row_ok.all()):
        check_finite(x[mask] if mask is not None else x, what)


def check_side(x, mask, name: str, where: str) -> torch.Tensor | None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{where}: {name} must be a tensor of shape (B, N, D), got {type(x).__name__}"
        )
    if x.dim() != 3:
        raise ValueError(f"{where}: {name} must have shape (B, N, D), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be floating point, got {x.dtype}")
    if mask is None:
        if x.shape[0] and x.shape[1] == 0:
            raise ValueError(f"{where}: {name} has no tokens at all (shape {tuple(x.shape)})")
        _check_real_finite(x, None, f"{where}: {name}")
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"{where}: {name}_mask must be a bool tensor (True = real token), got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}"
        )
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"{where}: {name}_mask of shape {tuple(mask.shape)} does not match {name} (B, N) = {tuple(x.shape[:2])}"
        )
    if mask.device != x.device:
        raise ValueError(f"{where}: {name}_mask is on {mask.device} but {name} on {x.device}")
    empty = ~mask.any(1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"{where}: {name} rows {rows[:5]}{' ...' if len(rows) > 5 else ''} have no real token "
            "(every position is padding); drop them or give them at least one token"
        )
    _check_real_finite(x, mask, f"{where}: {name}")
    # An all-True mask is dropped so that the engines skip masking work entirely.
    return None if bool(mask.all()) else mask


@torch.compiler.disable
def check_pair_inputs(
    images: torch.Tensor,
    texts: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    *,
    where: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Validate one image-caption token problem and return it ready for the engines.

    Checks types, shapes, feature dimensions, devices, bool masks of shape
    ``(B, N)``, that no row is all padding and that real tokens are finite
    (padding may hold anything, NaN included). It synchronises with the device
    once, so call it once per problem, never per block.

    Returns:
        ``(images, texts, image_mask, text_mask)``: both features in their
        promoted common dtype, and each mask or ``None`` where every token is real.

    Raises:
        TypeError: not tensors, not floating point, masks not bool.
        ValueError: wrong shapes, mismatched ``D`` or devices, empty rows, NaN/inf.

    Shape:
        - images: ``(Bi, N, D)``, texts: ``(Bt, M, D)``
        - image_mask: ``(Bi, N)``, text_mask: ``(Bt, M)``

    Example:
        >>> v, t, vm, tm = check_pair_inputs(torch.randn(2, 3, 4), torch.randn(5, 6, 4), where="demo")
        >>> vm is None and tm is None
        True
    """
    image_mask = check_side(images, image_mask, "images", where)
    text_mask = check_side(texts, text_mask, "texts", where)
    if images.shape[-1] != texts.shape[-1]:
        raise ValueError(
            f"{where}: images and texts must share the feature dimension D, got images "
            f"{tuple(images.shape)} (D={images.shape[-1]}) and texts {tuple(texts.shape)} (D={texts.shape[-1]})"
        )
    if images.device != texts.device:
        raise ValueError(f"{where}: images are on {images.device} but texts on {texts.device}")
    dtype = torch.promote_types(images.dtype, texts.dtype)
    return images.to(dtype), texts.to(dtype), image_mask, text_mask


def default_block_elements(device: torch.device) -> int:
    """The default block budget for ``device``: :data:`DEFAULT_MAX_BLOCK_ELEMENTS` on CPU,
    :data:`DEFAULT_MAX_BLOCK_ELEMENTS_CUDA` on CUDA."""
    return (
        DEFAULT_MAX_BLOCK_ELEMENTS_CUDA
        if torch.device(device).type == "cuda"
        else DEFAULT_MAX_BLOCK_ELEMENTS
    )


def check_block_args(
    max_block_elements, compute_dtype, *, where: str
) -> tuple[int | None, torch.dtype | None]:
    """Validate the engine's memory budget and compute dtype (``None``: the defaults); return them."""
    bad_budget = isinstance(max_block_elements, bool) or not isinstance(max_block_elements, int)
    if max_block_elements is not None and (bad_budget or max_block_elements < 1):
        raise ValueError(
            f"{where}: max_block_elements must be a positive int or None, got {max_block_elements!r}"
        )
    if compute_dtype is not None and (
        not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point
    ):
        raise TypeError(
            f"{where}: compute_dtype must be None or a floating torch.dtype such as torch.bfloat16, got {compute_dtype!r}"
        )
    return max_block_elements, compute_dtype


# ---------------------------------------------------------------------------- preparation
def normalize_tokens(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    eps: float = EPS,
) -> torch.Tensor:
    """L2-normalise every token; padded tokens become exact zero vectors.

    Args:
        x: token features.
        mask: True where a token is real; ``None``: all are.
        dtype: cast the result to this dtype (for example ``torch.bfloat16``).
        eps: floor of the norm, so an all-zero token stays zero.

    Shape:
        - x: ``(B, N, D)``, mask: ``(B, N)``, output: ``(B, N, D)``

    Example:
        >>> normalize_tokens(torch.tensor([[[3.0, 4.0], [float("nan"), 0.0]]]), torch.tensor([[True, False]]))
        tensor([[[0.6000, 0.8000],
                 [0.0000, 0.0000]]])
    """
    out = l2_normalize(x, dim=-1, eps=eps)
    if mask is not None:
        # where() rather than a product: padding may hold NaN, and 0 * NaN is NaN.
        out = torch.where(
            mask.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device)
        )
    return out if dtype is None else out.to(dtype)


@dataclass(frozen=True)
class PackedTokens:
    """The valid tokens of every set, concatenated set after set.

    Attributes:
        feats: ``(T, D)`` the valid tokens, set 0's first, each set's in order.
        lengths: tokens per set (host ints).
        spans: one past the position of each set's last real token (host ints); equal to
            ``lengths`` when padding only trails.
        offsets: set ``b`` owns rows ``offsets[b]:offsets[b + 1]`` of ``feats`` (host ints).
        positions: ``(B, L)`` long: the row of ``feats`` holding token ``l`` of set ``b``
            (0 at padding).
        mask: ``(B, L)`` bool, True where a token is real, or ``None`` when all are
            (then ``feats`` is the padded tensor reshaped, and no row was copied).
    """

    feats: torch.Tensor
    lengths: tuple[int, ...]
    spans: tuple[int, ...]
    offsets: tuple[int, ...]
    positions: torch.Tensor
    mask: torch.Tensor | None


def pack_tokens(x: torch.Tensor, mask: torch.Tensor | None = None) -> PackedTokens:
    """Drop the padding of ``x``: concatenate the valid tokens of all sets into one matrix.

    Reads the lengths on the host once (a device synchronisation when ``mask`` is given).

    Shape:
        - x: ``(B, L, D)``, mask: ``(B, L)``
        - output ``feats``: ``(T, D)`` with ``T = mask.sum()``

    Example:
        >>> p = pack_tokens(torch.arange(6.0).view(2, 3, 1), torch.tensor([[True, True, False], [True, False, False]]))
        >>> p.feats.flatten().tolist(), p.offsets
        ([0.0, 1.0, 3.0], (0, 2, 3))
    """
    B, L, D = x.shape
    positions = torch.arange(B * L, device=x.device).view(B, L)
    if mask is None:
        lengths = spans = (L,) * B
        feats = x.reshape(B * L, D)
    else:
        # One host read for both: the count of real tokens and where the last one sits
        # (masks need not be prefixes).
        last = torch.where(mask, torch.arange(1, L + 1, device=mask.device), 0).amax(1)
        lengths, spans = (tuple(r) for r in torch.stack([mask.sum(1), last]).tolist())
        feats = x[mask]
        # Row-major boolean indexing keeps set order and token order, so a running count of
        # valid tokens is each token's row in ``feats``.
        rank = mask.flatten().cumsum(0).view(B, L) - 1
        positions = torch.where(mask, rank, torch.zeros((), dtype=rank.dtype, device=rank.device))
    offsets = (0, *itertools.accumulate(lengths))
    return PackedTokens(feats, lengths, spans, offsets, positions, mask)


# ---------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class BlockPlan:
    """How :func:`blocked_query_scores` cuts a problem.

    Attributes:
        key_sets: key sets per key block (the last block may be smaller).
        query_bounds: ``(q0, q1)`` query-set ranges, each holding at most
            ``max_width`` valid tokens unless a single set is longer.
        max_width: the token budget of one query block.
    """

    key_sets: int
    query_bounds: tuple[tuple[int, int], ...]
    max_width: int


def plan_query_blocks(
    num_key_sets: int, tokens_per_key_set: int, offsets: Sequence[int], budget: int
) -> BlockPlan:
    """Choose block sizes so that one block's similarity matrix holds at most ``budget`` numbers.

    The blocks are near-square matrix products (about ``sqrt(budget)`` rows of
    key tokens), which keeps each product efficient; when all query tokens fit
    in one block, the key side grows to fill the budget instead.

    Example:
        >>> plan = plan_query_blocks(100, 36, [0, 10, 25, 40], budget=36 * 25)
        >>> plan.key_sets, plan.query_bounds
        (1, ((0, 2), (2, 3)))
    """
    total = offsets[-1]
    num_sets = len(offsets) - 1
    K = max(1, tokens_per_key_set)
    if num_key_sets * K * max(total, 1) <= budget:
        return BlockPlan(max(1, num_key_sets), ((0, num_sets),) if num_sets else (), max(total, 1))
    rows = max(K, min(num_key_sets * K, math.isqrt(budget)))
    key_sets = max(1, min(num_key_sets, rows // K))
    width = max(1, budget // (key_sets * K))
    if width >= total:
        width = max(total, 1)
        key_sets = max(1, min(num_key_sets, budget // (K * width)))
    # Even out the blocks (a small last block is a slow product): as many blocks as the budget
    # needs, each about the same size.
    key_sets = -(-num_key_sets // -(-num_key_sets // key_sets))
    width = min(max(total, 1), max(1, budget // (key_sets * K)))
    longest = max((b - a for a, b in itertools.pairwise(offsets)), default=0)
    target = min(width, -(-total // -(-total // width)) + longest)
    bounds = []
    start = 0
    while start < num_sets:
        # The longest run of whole sets from ``start`` whose tokens fit in ``target`` (at least one set).
        end = bisect.bisect_right(offsets, offsets[start] + target, lo=start + 1) - 1
        end = min(max(end, start + 1), num_sets)
        bounds.append((start, end))
        start = end
    return BlockPlan(key_sets, tuple(bounds), width)


# ---------------------------------------------------------------------------- engines
def max_over_keys(
    sims: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    key_context: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Token scores of hard assignment: the best-matching key token for every query token.

    .. math::

        s(t_i, V) = \max_{j : m_j} s_{ij} \qquad \text{(CHAN, Eq. 5-6)}

    The :func:`blocked_query_scores` callback for CHAN's hard assignment and
    ColBERT's MaxSim. Padded keys are filled with ``-inf`` in place (``sims``
    is a fresh product owned by the engine). The gradient is the sub-gradient
    of :func:`torch.amax`: it flows to the maximising key (shared equally at
    an exact tie). :meth:`torch.Tensor.max` with indices would keep less for
    the backward pass, but it is several times slower than ``amax`` on CPU.

    Shape:
        - sims: ``(b, K, w)``, key_mask: ``(b, K)``, output: ``(b, w)``

    Example:
        >>> max_over_keys(torch.tensor([[[0.1], [0.7], [0.9]]]), torch.tensor([[True, True, False]]))
        tensor([[0.7000]])
    """
    if key_mask is not None:
        sims = sims.masked_fill_(~key_mask.unsqueeze(-1), -math.inf)
    return sims.amax(dim=1)


def _pool_groups(plan: BlockPlan, offsets, limit: int) -> list[tuple[int, int]]:
    """Runs ``(j0, j1)`` of consecutive product blocks of ``plan`` holding at most ``limit`` query
    tokens together (a single block may hold more)."""
    groups, start, tokens = [], 0, 0
    for j, (q0, q1) in enumerate(plan.query_bounds):
        width = offsets[q1] - offsets[q0]
        if j > start and tokens + width > limit:
            groups.append((start, j))
            start, tokens = j, 0
        tokens += width
    if plan.query_bounds:
        groups.append((start, len(plan.query_bounds)))
    return groups


def _autocast_dtype(compute_dtype, dtype: torch.dtype, device: torch.device):
    """Under autocast, float32 products run in the autocast dtype, explicitly: then the training
    path (autograd) and the inference path (products into a reused buffer, which autocast
    would skip) compute the same numbers."""
    if compute_dtype is None and dtype == torch.float32 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return compute_dtype


def _repad_index(
    packed: PackedTokens, q0: int, q1: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """For query sets ``q0:q1``: the gather index back to ``(b_q, L_blk)`` (``None`` when the
    packed block already is that layout), the block's mask (``None`` when no padding), and ``L_blk``."""
    width = max(packed.spans[q0:q1])
    if min(packed.lengths[q0:q1]) == width:
        # Every set of the block is a full prefix of the same length: the packed rows already
        # are the (b_q, L_blk) layout, so no gather and no mask.
        return None, None, width
    assert packed.mask is not None  # no mask means every set is full, which returned above
    mask = packed.mask[q0:q1, :width]
    local = packed.positions[q0:q1, :width] - packed.offsets[q0]
    index = torch.where(mask, local, torch.zeros((), dtype=local.dtype, device=local.device))
    return index.reshape(-1), mask, width


@torch.compiler.disable
def blocked_query_scores(
    keys: torch.Tensor,
    queries: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    *,
    token_scores: TokenScoreFn = max_over_keys,
    pool: PoolFn,
    key_context: torch.Tensor | None = None,
    max_block_elements: int | None = None,
    compute_dtype: torch.dtype | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    r"""Score every key set against every query set through per-query-token scores.

    .. math::

        S(k, q) = \operatorname{pool}_{i \in q}\; f\big(\{\cos(q_i, k_j)\}_{j \in k}\big)

    For each block of ``b`` key sets and a run of query sets holding ``w``
    valid tokens, one matrix product gives the ``(b * K, w)`` cosines;
    ``token_scores`` reduces them to ``(b, w)`` (one score per key set and
    query token), and ``pool`` reduces each query set's tokens. Query padding
    is packed away before the product, so it costs nothing; key padding is
    handed to ``token_scores`` as ``key_mask``.

    Args:
        keys: key token features (the codebook side: regions for CHAN's visual codebook).
        queries: query token features (words for the visual codebook).
        key_mask: True where a key token is real; ``None``: all are.
        query_mask: True where a query token is real; ``None``: all are.
        token_scores: ``f(sims, key_mask, key_context) -> (b, w)``. ``sims`` is
            the block's ``(b, K, w)`` cosines in ``compute_dtype`` (the callback
            may overwrite it, and must not return a view of it: the next block
            reuses its memory); ``key_mask`` the block's ``(b, K)`` mask or
            ``None`` when it has no padding; ``key_context`` the block's rows of
            ``key_context`` or ``None``. Default: :func:`max_over_keys`.
        pool: ``pool(x, mask, dim)``, as returned by
            :func:`imtm.functional.pooling.resolve_pooling`; called on
            ``(b, b_q, L_blk)`` with a ``(b_q, L_blk)`` mask (or ``None``) and ``dim=-1``.
        key_context: optional per-key-set tensor, cut into blocks along its first axis
            (for example the key Gram matrices for soft assignment).
        max_block_elements: at most this many similarities exist at once (per block);
            ``None``: :func:`default_block_elements` of the inputs' device.
        compute_dtype: dtype of the normalised tokens and of the matrix products
            (for example ``torch.bfloat16``; products accumulate in float32 inside
            the kernel). Token scores are cast back to the input dtype before
            pooling. ``None``: the input dtype.
        normalize: L2-normalise tokens first (cosines). ``False``: the inputs are
            used as given (already normalised with zero padding, or raw dot products).

    Returns:
        ``(Bk, Bq)`` scores in the inputs' dtype.

    Shape:
        - keys: ``(Bk, K, D)``, key_mask: ``(Bk, K)``
        - queries: ``(Bq, L, D)``, query_mask: ``(Bq, L)``
        - key_context: ``(Bk, *)``
        - output: ``(Bk, Bq)``

    References:
        The blocked, padding-free form of CHAN's hard assignment (Pan et al.,
        CVPR 2023, Eq. 5-8) and of ColBERT's MaxSim (Khattab and Zaharia,
        SIGIR 2020, Eq. 3).

    Example:
        >>> from imtm.functional.pooling import resolve_pooling
        >>> s = blocked_query_scores(torch.randn(4, 36, 8), torch.randn(5, 7, 8), pool=resolve_pooling("sum"))
        >>> s.shape
        torch.Size([4, 5])
    """
    budget = (
        default_block_elements(keys.device) if max_block_elements is None else max_block_elements
    )
    out_dtype = torch.promote_types(keys.dtype, queries.dtype)
    Bk, K, D = keys.shape
    Bq = queries.shape[0]
    if Bk == 0 or Bq == 0:
        return torch.zeros(Bk, Bq, dtype=out_dtype, device=keys.device)
    compute_dtype = _autocast_dtype(compute_dtype, out_dtype, keys.device)
    # Queries are packed before they are normalised: only real tokens get normalised, and the
    # packing copy is the only one made.
    packed = pack_tokens(queries, query_mask)
    feats = packed.feats
    tracked = torch.is_grad_enabled() and (keys.requires_grad or queries.requires_grad)
    if normalize:
        keys = normalize_tokens(keys, key_mask)
        if packed.mask is not None and not tracked:
            # The packed rows are already a private copy: normalise them in place rather than
            # holding a second input-sized copy.
            feats = feats.div_(
                torch.linalg.vector_norm(feats, dim=-1, keepdim=True).clamp_min_(EPS)
            )
        else:
            feats = l2_normalize(feats, dim=-1, eps=EPS)
    if compute_dtype is not None:
        keys, feats = keys.to(compute_dtype), feats.to(compute_dtype)
    plan = plan_query_blocks(Bk, K, packed.offsets, budget)

    key_blocks = torch.split(keys.reshape(Bk * K, D), plan.key_sets * K)
    mask_blocks: list = [None] * len(key_blocks)
    if key_mask is not None:
        # One host read decides which key blocks need masking at all.
        has_pad = (~key_mask).any(1).tolist()
        mask_blocks = [
            m if any(has_pad[k0 : k0 + plan.key_sets]) else None
            for k0, m in zip(range(0, Bk, plan.key_sets), torch.split(key_mask, plan.key_sets))
        ]
    context_blocks: list = [None] * len(key_blocks)
    if key_context is not None:
        context_blocks = list(torch.split(key_context, plan.key_sets))
    query_blocks = torch.split(
        feats, [packed.offsets[q1] - packed.offsets[q0] for q0, q1 in plan.query_bounds]
    )
    widths = [qb.shape[0] for qb in query_blocks]
    # A wide block's width is padded with zero rows to a multiple of QUERY_ALIGN (when the product
    # still fits the budget): the product's output rows then start on aligned addresses, which the
    # matrix-product kernels need for full speed (measured on 2 CPU cores: ~15% faster products
    # at D = 1024); the few padded columns are dropped after the token scores.
    key_rows = plan.key_sets * K

    def aligned(qb: torch.Tensor) -> torch.Tensor:
        w = qb.shape[0]
        extra = -w % QUERY_ALIGN
        if extra == 0 or w < 4 * QUERY_ALIGN or key_rows * (w + extra) > budget:
            return qb
        return torch.nn.functional.pad(qb, (0, 0, 0, extra))

    query_blocks = [aligned(qb) for qb in query_blocks]  # type: ignore[assignment]
    # Consecutive product blocks are pooled together, up to a quarter of the budget of token
    # scores per key block: one gather and one pooling per group instead of per product keeps
    # the number of small operations (each a thread synchronisation) low.
    groups = _pool_groups(plan, packed.offsets, max(plan.max_width, budget // (4 * plan.key_sets)))
    repad = [
        _repad_index(packed, plan.query_bounds[j0][0], plan.query_bounds[j1 - 1][1])
        for j0, j1 in groups
    ]

    # Without autograd every block's product goes into one reused buffer: a fresh multi-MiB
    # tensor per block would be fresh pages from the OS, zeroed by page faults, each time.
    buffer = None
    if not tracked:
        most = max(kb.shape[0] for kb in key_blocks) * max(qb.shape[0] for qb in query_blocks)
        buffer = torch.empty(most, dtype=keys.dtype, device=keys.device)

    rows = []
    for kb, km, kc in zip(key_blocks, mask_blocks, context_blocks):
        b = kb.shape[0] // K
        parts = []
        for (j0, j1), (index, qmask, width) in zip(groups, repad):
            toks = []
            for qb, w in zip(query_blocks[j0:j1], widths[j0:j1]):
                if buffer is None:
                    sims = torch.mm(kb, qb.t())
                else:
                    sims = torch.mm(
                        kb,
                        qb.t(),
                        out=buffer[: kb.shape[0] * qb.shape[0]].view(kb.shape[0], qb.shape[0]),
                    )
                tok = token_scores(sims.view(b, K, qb.shape[0]), km, kc)
                toks.append(tok if w == qb.shape[0] else tok[:, :w])
            tok = (toks[0] if len(toks) == 1 else torch.cat(toks, dim=1)).to(out_dtype)
            n_sets = plan.query_bounds[j1 - 1][1] - plan.query_bounds[j0][0]
            tok = (tok if index is None else tok.index_select(1, index)).reshape(b, n_sets, width)
            parts.append(pool(tok, qmask, -1))
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


@torch.compiler.disable
def blocked_pair_scores(
    images: torch.Tensor,
    texts: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    *,
    reduce: PairReduceFn,
    max_block_elements: int | None = None,
    compute_dtype: torch.dtype | None = None,
    normalize: bool = True,
    pair_elements: int | None = None,
    with_blocks: bool = False,
    products: bool = True,
    text_extents: list[int] | None = None,
) -> Any:
    r"""Score every image against every caption from their full token-similarity blocks.

    For each block of ``b_i`` images and ``b_t`` captions, one matrix product
    ``(b_i * N, D) x (D, b_t * M)`` gives the cosines, viewed as
    ``(b_i, N, b_t, M)``, and ``reduce`` turns them into ``(b_i, b_t)`` scores.
    Both sides stay padded (use :func:`blocked_query_scores` when a reduction
    over one axis followed by a pooling is enough: it skips padding).

    Args:
        images: image token features.
        texts: caption token features.
        image_mask: True where an image token is real; ``None``: all are.
        text_mask: True where a word is real; ``None``: all are.
        reduce: ``reduce(sims, image_mask, text_mask) -> (b_i, b_t)``, given the
            block's cosines (in ``compute_dtype``; padded tokens have cosine 0 when
            ``normalize``) and its masks (``None`` where the block has no padding).
        max_block_elements: at most this many similarities exist at once; ``None``:
            :func:`default_block_elements` of the inputs' device.
        compute_dtype: dtype of the tokens in the matrix products; ``None``: the inputs'.
        normalize: L2-normalise tokens first.
        pair_elements: numbers ``reduce`` holds at once per image-caption pair, for the plan
            (a scorer whose reduction builds pair-sized intermediates larger than the ``N x M``
            similarities); ``None``: ``N * M``.
        with_blocks: call ``reduce(sims, image_mask, text_mask, rows, cols)`` with the block's
            image and caption ranges (two ``slice`` objects), so that it can cut per-image and
            per-caption inputs of its own to the block.
        products: compute the block's cosines; ``False``: ``reduce`` gets ``sims=None`` (a
            scorer that only needs the plan and the block ranges).
        text_extents: per caption, one past the position of its last real word;
            each block of captions is then cut to the largest extent among them, so ``reduce``
            gets ``(b_i, N, b_t, M_b)`` cosines and a ``(b_t, M_b)`` mask: the padding beyond
            every caption of the block is never multiplied. Captions sorted by extent (longest
            first) leave little padding in any block. ``None``: every block is ``M`` wide.

    Returns:
        ``(Bi, Bt)`` scores (in the dtype ``reduce`` returns). A ``reduce`` that returns a tuple of
        ``(b_i, b_t, ...)`` tensors gets the tuple of the assembled ``(Bi, Bt, ...)`` tensors.

    Shape:
        - images: ``(Bi, N, D)``, image_mask: ``(Bi, N)``
        - texts: ``(Bt, M, D)``, text_mask: ``(Bt, M)``
        - output: ``(Bi, Bt)``

    References:
        The all-pairs blocking of fine-grained matchers' evaluation (e.g. SCAN,
        CHAN), made memory-bounded and block-size independent.

    Example:
        >>> mean_of_max = lambda s, vm, tm: s.amax(1).mean(-1)
        >>> blocked_pair_scores(torch.randn(3, 4, 8), torch.randn(5, 6, 8), reduce=mean_of_max).shape
        torch.Size([3, 5])
    """
    budget = (
        default_block_elements(images.device) if max_block_elements is None else max_block_elements
    )
    Bi, N, D = images.shape
    Bt, M, _ = texts.shape
    if Bi == 0 or Bt == 0:
        return torch.zeros(
            Bi, Bt, dtype=torch.promote_types(images.dtype, texts.dtype), device=images.device
        )
    compute_dtype = _autocast_dtype(
        compute_dtype, torch.promote_types(images.dtype, texts.dtype), images.device
    )
    if normalize:
        images = normalize_tokens(images, image_mask, dtype=compute_dtype)
        texts = normalize_tokens(texts, text_mask, dtype=compute_dtype)
    elif compute_dtype is not None:
        images, texts = images.to(compute_dtype), texts.to(compute_dtype)
    N1, M1 = max(N, 1), max(M, 1)
    # The plan treats a pair as an N1 x M1 matrix; a larger per-pair footprint scales N1 up.
    if pair_elements is not None and pair_elements > N1 * M1:
        N1 = -(-pair_elements // M1)
    if Bi * N1 * Bt * M1 <= budget:
        bi, bt = max(Bi, 1), max(Bt, 1)
    else:
        bi = max(1, min(Bi, math.isqrt(budget) // N1))
        bt = max(1, min(Bt, budget // (bi * N1 * M1)))
        if bt == Bt:
            bi = max(1, min(Bi, budget // (N1 * Bt * M1)))
    image_blocks = torch.split(images.reshape(Bi * N, D), bi * N)
    text_blocks = torch.split(texts.reshape(Bt * M, D), bt * M)
    image_masks = (
        torch.split(image_mask, bi) if image_mask is not None else [None] * len(image_blocks)
    )
    text_masks = torch.split(text_mask, bt) if text_mask is not None else [None] * len(text_blocks)
    # Called as the options say: with or without the block ranges, with or without products.
    call: Any = reduce
    rows = []
    text_starts = list(range(0, Bt, bt))
    widths = [M] * len(text_blocks)
    if text_extents is not None:
        if len(text_extents) != Bt or any(a < b for a, b in zip(text_extents, text_extents[1:])):
            raise ValueError(
                f"blocked_pair_scores: text_extents must hold one extent per caption ({Bt}), "
                f"longest first; got {len(text_extents)} entries"
            )
        # Blocks of at most b_t captions of one extent each, cut to it (one copy per block).
        text_starts = _runs(text_extents, bt)
        bounds = list(zip(text_starts, [*text_starts[1:], Bt]))
        widths = [max(1, text_extents[t0]) for t0, _ in bounds]
        text_blocks = tuple(texts[t0:t1, :w].reshape(-1, D) for (t0, t1), w in zip(bounds, widths))
        # A block whose captions are all real up to their extent (one host read) has no padding.
        cut_masks: list[torch.Tensor | None] = [None] * len(bounds)
        if text_mask is not None:
            real = text_mask.sum(1).tolist()
            cut_masks = [
                None if all(real[t] == w for t in range(t0, t1)) else text_mask[t0:t1, :w]
                for (t0, t1), w in zip(bounds, widths)
            ]
        text_masks = cut_masks  # type: ignore[assignment]
    for i0, ib, im in zip(range(0, Bi, bi), image_blocks, image_masks):
        parts = []
        for t0, tb, tm, Mb in zip(text_starts, text_blocks, text_masks, widths):
            b_i, b_t = ib.shape[0] // N, tb.shape[0] // Mb
            sims = torch.mm(ib, tb.t()).view(b_i, N, b_t, Mb) if products else None
            if with_blocks:
                parts.append(call(sims, im, tm, slice(i0, i0 + b_i), slice(t0, t0 + b_t)))
            else:
                parts.append(call(sims, im, tm))
        rows.append(_assemble(parts, 1))
    return _assemble(rows, 0)


def order_by_extent(
    mask: torch.Tensor | None, n: int
) -> tuple[torch.Tensor | None, list[int] | None]:
    """Sets ordered by extent, longest first, and their extents in that order (one host read).

    The extent of a set is one past its last real token (masks need not be prefixes). Sorting
    by it lets a blocked engine cut each block to its longest set, so short sets do not compute
    the padding of the longest (``blocked_pair_scores(text_extents=)``, DCPA's phrase attention).

    Args:
        mask: ``(B, n)``, True at real tokens; ``None``: nothing is padded.
        n: the padded length.

    Returns:
        ``(order, extents)``: ``order`` ``(B,)`` indexes the sets longest first (stable) and
        ``extents[b]`` is the extent of set ``order[b]``; ``(None, None)`` when ``mask`` is
        ``None``, empty, or no set ends in padding (nothing to cut).

    Example:
        >>> order, ext = order_by_extent(torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]]).bool(), 3)
        >>> order.tolist(), ext
        ([1, 2, 0], [3, 2, 1])
    """
    if mask is None:
        return None, None
    last = torch.where(mask, torch.arange(1, n + 1, device=mask.device), 0).amax(1)
    ext, order = torch.sort(last, descending=True, stable=True)
    extents = ext.tolist()
    if not extents or extents[-1] == n:
        return None, None
    return order, extents


def _runs(extents: list[int], size: int) -> list[int]:
    """Starts of the blocks of at most ``size`` consecutive captions sharing one extent."""
    starts: list[int] = []
    for t, e in enumerate(extents):
        if not starts or e != extents[starts[-1]] or t - starts[-1] >= size:
            starts.append(t)
    return starts


def _assemble(parts: list, dim: int):
    """Concatenate block results (tensors, or tuples of tensors) along ``dim``."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(list(group), dim=dim) for group in zip(*parts))
    return torch.cat(parts, dim=dim)
