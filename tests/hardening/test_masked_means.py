"""The three public masked means share one implementation and agree, NaN padding and one-token rows included."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens
from imtm.functional import masked_mean, mean_pool
from imtm.testing import PADDINGS, tokens
from imtm.tokens import masked_mean_along

SETTINGS = settings(max_examples=25, deadline=None)


def loop_mean(feats, mask):
    """The obvious reference: average the real rows one by one (zero for a row without any)."""
    out = torch.zeros(feats.shape[0], feats.shape[2], dtype=torch.float64)
    for b in range(feats.shape[0]):
        real = feats[b][mask[b]].double()
        if len(real):
            out[b] = real.mean(0)
    return out


def with_nan_padding(t: Tokens) -> Tokens:
    return t.with_feats(t.feats.masked_fill(~t.mask.unsqueeze(-1), math.nan))


@SETTINGS
@given(
    t=st.sampled_from(PADDINGS).flatmap(lambda p: tokens(batch=3, max_tokens=5, dim=4, padding=p)),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_three_means_agree_and_ignore_nan_padding(t, dtype):
    t = with_nan_padding(t.with_feats(t.feats.to(dtype)))
    a = t.masked_mean()
    b = masked_mean(t.feats, t.mask)
    c = mean_pool(t.feats.transpose(1, 2), t.mask.unsqueeze(1), dim=-1)  # (B, D, N) pooled over N
    for out in (a, b, c):
        assert out.dtype == dtype and out.shape == (t.batch_size, t.dim)
        assert bool(torch.isfinite(out).all())
    # Bit for bit on the same layout: one implementation behind both (c sums along another axis).
    assert torch.equal(a, b)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(c, a, **tol)
    torch.testing.assert_close(a.double(), loop_mean(t.feats, t.mask), **tol)


def test_one_real_token_per_row_returns_that_token():
    feats = torch.full((2, 4, 3), math.nan)
    feats[0, 2], feats[1, 0] = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5, 4.0])
    mask = ~feats.isnan().any(-1)
    t = Tokens(feats, mask)
    expected = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]])
    for out in (
        t.masked_mean(),
        masked_mean(feats, mask),
        mean_pool(feats, mask.unsqueeze(-1), dim=1),
    ):
        torch.testing.assert_close(out, expected)


def test_gradients_do_not_reach_padding_and_stay_finite():
    feats = torch.randn(2, 3, 4, dtype=torch.float64)
    feats[0, 2] = math.nan
    feats.requires_grad_(True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    Tokens(feats, mask).masked_mean().sum().backward()
    grad = feats.grad
    assert bool(torch.isfinite(grad).all()) and bool((grad[0, 2] == 0).all())
    torch.testing.assert_close(grad[0, :2], torch.full((2, 4), 0.5, dtype=torch.float64))


def test_empty_sets_keep_each_documented_value():
    x, none = torch.randn(1, 3, 2), torch.zeros(1, 3, dtype=torch.bool)
    # A Tokens row / functional masked_mean row without real tokens: a zero vector.
    assert torch.equal(masked_mean(x, none), torch.zeros(1, 2))
    assert torch.equal(masked_mean_along(x, none.unsqueeze(-1), dim=1), torch.zeros(1, 2))
    # mean_pool, unchecked: an empty set has no mean (NaN, as 0 / 0).
    assert math.isnan(mean_pool(torch.randn(1, 3), none).item())


def test_mask_constant_along_the_axis_counts_every_position():
    x = torch.arange(6.0).reshape(2, 3)
    torch.testing.assert_close(
        masked_mean_along(x, torch.tensor([[True], [False]]), dim=1, empty=-1.0),
        torch.tensor([1.0, -1.0]),
    )


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: masked_mean(torch.randn(2, 3)),
            ValueError,
            r"masked_mean: expected a tensor of shape \(B, N, D\)",
        ),
        (
            lambda: masked_mean(torch.randn(2, 3, 4), torch.ones(2, 3)),
            TypeError,
            "mask must be a bool tensor",
        ),
        (
            lambda: masked_mean(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool)),
            ValueError,
            r"does not match \(B, N\)",
        ),
    ],
)
def test_functional_errors_are_unchanged(call, error, match):
    with pytest.raises(error, match=match):
        call()
