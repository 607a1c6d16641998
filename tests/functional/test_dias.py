import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.functional import (
    dimension_alignment_loss,
    dimension_correlation,
    sparse_correlation_mask,
    spatial_constraint_loss,
    spatial_differences,
    word_region_pairs,
)
from imtm.functional.dias import VARIANCE_EPS

SETTINGS = settings(max_examples=20, deadline=None)


def embeddings(b=6, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=dtype), torch.randn(b, d, generator=g, dtype=dtype)


# ---------------------------------------------------------------------- plain-loop references
def loop_correlation(v, t, correlation="cosine"):
    """Eq. 4: cosine (or Pearson: centred) of image dimension k with text dimension l over the batch."""
    b, d = v.shape
    out = torch.empty(d, d, dtype=torch.float64)
    for k in range(d):
        a = [float(v[n, k]) for n in range(b)]
        ma = sum(a) / b if correlation == "pearson" else 0.0
        sa = math.sqrt(sum((x - ma) ** 2 for x in a) / b + VARIANCE_EPS)
        for l in range(d):
            c = [float(t[n, l]) for n in range(b)]
            mc = sum(c) / b if correlation == "pearson" else 0.0
            sc = math.sqrt(sum((x - mc) ** 2 for x in c) / b + VARIANCE_EPS)
            out[k, l] = sum((x - ma) * (y - mc) for x, y in zip(a, c)) / b / (sa * sc)
    return out


def loop_dimension_loss(v, t, tau=0.1, correlation="cosine"):
    """Eq. 6 with c_ij = exp(C_ij / tau): minus the diagonal's share of its row and of its column."""
    C = loop_correlation(v, t, correlation)
    d = C.shape[0]
    c = [[math.exp(float(C[i, j]) / tau) for j in range(d)] for i in range(d)]
    return -sum(
        c[i][i] / sum(c[i][j] for j in range(d)) + c[i][i] / sum(c[j][i] for j in range(d))
        for i in range(d)
    )


def loop_intuitive_loss(v, t, lam, correlation="cosine"):
    """Eq. 5: each C_ii to 1, each C_ij (j != i) to 0, in squares."""
    C = loop_correlation(v, t, correlation)
    d = C.shape[0]
    return sum(
        (1 - float(C[i, i])) ** 2 + lam * sum(float(C[i, j]) ** 2 for j in range(d) if j != i)
        for i in range(d)
    )


