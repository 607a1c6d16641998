import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.functional.blocking import (
    DEFAULT_MAX_BLOCK_ELEMENTS,
    DEFAULT_MAX_BLOCK_ELEMENTS_CUDA,
    blocked_pair_scores,
    blocked_query_scores,
    check_block_args,
    check_pair_inputs,
    default_block_elements,
    max_over_keys,
    normalize_tokens,
    pack_tokens,
    plan_query_blocks,
    resolve_option,
)
from imtm.functional.pooling import resolve_pooling
from imtm.testing import tokens

SETTINGS = settings(max_examples=20, deadline=None)
SIDES = {"batch": st.integers(1, 5), "max_tokens": 5, "dim": 4, "dtype": torch.float64}


def loop_query_scores(keys, queries, pooling="sum"):
    """For every key set and query set: pool over real query tokens of the max cosine over real keys."""
    out = torch.empty(keys.batch_size, queries.batch_size, dtype=torch.float64)
    for k in range(keys.batch_size):
        for q in range(queries.batch_size):
            vals = []
            for i in range(queries.num_tokens):
                if not queries.mask[q, i]:
                    continue
                best = max(
                    float(
                        F.cosine_similarity(queries.feats[q, i], keys.feats[k, j], dim=0, eps=1e-8)
                    )
                    for j in range(keys.num_tokens)
                    if keys.mask[k, j]
                )
                vals.append(best)
            out[k, q] = sum(vals) if pooling == "sum" else max(vals)
    return out


def test_normalize_tokens_zeroes_padding_even_when_it_is_nan():
    x = torch.tensor([[[3.0, 4.0], [float("nan"), 1.0], [0.0, 0.0]]])
    out = normalize_tokens(x, torch.tensor([[True, False, True]]))
    torch.testing.assert_close(out, torch.tensor([[[0.6, 0.8], [0.0, 0.0], [0.0, 0.0]]]))
    assert normalize_tokens(x[:, :1], dtype=torch.bfloat16).dtype == torch.bfloat16


