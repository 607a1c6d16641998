import math

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.functional import cosine_cost, transport_cost, transport_plan
from imtm.functional.transport import TRANSPORT_METHODS, flush_threshold

SETTINGS = settings(max_examples=20, deadline=None)


def loop_ipot(cost, rows, cols, beta=0.5, n_iter=50):
    """IPOT (Xie et al. 2020, Algorithm 1) for one problem in plain Python floats, real tokens only."""
    c = [[float(cost[i][j]) for j in cols] for i in rows]
    n, m = len(rows), len(cols)
    a, b = [1.0 / n] * n, [1.0 / m] * m
    g = [[math.exp(-c[i][j] / beta) for j in range(m)] for i in range(n)]
    t = [[1.0] * m for _ in range(n)]
    v = [1.0] * m
    for _ in range(n_iter):
        q = [[g[i][j] * t[i][j] for j in range(m)] for i in range(n)]
        u = [a[i] / sum(q[i][j] * v[j] for j in range(m)) for i in range(n)]
        v = [b[j] / sum(q[i][j] * u[i] for i in range(n)) for j in range(m)]
        t = [[u[i] * q[i][j] * v[j] for j in range(m)] for i in range(n)]
    return t


def random_problem(b=3, n=7, m=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 6, generator=g, dtype=dtype)
    y = torch.randn(b, m, 6, generator=g, dtype=dtype)
    sm = torch.rand(b, n, generator=g) < 0.7
    tm = torch.rand(b, m, generator=g) < 0.7
    sm[:, 0] = True
    tm[:, 0] = True
    return cosine_cost(x, y), sm, tm


