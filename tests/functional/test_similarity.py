import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.functional import cosine_similarity_matrix, global_cosine_scores, masked_mean
from imtm.testing import tokens

SETTINGS = settings(max_examples=25, deadline=None)


def loop_masked_mean(feats, mask):
    out = []
    for b in range(feats.shape[0]):
        real = [feats[b, n] for n in range(feats.shape[1]) if mask[b, n]]
        out.append(
            torch.stack(real).sum(0) / len(real) if real else feats.new_zeros(feats.shape[2])
        )
    return torch.stack(out)


def test_masked_mean_shape_and_empty_row():
    x = torch.randn(3, 4, 5)
    mask = torch.tensor([[True, True, False, False], [False] * 4, [True] * 4])
    out = masked_mean(x, mask)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out[1], torch.zeros(5))
    torch.testing.assert_close(masked_mean(x), x.mean(1))


@SETTINGS
@given(t=tokens(batch=st.integers(1, 4), max_tokens=6, dim=3, dtype=torch.float64))
def test_masked_mean_matches_loop_and_ignores_nan_padding(t):
    feats = t.feats.masked_fill(~t.mask.unsqueeze(-1), float("nan"))
    torch.testing.assert_close(masked_mean(feats, t.mask), loop_masked_mean(t.feats, t.mask))


@SETTINGS
@given(
    a=st.integers(0, 2**31 - 1),
    bi=st.integers(1, 4),
    bt=st.integers(1, 4),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_cosine_matrix_matches_pairwise_cosine_and_is_bounded(a, bi, bt, scale):
    g = torch.Generator().manual_seed(a)
    x = torch.randn(bi, 6, generator=g, dtype=torch.float64) * scale
    y = torch.randn(bt, 6, generator=g, dtype=torch.float64)
    s = cosine_similarity_matrix(x, y)
    ref = torch.stack(
        [
            torch.stack([F.cosine_similarity(x[i], y[t], dim=0) for t in range(bt)])
            for i in range(bi)
        ]
    )
    torch.testing.assert_close(s, ref)
    assert bool((s.abs() <= 1 + 1e-12).all())


def test_cosine_of_a_zero_vector_is_zero_not_nan():
    s = cosine_similarity_matrix(torch.zeros(1, 3), torch.randn(2, 3))
    torch.testing.assert_close(s, torch.zeros(1, 2))


@SETTINGS
@given(
    images=tokens(batch=st.integers(1, 3), max_tokens=5, dim=4, dtype=torch.float64),
    texts=tokens(batch=st.integers(1, 3), max_tokens=5, dim=4, dtype=torch.float64),
)
def test_global_cosine_scores_matches_loop(images, texts):
    s = global_cosine_scores(images.feats, texts.feats, images.mask, texts.mask)
    vi, vt = loop_masked_mean(images.feats, images.mask), loop_masked_mean(texts.feats, texts.mask)
    for i in range(images.batch_size):
        for t in range(texts.batch_size):
            torch.testing.assert_close(s[i, t], F.cosine_similarity(vi[i], vt[t], dim=0))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: masked_mean(torch.randn(2, 3)), ValueError, r"shape \(B, N, D\)"),
        (lambda: masked_mean(torch.randn(2, 3, 4), torch.ones(2, 3)), TypeError, "bool"),
        (
            lambda: masked_mean(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool)),
            ValueError,
            "does not match",
        ),
        (lambda: masked_mean(torch.ones(2, 3, 4, dtype=torch.long)), TypeError, "floating-point"),
        (lambda: masked_mean([1, 2]), TypeError, "got list"),
        (
            lambda: cosine_similarity_matrix(torch.randn(2, 3), torch.randn(2, 4)),
            ValueError,
            "dimension 3 but texts have 4",
        ),
        (
            lambda: cosine_similarity_matrix(torch.randn(2, 3, 1), torch.randn(2, 3)),
            ValueError,
            r"shape \(B, D\)",
        ),
        (
            lambda: cosine_similarity_matrix(torch.randn(2, 3), torch.randn(2, 3).double()),
            TypeError,
            "float64",
        ),
        (
            lambda: global_cosine_scores(torch.randn(2, 3, 4), torch.randn(2, 3)),
            ValueError,
            "texts",
        ),
    ],
)
def test_similarity_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