def test_pack_tokens_keeps_order_and_handles_non_prefix_masks():
    x = torch.arange(12.0).view(3, 4, 1)
    mask = torch.tensor(
        [[True, False, True, False], [False, False, False, True], [True, True, True, True]]
    )
    p = pack_tokens(x, mask)
    assert p.feats.flatten().tolist() == [0.0, 2.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    assert p.lengths == (2, 1, 4) and p.spans == (3, 4, 4) and p.offsets == (0, 2, 3, 7)
    torch.testing.assert_close(p.feats[p.positions[mask]].flatten(), x[mask].flatten())
    full = pack_tokens(x)
    assert full.mask is None and full.feats.shape == (12, 1) and full.lengths == (4, 4, 4)


def test_plan_respects_the_budget_and_covers_every_set():
    offsets = [0]
    for n in [3, 9, 1, 7, 7, 2, 8, 4]:
        offsets.append(offsets[-1] + n)
    for budget in [1, 10, 36, 100, 500, 5000]:
        plan = plan_query_blocks(20, 5, offsets, budget)
        covered = [q for q0, q1 in plan.query_bounds for q in range(q0, q1)]
        assert covered == list(range(8))
        for q0, q1 in plan.query_bounds:
            width = offsets[q1] - offsets[q0]
            # A block exceeds the budget only when it holds one set too long on its own.
            assert plan.key_sets * 5 * width <= budget or (q1 - q0 == 1 and plan.key_sets == 1)


@SETTINGS
@given(keys=tokens(**SIDES), queries=tokens(**SIDES), budget=st.integers(1, 400))
def test_query_engine_matches_loop_for_every_block_size(keys, queries, budget):
    expected = loop_query_scores(keys, queries, "sum")
    got = blocked_query_scores(
        keys.feats,
        queries.feats,
        keys.mask,
        queries.mask,
        pool=resolve_pooling("sum"),
        max_block_elements=budget,
    )
    torch.testing.assert_close(got, expected)


def test_query_engine_budget_bounds_every_product(monkeypatch):
    keys, queries = torch.randn(13, 6, 8), torch.randn(17, 5, 8)
    qmask = torch.arange(5) < torch.randint(1, 6, (17, 1))
    sizes = []
    real_mm = torch.mm

    def recording_mm(a, b, **kwargs):
        out = real_mm(a, b, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "mm", recording_mm)
    for budget in [30, 100, 250, 1000]:
        sizes.clear()
        blocked_query_scores(
            keys, queries, None, qmask, pool=resolve_pooling("max"), max_block_elements=budget
        )
        assert sizes and max(sizes) <= budget


def test_query_engine_custom_token_scores_and_context():
    keys, queries = (
        torch.randn(3, 4, 5, dtype=torch.float64),
        torch.randn(2, 6, 5, dtype=torch.float64),
    )
    weights = torch.rand(3, 4, dtype=torch.float64)

    def weighted_mean(sims, key_mask, context):
        return (sims * context.unsqueeze(-1)).sum(1)

    got = blocked_query_scores(
        keys,
        queries,
        token_scores=weighted_mean,
        pool=resolve_pooling("mean"),
        key_context=weights,
        max_block_elements=7,
    )
    kn, qn = F.normalize(keys, dim=-1), F.normalize(queries, dim=-1)
    expected = torch.einsum("kjd,qid,kj->kqi", kn, qn, weights).mean(-1)
    torch.testing.assert_close(got, expected)


def bidirectional_max_mean(sims, image_mask, text_mask):
    neg = torch.tensor(-math.inf, dtype=sims.dtype)
    s = sims
    if image_mask is not None:
        s = torch.where(image_mask[:, :, None, None], s, neg)
    if text_mask is not None:
        s = torch.where(text_mask[None, None], s, neg)
    words = s.amax(1)  # (bi, bt, M): best region of each word
    regions = s.amax(3)  # (bi, N, bt): best word of each region
    tm = text_mask[None] if text_mask is not None else torch.ones_like(words, dtype=torch.bool)
    im = (
        image_mask[:, :, None]
        if image_mask is not None
        else torch.ones_like(regions, dtype=torch.bool)
    )
    w = torch.where(tm, words, 0).sum(-1) / tm.sum(-1)
    r = torch.where(im, regions, 0).sum(1) / im.sum(1)
    return w + r


@SETTINGS
@given(images=tokens(**SIDES), texts=tokens(**SIDES), budget=st.integers(1, 400))
def test_pair_engine_matches_loop_for_every_block_size(images, texts, budget):
    got = blocked_pair_scores(
        images.feats,
        texts.feats,
        images.mask,
        texts.mask,
        reduce=bidirectional_max_mean,
        max_block_elements=budget,
    )
    expected = torch.empty(images.batch_size, texts.batch_size, dtype=torch.float64)
    for i in range(images.batch_size):
        v = F.normalize(images.feats[i][images.mask[i]], dim=-1)
        for t in range(texts.batch_size):
            w = F.normalize(texts.feats[t][texts.mask[t]], dim=-1)
            s = v @ w.T
            expected[i, t] = s.amax(0).mean() + s.amax(1).mean()
    torch.testing.assert_close(got, expected)


def test_gradients_through_blocks_equal_unblocked():
    keys = torch.randn(5, 4, 6, dtype=torch.float64, requires_grad=True)
    queries = torch.randn(7, 3, 6, dtype=torch.float64, requires_grad=True)
    qmask = torch.arange(3) < torch.tensor([[3], [1], [2], [3], [2], [1], [3]])
    w = torch.randn(5, 7, dtype=torch.float64)
    grads = []
    for budget in [None, 12, 50]:
        keys.grad = queries.grad = None
        s = blocked_query_scores(
            keys, queries, None, qmask, pool=resolve_pooling("lse", 0.1), max_block_elements=budget
        )
        (s * w).sum().backward()
        grads.append((keys.grad.clone(), queries.grad.clone()))
    for g in grads[1:]:
        torch.testing.assert_close(g[0], grads[0][0])
        torch.testing.assert_close(g[1], grads[0][1])
    assert bool((queries.grad[~qmask] == 0).all())


def test_max_over_keys_masks_padding_and_routes_the_gradient_to_the_maximiser():
    sims = torch.tensor([[[0.2, 0.9], [0.7, 0.1], [5.0, 5.0]]], requires_grad=True)
    out = max_over_keys(sims.clone(), torch.tensor([[True, True, False]]))
    torch.testing.assert_close(out, torch.tensor([[0.7, 0.9]]))
    out.sum().backward()
    torch.testing.assert_close(sims.grad, torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]]))