def cosine_distance(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return 1 - dot / max(math.sqrt(sum(x * x for x in a)), 1e-8) / max(
        math.sqrt(sum(y * y for y in b)), 1e-8
    )


def loop_differences(v, t, kind):
    b = v.shape[0]
    V, T = v.tolist(), t.tolist()
    out = torch.empty(b, b, dtype=torch.float64)
    for i in range(b):
        for j in range(b):
            if kind == "inter":  # Eq. 7: x_ij - x_ji
                out[i, j] = cosine_distance(V[i], T[j]) - cosine_distance(V[j], T[i])
            else:  # Eq. 9: y_ij - z_ij
                out[i, j] = cosine_distance(V[i], V[j]) - cosine_distance(T[i], T[j])
    return out


def loop_mask(diff, beta, temperature, rule="intent", ids=None):
    """Eq. 11-14 with the statistics of p over the unmatched pairs and the sigmoid relaxation.

    ``rule="intent"`` compares p_ij with kappa; ``"printed"`` compares |d_ij| (Eq. 14 as printed).
    ``beta`` is a number or a list (one per instance); ``ids`` the image of each row (None: all distinct).
    """
    b = diff.shape[0]
    ids = list(range(b)) if ids is None else list(ids)
    betas = [beta] * b if isinstance(beta, (int, float)) else list(beta)
    unmatched = [[ids[i] != ids[j] for j in range(b)] for i in range(b)]
    p = [[1 / (1 + math.exp(abs(float(diff[i, j])))) for j in range(b)] for i in range(b)]
    a = p if rule == "intent" else [[abs(float(diff[i, j])) for j in range(b)] for i in range(b)]

    def stats(values):
        if not values:
            return 0.0, math.sqrt(VARIANCE_EPS)
        m = sum(values) / len(values)
        return m, math.sqrt(sum((x - m) ** 2 for x in values) / len(values) + VARIANCE_EPS)

    rows = [stats([p[i][j] for j in range(b) if unmatched[i][j]]) for i in range(b)]
    cols = [stats([p[i][j] for i in range(b) if unmatched[i][j]]) for j in range(b)]
    out = torch.zeros(b, b, dtype=torch.float64)
    for i in range(b):
        for j in range(b):
            if not unmatched[i][j]:
                continue
            z = min(
                (a[i][j] - rows[i][0]) / rows[i][1] - betas[i],
                (a[i][j] - cols[j][0]) / cols[j][1] - betas[j],
            )
            out[i, j] = 1 / (1 + math.exp(-z / temperature))
    return out


def loop_spatial_loss(v, t, kind, sparse, beta=0.0, temperature=0.1, rule="intent", ids=None):
    diff = loop_differences(v, t, kind)
    b = diff.shape[0]
    ids = list(range(b)) if ids is None else list(ids)
    if sparse:
        w = loop_mask(diff, beta, temperature, rule, ids)
    else:
        w = torch.tensor(
            [[float(ids[i] != ids[j]) for j in range(b)] for i in range(b)], dtype=torch.float64
        )
    return sum(float(w[i, j]) * float(diff[i, j]) ** 2 for i in range(b) for j in range(b))


# ---------------------------------------------------------------------- against the loops
@pytest.mark.parametrize("correlation", ["cosine", "pearson"])
def test_dimension_correlation_and_loss_match_the_loop(correlation):
    v, t = embeddings()
    v = v + 0.7  # non-zero column means: cosine and Pearson differ
    torch.testing.assert_close(
        dimension_correlation(v, t, correlation=correlation), loop_correlation(v, t, correlation)
    )
    torch.testing.assert_close(
        dimension_alignment_loss(v, t, correlation=correlation),
        torch.tensor(loop_dimension_loss(v, t, correlation=correlation), dtype=torch.float64),
    )
    torch.testing.assert_close(
        dimension_alignment_loss(v, t, temperature=0.5, reduction="mean", correlation=correlation),
        torch.tensor(loop_dimension_loss(v, t, 0.5, correlation) / v.shape[1], dtype=torch.float64),
    )
    for lam, expect_lam in ((None, 1 / (v.shape[1] - 1)), (0.3, 0.3)):
        torch.testing.assert_close(
            dimension_alignment_loss(
                v, t, objective="intuitive", off_diagonal_weight=lam, correlation=correlation
            ),
            torch.tensor(loop_intuitive_loss(v, t, expect_lam, correlation), dtype=torch.float64),
        )


def test_cosine_is_the_default_correlation_and_differs_from_pearson():
    v, t = embeddings(b=16, d=4, seed=11)
    v, t = v + 2.0, t - 1.0
    torch.testing.assert_close(
        dimension_correlation(v, t), dimension_correlation(v, t, correlation="cosine")
    )
    assert (
        float(
            (dimension_correlation(v, t) - dimension_correlation(v, t, correlation="pearson"))
            .abs()
            .max()
        )
        > 0.1
    )
    # Centred columns: the two coincide.
    vc, tc = v - v.mean(0), t - t.mean(0)
    torch.testing.assert_close(
        dimension_correlation(vc, tc), dimension_correlation(vc, tc, correlation="pearson")
    )


def test_intuitive_objective_is_zero_exactly_at_the_identity():
    d = 5
    x = torch.randn(64, d, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    q, _ = torch.linalg.qr(x)  # orthonormal columns: cosine correlation C = I
    v = q * 8.0
    assert float(dimension_alignment_loss(v, v, objective="intuitive")) == pytest.approx(
        0, abs=1e-6
    )
    mix = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    assert float(dimension_alignment_loss(v, v @ mix, objective="intuitive")) > 0.1


@pytest.mark.parametrize("kind", ["inter", "intra"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("rule", ["intent", "printed"])
def test_spatial_loss_matches_the_loop(kind, sparse, rule):
    v, t = embeddings(b=5, d=4, seed=1)
    torch.testing.assert_close(spatial_differences(v, t, kind=kind), loop_differences(v, t, kind))
    got = spatial_constraint_loss(
        v, t, kind=kind, sparse=sparse, beta=0.3, temperature=0.2, rule=rule
    )
    torch.testing.assert_close(
        got,
        torch.tensor(loop_spatial_loss(v, t, kind, sparse, 0.3, 0.2, rule), dtype=torch.float64),
    )
    mean = spatial_constraint_loss(
        v, t, kind=kind, sparse=sparse, beta=0.3, temperature=0.2, reduction="mean", rule=rule
    )
    torch.testing.assert_close(mean, got / 20)


@pytest.mark.parametrize("kind", ["inter", "intra"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("rule", ["intent", "printed"])
def test_captions_of_one_image_are_not_unmatched_pairs(kind, sparse, rule):
    # A training batch: rows 0, 1, 2 are the image of captions 0, 1, 2 and rows 0 and 2 are one image.
    ids = [4, 7, 4, 9, 1, 7]
    v, t = embeddings(b=6, d=4, seed=14)
    v = v[torch.tensor([0, 1, 0, 3, 4, 1])]  # repeated image rows
    pos = torch.tensor(ids)[:, None] == torch.tensor(ids)[None, :]
    got = spatial_constraint_loss(
        v, t, kind=kind, sparse=sparse, beta=0.2, temperature=0.3, rule=rule, positives=pos
    )
    ref = loop_spatial_loss(v, t, kind, sparse, 0.2, 0.3, rule, ids)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64))
    mean = spatial_constraint_loss(
        v,
        t,
        kind=kind,
        sparse=sparse,
        beta=0.2,
        temperature=0.3,
        rule=rule,
        positives=pos,
        reduction="mean",
    )
    torch.testing.assert_close(mean, got / int((~pos).sum()))
    # Without positives the two captions of image 4 count as an unmatched pair: a different loss.
    without = spatial_constraint_loss(
        v, t, kind=kind, sparse=sparse, beta=0.2, temperature=0.3, rule=rule
    )
    assert float((without - got).abs()) > 1e-6


@pytest.mark.parametrize("rule", ["intent", "printed"])
def test_sparse_mask_matches_the_loop_and_the_hard_limit(rule):
    v, t = embeddings(b=6, d=4, seed=2)
    diff = spatial_differences(v, t, kind="inter")
    torch.testing.assert_close(
        sparse_correlation_mask(diff, 0.4, temperature=0.3, rule=rule),
        loop_mask(diff, 0.4, 0.3, rule),
    )
    # T -> 0 is the hard rule, kappa = mu + beta theta from the statistics of p (Eq. 12-13): "intent" keeps
    # (i, j) when p_ij > max(kappa_i^V, kappa_j^T); "printed" (Eq. 14) when |x_ij - x_ji| > max(kappa_i^V, kappa_j^T).
    p = torch.sigmoid(-diff.abs())
    compared = p if rule == "intent" else diff.abs()
    off = ~torch.eye(6, dtype=torch.bool)
    hard = torch.zeros(6, 6, dtype=torch.bool)
    for i in range(6):
        for j in range(6):
            if i != j:
                row = p[i][off[i]]
                col = p[:, j][off[:, j]]
                k_row = row.mean() + 0.4 * (row.var(unbiased=False) + VARIANCE_EPS).sqrt()
                k_col = col.mean() + 0.4 * (col.var(unbiased=False) + VARIANCE_EPS).sqrt()
                hard[i, j] = compared[i, j] > max(k_row, k_col)
    assert torch.equal(sparse_correlation_mask(diff, 0.4, temperature=1e-6, rule=rule) > 0.5, hard)


def test_per_instance_beta_matches_the_loop_and_a_constant_vector_is_the_scalar():
    v, t = embeddings(b=5, d=4, seed=15)
    diff = spatial_differences(v, t, kind="intra")
    betas = [0.1, -0.3, 0.5, 0.0, 0.2]
    for rule in ("intent", "printed"):
        got = sparse_correlation_mask(
            diff, torch.tensor(betas, dtype=torch.float64), temperature=0.2, rule=rule
        )
        torch.testing.assert_close(got, loop_mask(diff, betas, 0.2, rule))
        torch.testing.assert_close(
            sparse_correlation_mask(diff, torch.full((5,), 0.25, dtype=torch.float64), rule=rule),
            sparse_correlation_mask(diff, 0.25, rule=rule),
        )


def test_the_two_readings_select_disjoint_pairs_on_random_inputs():
    v, t = embeddings(b=32, d=16, seed=16)
    diff = spatial_differences(v, t, kind="inter")
    intent = sparse_correlation_mask(diff, 0.0, temperature=1e-6, rule="intent") > 0.5
    printed = sparse_correlation_mask(diff, 0.0, temperature=1e-6, rule="printed") > 0.5
    assert int(intent.sum()) > 0 and int(printed.sum()) > 0
    # Small asymmetries (large p) against large ones: no pair is kept by both.
    assert int((intent & printed).sum()) == 0


def test_gradients_match_the_loop():
    v, t = embeddings(b=4, d=3, seed=3)
    for fn in (
        lambda a, b: dimension_alignment_loss(a, b),
        lambda a, b: spatial_constraint_loss(a, b, kind="inter", sparse=False),
        lambda a, b: spatial_constraint_loss(a, b, kind="intra", sparse=False),
    ):
        assert torch.autograd.gradcheck(
            fn, (v.clone().requires_grad_(), t.clone().requires_grad_())
        )
    # The mask takes no gradient from the embeddings: the sparse loss's gradient is the masked plain one.
    a, b = v.clone().requires_grad_(), t.clone().requires_grad_()
    spatial_constraint_loss(a, b, kind="inter", beta=0.2).backward()
    w = sparse_correlation_mask(spatial_differences(v, t), 0.2)
    a2, b2 = v.clone().requires_grad_(), t.clone().requires_grad_()
    (w * spatial_differences(a2, b2).square()).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_beta_receives_a_gradient():
    v, t = embeddings(b=8, d=6, seed=4)
    for kind in ("inter", "intra"):
        beta = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        spatial_constraint_loss(v, t, kind=kind, beta=beta).backward()
        assert (
            beta.grad is not None and torch.isfinite(beta.grad) and float(beta.grad) < 0
        )  # masking more lowers it


# ---------------------------------------------------------------------- minima and zeros
def test_identical_modalities_give_zero_spatial_losses():
    v, _ = embeddings(b=7, d=5, seed=5)
    for kind in ("inter", "intra"):
        for sparse in (False, True):
            assert float(
                spatial_constraint_loss(v, v.clone(), kind=kind, sparse=sparse)
            ) == pytest.approx(0, abs=1e-12)
            assert float(
                spatial_constraint_loss(
                    v, v.clone(), kind=kind, distance="euclidean", sparse=sparse
                )
            ) == pytest.approx(0, abs=1e-12)


def test_diagonal_correlation_minimises_dimension_loss():
    d, tau = 6, 0.1
    # Whitened, decorrelated dimensions shared by both modalities: C = I exactly.
    x = torch.randn(64, d, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    q, _ = torch.linalg.qr(x - x.mean(0))  # orthonormal columns with zero mean
    v = q * 8.0
    torch.testing.assert_close(
        dimension_correlation(v, v), torch.eye(d, dtype=torch.float64), atol=1e-4, rtol=0
    )
    best = dimension_alignment_loss(v, v, temperature=tau)
    share = math.exp(1 / tau) / (math.exp(1 / tau) + d - 1)
    torch.testing.assert_close(
        best, torch.tensor(-2 * d * share, dtype=torch.float64), atol=1e-4, rtol=0
    )
    assert float(best) < -2 * d + 2 * d * (d - 1) * math.exp(-1 / tau)  # near the bound -2D
    g = torch.Generator().manual_seed(7)
    for _ in range(5):  # any other pairing of the dimensions, or mixing them, scores worse
        mix = torch.randn(d, d, dtype=torch.float64, generator=g)
        assert float(dimension_alignment_loss(v, v @ mix, temperature=tau)) > float(best)
        assert (
            float(
                dimension_alignment_loss(v, v[:, torch.randperm(d, generator=g)], temperature=tau)
            )
            >= float(best) - 1e-9
        )


# ---------------------------------------------------------------------- finiteness at the edges
@pytest.mark.parametrize(
    "case",
    [
        "batch of 2",
        "identical rows",
        "zero-variance dimension",
        "identical modalities",
        "zero vectors",
    ],
)
def test_finite_values_and_gradients_at_the_edges(case):
    v, t = embeddings(b=5, d=4, seed=8)
    if case == "batch of 2":
        v, t = v[:2], t[:2]
    elif case == "identical rows":
        v, t = v[:1].expand(5, 4).clone(), t[:1].expand(5, 4).clone()
    elif case == "zero-variance dimension":
        v[:, 1] = 3.0
        t[:, 2] = 0.0
    elif case == "identical modalities":
        t = v.clone()
    else:
        v, t = torch.zeros(5, 4, dtype=torch.float64), torch.zeros(5, 4, dtype=torch.float64)
    for fn in (
        lambda a, b, beta: dimension_alignment_loss(a, b),
        lambda a, b, beta: spatial_constraint_loss(a, b, kind="inter", beta=beta),
        lambda a, b, beta: spatial_constraint_loss(a, b, kind="intra", beta=beta),
        lambda a, b, beta: spatial_constraint_loss(
            a, b, kind="intra", distance="euclidean", beta=beta
        ),
    ):
        a, b = v.clone().requires_grad_(), t.clone().requires_grad_()
        beta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        out = fn(a, b, beta)
        out.backward()
        assert torch.isfinite(out)
        for grad in (a.grad, b.grad, beta.grad):
            assert grad is None or bool(torch.isfinite(grad).all())


# ---------------------------------------------------------------------- properties
@SETTINGS
@given(
    b=st.integers(2, 7),
    d=st.integers(2, 5),
    seed=st.integers(0, 2**16),
    tau=st.sampled_from([0.05, 0.1, 1.0]),
)
def test_dimension_loss_bounds_and_pair_permutation(b, d, seed, tau):
    v, t = embeddings(b, d, seed)
    loss = dimension_alignment_loss(v, t, temperature=tau)
    assert (
        -2 * d <= float(loss) < 0
    )  # a batch of 2 has correlations of exactly +-1: shares can round to 1
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    # Reordering the pairs (rows of both sides together) changes nothing.
    torch.testing.assert_close(dimension_alignment_loss(v[perm], t[perm], temperature=tau), loss)
    # Renaming the dimensions on both sides the same way permutes C's rows and columns together.
    dims = torch.randperm(d, generator=torch.Generator().manual_seed(seed + 1))
    torch.testing.assert_close(
        dimension_alignment_loss(v[:, dims], t[:, dims], temperature=tau), loss
    )


@SETTINGS
@given(
    b=st.integers(2, 7),
    d=st.integers(2, 5),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["inter", "intra"]),
    sparse=st.booleans(),
    beta=st.floats(-1, 1),
    rule=st.sampled_from(["intent", "printed"]),
    n_images=st.integers(1, 7),
)
def test_spatial_loss_is_pair_permutation_invariant_and_nonnegative(
    b, d, seed, kind, sparse, beta, rule, n_images
):
    v, t = embeddings(b, d, seed)
    ids = torch.arange(b) % n_images
    pos = ids[:, None] == ids[None, :]
    kw = {"kind": kind, "sparse": sparse, "beta": beta, "rule": rule, "positives": pos}
    loss = spatial_constraint_loss(v, t, **kw)
    assert float(loss) >= 0
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(
        spatial_constraint_loss(v[perm], t[perm], **{**kw, "positives": pos[perm][:, perm]}), loss
    )
    diff = spatial_differences(v, t, kind=kind)
    mask = sparse_correlation_mask(diff, beta, rule=rule, positives=pos)
    assert bool(((mask >= 0) & (mask <= 1)).all()) and bool((mask[pos] == 0).all())
    torch.testing.assert_close(
        sparse_correlation_mask(diff[perm][:, perm], beta, rule=rule, positives=pos[perm][:, perm]),
        mask[perm][:, perm],
    )
    # The cosine distance is scale-free: rescaling a side's vectors changes nothing.
    torch.testing.assert_close(spatial_constraint_loss(3 * v, 0.5 * t, **kw), loss)


@SETTINGS
@given(
    b=st.integers(2, 7),
    d=st.integers(2, 5),
    seed=st.integers(0, 2**16),
    correlation=st.sampled_from(["cosine", "pearson"]),
)
def test_intuitive_objective_is_nonnegative_and_pair_permutation_invariant(b, d, seed, correlation):
    v, t = embeddings(b, d, seed)
    loss = dimension_alignment_loss(v, t, objective="intuitive", correlation=correlation)
    assert float(loss) >= 0
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(
        dimension_alignment_loss(v[perm], t[perm], objective="intuitive", correlation=correlation),
        loss,
    )
    C = dimension_correlation(v, t, correlation=correlation)
    assert bool((C.abs() <= 1 + 1e-9).all())


@SETTINGS
@given(seed=st.integers(0, 2**16), extra=st.integers(1, 3))
def test_word_region_pairs_padding_changes_nothing(seed, extra):
    g = torch.Generator().manual_seed(seed)
    v, t = torch.randn(3, 4, 5, generator=g), torch.randn(3, 3, 5, generator=g)
    vm = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    tm = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]]).bool()
    regions, words = word_region_pairs(v, t, vm, tm)
    vp = torch.cat([v, 1e3 * torch.randn(3, extra, 5, generator=g)], 1)
    vmp = torch.cat([vm, torch.zeros(3, extra, dtype=torch.bool)], 1)
    tp = torch.cat([t, 1e3 * torch.randn(3, extra, 5, generator=g)], 1)
    tmp = torch.cat([tm, torch.zeros(3, extra, dtype=torch.bool)], 1)
    r2, w2 = word_region_pairs(vp, tp, vmp, tmp)
    torch.testing.assert_close(r2, regions)
    torch.testing.assert_close(w2, words)


def test_word_region_pairs_match_the_loop():
    g = torch.Generator().manual_seed(9)
    v, t = torch.randn(2, 4, 3, generator=g), torch.randn(2, 3, 3, generator=g)
    vm = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    tm = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    regions, words = word_region_pairs(v, t, vm, tm)
    expect_r, expect_w = [], []
    for b in range(2):
        for m in range(3):
            if tm[b, m]:
                sims = [
                    1 - cosine_distance(v[b, n].tolist(), t[b, m].tolist())
                    if vm[b, n]
                    else -math.inf
                    for n in range(4)
                ]
                expect_r.append(v[b, max(range(4), key=lambda n: sims[n])])
                expect_w.append(t[b, m])
    torch.testing.assert_close(regions, torch.stack(expect_r))
    torch.testing.assert_close(words, torch.stack(expect_w))
    assert torch.isfinite(dimension_alignment_loss(regions, words))


# ---------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda v, t: dimension_alignment_loss(v.numpy(), t),
            TypeError,
            "image_embedding must be a",
        ),
        (
            lambda v, t: dimension_alignment_loss(v[None], t),
            ValueError,
            r"must have shape \(B, D\)",
        ),
        (lambda v, t: dimension_alignment_loss(v.long(), t), TypeError, "must be floating point"),
        (lambda v, t: dimension_alignment_loss(v, t[:3]), ValueError, "must have the same shape"),
        (lambda v, t: dimension_alignment_loss(v[:1], t[:1]), ValueError, "at least 2 pairs"),
        (lambda v, t: dimension_alignment_loss(v, t.to("meta")), ValueError, "is on"),
        (lambda v, t: dimension_alignment_loss(v * float("nan"), t), ValueError, "NaN or inf"),
        (
            lambda v, t: dimension_alignment_loss(v, t, temperature=0),
            ValueError,
            "temperature must be a finite number > 0",
        ),
        (
            lambda v, t: dimension_alignment_loss(v, t, temperature="hot"),
            TypeError,
            "temperature must be a positive number",
        ),
        (
            lambda v, t: dimension_alignment_loss(v, t, reduction="avg"),
            ValueError,
            "reduction must be one of",
        ),
        (
            lambda v, t: spatial_constraint_loss(v, t, kind="inner"),
            ValueError,
            "Did you mean 'inter'",
        ),
        (
            lambda v, t: spatial_constraint_loss(v, t, distance="cos"),
            ValueError,
            "distance must be one of",
        ),
        (
            lambda v, t: spatial_constraint_loss(v, t, sparse=1),
            TypeError,
            "sparse must be True or False",
        ),
        (
            lambda v, t: spatial_constraint_loss(v, t, beta=float("inf")),
            ValueError,
            "beta must be a finite number",
        ),
        (
            lambda v, t: spatial_constraint_loss(v, t, sparse=False, beta="x"),
            ValueError,
            "beta must be a finite number",
        ),
        (
            lambda v, t: spatial_constraint_loss(v, t, beta=torch.zeros(2)),
            ValueError,
            "one-element floating tensor",
        ),
        (
            lambda v, t: sparse_correlation_mask(torch.zeros(3, 3, dtype=torch.long)),
            TypeError,
            "floating",
        ),
        (
            lambda v, t: sparse_correlation_mask(torch.zeros(3, 4)),
            ValueError,
            r"shape \(B, B\) with B >= 2",
        ),
        (
            lambda v, t: sparse_correlation_mask(torch.zeros(3, 3), temperature=-1.0),
            ValueError,
            "temperature",
        ),
        (
            lambda v, t: sparse_correlation_mask(torch.zeros(3, 3), rule="print"),
            ValueError,
            "Did you mean 'printed'",
        ),
        (
            lambda v, t: sparse_correlation_mask(torch.zeros(3, 3), beta=torch.zeros(4)),
            ValueError,
            r"\(B,\) tensor",
        ),
        (
            lambda v, t: sparse_correlation_mask(torch.zeros(3, 3), positives=torch.eye(3)),
            ValueError,
            "positives must be a bool",
        ),
        (
            lambda v, t: spatial_constraint_loss(v, t, positives=torch.eye(3, dtype=torch.bool)),
            ValueError,
            r"\(B, B\) tensor with B = 4",
        ),
        (
            lambda v, t: spatial_constraint_loss(v, t, sparse=False, rule="x"),
            ValueError,
            "rule must be one of",
        ),
        (
            lambda v, t: dimension_alignment_loss(v, t, correlation="pearsn"),
            ValueError,
            "Did you mean 'pearson'",
        ),
        (
            lambda v, t: dimension_alignment_loss(v, t, objective="intuition"),
            ValueError,
            "objective must be one of",
        ),
        (
            lambda v, t: dimension_alignment_loss(
                v, t, objective="intuitive", off_diagonal_weight=-1.0
            ),
            ValueError,
            ">= 0",
        ),
        (
            lambda v, t: dimension_alignment_loss(v, t, off_diagonal_weight="big"),
            TypeError,
            "off_diagonal_weight",
        ),
        (lambda v, t: word_region_pairs(v, t), ValueError, r"floating \(B, N, D\) tensor"),
        (
            lambda v, t: word_region_pairs(v[None].expand(2, 4, 3), t[None]),
            ValueError,
            "same batch size",
        ),
        (
            lambda v, t: word_region_pairs(v[None], t[None], image_mask=torch.ones(1, 4)),
            ValueError,
            "bool tensor of shape",
        ),
        (
            lambda v, t: word_region_pairs(
                v[None], t[None], image_mask=torch.zeros(1, 4, dtype=torch.bool)
            ),
            ValueError,
            "no real region",
        ),
    ],
)
def test_bad_inputs(call, error, match):
    v, t = embeddings(b=4, d=3, dtype=torch.float32)
    with pytest.raises(error, match=match):
        call(v, t)