def test_shape_mask_marginals_and_padding():
    cost, sm, tm = random_problem()
    cost[~sm] = float("nan")  # padding may hold anything
    plan = transport_plan(cost, sm, tm, n_iter=200)
    assert plan.shape == cost.shape and plan.dtype == cost.dtype
    assert bool(torch.isfinite(plan).all()) and bool((plan >= 0).all())
    real = sm.unsqueeze(2) & tm.unsqueeze(1)
    assert bool((plan[~real] == 0).all())  # padding carries no mass and receives none
    a = sm.double() / sm.sum(1, keepdim=True)
    b = tm.double() / tm.sum(1, keepdim=True)
    torch.testing.assert_close(plan.sum(1), b)  # column scaling is the last step: exact
    torch.testing.assert_close(plan.sum(2), a, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_ipot_matches_loop_forward_and_gradient(seed):
    cost, sm, tm = random_problem(b=2, n=5, m=4, seed=seed)
    cost.requires_grad_(True)
    plan = transport_plan(cost, sm, tm, n_iter=30)
    for k in range(2):
        rows = sm[k].nonzero().flatten().tolist()
        cols = tm[k].nonzero().flatten().tolist()
        want = torch.tensor(
            loop_ipot(cost[k].detach().tolist(), rows, cols, n_iter=30), dtype=torch.float64
        )
        torch.testing.assert_close(plan[k][rows][:, cols], want)
    # Gradient of <T, W> against central differences of the loop (a smooth function of C).
    w = torch.randn(cost.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (plan * w).sum().backward()
    k, i, j = 0, sm[0].nonzero()[0].item(), tm[0].nonzero()[-1].item()
    rows = sm[k].nonzero().flatten().tolist()
    cols = tm[k].nonzero().flatten().tolist()

    def f(delta):
        c = cost[k].detach().clone()
        c[i, j] += delta
        t = loop_ipot(c.tolist(), rows, cols, n_iter=30)
        return sum(
            t[a][b] * float(w[k, rows[a], cols[b]])
            for a in range(len(rows))
            for b in range(len(cols))
        )

    h = 1e-6
    numeric = (f(h) - f(-h)) / (2 * h)
    torch.testing.assert_close(
        cost.grad[k, i, j], torch.tensor(numeric, dtype=torch.float64), rtol=1e-4, atol=1e-7
    )
    assert bool((cost.grad[~(sm.unsqueeze(2) & tm.unsqueeze(1))] == 0).all())


def test_ipot_is_within_one_percent_of_exact_emd():
    g = torch.Generator().manual_seed(0)
    cost = cosine_cost(torch.randn(8, 40, 16, generator=g), torch.randn(8, 12, 16, generator=g))
    ipot = transport_cost(transport_plan(cost), cost)
    exact = torch.stack(
        [
            (
                torch.from_numpy(
                    ot.emd(np.full(40, 1 / 40), np.full(12, 1 / 12), c.double().numpy())
                )
                * c.double()
            ).sum()
            for c in cost
        ]
    ).float()
    assert float(((ipot - exact) / exact).abs().mean()) < 0.01
    torch.testing.assert_close(transport_cost(transport_plan(cost, method="emd"), cost), exact)


def test_torch_sinkhorn_matches_pot_sinkhorn():
    cost, sm, tm = random_problem(b=2)
    ours = transport_plan(cost, sm, tm, method="sinkhorn", reg=0.5, n_iter=2000)
    pot = transport_plan(cost, sm, tm, method="pot_sinkhorn", reg=0.5, n_iter=2000)
    torch.testing.assert_close(ours, pot, atol=1e-7, rtol=1e-5)


@SETTINGS
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(1, 6),
    m=st.integers(1, 5),
    extra=st.integers(1, 3),
    method=st.sampled_from(["ipot", "sinkhorn", "emd"]),
)
def test_padding_never_changes_the_plan(seed, n, m, extra, method):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(2, n, m, generator=g, dtype=torch.float64) * 2
    base = transport_plan(cost, method=method, n_iter=20)
    padded = torch.cat([cost, torch.randn(2, extra, m, generator=g, dtype=torch.float64) * 1e3], 1)
    padded = torch.cat(
        [padded, torch.randn(2, n + extra, extra, generator=g, dtype=torch.float64) * 1e3], 2
    )
    sm = torch.arange(n + extra) < n
    tm = torch.arange(m + extra) < m
    out = transport_plan(padded, sm.expand(2, -1), tm.expand(2, -1), method=method, n_iter=20)
    torch.testing.assert_close(out[:, :n, :m], base)
    assert bool((out[:, n:] == 0).all()) and bool((out[:, :, m:] == 0).all())


@SETTINGS
@given(seed=st.integers(0, 10**6), n=st.integers(1, 6), m=st.integers(1, 5))
def test_permutation_equivariance_and_bounds(seed, n, m):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(1, n, m, generator=g, dtype=torch.float64) * 2
    p, q = torch.randperm(n, generator=g), torch.randperm(m, generator=g)
    plan = transport_plan(cost)
    torch.testing.assert_close(transport_plan(cost[:, p][:, :, q]), plan[:, p][:, :, q])
    assert bool((plan >= 0).all()) and float(plan.sum()) == pytest.approx(1.0, abs=1e-9)


def test_empty_side_gives_zero_plan_and_no_denormals():
    cost = torch.rand(2, 4, 3)
    sm = torch.tensor([[True] * 4, [False] * 4])
    plan = transport_plan(cost, sm, None, n_iter=300)
    assert bool((plan[1] == 0).all()) and bool(torch.isfinite(plan).all())
    nonzero = plan[plan > 0]
    assert bool((nonzero >= flush_threshold(torch.float32)).all())


def test_one_word_caption():
    cost = torch.rand(1, 5, 1)
    plan = transport_plan(cost)
    torch.testing.assert_close(plan, torch.full((1, 5, 1), 0.2))


def test_cosine_cost_matches_loop():
    x, y = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    c = cosine_cost(x, y)
    for k in range(2):
        for i in range(3):
            for j in range(5):
                want = 1 - float(x[k, i] @ y[k, j]) / float(x[k, i].norm() * y[k, j].norm())
                assert float(c[k, i, j]) == pytest.approx(want)


def test_bad_inputs():
    cost = torch.rand(2, 3, 4)
    with pytest.raises(TypeError, match="cost must be a"):
        transport_plan(cost.numpy())
    with pytest.raises(ValueError, match=r"shape \(B, N, M\)"):
        transport_plan(cost[0])
    with pytest.raises(TypeError, match="floating point"):
        transport_plan(cost.long())
    with pytest.raises(ValueError, match="Did you mean 'ipot'"):
        transport_plan(cost, method="ipott")
    with pytest.raises(ValueError, match="n_iter must be a positive integer"):
        transport_plan(cost, n_iter=0)
    with pytest.raises(ValueError, match="beta must be a finite number"):
        transport_plan(cost, beta=0.0)
    with pytest.raises(TypeError, match="source_mask must be a bool tensor"):
        transport_plan(cost, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"target_mask must have shape \(2, 4\)"):
        transport_plan(cost, None, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="cosine_cost: expected"):
        cosine_cost(torch.rand(2, 3, 4), torch.rand(3, 3, 4))
    assert sorted(TRANSPORT_METHODS) == ["emd", "ipot", "pot_sinkhorn", "sinkhorn"]