def test_empty_batches_give_empty_scores():
    s = blocked_query_scores(
        torch.randn(0, 3, 4), torch.randn(2, 3, 4), pool=resolve_pooling("max")
    )
    assert s.shape == (0, 2)
    s = blocked_pair_scores(
        torch.randn(2, 3, 4), torch.randn(0, 3, 4), reduce=lambda s, a, b: s.amax((1, 3))
    )
    assert s.shape == (2, 0)


def test_check_pair_inputs_drops_all_true_masks_and_promotes_dtype():
    v, t, vm, tm = check_pair_inputs(
        torch.randn(2, 3, 4),
        torch.randn(3, 2, 4, dtype=torch.float64),
        torch.ones(2, 3, dtype=torch.bool),
        None,
        where="x",
    )
    assert vm is None and tm is None and v.dtype == t.dtype == torch.float64


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 5)), ValueError, "share the feature dimension D"),
        (
            (torch.randn(2, 4), torch.randn(2, 3, 4)),
            ValueError,
            r"images must have shape \(B, N, D\), got \(2, 4\)",
        ),
        (([1.0], torch.randn(2, 3, 4)), TypeError, "images must be a tensor"),
        (
            (torch.ones(2, 3, 4, dtype=torch.long), torch.randn(2, 3, 4)),
            TypeError,
            "images must be floating point",
        ),
        (
            (torch.randn(2, 3, 4), torch.randn(2, 3, 4), None, torch.ones(2, 3)),
            TypeError,
            "texts_mask must be a bool tensor",
        ),
        (
            (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 2, dtype=torch.bool)),
            ValueError,
            r"images_mask of shape \(2, 2\)",
        ),
        (
            (
                torch.randn(2, 3, 4),
                torch.randn(2, 3, 4),
                None,
                torch.tensor([[True] * 3, [False] * 3]),
            ),
            ValueError,
            r"texts rows \[1\] have no real token",
        ),
        ((torch.full((2, 3, 4), float("nan")), torch.randn(2, 3, 4)), ValueError, "NaN or inf"),
        ((torch.randn(2, 0, 4), torch.randn(2, 3, 4)), ValueError, "no tokens at all"),
    ],
)
def test_check_pair_inputs_errors(args, error, match):
    with pytest.raises(error, match=match):
        check_pair_inputs(*args, where="demo")


def test_nan_in_padding_is_accepted():
    x = torch.randn(2, 3, 4)
    x[1, 2] = float("nan")
    check_pair_inputs(
        x, torch.randn(2, 3, 4), torch.tensor([[True] * 3, [True, True, False]]), where="demo"
    )


def test_block_args_and_options():
    assert check_block_args(None, torch.bfloat16, where="f") == (None, torch.bfloat16)
    assert default_block_elements(torch.device("cpu")) == DEFAULT_MAX_BLOCK_ELEMENTS
    assert default_block_elements(torch.device("cuda")) == DEFAULT_MAX_BLOCK_ELEMENTS_CUDA
    with pytest.raises(
        ValueError, match="max_block_elements must be a positive int or None, got 0"
    ):
        check_block_args(0, None, where="f")
    with pytest.raises(TypeError, match="compute_dtype must be None or a floating torch.dtype"):
        check_block_args(None, torch.int8, where="f")
    with pytest.raises(
        ValueError,
        match=r"f: codebook must be one of \['textual', 'visual'\], got 'visul'. Did you mean 'visual'\?",
    ):
        resolve_option("visul", {"visual": 0, "textual": 1}, name="codebook", where="f")


