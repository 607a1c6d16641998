"""Property sweep over every public function of :mod:`imtm.functional`.

For each exported function, hypothesis draws random shapes (batches of one
included), masks (``padding="all_but_one"`` included: a row with a single real
token), dtypes (float32, float64, bfloat16) and every available device. Each
call must return finite values of the shape its docstring's ``Shape:`` section
documents, in the dtype the rules below state; where the function promises it,
padding invariance (padded positions filled with NaN or other values change
nothing), permutation equivariance, independence of the block budget, bounds
and finite gradients are checked too, and no call may write into its inputs.
A second test feeds each validating function one hostile input and checks the
exception type and message its docstring documents; a third gives two-input
functions two dtypes (promoted or refused, never a failure deep inside); a
fourth reruns the sweep on float32 inputs under bfloat16 autocast.

Every public name must have an entry: exporting a new function without one
fails :func:`test_every_public_function_is_swept`. ``HYPOTHESIS_PROFILE=thorough``
runs a deeper sweep by hand (the suite uses 8 examples per function).
"""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imtm.functional as F
from imtm.functional import AttentionWeights
from imtm.functional.lexicon import LABEL_WEIGHTS as LEX_RULES
from imtm.testing import PADDINGS, devices, dtypes, image_ids, masks, score_matrices, tokens

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64
_SEEDS = st.integers(0, 2**32 - 1)

# Constants and classes exported next to the functions. They compute nothing themselves;
# the functions that consume them are swept (POOLINGS through every pooling by name and
# resolve_pooling, AttentionWeights through both phrase-attention functions).
EXCLUDED = {
    "POOLINGS": "a dict of the pooling functions, each swept under its own name",
    "AttentionWeights": "a frozen dataclass holding attention weights; swept through phrase_attention_*",
    "FeedForwardWeights": "a frozen dataclass holding feed-forward weights; swept through phrase_attention_*",
}

# Functions documented as doing no validation (they run inside blocked loops, or are pure
# arithmetic on values they trust): they have no hostile-input case.
UNVALIDATED = {
    "max_pool": "pooling primitives do no validation (module docstring); masked_pool is the checked entry",
    "mean_pool": "as max_pool",
    "sum_pool": "as max_pool",
    "softmax_pool": "as max_pool",
    "lse_pool": "as max_pool",
    "topk_mean": "an inner reduction, like the pooling primitives",
    "blocked_pair_scores": "the engines do no validation (blocking module docstring)",
    "blocked_query_scores": "as blocked_pair_scores",
    "normalize_tokens": "a preparation step of the engines",
    "pack_tokens": "a preparation step of the engines",
    "sparse_alignment_from_cosines": "documented: no validation, runs inside blocked loops",
    "hard_assignment_from_cosines": "as sparse_alignment_from_cosines (options checked, inputs not)",
    "aggregation_weights": "an inner step of PatchSlimming, whose block validates",
    "fusion_weights": "as aggregation_weights",
    "slimmed_cosines": "as aggregation_weights",
    "top_keep_decisions": "as aggregation_weights",
    "dimension_correlation": "no validation; the DIAS losses that call it validate",
    "transport_cost": "no validation; transport_plan validates",
    "num_masked_patches": "pure arithmetic on two numbers",
    "row_multiplicity": "counts rows of a bool matrix the losses have already checked",
}


def public_names() -> list[str]:
    """``imtm.functional.__all__`` if defined, else every public name its ``__init__`` imports."""
    explicit = getattr(F, "__all__", None)
    if explicit is not None:
        return sorted(explicit)
    tree = ast.parse(Path(F.__file__).read_text())
    names = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    return sorted(n for n in names if not n.startswith("_"))


