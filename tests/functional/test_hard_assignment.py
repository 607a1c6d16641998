import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens
from imtm.functional import hard_assignment_scores
from imtm.functional.pooling import POOLINGS
from imtm.testing import tokens

SETTINGS = settings(max_examples=20, deadline=None)
SIDES = {"batch": st.integers(1, 4), "max_tokens": 5, "dim": 4, "dtype": torch.float64}


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / max(
        math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)), 1e-16
    )


def pool(vals, pooling, temperature):
    if pooling == "max":
        return max(vals)
    if pooling == "mean":
        return sum(vals) / len(vals)
    if pooling == "sum":
        return sum(vals)
    top = max(vals)
    w = [math.exp((v - top) / temperature) for v in vals]
    if pooling == "softmax":
        return sum(wi * v for wi, v in zip(w, vals)) / sum(w)
    return top + temperature * math.log(
        sum(w)
    )  # (1/lambda) log sum exp(lambda s), shifted by the max


def loop_scores(images: Tokens, texts: Tokens, codebook="visual", pooling="lse", temperature=0.1):
    """CHAN Eq. 5-8 one pair at a time, in plain Python floats."""
    out = torch.empty(images.batch_size, texts.batch_size, dtype=torch.float64)
    for i in range(images.batch_size):
        regions = [
            images.feats[i, j].tolist() for j in range(images.num_tokens) if images.mask[i, j]
        ]
        for t in range(texts.batch_size):
            words = [
                texts.feats[t, k].tolist() for k in range(texts.num_tokens) if texts.mask[t, k]
            ]
            queries, codewords = (words, regions) if codebook == "visual" else (regions, words)
            per_query = [
                max(cos(q, c) for c in codewords) for q in queries
            ]  # Eq. 5-6: hard assignment
            out[i, t] = pool(per_query, pooling, temperature)  # Eq. 7-8: pooling over the queries
    return out


def call(images, texts, **kw):
    return hard_assignment_scores(images.feats, texts.feats, images.mask, texts.mask, **kw)


def test_shape_mask_and_dtype():
    images = Tokens.from_lengths(torch.randn(3, 6, 8), [6, 2, 4])
    texts = Tokens.from_lengths(torch.randn(5, 7, 8), [7, 1, 3, 5, 2])
    s = call(images, texts)
    assert s.shape == (3, 5) and s.dtype == torch.float32
    assert (
        hard_assignment_scores(images.feats.double(), texts.feats.double()).dtype == torch.float64
    )
    # No mask means every token is real.
    torch.testing.assert_close(
        hard_assignment_scores(images.feats, texts.feats),
        call(Tokens(images.feats), Tokens(texts.feats)),
    )


@pytest.mark.parametrize("codebook", ["visual", "textual"])
@pytest.mark.parametrize("pooling", sorted(POOLINGS))
@SETTINGS
@given(images=tokens(**SIDES), texts=tokens(**SIDES), temperature=st.sampled_from([0.05, 0.1, 1.0]))
def test_matches_loop_of_equations(codebook, pooling, images, texts, temperature):
    got = call(images, texts, codebook=codebook, pooling=pooling, temperature=temperature)
    torch.testing.assert_close(got, loop_scores(images, texts, codebook, pooling, temperature))


@pytest.mark.parametrize("codebook", ["visual", "textual"])
@SETTINGS
@given(images=tokens(**SIDES), texts=tokens(**SIDES), data=st.data())
def test_same_numbers_for_every_block_size(codebook, images, texts, data):
    full = call(images, texts, codebook=codebook, max_block_elements=10**9)
    n_pairs = images.batch_size * images.num_tokens * texts.batch_size * texts.num_tokens
    for budget in sorted({1, 2, 3, 7, data.draw(st.integers(1, max(1, n_pairs)))}):
        torch.testing.assert_close(
            call(images, texts, codebook=codebook, max_block_elements=budget), full
        )


def test_blocked_float32_matches_unblocked_at_realistic_sizes():
    torch.manual_seed(0)
    images = Tokens(torch.randn(11, 36, 64))
    texts = Tokens.from_lengths(torch.randn(23, 12, 64), torch.randint(1, 13, (23,)))
    full = call(images, texts, max_block_elements=10**9)
    for budget in [36 * 5, 36 * 40, 36 * 100 + 17, 5000]:
        torch.testing.assert_close(call(images, texts, max_block_elements=budget), full)
    # Sub-batches (how a retrieval evaluation cuts the test set) give the same numbers too.
    parts = torch.cat(
        [
            torch.cat([call(images[i : i + 4], texts[t : t + 5]) for t in range(0, 23, 5)], 1)
            for i in range(0, 11, 4)
        ]
    )
    torch.testing.assert_close(parts, full)


