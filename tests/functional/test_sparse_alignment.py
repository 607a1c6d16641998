import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.functional import sparse_alignment_from_cosines, sparse_alignment_scores
from imtm.testing import tokens

SETTINGS = settings(max_examples=20, deadline=None)


def loop_sparse_alignment(images, texts, image_mask, text_mask, direction="both"):
    """Eq. 8 written out: every pair, every token, plain Python maxima and means."""
    out = torch.zeros(images.shape[0], texts.shape[0], dtype=images.dtype)
    for i in range(images.shape[0]):
        vs = [images[i, n] for n in range(images.shape[1]) if image_mask[i, n]]
        for t in range(texts.shape[0]):
            ws = [texts[t, m] for m in range(texts.shape[1]) if text_mask[t, m]]
            A = [[torch.dot(v, w) / (v.norm() * w.norm()) for w in ws] for v in vs]
            p2w = sum(max(row) for row in A) / len(vs)
            w2p = sum(max(A[n][m] for n in range(len(vs))) for m in range(len(ws))) / len(ws)
            out[i, t] = {"both": p2w + w2p, "patch_to_word": p2w, "word_to_patch": w2p}[direction]
    return out


def masked(b, n, d, lengths, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g, dtype=dtype)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return x, mask


@pytest.mark.parametrize("direction", ["both", "patch_to_word", "word_to_patch"])
def test_equals_the_loop_of_eq8_forward_and_gradient(direction):
    v, vm = masked(3, 5, 6, [5, 2, 4], 0)
    t, tm = masked(4, 4, 6, [4, 1, 3, 2], 1)
    v.requires_grad_(True)
    t.requires_grad_(True)
    got = sparse_alignment_scores(v, t, vm, tm, direction=direction)
    want = loop_sparse_alignment(v, t, vm, tm, direction)
    torch.testing.assert_close(got, want)
    w = torch.randn(3, 4, dtype=torch.float64)
    g_got = torch.autograd.grad((got * w).sum(), (v, t))
    g_want = torch.autograd.grad((want * w).sum(), (v, t))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


@SETTINGS
@given(
    images=tokens(batch=st.integers(1, 4), max_tokens=5, dim=4, dtype=torch.float64),
    texts=tokens(batch=st.integers(1, 4), max_tokens=5, dim=4, dtype=torch.float64),
    budget=st.integers(1, 300),
    extra=st.integers(0, 3),
)
def test_padding_block_size_and_bounds(images, texts, budget, extra):
    full = sparse_alignment_scores(images.feats, texts.feats, images.mask, texts.mask)
    assert bool((full.abs() <= 2 + 1e-9).all())
    blocked = sparse_alignment_scores(
        images.feats, texts.feats, images.mask, texts.mask, max_block_elements=budget
    )
    torch.testing.assert_close(blocked, full)
    # garbage (NaN included) in extra padded positions changes nothing
    pad_v = torch.full((images.batch_size, extra, 4), math.nan, dtype=torch.float64)
    v2 = torch.cat([images.feats, pad_v], 1)
    m2 = torch.cat([images.mask, torch.zeros(images.batch_size, extra, dtype=torch.bool)], 1)
    torch.testing.assert_close(sparse_alignment_scores(v2, texts.feats, m2, texts.mask), full)


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_permutation_equivariance(seed):
    g = torch.Generator().manual_seed(seed)
    v, t = torch.randn(4, 5, 3, generator=g), torch.randn(3, 4, 3, generator=g)
    pi, pt = torch.randperm(4, generator=g), torch.randperm(3, generator=g)
    pn = torch.randperm(5, generator=g)
    s = sparse_alignment_scores(v, t)
    torch.testing.assert_close(sparse_alignment_scores(v[pi][:, pn], t[pt]), s[pi][:, pt])


def test_from_cosines_broadcasts_masks():
    A = torch.tensor([[[0.9, 0.1], [0.2, 0.4], [5.0, 5.0]]])
    torch.testing.assert_close(
        sparse_alignment_from_cosines(A, torch.tensor([[True, True, False]])),
        torch.tensor([0.65 + 0.65]),
    )
    torch.testing.assert_close(
        sparse_alignment_from_cosines(
            A[:, :2], None, torch.tensor([[True, False]]), direction="word_to_patch"
        ),
        torch.tensor([0.9]),
    )


def test_bad_inputs():
    v, t = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"direction must be one of .* Did you mean 'both'"):
        sparse_alignment_scores(v, t, direction="bth")
    with pytest.raises(ValueError, match="share the feature dimension"):
        sparse_alignment_scores(v, torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="have no real token"):
        sparse_alignment_scores(v, t, torch.tensor([[True, True, True], [False, False, False]]))
    with pytest.raises(ValueError, match="NaN or inf"):
        sparse_alignment_scores(v.clone().fill_(math.nan), t)
    with pytest.raises(ValueError, match="max_block_elements must be a positive int"):
        sparse_alignment_scores(v, t, max_block_elements=0)
    with pytest.raises(TypeError, match="must be floating point"):
        sparse_alignment_scores(v.long(), t)


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    fill=st.sampled_from([math.nan, math.inf, -math.inf, 7.0]),
    direction=st.sampled_from(["both", "patch_to_word", "word_to_patch"]),
)
def test_from_cosines_with_both_masks_equals_the_loop_and_padding_gets_no_gradient(
    seed, fill, direction
):
    """With both masks the cosines are filled once for both halves of Eq. 8: the loop's values, the
    two halves summing to the whole, and a zero gradient at every padded position, whatever the
    padding holds (NaN included)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(3, 4, 5, 6, generator=g, dtype=torch.float64) * 2 - 1
    im = torch.rand(3, 4, 5, generator=g) > 0.3
    tm = torch.rand(1, 4, 6, generator=g) > 0.3
    im[..., 0], tm[..., 0] = True, True
    real = im.unsqueeze(-1) & tm.unsqueeze(-2)
    A = torch.where(real, A, fill).requires_grad_(True)
    got = sparse_alignment_from_cosines(A, im, tm, direction=direction)
    (grad,) = torch.autograd.grad(got.sum(), A)
    assert bool(torch.isfinite(grad).all()) and bool((grad[~real.expand_as(A)] == 0).all())
    if direction == "both":
        halves = sparse_alignment_from_cosines(
            A, im, tm, direction="patch_to_word"
        ) + sparse_alignment_from_cosines(A, im, tm, direction="word_to_patch")
        torch.testing.assert_close(got, halves)
    for i in range(3):
        for t in range(4):
            rows = [n for n in range(5) if im[i, t, n]]
            cols = [m for m in range(6) if tm[0, t, m]]
            p2w = sum(max(float(A[i, t, n, m]) for m in cols) for n in rows) / len(rows)
            w2p = sum(max(float(A[i, t, n, m]) for n in rows) for m in cols) / len(cols)
            want = {"both": p2w + w2p, "patch_to_word": p2w, "word_to_patch": w2p}[direction]
            assert math.isclose(float(got[i, t]), want, abs_tol=1e-12)