# ---------------------------------------------------------------------------- drawing context
class Ctx:
    """What one example draws with: hypothesis's ``draw``, the dtype and the device."""

    def __init__(self, draw, dtype: torch.dtype, device: torch.device):
        self.draw, self.dtype, self.device = draw, dtype, device

    def int(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def pick(self, options):
        return self.draw(st.sampled_from(list(options)))

    def flag(self) -> bool:
        return self.draw(st.booleans())

    def padding(self) -> str:
        return self.pick(PADDINGS)

    def _gen(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.draw(_SEEDS))

    def generator(self) -> torch.Generator:
        """A seeded generator on the device (random functions draw on their inputs' device)."""
        return torch.Generator(device=self.device).manual_seed(self.draw(_SEEDS))

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as it is, or the same values in a non-contiguous layout (a transposed copy's view)."""
        if x.dim() < 2 or not self.flag():
            return x
        return x.transpose(0, -1).contiguous().transpose(0, -1)

    def randn(self, *shape, scale: float = 1.0, dtype=None) -> torch.Tensor:
        x = torch.randn(*shape, generator=self._gen(), dtype=F64) * scale
        return self.layout(x.to(dtype or self.dtype).to(self.device))

    def rand(self, *shape, low: float = 0.0, high: float = 1.0, dtype=None) -> torch.Tensor:
        x = torch.rand(*shape, generator=self._gen(), dtype=F64) * (high - low) + low
        return self.layout(x.to(dtype or self.dtype).to(self.device))

    def tokens(self, batch, max_tokens=5, dim=4, padding=None):
        """``(feats, mask)`` on the device; padded positions hold random values.

        Features are of scale 1 or 1000, and sometimes the first token is an all-zero vector.
        """
        scale = self.pick([1.0, 1e3])
        t = self.draw(
            tokens(
                batch=batch,
                max_tokens=max_tokens,
                dim=dim,
                dtype=self.dtype,
                scale=scale,
                padding=padding or self.padding(),
            )
        )
        feats = t.feats.clone()
        if self.flag():
            feats[0, 0] = 0
        return self.layout(feats.to(self.device)), self.layout(t.mask.to(self.device))

    def mask(self, batch, max_tokens=5, padding=None) -> torch.Tensor:
        m = self.draw(masks(batch=batch, max_tokens=max_tokens, padding=padding or self.padding()))
        return self.layout(m.to(self.device))

    def perm(self, n: int) -> torch.Tensor:
        return torch.tensor(
            self.draw(st.permutations(range(n))), dtype=torch.long, device=self.device
        )

    def positives(self, bi: int, bt: int) -> torch.Tensor:
        """``(Bi, Bt)`` bool from the image id of every caption: each caption matches one image."""
        ids = self.draw(image_ids(batch=bt, max_images=bi)).to(self.device)
        return torch.arange(bi, device=self.device)[:, None] == ids[None, :]

    def scores(self, bi, bt, *, wide: bool = False) -> torch.Tensor:
        """Cosine-like scores in [-1, 1], or with ``wide`` sometimes logits in [-50, 50]."""
        high = self.pick([1.0, 50.0]) if wide else 1.0
        return self.draw(score_matrices(bi=bi, bt=bt, dtype=self.dtype, low=-high, high=high)).to(
            self.device
        )

    def budget(self):
        """A block budget: the default, or one small enough to cut a tiny problem into many blocks."""
        return self.pick([None, 1, 7, 64])


# ---------------------------------------------------------------------------- checks
_ATOL = {BF16: 3e-2, F32: 2e-5, F64: 1e-9}
_RTOL = {BF16: 3e-2, F32: 2e-5, F64: 1e-9}


def close(actual, expected, dtype, what: str) -> None:
    torch.testing.assert_close(
        actual, expected, atol=_ATOL[dtype], rtol=_RTOL[dtype], msg=lambda m: f"{what}: {m}"
    )


def expect(out, shape, dtype, ctx: Ctx, what: str, *, finite: bool = True) -> torch.Tensor:
    """``out`` is a tensor of ``shape`` and ``dtype`` on the context's device, finite unless told."""
    assert isinstance(out, torch.Tensor), f"{what}: expected a tensor, got {type(out).__name__}"
    assert tuple(out.shape) == tuple(shape), (
        f"{what}: shape {tuple(out.shape)}, documented {tuple(shape)}"
    )
    if torch.is_autocast_enabled(ctx.device.type) and dtype == F32:
        # Under autocast, matrix products return the autocast dtype, and so may the functions.
        assert out.dtype in (F32, torch.get_autocast_dtype(ctx.device.type)), (
            f"{what}: dtype {out.dtype}"
        )
    else:
        assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
    assert out.device.type == ctx.device.type, f"{what}: on {out.device}, inputs on {ctx.device}"
    if finite and out.is_floating_point():
        assert bool(torch.isfinite(out).all()), f"{what}: non-finite values {out}"
    return out


def within(out, low, high, dtype, what: str) -> None:
    slack = _ATOL[dtype] * (1 + max(abs(low), abs(high)))
    ok = (out >= low - slack) & (out <= high + slack)
    assert bool(ok.all()), f"{what}: values outside [{low}, {high}]: {out}"


def nan_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with every padded position (``mask`` False, broadcast over trailing axes) set to NaN."""
    m = mask.reshape(*mask.shape, *([1] * (x.dim() - mask.dim())))
    return torch.where(m, x, torch.full((), math.nan, dtype=x.dtype, device=x.device))


def finite_grads(fn, tensors, real=None, what: str = "") -> None:
    """Backward through ``fn(*tensors)``: every gradient is finite at real positions.

    ``real[k]`` is a bool mask over the leading axes of ``tensors[k]`` (``None``: all real).
    """
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    terms = [
        o[torch.isfinite(o)].float().sum()
        for o in outs
        if o.is_floating_point() and o.requires_grad
    ]
    if not terms:
        return
    sum(terms).backward()
    for k, leaf in enumerate(leaves):
        if leaf.grad is None:
            continue
        g = leaf.grad if real is None or real[k] is None else leaf.grad[real[k]]
        assert bool(torch.isfinite(g).all()), f"{what}: non-finite gradient for input {k}"


# ---------------------------------------------------------------------------- token-pair scorers
def _pair_inputs(ctx: Ctx, *, dim=None, max_tokens=4):
    d = dim if dim is not None else ctx.int(1, 5)
    bi, bt = ctx.int(1, 3), ctx.int(1, 3)
    v, vm = ctx.tokens(bi, max_tokens, d)
    t, tm = ctx.tokens(bt, max_tokens, d)
    # Sometimes no mask at all: None means every token is real.
    if ctx.flag():
        vm = None if bool(vm.all()) else vm
    return v, t, vm, tm


def _pair_properties(ctx, fn, v, t, vm, tm, out, kwargs, what, *, budget=True, grad=True):
    """Padding invariance (NaN in padding), permutation equivariance, budget independence, gradients."""
    dtype = ctx.dtype
    v2 = v if vm is None else nan_padding(v, vm)
    t2 = t if tm is None else nan_padding(t, tm)
    if vm is not None or tm is not None:
        close(
            fn(v2, t2, vm, tm, **kwargs), out, dtype, f"{what}: NaN in padding changed the scores"
        )
    pi, pt = ctx.perm(v.shape[0]), ctx.perm(t.shape[0])
    permuted = fn(
        v[pi], t[pt], None if vm is None else vm[pi], None if tm is None else tm[pt], **kwargs
    )
    close(permuted, out[pi][:, pt], dtype, f"{what}: not permutation equivariant")
    if budget and kwargs.get("max_block_elements") is not None:
        close(
            fn(v, t, vm, tm, **{**kwargs, "max_block_elements": None}),
            out,
            dtype,
            f"{what}: depends on the block budget",
        )
    if grad:
        # NaN in padding must not reach the gradient of a real token either.
        finite_grads(lambda a, b: fn(a, b, vm, tm, **kwargs), [v2, t2], [vm, tm], what)


def _compute_dtype(ctx):
    return ctx.pick([None, BF16]) if ctx.dtype != BF16 else None


def _bound_dtype(ctx, kwargs):
    """The dtype whose tolerance a bound gets: matrix products in ``compute_dtype`` round there.

    A cosine from a bfloat16 product can exceed 1 by bfloat16's rounding even when the output is
    float32 (seen as 1.0001 from ``soft_assignment_scores``).
    """
    compute = kwargs.get("compute_dtype")
    return ctx.dtype if compute is None else max(ctx.dtype, compute, key=lambda t: _ATOL[t])


def case_hard_assignment_scores(ctx: Ctx):
    v, t, vm, tm = _pair_inputs(ctx)
    kwargs = {
        "codebook": ctx.pick(["visual", "textual"]),
        "pooling": ctx.pick(["max", "mean", "sum", "softmax", "lse"]),
        "temperature": ctx.pick([0.01, 0.1, 1.0]),
        "max_block_elements": ctx.budget(),
        "compute_dtype": _compute_dtype(ctx),
    }
    fn = F.hard_assignment_scores
    out = expect(
        fn(v, t, vm, tm, **kwargs),
        (v.shape[0], t.shape[0]),
        ctx.dtype,
        ctx,
        "hard_assignment_scores",
    )
    if kwargs["pooling"] in ("max", "mean", "softmax"):
        within(out, -1, 1, _bound_dtype(ctx, kwargs), "hard_assignment_scores")
    _pair_properties(ctx, fn, v, t, vm, tm, out, kwargs, "hard_assignment_scores")


def case_soft_assignment_scores(ctx: Ctx):
    v, t, vm, tm = _pair_inputs(ctx)
    kwargs = {
        "tau": ctx.pick([0.01, 0.1, 1.0]),
        "codebook": ctx.pick(["visual", "textual"]),
        "pooling": ctx.pick(["max", "mean", "sum", "softmax", "lse"]),
        "temperature": ctx.pick([0.05, 1.0]),
        "max_block_elements": ctx.budget(),
        "compute_dtype": _compute_dtype(ctx),
    }
    fn = F.soft_assignment_scores
    out = expect(
        fn(v, t, vm, tm, **kwargs),
        (v.shape[0], t.shape[0]),
        ctx.dtype,
        ctx,
        "soft_assignment_scores",
    )
    if kwargs["pooling"] in ("max", "mean", "softmax"):
        within(out, -1, 1, _bound_dtype(ctx, kwargs), "soft_assignment_scores")
    _pair_properties(ctx, fn, v, t, vm, tm, out, kwargs, "soft_assignment_scores")


def case_sparse_alignment_scores(ctx: Ctx):
    v, t, vm, tm = _pair_inputs(ctx)
    direction = ctx.pick(["both", "patch_to_word", "word_to_patch"])
    kwargs = {
        "direction": direction,
        "max_block_elements": ctx.budget(),
        "compute_dtype": _compute_dtype(ctx),
    }
    fn = F.sparse_alignment_scores
    out = expect(
        fn(v, t, vm, tm, **kwargs),
        (v.shape[0], t.shape[0]),
        ctx.dtype,
        ctx,
        "sparse_alignment_scores",
    )
    bound = 2 if direction == "both" else 1
    within(out, -bound, bound, _bound_dtype(ctx, kwargs), "sparse_alignment_scores")
    _pair_properties(ctx, fn, v, t, vm, tm, out, kwargs, "sparse_alignment_scores")


def case_global_cosine_scores(ctx: Ctx):
    v, t, vm, tm = _pair_inputs(ctx)
    fn = F.global_cosine_scores
    out = expect(fn(v, t, vm, tm), (v.shape[0], t.shape[0]), ctx.dtype, ctx, "global_cosine_scores")
    within(out, -1, 1, ctx.dtype, "global_cosine_scores")
    _pair_properties(ctx, fn, v, t, vm, tm, out, {}, "global_cosine_scores", budget=False)


def _mean_of_max(sims, vm, tm):
    # A masked reduction for the pair engine: LAPS Eq. 8 on the block's (b_i, b_t, N, M) cosines.
    return F.sparse_alignment_from_cosines(
        sims.permute(0, 2, 1, 3),
        None if vm is None else vm[:, None],
        None if tm is None else tm[None],
    )


def case_blocked_pair_scores(ctx: Ctx):
    v, t, vm, tm = _pair_inputs(ctx)
    kwargs = {
        "reduce": _mean_of_max,
        "max_block_elements": ctx.budget(),
        "compute_dtype": _compute_dtype(ctx),
    }
    fn = F.blocked_pair_scores
    out_dtype = kwargs["compute_dtype"] or ctx.dtype  # the dtype the reduction returns
    out = expect(
        fn(v, t, vm, tm, **kwargs), (v.shape[0], t.shape[0]), out_dtype, ctx, "blocked_pair_scores"
    )
    within(out, -2, 2, out_dtype, "blocked_pair_scores")
    ctx.dtype = out_dtype  # tolerances of the compute dtype
    _pair_properties(ctx, fn, v, t, vm, tm, out, kwargs, "blocked_pair_scores")


def case_blocked_query_scores(ctx: Ctx):
    v, t, vm, tm = _pair_inputs(ctx)
    pooling = ctx.pick(["max", "mean", "sum", "softmax", "lse"])
    kwargs = {
        "pool": F.resolve_pooling(pooling, 0.1),
        "max_block_elements": ctx.budget(),
        "compute_dtype": _compute_dtype(ctx),
    }
    fn = F.blocked_query_scores
    out = expect(
        fn(v, t, vm, tm, **kwargs), (v.shape[0], t.shape[0]), ctx.dtype, ctx, "blocked_query_scores"
    )
    if pooling != "sum":
        within(
            out,
            -1,
            1 + 0.1 * math.log(t.shape[1]),
            _bound_dtype(ctx, kwargs),
            "blocked_query_scores",
        )
    _pair_properties(ctx, fn, v, t, vm, tm, out, kwargs, "blocked_query_scores")


def _attention_weights(ctx: Ctx, dim: int) -> AttentionWeights:
    s = 1 / math.sqrt(dim)
    return AttentionWeights(
        ctx.randn(3 * dim, dim, scale=s),
        ctx.randn(3 * dim, scale=0.1),
        ctx.randn(dim, dim, scale=s),
        ctx.randn(dim, scale=0.1),
        1 + ctx.randn(dim, scale=0.1),
        ctx.randn(dim, scale=0.1),
    )


def _feed_forward_weights(ctx: Ctx, dim: int):
    """Feed-forward sub-layer weights (hidden width 1-5), or None (no sub-layer)."""
    if not ctx.flag():
        return None
    hidden = ctx.int(1, 5)
    return F.FeedForwardWeights(
        ctx.randn(hidden, dim, scale=1 / math.sqrt(dim)),
        ctx.randn(hidden, scale=0.1),
        ctx.randn(dim, hidden, scale=1 / math.sqrt(hidden)),
        ctx.randn(dim, scale=0.1),
        1 + ctx.randn(dim, scale=0.1),
        ctx.randn(dim, scale=0.1),
    )


def case_phrase_attention_scores(ctx: Ctx):
    heads = ctx.int(1, 2)
    d = heads * ctx.int(1, 3)
    v, t, vm, tm = _pair_inputs(ctx, dim=d)
    kwargs = {
        "self_attn": _attention_weights(ctx, d),
        "cross_attn": _attention_weights(ctx, d),
        "heads": heads,
        "k": ctx.pick([None, 1, 2, 10]),
        "max_block_elements": ctx.budget(),
        "feed_forward": _feed_forward_weights(ctx, d),
        "average": ctx.pick(["features", "cosines"]),
    }
    fn = F.phrase_attention_scores
    out = expect(
        fn(v, t, vm, tm, **kwargs),
        (v.shape[0], t.shape[0]),
        ctx.dtype,
        ctx,
        "phrase_attention_scores",
    )
    within(out, -1, 1, ctx.dtype, "phrase_attention_scores")
    _pair_properties(ctx, fn, v, t, vm, tm, out, kwargs, "phrase_attention_scores")


def case_phrase_attention_token_scores(ctx: Ctx):
    heads = ctx.int(1, 2)
    d = heads * ctx.int(1, 3)
    b = ctx.int(1, 3)
    q, qm = ctx.tokens(b, 4, d)
    k, km = ctx.tokens(b, 4, d)
    kwargs = {
        "self_attn": _attention_weights(ctx, d),
        "cross_attn": _attention_weights(ctx, d),
        "heads": heads,
        "feed_forward": _feed_forward_weights(ctx, d),
    }
    fn = F.phrase_attention_token_scores
    what = "phrase_attention_token_scores"
    out = expect(fn(q, k, qm, km, **kwargs), q.shape[:2], ctx.dtype, ctx, what, finite=False)
    # Documented: finite scores at real query tokens, -inf at padded ones.
    assert bool(torch.isfinite(out[qm]).all()), f"{what}: non-finite score at a real token"
    assert bool((out[~qm] == -math.inf).all()), f"{what}: padded query tokens must score -inf"
    within(out[qm], -1, 1, ctx.dtype, what)
    close(
        fn(nan_padding(q, qm), nan_padding(k, km), qm, km, **kwargs),
        out,
        ctx.dtype,
        f"{what}: NaN in padding",
    )
    p = ctx.perm(b)
    close(
        fn(q[p], k[p], qm[p], km[p], **kwargs),
        out[p],
        ctx.dtype,
        f"{what}: not equivariant in the pairs",
    )
    finite_grads(
        lambda a, c: fn(a, c, qm, km, **kwargs),
        [nan_padding(q, qm), nan_padding(k, km)],
        [qm, km],
        what,
    )


def case_topk_mean_scores(ctx: Ctx):
    d = ctx.int(1, 5)
    v, vm = ctx.tokens(ctx.int(1, 3), 5, d)
    c = ctx.randn(ctx.int(1, 3), d)
    kwargs = {
        "k": ctx.pick([None, 1, 2, 10]),
        "max_block_elements": ctx.budget(),
        "compute_dtype": _compute_dtype(ctx),
    }
    fn = F.topk_mean_scores
    what = "topk_mean_scores"
    out = expect(fn(v, c, vm, **kwargs), (v.shape[0], c.shape[0]), ctx.dtype, ctx, what)
    within(out, -1, 1, _bound_dtype(ctx, kwargs), what)
    close(fn(nan_padding(v, vm), c, vm, **kwargs), out, ctx.dtype, f"{what}: NaN in padding")
    pi, pt = ctx.perm(v.shape[0]), ctx.perm(c.shape[0])
    close(
        fn(v[pi], c[pt], vm[pi], **kwargs),
        out[pi][:, pt],
        ctx.dtype,
        f"{what}: not permutation equivariant",
    )
    close(
        fn(v, c, vm, **{**kwargs, "max_block_elements": None}),
        out,
        ctx.dtype,
        f"{what}: depends on the budget",
    )
    finite_grads(lambda a, b: fn(a, b, vm, **kwargs), [nan_padding(v, vm), c], [vm, None], what)


def case_sparse_alignment_from_cosines(ctx: Ctx):
    b = ctx.int(1, 3)
    vm, tm = ctx.mask(b), ctx.mask(b)
    sims = ctx.rand(b, vm.shape[1], tm.shape[1], low=-1, high=1)
    direction = ctx.pick(["both", "patch_to_word", "word_to_patch"])
    fn = F.sparse_alignment_from_cosines
    what = "sparse_alignment_from_cosines"
    out = expect(fn(sims, vm, tm, direction=direction), (b,), ctx.dtype, ctx, what)
    within(out, -2, 2, ctx.dtype, what)
    pair = vm[:, :, None] & tm[:, None, :]
    close(
        fn(nan_padding(sims, pair), vm, tm, direction=direction),
        out,
        ctx.dtype,
        f"{what}: NaN in padding",
    )
    pn, pm = ctx.perm(vm.shape[1]), ctx.perm(tm.shape[1])
    close(
        fn(sims[:, pn][:, :, pm], vm[:, pn], tm[:, pm], direction=direction),
        out,
        ctx.dtype,
        f"{what}: not invariant to the order of tokens",
    )
    finite_grads(lambda s: fn(s, vm, tm, direction=direction), [sims], None, what)


def case_patch_slimming_scores(ctx: Ctx):
    v, t, vm, tm = _pair_inputs(ctx)
    bi, n, _ = v.shape
    a_p, logits = ctx.rand(bi, n), ctx.randn(bi, n, ctx.int(1, 3))
    kwargs = {
        "beta": ctx.pick([0.0, 0.8, 1.0]),
        "ratio": ctx.pick([0.3, 0.5, 1.0]),
        "fusion": ctx.flag(),
        "max_block_elements": ctx.budget(),
    }
    what = "patch_slimming_scores"

    def fn(v, t, vm, tm, a_p=a_p, logits=logits, **kw):
        out = F.patch_slimming_scores(v, t, vm, tm, predicted=a_p, aggregation_logits=logits, **kw)
        return out.scores

    out = expect(fn(v, t, vm, tm, **kwargs), (bi, t.shape[0]), ctx.dtype, ctx, what)
    within(out, -2, 2, ctx.dtype, what)
    v2 = v if vm is None else nan_padding(v, vm)
    t2 = t if tm is None else nan_padding(t, tm)
    close(
        fn(v2, t2, vm, tm, **kwargs), out, ctx.dtype, f"{what}: NaN in padding changed the scores"
    )
    pi, pt = ctx.perm(bi), ctx.perm(t.shape[0])
    permuted = fn(
        v[pi],
        t[pt],
        None if vm is None else vm[pi],
        None if tm is None else tm[pt],
        a_p=a_p[pi],
        logits=logits[pi],
        **kwargs,
    )
    close(permuted, out[pi][:, pt], ctx.dtype, f"{what}: not permutation equivariant")
    close(
        fn(v, t, vm, tm, **{**kwargs, "max_block_elements": None}),
        out,
        ctx.dtype,
        f"{what}: depends on the block budget",
    )
    finite_grads(lambda a, b: fn(a, b, vm, tm, **kwargs), [v2, t2], [vm, tm], what)


def _slimming_scores(v, t, vm=None, tm=None, **kwargs):
    """patch_slimming_scores with a prediction of the images' shape, for the shared hostile cases."""
    predicted = v.new_zeros(v.shape[:2]) if isinstance(v, torch.Tensor) and v.dim() == 3 else None
    return F.patch_slimming_scores(v, t, vm, tm, predicted=predicted, **kwargs).scores


def case_hard_assignment_from_cosines(ctx: Ctx):
    b = ctx.int(1, 3)
    vm, tm = ctx.mask(b), ctx.mask(b)
    sims = ctx.rand(b, vm.shape[1], tm.shape[1], low=-1, high=1)
    kw = {
        "codebook": ctx.pick(["visual", "textual"]),
        "pooling": ctx.pick(["max", "mean", "softmax"]),
        "temperature": ctx.pick([0.05, 1.0]),
    }
    fn = F.hard_assignment_from_cosines
    what = "hard_assignment_from_cosines"
    out = expect(fn(sims, vm, tm, **kw), (b,), ctx.dtype, ctx, what)
    within(out, -1, 1, ctx.dtype, what)
    pair = vm[:, :, None] & tm[:, None, :]
    close(fn(nan_padding(sims, pair), vm, tm, **kw), out, ctx.dtype, f"{what}: NaN in padding")
    pn, pm = ctx.perm(vm.shape[1]), ctx.perm(tm.shape[1])
    close(
        fn(sims[:, pn][:, :, pm], vm[:, pn], tm[:, pm], **kw),
        out,
        ctx.dtype,
        f"{what}: not invariant to the order of tokens",
    )
    finite_grads(lambda s: fn(s, vm, tm, **kw), [sims], None, what)


def case_cosine_similarity_matrix(ctx: Ctx):
    d = ctx.int(1, 5)
    a, b = ctx.randn(ctx.int(1, 4), d), ctx.randn(ctx.int(1, 4), d)
    if ctx.flag():
        a[0] = 0  # documented: an all-zero vector scores 0 with everything
    fn = F.cosine_similarity_matrix
    what = "cosine_similarity_matrix"
    out = expect(fn(a, b), (a.shape[0], b.shape[0]), ctx.dtype, ctx, what)
    within(out, -1, 1, ctx.dtype, what)
    if not bool(a[0].any()):
        assert bool((out[0] == 0).all()), f"{what}: a zero vector must score 0"
    pi, pt = ctx.perm(a.shape[0]), ctx.perm(b.shape[0])
    close(fn(a[pi], b[pt]), out[pi][:, pt], ctx.dtype, f"{what}: not permutation equivariant")
    finite_grads(fn, [a, b], None, what)


def case_masked_mean(ctx: Ctx):
    x, m = ctx.tokens(ctx.int(1, 4), 5, ctx.int(1, 4))
    what = "masked_mean"
    out = expect(F.masked_mean(x, m), (x.shape[0], x.shape[2]), ctx.dtype, ctx, what)
    close(F.masked_mean(nan_padding(x, m), m), out, ctx.dtype, f"{what}: NaN in padding")
    p = ctx.perm(x.shape[1])
    close(
        F.masked_mean(x[:, p], m[:, p]),
        out,
        ctx.dtype,
        f"{what}: not invariant to the order of tokens",
    )
    # Documented: a row without any real token gives a zero vector.
    empty = m.clone()
    empty[0] = False
    assert bool((F.masked_mean(x, empty)[0] == 0).all()), (
        f"{what}: an empty row must give a zero vector"
    )
    finite_grads(lambda a: F.masked_mean(a, m), [nan_padding(x, m)], [m], what)


def case_normalize_tokens(ctx: Ctx):
    x, m = ctx.tokens(ctx.int(1, 4), 5, ctx.int(1, 4))
    cast = ctx.pick([None, F32, F64, BF16])
    what = "normalize_tokens"
    out = expect(F.normalize_tokens(x, m, dtype=cast), x.shape, cast or ctx.dtype, ctx, what)
    assert bool((out[~m] == 0).all()), f"{what}: padded tokens must be exact zeros"
    coarse = max(
        out.dtype, ctx.dtype, key=lambda t: _ATOL[t]
    )  # computed in the input dtype, then cast
    norms = torch.linalg.vector_norm(out[m].to(F64), dim=-1)
    nonzero = x[m].abs().amax(-1) > 0  # documented: an all-zero token stays zero
    within(norms[nonzero], 1, 1, coarse, f"{what}: real tokens must have unit norm")
    assert bool((norms[~nonzero] == 0).all()), f"{what}: a zero token must stay zero"
    close(
        F.normalize_tokens(nan_padding(x, m), m, dtype=cast),
        out,
        out.dtype,
        f"{what}: NaN in padding",
    )
    finite_grads(lambda a: F.normalize_tokens(a, m, dtype=cast), [nan_padding(x, m)], [m], what)


def case_pack_tokens(ctx: Ctx):
    x, m = ctx.tokens(ctx.int(1, 4), 5, ctx.int(1, 4))
    mask = None if ctx.flag() else m
    what = "pack_tokens"
    packed = F.pack_tokens(x, mask)
    total = x.shape[0] * x.shape[1] if mask is None else int(m.sum())
    expect(packed.feats, (total, x.shape[2]), ctx.dtype, ctx, f"{what}: feats")
    assert packed.offsets[-1] == total and sum(packed.lengths) == total, (
        f"{what}: offsets disagree with the mask"
    )
    torch.testing.assert_close(packed.feats, x.reshape(-1, x.shape[2]) if mask is None else x[m])
    if mask is not None:
        torch.testing.assert_close(F.pack_tokens(nan_padding(x, m), m).feats, packed.feats)


# ---------------------------------------------------------------------------- poolings
def _pool_inputs(ctx: Ctx):
    """``x`` of rank 1-3 pooled along ``dim``; the mask is full-shaped or broadcasts over axis 0."""
    rank = ctx.int(1, 3)
    lead = [ctx.int(1, 3) for _ in range(rank - 1)]
    broadcast = rank == 3 and ctx.flag()
    sets = math.prod(lead[1:]) if broadcast else math.prod(lead)
    m = ctx.mask(sets)  # (sets, L), one real position at least per set
    length = m.shape[1]
    x = ctx.randn(*lead, length, scale=ctx.pick([1.0, 30.0]))
    m = (
        m.reshape(*([1] if broadcast else lead[:1]), *lead[1:], length)
        if rank > 1
        else m.reshape(length)
    )
    dim = ctx.pick(range(-1, -rank - 1, -1)) if rank > 1 else -1
    if dim != -1:
        x, m = x.movedim(-1, dim), m.movedim(-1, dim)
    return x, m, dim


def _pool_case(name: str, *, bounded: str | None, **fixed):
    def case(ctx: Ctx):
        fn = getattr(F, name)
        x, m, dim = _pool_inputs(ctx)
        kwargs = dict(fixed)
        if name in ("softmax_pool", "lse_pool"):
            kwargs["temperature"] = ctx.pick([1e-3, 0.1, 1.0])
        if name == "topk_mean":
            kwargs["k"] = ctx.pick([None, 1, 2, 10])
        if name == "masked_pool":
            kwargs["pooling"] = ctx.pick(sorted(F.POOLINGS))
            kwargs["temperature"] = ctx.pick([1e-3, 0.1, 1.0])
        shape = x.shape[: dim % x.dim()] + x.shape[dim % x.dim() + 1 :]
        out = expect(fn(x, m, dim=dim, **kwargs), shape, ctx.dtype, ctx, name)
        full = torch.broadcast_to(m, x.shape)
        lo = torch.where(full, x, torch.full((), math.inf, dtype=x.dtype, device=x.device)).amin(
            dim
        )
        hi = torch.where(full, x, torch.full((), -math.inf, dtype=x.dtype, device=x.device)).amax(
            dim
        )
        pooled = kwargs.get("pooling", name)
        if bounded == "set" and pooled not in ("sum", "lse", "lse_pool", "sum_pool"):
            # max, mean, softmax and top-k means lie between the smallest and largest valid score.
            slack = _ATOL[ctx.dtype] * (1 + hi.abs())
            assert bool((out >= lo - slack).all() and (out <= hi + slack).all()), (
                f"{name}: outside the set's range"
            )
        if pooled in ("lse", "lse_pool"):
            n = full.sum(dim).to(F64)
            t = kwargs["temperature"]
            slack = _ATOL[ctx.dtype] * (1 + hi.abs())
            assert bool(
                (out >= hi - slack).all() and (out <= hi + t * n.log().to(out.dtype) + slack).all()
            ), f"{name}: log-sum-exp outside [max, max + T log n]"
        close(
            fn(nan_padding(x, full), m, dim=dim, **kwargs),
            out,
            ctx.dtype,
            f"{name}: NaN in padding",
        )
        p = ctx.perm(x.shape[dim])
        xp, mp = x.index_select(dim % x.dim(), p), m.index_select(dim % m.dim(), p)
        close(
            fn(xp, mp, dim=dim, **kwargs),
            out,
            ctx.dtype,
            f"{name}: not invariant to the order within a set",
        )
        finite_grads(lambda a: fn(a, m, dim=dim, **kwargs), [nan_padding(x, full)], [full], name)

    case.__name__ = f"case_{name}"
    return case


def case_resolve_pooling(ctx: Ctx):
    name = ctx.pick(sorted(F.POOLINGS))
    temperature = ctx.pick([0.05, 1.0])
    pool = F.resolve_pooling(name, temperature)
    x, m, dim = _pool_inputs(ctx)
    shape = x.shape[: dim % x.dim()] + x.shape[dim % x.dim() + 1 :]
    out = expect(pool(x, m, dim), shape, ctx.dtype, ctx, "resolve_pooling")
    kwargs = {"temperature": temperature} if name in ("softmax", "lse") else {}
    close(
        out,
        F.POOLINGS[name](x, m, dim=dim, **kwargs),
        ctx.dtype,
        "resolve_pooling: not the named pooling",
    )


# ---------------------------------------------------------------------------- ranking losses and miners
def _loss_inputs(ctx: Ctx, wide: bool = True):
    bi, bt = ctx.int(1, 4), ctx.int(1, 4)
    s = ctx.scores(bi, bt, wide=wide)
    pos = ctx.positives(bi, bt)
    scores = (s, ctx.scores(bi, bt, wide=wide)) if ctx.flag() else s
    return scores, pos


def _permute_scores(scores, pi, pt):
    if isinstance(scores, torch.Tensor):
        return scores[pi][:, pt]
    return tuple(s[pi][:, pt] for s in scores)


def case_triplet_loss(ctx: Ctx):
    scores, pos = _loss_inputs(ctx)
    reduction = ctx.pick(["sum", "mean", "none"])
    kwargs = {"margin": ctx.pick([0.0, 0.2, 1.0]), "hardest": ctx.flag(), "reduction": reduction}
    if ctx.flag():
        kwargs["negatives"] = F.distance_weighted_negatives(
            scores, pos, dim=16, generator=ctx.generator()
        )
    what = "triplet_loss"
    shape = tuple(pos.shape) if reduction == "none" else ()
    out = expect(F.triplet_loss(scores, pos, **kwargs), shape, ctx.dtype, ctx, what)
    assert bool((out >= 0).all()), f"{what}: negative loss {out}"
    if "negatives" not in kwargs:
        pi, pt = ctx.perm(pos.shape[0]), ctx.perm(pos.shape[1])
        permuted = F.triplet_loss(_permute_scores(scores, pi, pt), pos[pi][:, pt], **kwargs)
        close(
            permuted,
            out[pi][:, pt] if reduction == "none" else out,
            ctx.dtype,
            f"{what}: not permutation invariant",
        )
    s = list(scores) if isinstance(scores, tuple) else [scores]
    finite_grads(
        lambda *a: F.triplet_loss(a[0] if len(a) == 1 else a, pos, **kwargs), s, None, what
    )


def case_info_nce_loss(ctx: Ctx):
    scores, pos = _loss_inputs(ctx)
    temperature = ctx.pick([0.01, 0.05, 1.0])
    what = "info_nce_loss"
    out = expect(F.info_nce_loss(scores, pos, temperature), (), ctx.dtype, ctx, what)
    assert float(out) >= -_ATOL[ctx.dtype], f"{what}: negative loss {out}"
    pi, pt = ctx.perm(pos.shape[0]), ctx.perm(pos.shape[1])
    close(
        F.info_nce_loss(_permute_scores(scores, pi, pt), pos[pi][:, pt], temperature),
        out,
        ctx.dtype,
        f"{what}: not permutation invariant",
    )
    s = list(scores) if isinstance(scores, tuple) else [scores]
    finite_grads(
        lambda *a: F.info_nce_loss(a[0] if len(a) == 1 else a, pos, temperature), s, None, what
    )


def _is_negative_pick(idx, pos, has_neg, what):
    picked = pos.gather(1, idx.clamp_min(0))
    assert not bool((picked & has_neg).any()), f"{what}: picked a positive where a negative exists"


def case_distance_weighted_negatives(ctx: Ctx):
    scores, pos = _loss_inputs(ctx, wide=False)
    cutoff = ctx.pick([0.1, 0.5])
    kwargs = {
        "dim": ctx.pick([4, 16, 1024]),
        "cutoff": cutoff,
        "nonzero_loss_cutoff": ctx.pick([1.4, 2.0]),
        "generator": ctx.generator(),
    }
    what = "distance_weighted_negatives"
    i2t, t2i = F.distance_weighted_negatives(scores, pos, **kwargs)
    expect(i2t, pos.shape, torch.long, ctx, f"{what}: i2t")
    expect(t2i, pos.shape, torch.long, ctx, f"{what}: t2i")
    bi, bt = pos.shape
    assert bool(((i2t >= 0) & (i2t < bt)).all() and ((t2i >= 0) & (t2i < bi)).all()), (
        f"{what}: index out of range"
    )
    _is_negative_pick(i2t, pos, (~pos).any(1, keepdim=True), what)
    _is_negative_pick(t2i.t(), pos.t(), (~pos).any(0)[:, None], what)


def case_sample_hard_negatives(ctx: Ctx):
    scores, pos = _loss_inputs(ctx)
    s = scores if isinstance(scores, torch.Tensor) else scores[0]
    sample = ctx.flag()
    what = "sample_hard_negatives"
    gen = ctx.generator() if sample else None
    neg_t, neg_i = F.sample_hard_negatives(
        s, pos, temperature=ctx.pick([0.01, 0.07, 1.0]), sample=sample, generator=gen
    )
    expect(neg_t, (pos.shape[0],), torch.long, ctx, f"{what}: texts")
    expect(neg_i, (pos.shape[1],), torch.long, ctx, f"{what}: images")
    for idx, p in ((neg_t, pos), (neg_i, pos.t())):
        has_neg = (~p).any(1)
        assert bool((idx[~has_neg] == -1).all()), f"{what}: a row without negatives must give -1"
        assert not bool(p[has_neg].gather(1, idx[has_neg, None]).any()), (
            f"{what}: picked a positive"
        )


def case_dimension_alignment_loss(ctx: Ctx):
    b, d = ctx.int(2, 5), ctx.int(1, 4)
    v, t = ctx.randn(b, d), ctx.randn(b, d)
    if ctx.flag():
        t = v.clone()  # identical modalities, and sometimes a constant dimension
        v[:, 0] = 1.0
    reduction = ctx.pick(["sum", "mean"])
    kwargs = {"temperature": ctx.pick([0.05, 0.1, 1.0]), "reduction": reduction}
    what = "dimension_alignment_loss"
    out = expect(F.dimension_alignment_loss(v, t, **kwargs), (), ctx.dtype, ctx, what)
    within(out, -2 * d if reduction == "sum" else -2, 0, ctx.dtype, what)
    p = ctx.perm(b)
    close(
        F.dimension_alignment_loss(v[p], t[p], **kwargs),
        out,
        ctx.dtype,
        f"{what}: depends on the order of pairs",
    )
    finite_grads(lambda a, c: F.dimension_alignment_loss(a, c, **kwargs), [v, t], None, what)


def case_dimension_correlation(ctx: Ctx):
    b, d = ctx.int(1, 5), ctx.int(1, 4)
    v, t = ctx.randn(b, d), ctx.randn(b, d)
    what = "dimension_correlation"
    out = expect(F.dimension_correlation(v, t), (d, d), ctx.dtype, ctx, what)
    within(out, -1, 1, ctx.dtype, what)
    p = ctx.perm(b)
    close(
        F.dimension_correlation(v[p], t[p]),
        out,
        ctx.dtype,
        f"{what}: depends on the order of pairs",
    )
    finite_grads(F.dimension_correlation, [v, t], None, what)


def _dias_kwargs(ctx):
    return {"kind": ctx.pick(["inter", "intra"]), "distance": ctx.pick(["cosine", "euclidean"])}


def case_spatial_differences(ctx: Ctx):
    b, d = ctx.int(2, 5), ctx.int(1, 4)
    v, t = ctx.randn(b, d), ctx.randn(b, d)
    kwargs = _dias_kwargs(ctx)
    what = "spatial_differences"
    out = expect(F.spatial_differences(v, t, **kwargs), (b, b), ctx.dtype, ctx, what)
    within(out.diagonal(), 0, 0, ctx.dtype, f"{what}: diagonal")
    p = ctx.perm(b)
    close(
        F.spatial_differences(v[p], t[p], **kwargs),
        out[p][:, p],
        ctx.dtype,
        f"{what}: not equivariant",
    )
    finite_grads(lambda a, c: F.spatial_differences(a, c, **kwargs), [v, t], None, what)


def case_spatial_constraint_loss(ctx: Ctx):
    b, d = ctx.int(2, 5), ctx.int(1, 4)
    v, t = ctx.randn(b, d), ctx.randn(b, d)
    beta = ctx.pick([0.0, 1.0, -0.5])
    if ctx.flag():
        beta = torch.tensor(beta, dtype=ctx.dtype, device=ctx.device)
    kwargs = dict(
        _dias_kwargs(ctx),
        sparse=ctx.flag(),
        beta=beta,
        temperature=ctx.pick([0.01, 0.1]),
        reduction=ctx.pick(["sum", "mean"]),
    )
    what = "spatial_constraint_loss"
    out = expect(F.spatial_constraint_loss(v, t, **kwargs), (), ctx.dtype, ctx, what)
    assert float(out) >= 0, f"{what}: negative loss {out}"
    p = ctx.perm(b)
    close(
        F.spatial_constraint_loss(v[p], t[p], **kwargs),
        out,
        ctx.dtype,
        f"{what}: depends on the order of pairs",
    )
    finite_grads(lambda a, c: F.spatial_constraint_loss(a, c, **kwargs), [v, t], None, what)


def case_sparse_correlation_mask(ctx: Ctx):
    b = ctx.int(2, 5)
    d = ctx.randn(b, b)
    d = d - d.t() if ctx.flag() else d
    kwargs = {"beta": ctx.pick([0.0, 1.0]), "temperature": ctx.pick([0.01, 0.1, 1.0])}
    what = "sparse_correlation_mask"
    out = expect(F.sparse_correlation_mask(d, **kwargs), (b, b), ctx.dtype, ctx, what)
    within(out, 0, 1, ctx.dtype, what)
    assert bool((out.diagonal() == 0).all()), f"{what}: the diagonal must be 0"
    p = ctx.perm(b)
    close(
        F.sparse_correlation_mask(d[p][:, p], **kwargs),
        out[p][:, p],
        ctx.dtype,
        f"{what}: not equivariant",
    )


def case_word_region_pairs(ctx: Ctx):
    b, d = ctx.int(1, 3), ctx.int(1, 4)
    v, vm = ctx.tokens(b, 4, d)
    t, tm = ctx.tokens(b, 4, d)
    what = "word_region_pairs"
    regions, words = F.word_region_pairs(v, t, vm, tm)
    w = int(tm.sum())
    expect(regions, (w, d), ctx.dtype, ctx, f"{what}: regions")
    expect(words, (w, d), ctx.dtype, ctx, f"{what}: words")
    torch.testing.assert_close(words, t[tm])
    # Every region comes from a real token of its own image.
    owner = torch.arange(b, device=ctx.device)[:, None].expand_as(tm)[tm]
    real = torch.where(vm[..., None], v, torch.full((), math.nan, dtype=v.dtype, device=v.device))
    assert bool((regions[:, None, :] == real[owner]).all(-1).any(-1).all()), (
        f"{what}: a region is not a real token"
    )
    finite_grads(lambda a, c: F.word_region_pairs(a, c, vm, tm), [v, t], [vm, tm], what)


def case_scan_t2i_scores(ctx: Ctx):
    v, t, vm, tm = _pair_inputs(ctx)
    kwargs = {"smooth": ctx.pick([1.0, 9.0, 50.0]), "max_block_elements": ctx.budget()}
    fn = F.scan_t2i_scores
    what = "scan_t2i_scores"
    out = expect(fn(v, t, vm, tm, **kwargs), (v.shape[0], t.shape[0]), ctx.dtype, ctx, what)
    within(out, -1, 1, ctx.dtype, what)
    _pair_properties(ctx, fn, v, t, vm, tm, out, kwargs, what)


def case_local_matching_scores(ctx: Ctx):
    v, t, vm, tm = _pair_inputs(ctx)
    kwargs = {
        "weighting": ctx.pick(["softmax", "linear"]),
        "tau": ctx.pick([0.05, 0.1, 1.0]),
        "max_block_elements": ctx.budget(),
    }
    fn = F.local_matching_scores
    what = "local_matching_scores"
    out = expect(fn(v, t, vm, tm, **kwargs), (v.shape[0], t.shape[0]), ctx.dtype, ctx, what)
    within(out, -1, 1, ctx.dtype, what)
    _pair_properties(ctx, fn, v, t, vm, tm, out, kwargs, what)


def case_local_weights(ctx: Ctx):
    b = ctx.int(1, 3)
    m = ctx.mask(b)
    sims = ctx.rand(*m.shape, low=-1.0, high=1.0)
    weighting = ctx.pick(["softmax", "linear"])
    tau = ctx.pick([0.05, 0.1, 1.0])
    what = "local_weights"
    out = expect(
        F.local_weights(sims, m, -1, weighting=weighting, tau=tau), sims.shape, ctx.dtype, ctx, what
    )
    within(out, 0, 1, ctx.dtype, what)
    close(
        out.sum(-1),
        torch.ones(b, dtype=ctx.dtype, device=ctx.device),
        ctx.dtype,
        f"{what}: rows must sum to 1",
    )
    assert bool((out[~m] == 0).all()), f"{what}: a padded position has weight"
    close(
        F.local_weights(nan_padding(sims, m), m, -1, weighting=weighting, tau=tau),
        out,
        ctx.dtype,
        f"{what}: NaN in padding changed the weights",
    )
    p = ctx.perm(m.shape[1])
    close(
        F.local_weights(sims[:, p], m[:, p], -1, weighting=weighting, tau=tau),
        out[:, p],
        ctx.dtype,
        f"{what}: not permutation equivariant",
    )


def errors_local_weights(ctx: Ctx):
    sims, m = ctx.randn(1, 3), torch.ones(1, 3, dtype=torch.bool, device=ctx.device)
    return [
        (
            lambda: F.local_weights(sims, m, -1, weighting="softmx"),
            ValueError,
            r"Did you mean 'softmax'",
        ),
        (
            lambda: F.local_weights(sims, m, -1, tau=0.0),
            ValueError,
            r"tau must be a finite number > 0",
        ),
    ]


def case_row_multiplicity(ctx: Ctx):
    bi, bt = ctx.int(1, 4), ctx.int(1, 4)
    pos = ctx.positives(bi, bt)
    what = "row_multiplicity"
    out = F.row_multiplicity(pos)
    assert out.dtype == torch.long and tuple(out.shape) == (bi,), (
        f"{what}: {out.dtype} {tuple(out.shape)}"
    )
    # A plain loop: rows with the same non-empty set of positives.
    rows = [tuple(r.tolist()) for r in pos.cpu()]
    expected = [max(1, sum(1 for u in rows if u == r)) if any(r) else 1 for r in rows]
    assert out.tolist() == expected, f"{what}: {out.tolist()}, expected {expected}"
    p = ctx.perm(bi)
    assert F.row_multiplicity(pos[p]).tolist() == out[p].tolist(), (
        f"{what}: not permutation equivariant"
    )


# ---------------------------------------------------------------------------- LAPS patch slimming
def _significance(ctx: Ctx, *shape):
    a = ctx.rand(*shape)
    # Scores of exactly 0 and 1 are documented to give finite logits and gradients.
    edge = ctx.draw(
        st.lists(st.sampled_from([None, 0.0, 1.0]), min_size=a.numel(), max_size=a.numel())
    )
    flat = a.reshape(-1).clone()
    for k, e in enumerate(edge):
        if e is not None:
            flat[k] = e
    return flat.reshape(a.shape)


def case_gumbel_keep_decisions(ctx: Ctx):
    b = ctx.int(1, 3)
    m = ctx.mask(b)
    scores = _significance(ctx, *m.shape)
    hard = ctx.flag()
    kwargs = {"tau": ctx.pick([0.1, 1.0, 5.0]), "hard": hard, "mask": m if ctx.flag() else None}
    what = "gumbel_keep_decisions"
    seed = ctx.draw(_SEEDS)

    def call(s):
        return F.gumbel_keep_decisions(
            s, generator=torch.Generator(device=ctx.device).manual_seed(seed), **kwargs
        )

    out = expect(call(scores), scores.shape, ctx.dtype, ctx, what)
    within(out, 0, 1, ctx.dtype, what)
    if hard:
        assert bool(((out == 0) | (out == 1)).all()), f"{what}: hard decisions must be 0 or 1"
    if kwargs["mask"] is not None:
        assert bool((out[~m] == 0).all()), f"{what}: masked positions must be 0"
    finite_grads(call, [scores], None, what)


def case_top_keep_decisions(ctx: Ctx):
    b = ctx.int(1, 3)
    m = ctx.mask(b)
    scores = ctx.rand(*m.shape)
    ratio = ctx.pick([0.01, 0.25, 0.5, 0.7, 1.0])
    mask = m if ctx.flag() else None
    what = "top_keep_decisions"
    out = expect(F.top_keep_decisions(scores, ratio, mask), scores.shape, ctx.dtype, ctx, what)
    assert bool(((out == 0) | (out == 1)).all()), f"{what}: decisions must be 0 or 1"
    valid = m if mask is not None else torch.ones_like(m)
    n = valid.sum(1)
    expected = torch.minimum(torch.ceil(n.double() * ratio - 1e-6).clamp_min(1), n.double()).long()
    assert out.sum(1).long().tolist() == expected.tolist(), (
        f"{what}: kept {out.sum(1)}, expected ceil(ratio * n)"
    )
    assert bool((out[~valid] == 0).all()), f"{what}: a padded patch was kept"
    kept_min = torch.where(out > 0, scores, torch.full_like(scores, math.inf)).amin(1)
    dropped_max = torch.where((out == 0) & valid, scores, torch.full_like(scores, -math.inf)).amax(
        1
    )
    assert bool((kept_min >= dropped_max).all()), f"{what}: kept a patch below a dropped one"


def case_ratio_loss(ctx: Ctx):
    b = ctx.int(1, 3)
    m = ctx.mask(b)
    decisions = ctx.rand(*m.shape)
    rho = ctx.pick([0.1, 0.5, 1.0])
    mask = m if ctx.flag() else None
    what = "ratio_loss"
    out = expect(F.ratio_loss(decisions, rho, mask), (), ctx.dtype, ctx, what)
    within(out, 0, 1, ctx.dtype, what)
    if mask is not None:
        close(
            F.ratio_loss(nan_padding(decisions, m), rho, mask),
            out,
            ctx.dtype,
            f"{what}: NaN in padding",
        )
    finite_grads(lambda d: F.ratio_loss(d, rho, mask), [decisions], [mask], what)


def _decisions(ctx: Ctx, *shape):
    return (ctx.rand(*shape) > 0.5).to(ctx.dtype)


def case_dpc_knn_weights(ctx: Ctx):
    bi, bt, n, d, nc = ctx.int(1, 3), ctx.int(1, 3), ctx.int(1, 5), ctx.int(1, 4), ctx.int(1, 4)
    m = ctx.mask(bi, max_tokens=n)
    n = m.shape[1]
    v = ctx.randn(bi, n, d)
    dec = _decisions(ctx, bi, n, bt)
    k = ctx.int(1, 4)
    mask = m if ctx.flag() else None
    what = "dpc_knn_weights"
    weights, valid = F.dpc_knn_weights(v, dec, nc, k=k, mask=mask)
    expect(weights, (bi, n, bt, nc), ctx.dtype, ctx, what)
    assert valid.dtype == torch.bool and tuple(valid.shape) == (bi, bt, nc), (
        f"{what}: valid {valid.dtype} {tuple(valid.shape)}"
    )
    kept = (dec > 0) & (m.unsqueeze(-1) if mask is not None else True)
    # Every kept patch joins exactly one cluster; dropped and padded patches join none.
    member = (weights > 0).sum(-1)
    assert bool((member[kept] == 1).all()), (
        f"{what}: a kept patch is in {member[kept].tolist()} clusters"
    )
    assert bool((member[~kept] == 0).all()), f"{what}: a dropped or padded patch has weight"
    # A non-empty cluster's weights are 1/|C| each, so they sum to 1; an empty cluster is not valid.
    close(
        weights.sum(1),
        valid.to(ctx.dtype).permute(0, 1, 2),
        ctx.dtype,
        f"{what}: cluster weights must sum to 1",
    )
    assert int(valid.sum()) <= int(kept.sum()), f"{what}: more clusters than kept patches"
    if mask is not None:
        # NaN in padded patches changes nothing.
        w2, v2 = F.dpc_knn_weights(nan_padding(v, m), dec, nc, k=k, mask=mask)
        close(w2, weights, ctx.dtype, f"{what}: NaN in padding changed the weights")
        assert torch.equal(v2, valid)
    finite_grads(lambda a, b: F.dpc_knn_weights(a, b, nc, k=k, mask=mask)[0], [v, dec], None, what)


def errors_dpc_knn_weights(ctx: Ctx):
    v = ctx.randn(1, 3, 2)
    dec = torch.ones(1, 3, 2, dtype=ctx.dtype, device=ctx.device)
    return [
        (lambda: F.dpc_knn_weights(v, dec, 0), ValueError, r"num_clusters must be a positive int"),
        (lambda: F.dpc_knn_weights(v, dec, 2, k=True), ValueError, r"k must be a positive int"),
        (
            lambda: F.dpc_knn_weights(v, dec[:, :2], 2),
            ValueError,
            r"expected patches \(Bi, N, D\) and decisions",
        ),
    ]


def case_aggregation_weights(ctx: Ctx):
    bi, bt, n, nc = ctx.int(1, 3), ctx.int(1, 3), ctx.int(1, 4), ctx.int(1, 3)
    logits = ctx.randn(bi, n, nc, scale=ctx.pick([1.0, 100.0]))
    dec = _decisions(ctx, bi, bt, n)
    what = "aggregation_weights"
    out = expect(F.aggregation_weights(logits, dec), (bi, bt, n, nc), ctx.dtype, ctx, what)
    any_kept = (dec > 0).any(-1, keepdim=True).to(ctx.dtype).expand(bi, bt, nc)
    close(out.sum(2), any_kept, ctx.dtype, f"{what}: columns must sum to 1 (0 with nothing kept)")
    assert bool((out[dec == 0] == 0).all()), f"{what}: a dropped patch has weight"
    finite_grads(F.aggregation_weights, [logits, dec], None, what)


def case_fusion_weights(ctx: Ctx):
    b = ctx.int(1, 3)
    m = ctx.mask(b)
    scores, dec = ctx.rand(*m.shape), _decisions(ctx, *m.shape)
    mask = m if ctx.flag() else None
    what = "fusion_weights"
    out = expect(F.fusion_weights(scores, dec, mask), scores.shape, ctx.dtype, ctx, what)
    dropped = (dec == 0) & (m if mask is not None else torch.ones_like(m))
    close(
        out.sum(-1),
        dropped.any(-1).to(ctx.dtype),
        ctx.dtype,
        f"{what}: weights must sum to 1 over dropped patches",
    )
    assert bool((out[~dropped] == 0).all()), f"{what}: weight outside the dropped real patches"
    finite_grads(lambda s, d: F.fusion_weights(s, d, mask), [scores, dec], None, what)


def case_slimmed_cosines(ctx: Ctx):
    bi, bt, n, m, k, d = (ctx.int(1, 3) for _ in range(6))
    v = ctx.randn(bi, n, d)
    t = torch.nn.functional.normalize(ctx.randn(bt, m, d, dtype=F64), dim=-1).to(ctx.dtype)
    w = ctx.rand(bi, n, bt, k)
    if ctx.flag():
        w[..., 0] = 0  # a token without weight: documented cosine 0
    pw = torch.einsum("ind,tmd->intm", v, t)
    gram = v @ v.transpose(1, 2)
    what = "slimmed_cosines"
    out = expect(F.slimmed_cosines(pw, gram, w), (bi, bt, k, m), ctx.dtype, ctx, what)
    if ctx.dtype == F64 and not torch.is_autocast_enabled(ctx.device.type):
        # The norms come from a Gram matrix: where a weighted sum nearly cancels, rounding moves
        # the cosine past 1 (by ~0.3% in float32, ~0.2 in bfloat16), so the bound is float64's.
        within(out, -1, 1, ctx.dtype, what)
    zero = (w == 0).all(1)  # (bi, bt, k)
    assert bool((out[zero] == 0).all()), f"{what}: a token without weight must have cosine 0"
    finite_grads(F.slimmed_cosines, [pw, gram, w], None, what)


# ---------------------------------------------------------------------------- ELA: masking, transport, lexicon
def case_num_masked_patches(ctx: Ctx):
    n = ctx.int(0, 400)
    r = ctx.draw(st.floats(0, 1, exclude_max=True))
    k = F.num_masked_patches(n, r)
    assert isinstance(k, int) and 0 <= k <= n, f"num_masked_patches: {k} for {n} patches at {r}"


def case_random_patch_mask(ctx: Ctx):
    b, n = ctx.int(0, 4), ctx.int(0, 8)
    r = ctx.pick([0.0, 0.25, 0.5, 0.75, 0.99])
    what = "random_patch_mask"
    out = expect(
        F.random_patch_mask(b, n, r, generator=ctx.generator(), device=ctx.device),
        (b, n),
        torch.bool,
        ctx,
        what,
    )
    assert out.sum(1).tolist() == [F.num_masked_patches(n, r)] * b, (
        f"{what}: not K masked patches per row"
    )


def _transport_inputs(ctx: Ctx):
    b = ctx.int(1, 3)
    sm, tm = ctx.mask(b, 4), ctx.mask(b, 4)
    cost = ctx.rand(b, sm.shape[1], tm.shape[1], high=ctx.pick([1.0, 2.0, 4.0]))
    return cost, sm if ctx.flag() else None, tm


def case_transport_plan(ctx: Ctx):
    cost, sm, tm = _transport_inputs(ctx)
    method = ctx.pick(["ipot", "sinkhorn", "emd", "pot_sinkhorn"])
    kwargs = {
        "method": method,
        "n_iter": ctx.int(1, 20),
        "beta": ctx.pick([0.1, 0.5]),
        "reg": ctx.pick([0.05, 0.5]),
    }
    what = f"transport_plan[{method}]"
    plan = expect(F.transport_plan(cost, sm, tm, **kwargs), cost.shape, ctx.dtype, ctx, what)
    assert bool((plan >= 0).all()), f"{what}: negative mass"
    s = sm if sm is not None else torch.ones(cost.shape[:2], dtype=torch.bool, device=ctx.device)
    pair = s[:, :, None] & tm[:, None, :]
    assert bool((plan[~pair] == 0).all()), f"{what}: mass on padding"
    # Documented: column sums are exactly b after an IPOT or Sinkhorn iteration, POT's Sinkhorn ends
    # on the rows (row sums exactly a), and the exact plan of ot.emd meets both.
    a_marg = s.to(F64) / s.sum(1, keepdim=True)
    b_marg = tm.to(F64) / tm.sum(1, keepdim=True)
    if method != "pot_sinkhorn":
        close(
            plan.to(F64).sum(1),
            b_marg,
            ctx.dtype,
            f"{what}: column sums are not the target marginal",
        )
    if method in ("emd", "pot_sinkhorn"):
        close(
            plan.to(F64).sum(2), a_marg, ctx.dtype, f"{what}: row sums are not the source marginal"
        )
    close(
        F.transport_plan(nan_padding(cost, pair), sm, tm, **kwargs),
        plan,
        ctx.dtype,
        f"{what}: NaN in padding",
    )
    p = ctx.perm(cost.shape[0])
    close(
        F.transport_plan(cost[p], None if sm is None else sm[p], tm[p], **kwargs),
        plan[p],
        ctx.dtype,
        f"{what}: problems are not independent",
    )
    if method in ("ipot", "sinkhorn"):
        finite_grads(lambda c: F.transport_plan(c, sm, tm, **kwargs), [cost], None, what)


def case_transport_cost(ctx: Ctx):
    cost, sm, tm = _transport_inputs(ctx)
    s = sm if sm is not None else torch.ones(cost.shape[:2], dtype=torch.bool, device=ctx.device)
    pair = s[:, :, None] & tm[:, None, :]
    plan = ctx.rand(*cost.shape) * pair  # no mass on padding
    what = "transport_cost"
    out = expect(F.transport_cost(plan, cost), cost.shape[:1], ctx.dtype, ctx, what)
    assert bool((out >= 0).all()), f"{what}: negative cost of non-negative plans and costs"
    close(
        F.transport_cost(plan, nan_padding(cost, pair)),
        out,
        ctx.dtype,
        f"{what}: padding is not ignored",
    )
    finite_grads(F.transport_cost, [plan, cost], None, what)


def case_cosine_cost(ctx: Ctx):
    b, d = ctx.int(1, 3), ctx.int(1, 4)
    x, y = ctx.randn(b, ctx.int(1, 4), d), ctx.randn(b, ctx.int(1, 4), d)
    what = "cosine_cost"
    out = expect(F.cosine_cost(x, y), (b, x.shape[1], y.shape[1]), ctx.dtype, ctx, what)
    within(out, 0, 2, ctx.dtype, what)
    finite_grads(F.cosine_cost, [x, y], None, what)


def case_expansive_soft_labels(ctx: Ctx):
    b, v = ctx.int(1, 3), ctx.int(1, 5)
    wm = ctx.mask(b, 4)
    m = wm.shape[1]
    n = ctx.int(1, 3)
    probs = torch.softmax(ctx.randn(b, m, v, dtype=F64), -1).to(ctx.dtype)
    plan = ctx.rand(b, n, m) * (ctx.rand(b, n, 1) > 0.3)  # some patch rows without mass
    cost = ctx.rand(b, n, m, high=2.0)
    kwargs = {"label_weights": ctx.pick(sorted(LEX_RULES)), "top_k": ctx.int(1, 4)}
    what = "expansive_soft_labels"
    if ctx.flag():
        out = F.expansive_soft_labels(plan, probs, wm, cost=cost, **kwargs)
        shape = (b, n, v)
    else:
        idx = torch.tensor(
            ctx.draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=4)), device=ctx.device
        )
        rows = plan[idx, 0]
        out = F.expansive_soft_labels(rows, probs, wm, batch_index=idx, cost=cost[idx, 0], **kwargs)
        shape = (idx.shape[0], v)
    expect(out, shape, ctx.dtype, ctx, what)
    assert bool((out >= 0).all()), f"{what}: negative label mass"
    close(
        out.sum(-1),
        torch.ones(shape[:-1], dtype=ctx.dtype, device=ctx.device),
        ctx.dtype,
        f"{what}: rows must sum to 1",
    )