@pytest.mark.parametrize("codebook", ["visual", "textual"])
@SETTINGS
@given(
    images=tokens(**SIDES),
    texts=tokens(**SIDES),
    extra=st.integers(1, 3),
    fill=st.sampled_from([float("nan"), 1e6]),
)
def test_padding_garbage_changes_nothing(codebook, images, texts, extra, fill):
    def pad(t):
        mask = torch.cat([t.mask, t.mask.new_zeros(t.batch_size, extra)], 1)
        feats = torch.cat([t.feats, torch.randn(t.batch_size, extra, t.dim, dtype=t.dtype)], 1)
        return Tokens(feats.masked_fill(~mask.unsqueeze(-1), fill), mask)

    torch.testing.assert_close(
        call(pad(images), pad(texts), codebook=codebook), call(images, texts, codebook=codebook)
    )


@SETTINGS
@given(images=tokens(**SIDES), texts=tokens(**SIDES), data=st.data())
def test_permutations_permute_rows_and_columns(images, texts, data):
    pi = torch.tensor(data.draw(st.permutations(range(images.batch_size))))
    pt = torch.tensor(data.draw(st.permutations(range(texts.batch_size))))
    s = call(images, texts)
    torch.testing.assert_close(call(images[pi], texts[pt]), s[pi][:, pt])
    # Permuting the tokens inside an image or a caption changes nothing either.
    pn = torch.randperm(images.num_tokens)
    torch.testing.assert_close(call(Tokens(images.feats[:, pn], images.mask[:, pn]), texts), s)


@SETTINGS
@given(images=tokens(**SIDES), texts=tokens(**SIDES), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_cosine_bounds_and_scale_invariance(images, texts, scale):
    for pooling in ("max", "mean", "softmax"):
        s = call(images, texts, pooling=pooling)
        assert bool((s.abs() <= 1 + 1e-12).all())
    torch.testing.assert_close(
        call(images.with_feats(images.feats * scale), texts), call(images, texts)
    )


@SETTINGS
@given(images=tokens(**SIDES), texts=tokens(**SIDES))
def test_textual_codebook_is_visual_with_roles_swapped(images, texts):
    torch.testing.assert_close(
        call(images, texts, codebook="textual", pooling="mean"),
        call(texts, images, pooling="mean").t(),
    )


def test_lse_with_tiny_temperature_is_finite_and_near_max():
    torch.manual_seed(1)
    images, texts = Tokens(torch.randn(3, 5, 8)), Tokens(torch.randn(4, 6, 8))
    for t in (1e-3, 1e-5):
        lse = call(images, texts, pooling="lse", temperature=t)
        assert bool(torch.isfinite(lse).all())
        mx = call(images, texts, pooling="max")
        assert bool(((lse >= mx - 1e-6) & (lse <= mx + t * math.log(6) + 1e-6)).all())


@pytest.mark.parametrize("pooling", ["lse", "softmax", "mean", "sum", "max"])
@pytest.mark.parametrize("codebook", ["visual", "textual"])
def test_gradcheck_float64(pooling, codebook):
    torch.manual_seed(2)
    images = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    texts = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    text_mask = torch.tensor([[True, True, False], [True, True, True]])

    def f(v, t):
        return hard_assignment_scores(
            v, t, None, text_mask, codebook=codebook, pooling=pooling, max_block_elements=20
        )

    # Random inputs have no ties, so the max over regions is differentiable at these points.
    assert torch.autograd.gradcheck(f, (images, texts), fast_mode=True)


def test_hard_max_subgradient_reaches_only_the_best_region():
    images = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]], requires_grad=True)
    texts = torch.tensor([[[1.0, 0.1]]], requires_grad=True)
    hard_assignment_scores(images, texts, pooling="max").sum().backward()
    assert images.grad[0, 0].abs().sum() > 0
    assert bool((images.grad[0, 1:] == 0).all())
    assert texts.grad.abs().sum() > 0


def test_gradients_same_with_and_without_blocking():
    torch.manual_seed(3)
    v = torch.randn(6, 5, 8, requires_grad=True)
    t = torch.randn(7, 4, 8, requires_grad=True)
    tm = torch.arange(4) < torch.randint(1, 5, (7, 1))
    w = torch.randn(6, 7)
    grads = []
    for budget in [10**9, 25, 101]:
        v.grad = t.grad = None
        (hard_assignment_scores(v, t, None, tm, max_block_elements=budget) * w).sum().backward()
        grads.append((v.grad.clone(), t.grad.clone()))
    for gv, gt in grads[1:]:
        torch.testing.assert_close(gv, grads[0][0])
        torch.testing.assert_close(gt, grads[0][1])


def test_training_and_inference_give_the_same_numbers():
    v, t = torch.randn(4, 6, 8), torch.randn(5, 3, 8)
    with torch.no_grad():
        inference = hard_assignment_scores(v, t)
    training = hard_assignment_scores(v.requires_grad_(), t)
    assert training.requires_grad
    torch.testing.assert_close(training.detach(), inference, rtol=0, atol=0)


