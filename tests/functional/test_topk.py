import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens
from imtm.functional import topk_mean, topk_mean_scores
from imtm.testing import tokens

SETTINGS = settings(max_examples=20, deadline=None)
IMAGES = tokens(batch=st.integers(1, 4), max_tokens=7, dim=4, dtype=torch.float64)
KS = st.sampled_from([1, 2, 3, 10, None])


def loop_topk_mean(values, k):
    """The mean of the k largest values (all of them when fewer than k, or k is None)."""
    top = sorted(values, reverse=True)[: len(values) if k is None else k]
    return sum(top) / len(top)


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / max(
        math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)), 1e-16
    )


def loop_scores(images: Tokens, texts: torch.Tensor, k, average="features"):
    """DCPA Eq. 10 one pair at a time, in plain Python floats; k=None with average="features" is the
    global average of Table III / IV: the mean region first, then one cosine."""
    out = torch.empty(images.batch_size, texts.shape[0], dtype=torch.float64)
    for i in range(images.batch_size):
        regions = [
            images.feats[i, j].tolist() for j in range(images.num_tokens) if images.mask[i, j]
        ]
        mean = [sum(r[d] for r in regions) / len(regions) for d in range(len(regions[0]))]
        for t in range(texts.shape[0]):
            if k is None and average == "features":
                out[i, t] = cos(mean, texts[t].tolist())
            else:
                out[i, t] = loop_topk_mean([cos(r, texts[t].tolist()) for r in regions], k)
    return out


@SETTINGS
@given(x=tokens(batch=st.integers(1, 4), max_tokens=8, dim=1, dtype=torch.float64), k=KS)
def test_topk_mean_matches_loop_and_ignores_padding(x, k):
    vals = x.feats[..., 0]
    got = topk_mean(vals, x.mask, k)
    want = torch.tensor(
        [loop_topk_mean(vals[b][x.mask[b]].tolist(), k) for b in range(x.batch_size)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, want)
    garbage = torch.where(x.mask, vals, torch.full_like(vals, float("nan")))
    torch.testing.assert_close(topk_mean(garbage, x.mask, k), want)


def test_topk_mean_edges():
    x = torch.tensor([[3.0, 1.0, 2.0], [5.0, 4.0, 0.0]])
    # K larger than the valid entries: every valid entry is averaged.
    torch.testing.assert_close(
        topk_mean(x, torch.tensor([[True, False, True], [True, True, True]]), k=5),
        torch.tensor([2.5, 3.0]),
    )
    torch.testing.assert_close(topk_mean(x, None, k=2), torch.tensor([2.5, 4.5]))
    torch.testing.assert_close(topk_mean(x, None, k=None), torch.tensor([2.0, 3.0]))
    # Another axis, and a row without a valid entry gives 0.
    torch.testing.assert_close(
        topk_mean(x.t(), torch.tensor([[True, False]] * 3), k=2, dim=0), torch.tensor([2.5, 0.0])
    )


def test_shape_and_dtype():
    images = Tokens.from_lengths(torch.randn(3, 6, 8), [6, 2, 4])
    s = topk_mean_scores(images.feats, torch.randn(5, 8), images.mask)
    assert s.shape == (3, 5) and s.dtype == torch.float32
    assert (
        topk_mean_scores(images.feats.double(), torch.randn(5, 8).double()).dtype == torch.float64
    )
    assert topk_mean_scores(images.feats[:0], torch.randn(5, 8)).shape == (0, 5)


@SETTINGS
@given(
    images=IMAGES,
    n_texts=st.integers(1, 4),
    k=KS,
    average=st.sampled_from(["features", "cosines"]),
    data=st.data(),
)
def test_matches_loop_of_equation_10_for_every_block_size(images, n_texts, k, average, data):
    texts = torch.randn(n_texts, 4, dtype=torch.float64)
    want = loop_scores(images, texts, k, average)
    full = topk_mean_scores(images.feats, texts, images.mask, k=k, average=average)
    torch.testing.assert_close(full, want)
    assert bool((full.abs() <= 1 + 1e-12).all())
    budget = data.draw(st.integers(1, images.batch_size * images.num_tokens * n_texts))
    torch.testing.assert_close(
        topk_mean_scores(
            images.feats, texts, images.mask, k=k, max_block_elements=budget, average=average
        ),
        full,
    )


def test_global_average_pools_first():
    """Pooling first and averaging cosines rank captions differently on random data (the old k=None)."""
    g = torch.Generator().manual_seed(0)
    images = Tokens.from_lengths(
        torch.randn(50, 12, 16, generator=g, dtype=torch.float64), [12] * 25 + [5] * 25
    )
    texts = torch.randn(60, 16, generator=g, dtype=torch.float64)
    pooled = topk_mean_scores(images.feats, texts, images.mask, k=None)
    cosines = topk_mean_scores(images.feats, texts, images.mask, k=None, average="cosines")
    agree = float((pooled.argmax(0) == cosines.argmax(0)).double().mean())
    assert agree < 0.95


@pytest.mark.parametrize("k", [2, None])
def test_gradient_matches_loop(k):
    torch.manual_seed(0)
    feats = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    texts = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 0, 1, 1]], dtype=torch.bool)
    weight = torch.randn(3, 4, dtype=torch.float64)
    blocked = topk_mean_scores(feats, texts, mask, k=k, max_block_elements=7)
    g_blocked = torch.autograd.grad((blocked * weight).sum(), (feats, texts))
    # The same equation, one pair at a time with autograd.
    total = 0
    for i in range(3):
        regions = torch.nn.functional.normalize(feats[i][mask[i]], dim=-1)
        for t in range(4):
            sims = regions @ torch.nn.functional.normalize(texts[t], dim=0)
            if k is None:  # the global average: mean region first, then one cosine
                pooled = torch.nn.functional.normalize(feats[i][mask[i]].mean(0), dim=0)
                total = total + weight[i, t] * (
                    pooled @ torch.nn.functional.normalize(texts[t], dim=0)
                )
                continue
            total = total + weight[i, t] * sims.topk(min(k, sims.numel())).values.mean()
    g_loop = torch.autograd.grad(total, (feats, texts))
    for a, b in zip(g_blocked, g_loop):
        torch.testing.assert_close(a, b)


def test_bad_inputs():
    x, t = torch.randn(2, 3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="k must be a positive int"):
        topk_mean_scores(x, t, k=0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        topk_mean_scores(x, t, k=True)
    with pytest.raises(TypeError, match="texts must be a tensor"):
        topk_mean_scores(x, [[0.0] * 4])
    with pytest.raises(ValueError, match=r"one vector per caption, shape \(Bt, D\)"):
        topk_mean_scores(x, torch.randn(5, 2, 4))
    with pytest.raises(TypeError, match="texts must be floating point"):
        topk_mean_scores(x, torch.ones(5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="share the feature dimension"):
        topk_mean_scores(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="images are on cpu but texts on meta"):
        topk_mean_scores(x, torch.empty(5, 4, device="meta"))
    with pytest.raises(ValueError, match="texts hold NaN"):
        topk_mean_scores(x, torch.full((5, 4), float("nan")))
    with pytest.raises(ValueError, match="have no real token"):
        topk_mean_scores(x, t, torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="max_block_elements must be a positive int"):
        topk_mean_scores(x, t, max_block_elements=0)
    with pytest.raises(ValueError, match="average must be one of .* Did you mean 'cosines'"):
        topk_mean_scores(x, t, k=None, average="cosine")