def case_lexicon_kl_loss(ctx: Ctx):
    k, v = ctx.int(0, 3), ctx.int(1, 5)
    logits = ctx.randn(k, v, scale=ctx.pick([1.0, 30.0]))
    target = torch.softmax(ctx.randn(k, v, dtype=F64, scale=3.0), -1).to(ctx.dtype)
    reduction = ctx.pick(["mean", "sum", "none"])
    kwargs = {"reduction": reduction, "direction": ctx.pick(["prediction_first", "target_first"])}
    what = "lexicon_kl_loss"
    # Computed in at least float32 (a bf16 log-softmax over a vocabulary loses small probabilities).
    dtype = torch.promote_types(ctx.dtype, F32)
    out = expect(
        F.lexicon_kl_loss(logits, target, **kwargs),
        (k,) if reduction == "none" else (),
        dtype,
        ctx,
        what,
    )
    assert bool((out >= -1e-4).all()), f"{what}: a KL divergence below 0: {out}"
    finite_grads(lambda a: F.lexicon_kl_loss(a, target, **kwargs), [logits], None, what)


def case_mask_words(ctx: Ctx):
    b, vocab = ctx.int(1, 3), ctx.int(2, 50)
    maskable = ctx.mask(b, 6) if ctx.flag() else ctx.mask(b, 6) & False
    ids = torch.randint(
        0, vocab, maskable.shape, generator=torch.Generator().manual_seed(ctx.draw(_SEEDS))
    ).to(ctx.device)
    mask_id = vocab  # outside the ordinary ids, as BERT's [MASK] is a special token
    replace_mask, replace_random = ctx.pick([(0.8, 0.1), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0)])
    kwargs = {
        "mask_token_id": mask_id,
        "vocab_size": vocab,
        "prob": ctx.pick([0.0, 0.15, 1.0]),
        "replace_mask": replace_mask,
        "replace_random": replace_random,
    }
    gen = torch.Generator().manual_seed(
        ctx.draw(_SEEDS)
    )  # documented: a CPU generator serves any device
    what = "mask_words"
    out, labels = F.mask_words(ids, maskable, generator=gen, **kwargs)
    expect(out, ids.shape, torch.long, ctx, f"{what}: ids")
    expect(labels, ids.shape, torch.long, ctx, f"{what}: labels")
    picked = labels != -100
    assert not bool((picked & ~maskable).any()), f"{what}: picked a word that is not maskable"
    assert bool((labels[picked] == ids[picked]).all()), f"{what}: labels must hold the original ids"
    assert bool((out[~picked] == ids[~picked]).all()), f"{what}: changed a word it did not pick"
    assert bool(((out >= 0) & (out <= mask_id)).all()), f"{what}: an id outside the vocabulary"


