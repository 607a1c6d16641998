import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.functional.pooling import (
    POOLINGS,
    lse_pool,
    masked_pool,
    max_pool,
    mean_pool,
    resolve_pooling,
    softmax_pool,
    sum_pool,
)

SETTINGS = settings(max_examples=25, deadline=None)


def loop_pool(x, mask, pooling, temperature):
    """The poolings written out one set at a time over the last axis."""
    out = torch.empty(x.shape[:-1], dtype=x.dtype)
    for idx in (
        torch.cartesian_prod(*[torch.arange(n) for n in x.shape[:-1]])
        .view(-1, x.dim() - 1)
        .tolist()
    ):
        vals = [float(x[tuple(idx)][m]) for m in range(x.shape[-1]) if mask[tuple(idx)][m]]
        if pooling == "max":
            r = max(vals)
        elif pooling == "mean":
            r = sum(vals) / len(vals)
        elif pooling == "sum":
            r = sum(vals)
        elif pooling == "softmax":
            top = max(vals)
            w = [math.exp((v - top) / temperature) for v in vals]
            r = sum(wi * v for wi, v in zip(w, vals)) / sum(w)
        else:
            top = max(vals)
            r = top + temperature * math.log(sum(math.exp((v - top) / temperature) for v in vals))
        out[tuple(idx)] = r
    return out


@st.composite
def scores_and_mask(draw, max_sets=4, max_len=6):
    a, b, m = (
        draw(st.integers(1, max_sets)),
        draw(st.integers(1, max_sets)),
        draw(st.integers(1, max_len)),
    )
    rows = [draw(st.lists(st.booleans(), min_size=m, max_size=m)) for _ in range(a * b)]
    for row in rows:
        if not any(row):
            row[draw(st.integers(0, m - 1))] = True
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.rand(a, b, m, generator=gen, dtype=torch.float64) * 2 - 1
    return x, torch.tensor(rows).view(a, b, m)


@pytest.mark.parametrize("pooling", sorted(POOLINGS))
def test_shape_and_axis(pooling):
    x = torch.randn(3, 4, 5)
    mask = torch.rand(3, 4, 5) > 0.3
    mask[..., 0] = True
    mask[:, 0, :] = True
    assert masked_pool(x, mask, pooling).shape == (3, 4)
    # Pooling another axis is the same as moving it last.
    torch.testing.assert_close(
        masked_pool(x, mask, pooling, dim=1),
        masked_pool(x.transpose(1, 2), mask.transpose(1, 2), pooling),
    )


@pytest.mark.parametrize("pooling", sorted(POOLINGS))
@SETTINGS
@given(data=scores_and_mask(), temperature=st.sampled_from([0.05, 0.1, 1.0]))
def test_matches_loop_of_equation(pooling, data, temperature):
    x, mask = data
    torch.testing.assert_close(
        masked_pool(x, mask, pooling, temperature), loop_pool(x, mask, pooling, temperature)
    )


@pytest.mark.parametrize("pooling", sorted(POOLINGS))
@SETTINGS
@given(
    data=scores_and_mask(),
    extra=st.integers(1, 3),
    fill=st.sampled_from([float("nan"), 1e30, -1e30]),
)
def test_padding_values_never_matter(pooling, data, extra, fill):
    x, mask = data
    padded = torch.cat([x, torch.full((*x.shape[:-1], extra), fill, dtype=x.dtype)], -1)
    padded_mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], extra)], -1)
    garbage = padded.masked_fill(~padded_mask, fill)
    torch.testing.assert_close(
        masked_pool(garbage, padded_mask, pooling), masked_pool(x, mask, pooling)
    )


@SETTINGS
@given(data=scores_and_mask(), temperature=st.sampled_from([1e-3, 0.1, 10.0]))
def test_bounds(data, temperature):
    x, mask = data
    lo = x.masked_fill(~mask, math.inf).amin(-1)
    hi = x.masked_fill(~mask, -math.inf).amax(-1)
    n = mask.sum(-1).to(x.dtype)
    tol = 1e-12
    for pooling in ("max", "mean", "softmax"):
        s = masked_pool(x, mask, pooling, temperature)
        assert bool(((s >= lo - tol) & (s <= hi + tol)).all())
        assert bool((s.abs() <= 1 + tol).all())  # cosines stay cosines
    lse = masked_pool(x, mask, "lse", temperature)
    assert bool(((lse >= hi - tol) & (lse <= hi + temperature * torch.log(n) + tol)).all())