def test_bfloat16_compute_is_close_to_float32_and_returns_float32():
    torch.manual_seed(4)
    v = torch.randn(5, 36, 64)
    t = torch.randn(6, 10, 64)
    tm = torch.arange(10) < torch.randint(1, 11, (6, 1))
    exact = hard_assignment_scores(v, t, None, tm)
    fast = hard_assignment_scores(v, t, None, tm, compute_dtype=torch.bfloat16)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, exact, atol=2e-2, rtol=0)
    v.requires_grad_()
    hard_assignment_scores(v, t, None, tm, compute_dtype=torch.bfloat16).sum().backward()
    assert v.grad.dtype == torch.float32 and bool(torch.isfinite(v.grad).all())


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (
            (torch.randn(2, 3, 8), torch.randn(2, 4, 6)),
            {},
            ValueError,
            r"hard_assignment_scores: images and texts must share the feature dimension D",
        ),
        (
            (
                torch.randn(2, 3, 8),
                torch.randn(2, 4, 8),
                None,
                torch.tensor([[True] * 4, [False] * 4]),
            ),
            {},
            ValueError,
            r"texts rows \[1\] have no real token",
        ),
        (
            (torch.full((2, 3, 8), float("nan")), torch.randn(2, 4, 8)),
            {},
            ValueError,
            "images holds 48 NaN or inf",
        ),
        (
            (torch.randn(2, 3, 8), torch.randn(2, 4, 8), torch.ones(2, 3)),
            {},
            TypeError,
            "images_mask must be a bool tensor",
        ),
        (
            (torch.randn(2, 3, 8), torch.randn(2, 4, 8), None, torch.ones(2, 3, dtype=torch.bool)),
            {},
            ValueError,
            r"texts_mask of shape \(2, 3\) does not match",
        ),
        (
            (torch.randn(2, 3, 8), torch.randn(2, 4, 8)),
            {"pooling": "meen"},
            ValueError,
            r"pooling must be one of .*got 'meen'. Did you mean 'mean'\?",
        ),
        (
            (torch.randn(2, 3, 8), torch.randn(2, 4, 8)),
            {"codebook": "textal"},
            ValueError,
            r"codebook must be one of \['textual', 'visual'\], got 'textal'. Did you mean 'textual'\?",
        ),
        (
            (torch.randn(2, 3, 8), torch.randn(2, 4, 8)),
            {"temperature": -1.0},
            ValueError,
            "temperature must be a finite number > 0",
        ),
        (
            (torch.randn(2, 3, 8), torch.randn(2, 4, 8)),
            {"max_block_elements": 0},
            ValueError,
            "max_block_elements must be a positive int",
        ),
        (
            (torch.randn(2, 3, 8), torch.randn(2, 4, 8)),
            {"compute_dtype": "bf16"},
            TypeError,
            "compute_dtype must be None or a floating torch.dtype",
        ),
        (
            (torch.randn(2, 3, 8), torch.randint(0, 5, (2, 4))),
            {},
            ValueError,
            r"texts must have shape \(B, N, D\)",
        ),
    ],
)
def test_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        hard_assignment_scores(*args, **kwargs)


def test_autocast_training_and_inference_compute_the_same_numbers():
    torch.manual_seed(5)
    v, t = torch.randn(4, 6, 16), torch.randn(5, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            inference = hard_assignment_scores(v, t)
        training = hard_assignment_scores(v.clone().requires_grad_(), t)
    assert inference.dtype == training.dtype == torch.float32
    torch.testing.assert_close(training.detach(), inference, rtol=0, atol=0)
    torch.testing.assert_close(
        inference, hard_assignment_scores(v, t, compute_dtype=torch.bfloat16), rtol=0, atol=0
    )


@pytest.mark.parametrize("codebook", ["visual", "textual"])
@pytest.mark.parametrize("pooling", ["lse", "mean", "max"])
def test_from_cosines_equals_the_blocked_scores(codebook, pooling):
    # The per-matrix reduction (used on LAPS's slimmed sets) is the same coding as the blocked
    # all-pairs scorer, and HardAssignmentCoding.reduce_cosines calls it.
    from imtm.components import HardAssignmentCoding
    from imtm.functional import hard_assignment_from_cosines

    g = torch.Generator().manual_seed(0)
    v, t = (
        torch.randn(3, 5, 8, generator=g, dtype=torch.float64),
        torch.randn(4, 6, 8, generator=g, dtype=torch.float64),
    )
    vm = torch.arange(5) < torch.tensor([[5], [3], [1]])
    tm = torch.arange(6) < torch.tensor([[6], [2], [4], [1]])
    kw = dict(codebook=codebook, pooling=pooling, temperature=0.2)
    want = hard_assignment_scores(v, t, vm, tm, **kw)
    sims = torch.einsum("ind,tmd->itnm", F.normalize(v, dim=-1), F.normalize(t, dim=-1))
    got = hard_assignment_from_cosines(sims, vm[:, None, :], tm[None, :, :], **kw)
    torch.testing.assert_close(got, want)
    coding = HardAssignmentCoding(**kw)
    torch.testing.assert_close(coding.reduce_cosines(sims, vm[:, None, :], tm[None, :, :]), want)
    with pytest.raises(ValueError, match="hard_assignment_from_cosines: codebook must be one of"):
        hard_assignment_from_cosines(sims, codebook="visaul")