# ---------------------------------------------------------------------------- documented errors
# Each entry draws valid inputs and returns hostile variants ``(call, exception, match)``; the
# test runs one of them. The exception types are those the functions' docstrings document.
def _with_empty_row(mask):
    bad = mask.clone()
    bad[0] = False
    return bad


def _with_nan_token(x, mask):
    bad = x.clone()
    index = mask.nonzero()[0]  # the first real token
    bad[index[0], index[1], 0] = math.nan
    return bad


def _pair_errors(fn, **kwargs):
    def errors(ctx: Ctx):
        d = ctx.int(1, 4)
        b = ctx.int(1, 3)
        v, vm = ctx.tokens(b, 4, d)
        t, tm = ctx.tokens(b, 4, d)
        variants = [
            (
                lambda: fn(v, t, _with_empty_row(vm), tm, **kwargs),
                ValueError,
                r"have no real token",
            ),
            (lambda: fn(_with_nan_token(v, vm), t, vm, tm, **kwargs), ValueError, r"NaN or inf"),
            (lambda: fn(v, t, vm.long(), tm, **kwargs), TypeError, r"must be a bool tensor"),
            (
                lambda: fn(v, torch.cat([t, t], -1), vm, tm, **kwargs),
                ValueError,
                r"feature dimension",
            ),
            (lambda: fn(v[0], t, None, tm, **kwargs), ValueError, r"shape \(B, N, D\)"),
        ]
        return variants

    return errors