@settings(max_examples=15, deadline=None)
@given(budget=st.integers(1, 400), pair_elements=st.one_of(st.none(), st.integers(1, 200)))
def test_blocked_pair_scores_tuples_block_ranges_and_pair_budget(budget, pair_elements):
    # A reduce with its own per-image and per-caption inputs (cut by the block ranges) and two
    # outputs equals the unblocked computation, whatever the budget and per-pair footprint.
    from imtm.functional.blocking import blocked_pair_scores

    g = torch.Generator().manual_seed(budget)
    v, t = torch.randn(5, 3, 4, generator=g), torch.randn(7, 2, 4, generator=g)
    image_bias, text_bias = torch.randn(5, generator=g), torch.randn(7, generator=g)
    seen = []

    def reduce(sims, vm, tm, rows, cols):
        seen.append((rows, cols))
        s = sims.amax(1).amax(-1) + image_bias[rows, None] + text_bias[None, cols]
        return s, s.unsqueeze(-1) * torch.ones(3)

    s, extra = blocked_pair_scores(
        v,
        t,
        reduce=reduce,
        max_block_elements=budget,
        pair_elements=pair_elements,
        with_blocks=True,
    )
    want = torch.einsum("ind,tmd->itnm", F.normalize(v, dim=-1), F.normalize(t, dim=-1))
    want = want.amax(-1).amax(-1) + image_bias[:, None] + text_bias[None, :]
    torch.testing.assert_close(s, want)
    torch.testing.assert_close(extra, want.unsqueeze(-1).expand(5, 7, 3))
    # the plan holds one block when all pairs' footprint fits the budget, several otherwise
    footprint = max(3 * 2, 2 * -(-(pair_elements or 0) // 2))
    blocks = [(r.stop - r.start) * (c.stop - c.start) for r, c in seen]
    assert sum(blocks) == 35
    assert (len(blocks) == 1) == (35 * footprint <= budget)

    def no_products(sims, vm, tm, rows, cols):
        assert sims is None
        return image_bias[rows, None] + text_bias[None, cols]

    torch.testing.assert_close(
        blocked_pair_scores(
            v, t, reduce=no_products, max_block_elements=budget, with_blocks=True, products=False
        ),
        image_bias[:, None] + text_bias[None, :],
    )


@SETTINGS
@given(texts=tokens(**SIDES), budget=st.integers(1, 400), data=st.data())
def test_pair_engine_cut_to_text_extents_equals_the_full_width(texts, budget, data):
    """Captions sorted by extent and each block cut to it: the same scores, the padding never multiplied."""
    images = data.draw(tokens(**SIDES))
    mask = texts.mask
    last = torch.where(mask, torch.arange(1, mask.shape[1] + 1), 0).amax(1)
    ext, order = torch.sort(last, descending=True, stable=True)
    feats, mask = texts.feats[order], mask[order]
    widths = []

    def reduce(sims, image_mask, text_mask):
        widths.append(sims.shape[-1])
        return bidirectional_max_mean(sims, image_mask, text_mask)

    kw = dict(reduce=reduce, max_block_elements=budget)
    full = blocked_pair_scores(images.feats, feats, images.mask, mask, **kw)
    widths.clear()
    cut = blocked_pair_scores(
        images.feats, feats, images.mask, mask, text_extents=ext.tolist(), **kw
    )
    torch.testing.assert_close(cut, full)
    assert max(widths) <= int(ext[0]) and min(widths) == max(1, int(ext[-1]))
    with pytest.raises(ValueError, match="longest first"):
        blocked_pair_scores(
            images.feats, feats, images.mask, mask, text_extents=ext.tolist()[::-1] + [0], **kw
        )