@SETTINGS
@given(data=scores_and_mask())
def test_permutation_invariance_within_a_set(data):
    x, mask = data
    perm = torch.randperm(x.shape[-1])
    for pooling in POOLINGS:
        torch.testing.assert_close(
            masked_pool(x[..., perm], mask[..., perm], pooling), masked_pool(x, mask, pooling)
        )


def test_broadcast_mask_and_none_mask():
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False, True], [True, False, False, False], [True] * 4])
    for fn in POOLINGS.values():
        torch.testing.assert_close(fn(x, mask), fn(x, mask.expand(2, 3, 4)))
        torch.testing.assert_close(fn(x, None), fn(x, torch.ones(4, dtype=torch.bool)))


def test_lse_and_softmax_tiny_temperature_stay_finite_and_tend_to_max():
    x = torch.tensor([[0.9, 0.3, -0.5], [1.0, 1.0, 0.2]], dtype=torch.float32)
    for t in (1e-3, 1e-4):
        lse = lse_pool(x, temperature=t)
        assert bool(torch.isfinite(lse).all())
        torch.testing.assert_close(
            lse, max_pool(x) + torch.tensor([0.0, t * math.log(2)]), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(softmax_pool(x, temperature=t), max_pool(x))


def test_large_temperature_softmax_tends_to_mean():
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(softmax_pool(x, temperature=1e6), mean_pool(x), atol=1e-5, rtol=0)


def test_unchecked_functions_on_empty_sets():
    x, empty = torch.randn(1, 3), torch.zeros(1, 3, dtype=torch.bool)
    assert max_pool(x, empty).item() == -math.inf
    assert lse_pool(x, empty).item() == -math.inf
    assert sum_pool(x, empty).item() == 0.0
    assert math.isnan(mean_pool(x, empty).item())


def test_gradients_of_lse_and_softmax_gradcheck():
    x = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 3, 4) > 0.3
    mask[..., 0] = True
    for pooling in ("lse", "softmax", "mean", "sum"):
        assert torch.autograd.gradcheck(lambda v, p=pooling: masked_pool(v, mask, p, 0.2), (x,))


def test_max_gradient_is_a_subgradient_at_the_maximum():
    x = torch.tensor([[0.1, 0.8, 0.3, 2.0]], requires_grad=True)
    max_pool(x, torch.tensor([[True, True, True, False]])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))


def test_lse_gradient_is_finite_at_tiny_temperature():
    x = torch.tensor([[0.5, 0.49, -1.0]], requires_grad=True)
    lse_pool(x, torch.tensor([[True, True, False]]), temperature=1e-3).sum().backward()
    assert bool(torch.isfinite(x.grad).all())
    assert x.grad[0, 2] == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"pooling": "lsee"},
            ValueError,
            r"pooling must be one of \['lse', 'max', 'mean', 'softmax', 'sum'\], got 'lsee'\. Did you mean 'lse'\?",
        ),
        (
            {"pooling": "lse", "temperature": 0.0},
            ValueError,
            "temperature must be a finite number > 0, got 0.0",
        ),
        (
            {"pooling": "lse", "temperature": float("nan")},
            ValueError,
            "temperature must be a finite number > 0",
        ),
        (
            {"pooling": "max", "temperature": "hot"},
            TypeError,
            "temperature must be a positive number, got str",
        ),
        ({"mask": torch.ones(2, 3)}, TypeError, "mask must be a bool tensor"),
        (
            {"mask": torch.ones(4, 3, dtype=torch.bool)},
            ValueError,
            r"mask of shape \(4, 3\) does not broadcast",
        ),
        (
            {"mask": torch.ones(2, 2, 3, dtype=torch.bool)},
            ValueError,
            "does not broadcast to x of shape",
        ),
        (
            {"mask": torch.tensor([[True] * 3, [False] * 3])},
            ValueError,
            "1 set\\(s\\) have no valid position",
        ),
        ({"dim": 2}, ValueError, "dim=2 is out of range"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        masked_pool(torch.randn(2, 3), **kwargs)


def test_bad_x():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        masked_pool(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no position to pool over"):
        masked_pool(torch.ones(2, 0))
    with pytest.raises(ValueError, match="at least one axis"):
        masked_pool(torch.tensor(1.0))


def test_resolve_pooling_binds_temperature_once():
    pool = resolve_pooling("softmax", 0.5)
    x = torch.randn(3, 4)
    torch.testing.assert_close(pool(x, None, -1), softmax_pool(x, temperature=0.5))