def _option_error(fn, option, typo, suggestion):
    def variant(ctx: Ctx):
        v, t = ctx.randn(1, 2, 4), ctx.randn(1, 2, 4)
        return [(lambda: fn(v, t, **{option: typo}), ValueError, rf"Did you mean {suggestion!r}")]

    return variant


def _kw_error(fn, kwargs, exc, match):
    def variant(ctx: Ctx):
        v, t = ctx.randn(1, 2, 4), ctx.randn(1, 2, 4)
        return [(lambda: fn(v, t, **kwargs), exc, match)]

    return variant


def _both(*makers):
    def errors(ctx: Ctx):
        return [variant for make in makers for variant in make(ctx)]

    return errors


def _attention_errors(fn, paired: bool):
    def errors(ctx: Ctx):
        b = ctx.int(1, 3)
        q, qm = ctx.tokens(b, 3, 4)
        k, km = ctx.tokens(b, 3, 4)
        w = _attention_weights(ctx, 4)
        small = _attention_weights(ctx, 2)
        variants = [
            (
                lambda: fn(q, k, qm, km, self_attn=w, cross_attn=w, heads=3),
                ValueError,
                r"heads must be a positive int dividing",
            ),
            (
                lambda: fn(q, k, qm, km, self_attn=small, cross_attn=w, heads=2),
                ValueError,
                r"self_attn.in_proj_weight must have shape",
            ),
            (
                lambda: fn(q, k, _with_empty_row(qm), km, self_attn=w, cross_attn=w, heads=2),
                ValueError,
                r"have no real token",
            ),
            (
                lambda: fn(q, k, qm, km, self_attn="w", cross_attn=w, heads=2),
                TypeError,
                r"must be an AttentionWeights",
            ),
        ]
        if paired:
            k2, km2 = torch.cat([k, k]), torch.cat([km, km])
            variants.append(
                (
                    lambda: fn(q, k2, qm, km2, self_attn=w, cross_attn=w, heads=2),
                    ValueError,
                    r"pair row by row",
                )
            )
        else:
            variants.append(
                (
                    lambda: fn(q, k, qm, km, self_attn=w, cross_attn=w, heads=2, k=0),
                    ValueError,
                    r"k must be a positive int",
                )
            )
        return variants

    return errors


def errors_global_cosine_scores(ctx: Ctx):
    v, vm = ctx.tokens(2, 3, 4)
    t, tm = ctx.tokens(2, 3, 4)
    fn = F.global_cosine_scores
    return [
        (lambda: fn(v, t[..., :3], vm, tm), ValueError, r"project both into one space"),
        (lambda: fn(v, t, vm.long(), tm), TypeError, r"mask must be a bool tensor"),
        (
            lambda: fn(
                v, t, torch.ones(2, v.shape[1] + 1, dtype=torch.bool, device=ctx.device), tm
            ),
            ValueError,
            r"does not match",
        ),
        (lambda: fn(v.long(), t), TypeError, r"floating-point features"),
    ]


def errors_masked_mean(ctx: Ctx):
    x, m = ctx.tokens(2, 3, 4)
    return [
        (
            lambda: F.masked_mean(x[..., 0], m),
            ValueError,
            r"expected a tensor of shape \(B, N, D\)",
        ),
        (lambda: F.masked_mean(x, m.float()), TypeError, r"must be a bool tensor"),
        (lambda: F.masked_mean(x.tolist(), m), TypeError, r"expected a tensor"),
    ]


def errors_cosine_similarity_matrix(ctx: Ctx):
    a, b = ctx.randn(2, 3), ctx.randn(3, 3)
    fn = F.cosine_similarity_matrix
    other = F64 if ctx.dtype != F64 else F32
    return [
        (lambda: fn(a, b[:, :2]), ValueError, r"project both into one space"),
        (lambda: fn(a, b.to(other)), TypeError, r"images are .* but texts are"),
        (lambda: fn(a[None], b), ValueError, r"must have shape \(B, D\)"),
        (lambda: fn(a.long(), b), TypeError, r"must be floating point"),
    ]


def errors_topk_mean_scores(ctx: Ctx):
    v, vm = ctx.tokens(2, 3, 4)
    c = ctx.randn(3, 4)
    fn = F.topk_mean_scores
    bad = c.clone()
    bad[0, 0] = math.inf
    return [
        (lambda: fn(v, c[None], vm), ValueError, r"one vector per caption"),
        (lambda: fn(v, c, vm, k=0), ValueError, r"k must be a positive int"),
        (lambda: fn(v, c, _with_empty_row(vm)), ValueError, r"have no real token"),
        (lambda: fn(v, bad, vm), ValueError, r"NaN or inf"),
        (lambda: fn(v, c[:, :2], vm), ValueError, r"feature dimension"),
        (
            lambda: fn(v, c, vm, max_block_elements=0),
            ValueError,
            r"max_block_elements must be a positive int",
        ),
    ]


def errors_masked_pool(ctx: Ctx):
    x, m, dim = _pool_inputs(ctx)
    full = torch.broadcast_to(m, x.shape).clone()
    full.select(dim % x.dim(), 0).fill_(False)
    full.narrow(dim % x.dim(), 1, x.shape[dim] - 1).fill_(False)
    fn = F.masked_pool
    return [
        (lambda: fn(x, full, dim=dim), ValueError, r"no valid position to pool over"),
        (lambda: fn(x, m, pooling="maxx", dim=dim), ValueError, r"Did you mean 'max'"),
        (
            lambda: fn(x, m, pooling="lse", temperature=0.0, dim=dim),
            ValueError,
            r"finite number > 0",
        ),
        (lambda: fn(x.long(), m, dim=dim), TypeError, r"floating-point tensor"),
        (lambda: fn(x, m, dim=x.dim()), ValueError, r"out of range"),
        (lambda: fn(x, m.float(), dim=dim), TypeError, r"mask must be a bool tensor"),
    ]


def errors_resolve_pooling(ctx: Ctx):
    return [
        (lambda: F.resolve_pooling("softmaxx"), ValueError, r"Did you mean 'softmax'"),
        (
            lambda: F.resolve_pooling("lse", ctx.pick([0.0, -1.0, math.inf, math.nan])),
            ValueError,
            r"finite number > 0",
        ),
        (lambda: F.resolve_pooling("lse", "0.1"), TypeError, r"must be a positive number"),
    ]


def _loss_errors(fn, extra):
    def errors(ctx: Ctx):
        bi, bt = ctx.int(1, 3), ctx.int(1, 3)
        s = ctx.scores(bi, bt)
        pos = ctx.positives(bi, bt)
        bad = s.clone()
        bad[0, 0] = math.nan
        return [
            (lambda: fn(s, torch.zeros_like(pos)), ValueError, r"holds no True entry"),
            (lambda: fn(s, pos.float()), TypeError, r"positives must be a bool tensor"),
            (lambda: fn(bad, pos), ValueError, r"NaN or inf"),
            (lambda: fn(s[0], pos), ValueError, r"must have shape \(Bi, Bt\)"),
            (lambda: fn((s, s, s), pos), ValueError, r"got a sequence of 3"),
            *((lambda kw=kw: fn(s, pos, **kw), exc, match) for kw, exc, match in extra),
        ]

    return errors


def errors_distance_weighted_negatives(ctx: Ctx):
    s = ctx.scores(3, 3)
    pos = torch.eye(3, dtype=torch.bool, device=ctx.device)
    fn = F.distance_weighted_negatives
    return [
        (
            lambda: fn(s, pos, dim=3),
            ValueError,
            r"dim must be the embedding dimension, an integer >= 4",
        ),
        (lambda: fn(s, pos, dim=8, cutoff=2.5), ValueError, r"cutoff must be a number in"),
        (lambda: fn(s, pos.float(), dim=8), ValueError, r"positives must be a bool tensor"),
        (
            lambda: fn(s, pos, dim=8, nonzero_loss_cutoff=0.1),
            ValueError,
            r"nonzero_loss_cutoff must be a number",
        ),
        (lambda: fn(s, pos, dim=8, generator=0), TypeError, r"generator must be a torch.Generator"),
    ]


def errors_sample_hard_negatives(ctx: Ctx):
    s = ctx.scores(3, 2)
    pos = ctx.positives(3, 2)
    fn = F.sample_hard_negatives
    return [
        (lambda: fn(s, pos, temperature=0.0), ValueError, r"temperature must be a number > 0"),
        (lambda: fn(s, pos.t()), ValueError, r"bool positives of the same shape"),
        (lambda: fn(s, pos.float()), ValueError, r"bool positives of the same shape"),
    ]


def _dias_errors(fn, extra=()):
    def errors(ctx: Ctx):
        b, d = ctx.int(2, 4), ctx.int(1, 4)
        v, t = ctx.randn(b, d), ctx.randn(b, d)
        bad = t.clone()
        bad[0, 0] = math.inf
        return [
            (lambda: fn(v[:1], t[:1]), ValueError, r"needs a batch of at least 2 pairs"),
            (lambda: fn(v, torch.cat([t, t], 1)), ValueError, r"must have the same shape"),
            (lambda: fn(v, bad), ValueError, r"NaN or inf"),
            (lambda: fn(v[None], t), ValueError, r"must have shape \(B, D\)"),
            *((lambda kw=kw: fn(v, t, **kw), exc, match) for kw, exc, match in extra),
        ]

    return errors


def errors_sparse_correlation_mask(ctx: Ctx):
    d = ctx.randn(3, 3)
    fn = F.sparse_correlation_mask
    return [
        (lambda: fn(d[:, :2]), ValueError, r"must have shape \(B, B\) with B >= 2"),
        (lambda: fn(d[:1, :1]), ValueError, r"must have shape \(B, B\) with B >= 2"),
        (lambda: fn(d.long()), TypeError, r"floating \(B, B\) tensor"),
        (lambda: fn(d, temperature=0.0), ValueError, r"temperature must be a finite number > 0"),
        (lambda: fn(d, beta=math.nan), ValueError, r"beta must be a finite number"),
    ]


def errors_word_region_pairs(ctx: Ctx):
    v, vm = ctx.tokens(2, 3, 4)
    t, tm = ctx.tokens(2, 3, 4)
    fn = F.word_region_pairs
    return [
        (lambda: fn(v, t, _with_empty_row(vm), tm), ValueError, r"has no real region"),
        (lambda: fn(v, t[:1], vm, tm[:1]), ValueError, r"must have the same batch size"),
        (lambda: fn(v, t, vm.long(), tm), ValueError, r"image_mask must be a bool tensor"),
        (lambda: fn(v[0], t), ValueError, r"floating \(B, N, D\) tensor"),
    ]


def errors_gumbel_keep_decisions(ctx: Ctx):
    a = ctx.rand(2, 3)
    fn = F.gumbel_keep_decisions
    return [
        (
            lambda: fn(a, tau=ctx.pick([0.0, -1.0, math.inf])),
            ValueError,
            r"tau must be a finite number > 0",
        ),
        (lambda: fn((a > 0.5).long()), TypeError, r"scores must be a floating tensor"),
        (lambda: fn(a, noise=a[:1]), ValueError, r"noise has shape"),
        (lambda: fn(a, eps=0.5), ValueError, r"eps must lie in \(0, 0.5\)"),
    ]


def errors_ratio_loss(ctx: Ctx):
    d = ctx.rand(2, 3)
    fn = F.ratio_loss
    return [
        (
            lambda: fn(d, ctx.pick([0.0, 1.5, -0.1])),
            ValueError,
            r"rho must be a number in \(0, 1\]",
        ),
        (lambda: fn((d > 0.5).long(), 0.5), TypeError, r"decisions must be a floating tensor"),
        (
            lambda: fn(d, 0.5, torch.ones(4, dtype=torch.bool, device=ctx.device)),
            ValueError,
            r"does not broadcast",
        ),
        (
            lambda: fn(d, 0.5, torch.ones(3, device=ctx.device)),
            TypeError,
            r"mask must be a bool tensor",
        ),
    ]


def errors_random_patch_mask(ctx: Ctx):
    fn = F.random_patch_mask
    return [
        (
            lambda: fn(2, 4, ctx.pick([1.0, -0.1, 2])),
            ValueError,
            r"mask_ratio must be a number in \[0, 1\)",
        ),
        (lambda: fn(-1, 4, 0.5), ValueError, r"must be >= 0"),
    ]


def errors_transport_plan(ctx: Ctx):
    cost, sm, tm = _transport_inputs(ctx)
    fn = F.transport_plan
    return [
        (lambda: fn(cost, sm, tm, method="ipto"), ValueError, r"Did you mean 'ipot'"),
        (lambda: fn(cost, sm, tm.long()), TypeError, r"target_mask must be a bool tensor"),
        (lambda: fn(cost[0], None, None), ValueError, r"cost must have shape \(B, N, M\)"),
        (lambda: fn(cost, sm, tm, n_iter=0), ValueError, r"n_iter must be a positive integer"),
        (lambda: fn(cost, sm, tm[:, :0]), ValueError, r"target_mask must have shape"),
        (lambda: fn(cost, sm, tm, beta=0.0), ValueError, r"beta must be a finite number > 0"),
        (lambda: fn(cost.long(), sm, tm), TypeError, r"cost must be floating point"),
    ]


def errors_cosine_cost(ctx: Ctx):
    x, y = ctx.randn(2, 3, 4), ctx.randn(2, 2, 4)
    return [
        (
            lambda: F.cosine_cost(x, y[:1]),
            ValueError,
            r"expected source \(B, N, D\) and target \(B, M, D\)",
        ),
        (
            lambda: F.cosine_cost(x, y[..., :3]),
            ValueError,
            r"expected source \(B, N, D\) and target \(B, M, D\)",
        ),
    ]


def errors_expansive_soft_labels(ctx: Ctx):
    probs = torch.softmax(ctx.randn(2, 3, 5, dtype=F64), -1).to(ctx.dtype)
    plan = ctx.rand(2, 4, 3)
    fn = F.expansive_soft_labels
    return [
        (
            lambda: fn(plan, probs, label_weights="plan_top"),
            ValueError,
            r"Did you mean 'plan_topk'",
        ),
        (
            lambda: fn(plan, probs, label_weights="one_minus_cost"),
            ValueError,
            r"needs the transport cost",
        ),
        (lambda: fn(plan, probs, top_k=0), ValueError, r"top_k must be a positive integer"),
        (lambda: fn(plan[..., :2], probs), ValueError, r"plan must have shape \(B, N, M\)"),
        (lambda: fn(plan, probs[0]), ValueError, r"word_probs must have shape \(B, M, V\)"),
        (
            lambda: fn(
                plan[0], probs, batch_index=torch.zeros(3, dtype=torch.long, device=ctx.device)
            ),
            ValueError,
            r"batch_index must have shape",
        ),
    ]


def errors_lexicon_kl_loss(ctx: Ctx):
    logits, target = ctx.randn(2, 5), torch.full((2, 5), 0.2, dtype=ctx.dtype, device=ctx.device)
    fn = F.lexicon_kl_loss
    return [
        (lambda: fn(logits, target, reduction="meen"), ValueError, r"Did you mean 'mean'"),
        (lambda: fn(logits, target[:, :4]), ValueError, r"must both have shape \(K, V\)"),
        (
            lambda: fn(logits, target, direction="target"),
            ValueError,
            r"Did you mean 'target_first'",
        ),
        (lambda: fn(logits, target, eps=0.0), ValueError, r"eps must be a number > 0"),
    ]


def errors_mask_words(ctx: Ctx):
    ids = torch.randint(0, 9, (2, 4), device=ctx.device)
    maskable = ids > 2
    fn = F.mask_words
    return [
        (
            lambda: fn(ids, maskable, mask_token_id=9, vocab_size=9, prob=1.5),
            ValueError,
            r"prob must be a number in",
        ),
        (
            lambda: fn(
                ids, maskable, mask_token_id=9, vocab_size=9, replace_mask=0.8, replace_random=0.3
            ),
            ValueError,
            r"replace_mask \+ replace_random must be at most 1",
        ),
        (
            lambda: fn(ids, maskable.long(), mask_token_id=9, vocab_size=9),
            ValueError,
            r"maskable must be a bool tensor",
        ),
    ]


ERRORS = {
    "cosine_cost": errors_cosine_cost,
    "cosine_similarity_matrix": errors_cosine_similarity_matrix,
    "dimension_alignment_loss": _dias_errors(
        F.dimension_alignment_loss,
        [
            ({"temperature": 0.0}, ValueError, r"temperature must be a finite number > 0"),
            ({"reduction": "summ"}, ValueError, r"Did you mean 'sum'"),
        ],
    ),
    "distance_weighted_negatives": errors_distance_weighted_negatives,
    "dpc_knn_weights": errors_dpc_knn_weights,
    "expansive_soft_labels": errors_expansive_soft_labels,
    "global_cosine_scores": errors_global_cosine_scores,
    "gumbel_keep_decisions": errors_gumbel_keep_decisions,
    "hard_assignment_scores": _both(
        _pair_errors(F.hard_assignment_scores),
        _option_error(F.hard_assignment_scores, "pooling", "lze", "lse"),
        _option_error(F.hard_assignment_scores, "codebook", "visul", "visual"),
    ),
    "info_nce_loss": _loss_errors(
        F.info_nce_loss,
        [({"temperature": 0.0}, ValueError, r"temperature must be a finite number > 0")],
    ),
    "lexicon_kl_loss": errors_lexicon_kl_loss,
    "mask_words": errors_mask_words,
    "masked_mean": errors_masked_mean,
    "masked_pool": errors_masked_pool,
    "phrase_attention_scores": _attention_errors(F.phrase_attention_scores, paired=False),
    "phrase_attention_token_scores": _attention_errors(
        F.phrase_attention_token_scores, paired=True
    ),
    "random_patch_mask": errors_random_patch_mask,
    "ratio_loss": errors_ratio_loss,
    "resolve_pooling": errors_resolve_pooling,
    "sample_hard_negatives": errors_sample_hard_negatives,
    "local_matching_scores": _both(
        _pair_errors(F.local_matching_scores),
        _option_error(F.local_matching_scores, "weighting", "lineer", "linear"),
    ),
    "local_weights": errors_local_weights,
    "patch_slimming_scores": _both(
        _pair_errors(_slimming_scores),
        _kw_error(_slimming_scores, {"ratio": 0.0}, ValueError, r"ratio must be a finite number"),
        _kw_error(_slimming_scores, {"tau": -1.0}, ValueError, r"tau must be a finite number"),
    ),
    "scan_t2i_scores": _both(
        _pair_errors(F.scan_t2i_scores),
        lambda ctx: [
            (
                lambda: F.scan_t2i_scores(ctx.randn(1, 2, 4), ctx.randn(1, 2, 4), smooth=0.0),
                ValueError,
                r"smooth must be a finite number > 0",
            )
        ],
    ),
    "soft_assignment_scores": _both(
        _pair_errors(F.soft_assignment_scores),
        _kw_error(
            F.soft_assignment_scores, {"tau": 0.0}, ValueError, r"tau must be a finite number > 0"
        ),
    ),
    "sparse_alignment_scores": _both(
        _pair_errors(F.sparse_alignment_scores),
        _option_error(F.sparse_alignment_scores, "direction", "bothh", "both"),
    ),
    "sparse_correlation_mask": errors_sparse_correlation_mask,
    "spatial_constraint_loss": _dias_errors(
        F.spatial_constraint_loss,
        [
            ({"sparse": 1}, TypeError, r"sparse must be True or False"),
            ({"temperature": 0.0}, ValueError, r"temperature must be a finite number > 0"),
            ({"beta": math.nan}, ValueError, r"beta must be a finite number"),
            ({"distance": "cosin"}, ValueError, r"Did you mean 'cosine'"),
        ],
    ),
    "spatial_differences": _dias_errors(
        F.spatial_differences, [({"kind": "intr"}, ValueError, r"Did you mean 'intra'")]
    ),
    "topk_mean_scores": errors_topk_mean_scores,
    "transport_plan": errors_transport_plan,
    "triplet_loss": _loss_errors(
        F.triplet_loss,
        [
            ({"margin": -0.1}, ValueError, r"margin must be a finite number >= 0"),
            ({"reduction": "summ"}, ValueError, r"Did you mean 'sum'"),
            ({"hardest": 1}, TypeError, r"hardest must be True"),
        ],
    ),
    "word_region_pairs": errors_word_region_pairs,
}


# ---------------------------------------------------------------------------- the sweep
CASES = {
    "aggregation_weights": case_aggregation_weights,
    "blocked_pair_scores": case_blocked_pair_scores,
    "blocked_query_scores": case_blocked_query_scores,
    "cosine_cost": case_cosine_cost,
    "cosine_similarity_matrix": case_cosine_similarity_matrix,
    "dimension_alignment_loss": case_dimension_alignment_loss,
    "dimension_correlation": case_dimension_correlation,
    "distance_weighted_negatives": case_distance_weighted_negatives,
    "local_matching_scores": case_local_matching_scores,
    "local_weights": case_local_weights,
    "row_multiplicity": case_row_multiplicity,
    "dpc_knn_weights": case_dpc_knn_weights,
    "expansive_soft_labels": case_expansive_soft_labels,
    "fusion_weights": case_fusion_weights,
    "global_cosine_scores": case_global_cosine_scores,
    "gumbel_keep_decisions": case_gumbel_keep_decisions,
    "hard_assignment_from_cosines": case_hard_assignment_from_cosines,
    "hard_assignment_scores": case_hard_assignment_scores,
    "info_nce_loss": case_info_nce_loss,
    "lexicon_kl_loss": case_lexicon_kl_loss,
    "lse_pool": _pool_case("lse_pool", bounded=None),
    "mask_words": case_mask_words,
    "masked_mean": case_masked_mean,
    "masked_pool": _pool_case("masked_pool", bounded="set"),
    "max_pool": _pool_case("max_pool", bounded="set"),
    "mean_pool": _pool_case("mean_pool", bounded="set"),
    "normalize_tokens": case_normalize_tokens,
    "num_masked_patches": case_num_masked_patches,
    "pack_tokens": case_pack_tokens,
    "patch_slimming_scores": case_patch_slimming_scores,
    "phrase_attention_scores": case_phrase_attention_scores,
    "phrase_attention_token_scores": case_phrase_attention_token_scores,
    "random_patch_mask": case_random_patch_mask,
    "ratio_loss": case_ratio_loss,
    "resolve_pooling": case_resolve_pooling,
    "sample_hard_negatives": case_sample_hard_negatives,
    "scan_t2i_scores": case_scan_t2i_scores,
    "slimmed_cosines": case_slimmed_cosines,
    "soft_assignment_scores": case_soft_assignment_scores,
    "softmax_pool": _pool_case("softmax_pool", bounded="set"),
    "sparse_alignment_from_cosines": case_sparse_alignment_from_cosines,
    "sparse_alignment_scores": case_sparse_alignment_scores,
    "sparse_correlation_mask": case_sparse_correlation_mask,
    "spatial_constraint_loss": case_spatial_constraint_loss,
    "spatial_differences": case_spatial_differences,
    "sum_pool": _pool_case("sum_pool", bounded=None),
    "top_keep_decisions": case_top_keep_decisions,
    "topk_mean": _pool_case("topk_mean", bounded="set"),
    "topk_mean_scores": case_topk_mean_scores,
    "transport_cost": case_transport_cost,
    "transport_plan": case_transport_plan,
    "triplet_loss": case_triplet_loss,
    "word_region_pairs": case_word_region_pairs,
}

#: Examples per function: few, the sizes are tiny; the POT backends solve problem by problem.
#: 8 by default, 80 with HYPOTHESIS_PROFILE=thorough (a hundredth of the profile's examples).
EXAMPLES = max(8, settings.default.max_examples // 100 * 8)
ERROR_EXAMPLES = max(1, EXAMPLES * 3 // 4)
AUTOCAST_EXAMPLES = max(1, EXAMPLES // 3)
SLOW = dict.fromkeys(
    ["transport_plan", "phrase_attention_scores", "soft_assignment_scores"], ERROR_EXAMPLES
)


def _settings(n):
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def test_every_public_function_is_swept():
    names = set(public_names())
    missing = names - set(CASES) - set(EXCLUDED)
    assert not missing, (
        f"imtm.functional exports {sorted(missing)} without a sweep case: add one to CASES"
    )
    stale = (set(CASES) | set(EXCLUDED)) - names
    assert not stale, f"sweep entries for names imtm.functional no longer exports: {sorted(stale)}"
    for name in EXCLUDED:
        # Only constants and classes may be left out; every function is swept.
        assert not inspect.isfunction(getattr(F, name)), (
            f"{name} is a function: give it a sweep case"
        )
    assert set(ERRORS) | set(UNVALIDATED) == set(CASES), (
        "every swept function needs a hostile case or a reason"
    )
    assert not set(ERRORS) & set(UNVALIDATED)


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            yield from _tensors(v)
        elif isinstance(v, AttentionWeights):
            yield from _tensors(vars(v).values())


def leaves_inputs_alone(fn):
    """``fn``, checking on every call that it does not write into any tensor it was given."""

    def guarded(*args, **kwargs):
        given = list(_tensors([*args, *kwargs.values()]))
        before = [t.detach().clone() for t in given]
        out = fn(*args, **kwargs)
        for k, (t, b) in enumerate(zip(given, before)):
            torch.testing.assert_close(
                t.detach(),
                b,
                rtol=0,
                atol=0,
                equal_nan=True,
                msg=lambda m, k=k: f"{fn.__name__} wrote into its input {k}: {m}",
            )
        return out

    return guarded


@pytest.mark.parametrize("name", sorted(CASES))
def test_sweep(name, monkeypatch):
    # Every call of the function under test, in every check below, must leave its inputs unchanged.
    monkeypatch.setattr(F, name, leaves_inputs_alone(getattr(F, name)))

    @_settings(SLOW.get(name, EXAMPLES))
    @given(data=st.data(), dtype=dtypes(), device=devices())
    def run(data, dtype, device):
        CASES[name](Ctx(data.draw, dtype, device))

    run()


@pytest.mark.parametrize("name", sorted(CASES))
def test_sweep_under_autocast(name, monkeypatch):
    # float32 inputs under bfloat16 autocast: finite values of the documented shape, and every
    # promised property, within bfloat16's tolerances.
    monkeypatch.setitem(_ATOL, F32, _ATOL[BF16])
    monkeypatch.setitem(_RTOL, F32, _RTOL[BF16])

    @_settings(AUTOCAST_EXAMPLES)
    @given(data=st.data(), device=devices())
    def run(data, device):
        with torch.autocast(device.type, dtype=BF16):
            CASES[name](Ctx(data.draw, F32, device))

    run()


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_documented_errors(name):
    @_settings(ERROR_EXAMPLES)
    @given(data=st.data(), dtype=dtypes(), device=devices())
    def run(data, dtype, device):
        ctx = Ctx(data.draw, dtype, device)
        variants = ERRORS[name](ctx)
        call, exc, match = variants[ctx.int(0, len(variants) - 1)]
        with pytest.raises(exc, match=match):
            call()

    run()


# ---------------------------------------------------------------------------- two inputs of different dtypes
# Functions of two float inputs either compute in the promoted dtype (documented through
# check_pair_inputs: "both features in their promoted common dtype") or refuse the pair with a
# TypeError naming both dtypes. Each entry: (inputs of dtypes a and b) -> (call, "promote" | "refuse").
def _mixed_pair_scorer(fn):
    def build(ctx: Ctx, a, b):
        v, vm = ctx.tokens(ctx.int(1, 3), 4, 4)
        t, tm = ctx.tokens(ctx.int(1, 3), 4, 4)
        return (lambda: fn(v.to(a), t.to(b), vm, tm)), "promote"

    return build


def _mixed_two(fn, shape_a, shape_b, rule):
    def build(ctx: Ctx, a, b):
        x, y = ctx.randn(*shape_a, dtype=a), ctx.randn(*shape_b, dtype=b)
        return (lambda: fn(x, y)), rule

    return build


def _mixed_loss(fn):
    def build(ctx: Ctx, a, b):
        pos = ctx.positives(3, 2)
        return (lambda: fn((ctx.scores(3, 2).to(a), ctx.scores(3, 2).to(b)), pos)), "promote"

    return build


MIXED = {
    "hard_assignment_scores": _mixed_pair_scorer(F.hard_assignment_scores),
    "soft_assignment_scores": _mixed_pair_scorer(F.soft_assignment_scores),
    "sparse_alignment_scores": _mixed_pair_scorer(F.sparse_alignment_scores),
    "scan_t2i_scores": _mixed_pair_scorer(F.scan_t2i_scores),
    "local_matching_scores": _mixed_pair_scorer(F.local_matching_scores),
    "global_cosine_scores": _mixed_two(
        lambda v, t: F.global_cosine_scores(v, t), (2, 3, 4), (3, 2, 4), "refuse"
    ),
    "cosine_similarity_matrix": _mixed_two(F.cosine_similarity_matrix, (2, 4), (3, 4), "refuse"),
    "topk_mean_scores": _mixed_two(
        lambda v, c: F.topk_mean_scores(v, c, k=2), (2, 3, 4), (3, 4), "promote"
    ),
    "triplet_loss": _mixed_loss(F.triplet_loss),
    "info_nce_loss": _mixed_loss(F.info_nce_loss),
    "dimension_alignment_loss": _mixed_two(F.dimension_alignment_loss, (3, 4), (3, 4), "refuse"),
    "spatial_differences": _mixed_two(F.spatial_differences, (3, 4), (3, 4), "refuse"),
    "spatial_constraint_loss": _mixed_two(F.spatial_constraint_loss, (3, 4), (3, 4), "refuse"),
    "word_region_pairs": _mixed_two(F.word_region_pairs, (2, 3, 4), (2, 2, 4), "refuse"),
    "cosine_cost": _mixed_two(F.cosine_cost, (2, 3, 4), (2, 2, 4), "refuse"),
}


@pytest.mark.parametrize("name", sorted(MIXED))
def test_mixed_dtypes(name):
    @_settings(ERROR_EXAMPLES)
    @given(data=st.data(), pair=st.permutations([F32, F64, BF16]), device=devices())
    def run(data, pair, device):
        a, b = pair[:2]
        call, rule = MIXED[name](Ctx(data.draw, a, device), a, b)
        if rule == "refuse":
            with pytest.raises(TypeError, match=rf"{a}.* but .*{b}"):
                call()
            return
        out = call()
        assert out.dtype == torch.promote_types(a, b), f"{name}: {out.dtype} from {a} and {b}"
        assert bool(torch.isfinite(out).all())

    run()


# ---------------------------------------------------------------------------- regressions found by the sweep
@pytest.mark.parametrize("method", ["emd", "pot_sinkhorn"])
def test_pot_backends_take_bfloat16(method):
    # POT solves through NumPy, which has no bfloat16: ot.emd raised "unsupported ScalarType BFloat16".
    cost = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    target_mask = torch.tensor([[True, True, False, True], [True, False, False, False]])
    plan = F.transport_plan(cost.to(BF16), target_mask=target_mask, method=method, reg=0.5)
    assert plan.dtype == BF16
    reference = F.transport_plan(
        cost.to(BF16).to(F64), target_mask=target_mask, method=method, reg=0.5
    )
    torch.testing.assert_close(plan, reference.to(BF16))


def test_intra_euclidean_differences_have_an_exact_zero_diagonal():
    # sqrt(|a|^2 + |a|^2 - 2 a.a) of a rounding residue gave diagonals of ~1e-3 in float32.
    g = torch.Generator().manual_seed(1)
    v, t = torch.randn(4, 4, generator=g, dtype=F64), torch.randn(4, 4, generator=g, dtype=F64)
    for dtype in (F32, BF16, F64):
        d = F.spatial_differences(v.to(dtype), t.to(dtype), kind="intra", distance="euclidean")
        assert bool((d.diagonal() == 0).all()), f"{dtype}: {d.diagonal()}"


def test_log_sinkhorn_meets_the_target_marginal_in_bfloat16():
    # Log-domain values reach C / reg = 80 here; iterated in bfloat16 (resolution 0.5 at 80) the
    # column sums missed b by 20%.
    cost = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * 4
    plan = F.transport_plan(cost.to(BF16), method="sinkhorn", n_iter=1, reg=0.05)
    assert plan.dtype == BF16
    torch.testing.assert_close(
        plan.double().sum(1), torch.full((2, 4), 0.25, dtype=F64), atol=5e-3, rtol=0
    )


@pytest.mark.parametrize("fn", [F.phrase_attention_scores, F.phrase_attention_token_scores])
def test_phrase_attention_refuses_weights_of_another_dtype(fn):
    # Float32 weights with float64 features failed inside F.linear ("mat1 and mat2 must have the same dtype").
    g = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(2, 3, 4, generator=g, dtype=F64),
        torch.randn(2, 2, 4, generator=g, dtype=F64),
    )
    w = _attention_weights(
        Ctx(lambda strategy: 0, F32, torch.device("cpu")), 4
    )  # every draw seeds 0
    with pytest.raises(
        TypeError,
        match=r"self_attn.in_proj_weight is torch.float32 but the tokens are torch.float64",
    ):
        fn(q, k, self_attn=w, cross_attn=w, heads=2)
