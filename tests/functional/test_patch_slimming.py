import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from imtm.functional import (
    aggregation_weights,
    fusion_weights,
    gumbel_keep_decisions,
    ratio_loss,
    slimmed_cosines,
    top_keep_decisions,
)
from imtm.functional.patch_slimming import (
    SIGNIFICANCE_EPS,
    aggregate_tokens,
    combine_significance,
    logistic_noise,
    minmax_normalize,
    num_kept,
    self_attentive_scores,
    text_attentive_scores,
)

SETTINGS = settings(max_examples=20, deadline=None)


def loop_norm(values):
    lo, hi = min(values), max(values)
    return [(x - lo) / (hi - lo) if hi > lo else 0.0 * x for x in values]


# ---------------------------------------------------------------------------- Eq. 1-3
def test_significance_parts_equal_the_loop():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    pm = torch.tensor([[True] * 5, [True, True, True, False, False]])
    ctx = torch.randn(3, 4, generator=g, dtype=torch.float64)
    a_s, a_r = self_attentive_scores(v, pm), text_attentive_scores(v, ctx, pm)
    for i in range(2):
        real = [v[i, n] for n in range(5) if pm[i, n]]
        glo = sum(real) / len(real)
        want = loop_norm([torch.dot(x, glo) / 4 for x in real])
        torch.testing.assert_close(a_s[i, : len(real)], torch.stack(want))
        assert bool((a_s[i, len(real) :] == 0).all())
        for t in range(3):
            want = loop_norm([torch.dot(x, ctx[t]) / 4 for x in real])
            torch.testing.assert_close(a_r[i, : len(real), t], torch.stack(want))
    pred = torch.rand(2, 5, 1, dtype=torch.float64)
    a = combine_significance(pred, a_s.unsqueeze(-1), a_r, beta=0.8)
    torch.testing.assert_close(a, 0.2 * pred + 0.4 * (a_s.unsqueeze(-1) + a_r))
    # one score left out: the other takes the whole weight beta
    torch.testing.assert_close(
        combine_significance(pred, None, a_r, beta=0.8), 0.2 * pred + 0.8 * a_r
    )


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6))
def test_minmax_bounds_and_constant_rows(seed, n):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(seed))
    y = minmax_normalize(x)
    assert bool(((y >= 0) & (y <= 1)).all())
    if n > 1:
        torch.testing.assert_close(y.amax(-1), torch.ones(3))
    torch.testing.assert_close(minmax_normalize(torch.full((2, n), 3.0)), torch.zeros(2, n))


# ---------------------------------------------------------------------------- Eq. 4-5
def test_gumbel_decisions_are_exact_and_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    noise = logistic_noise(a.shape, generator=g, dtype=torch.float64)
    d = gumbel_keep_decisions(a, tau=0.5, noise=noise)
    assert set(d.detach().unique().tolist()) <= {0.0, 1.0}
    # plain two-class Gumbel-softmax of (log a, log(1 - a)), one element at a time
    for idx in range(a.numel()):
        ai, ni = float(a.detach().flatten()[idx]), float(noise.flatten()[idx])
        keep, drop = math.log(ai) + ni, math.log(1 - ai)
        assert d.flatten()[idx].item() == float(keep > drop)
    soft = torch.sigmoid((torch.log(a) - torch.log1p(-a) + noise) / 0.5)
    w = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(
        torch.autograd.grad((d * w).sum(), a)[0], torch.autograd.grad((soft * w).sum(), a)[0]
    )
    torch.testing.assert_close(gumbel_keep_decisions(a, tau=0.5, hard=False, noise=noise), soft)


def test_gumbel_generator_reproducible_and_rate_matches_the_score():
    a = torch.tensor([0.1, 0.5, 0.9]).expand(20000, 3).contiguous()
    d1 = gumbel_keep_decisions(a, generator=torch.Generator().manual_seed(3))
    d2 = gumbel_keep_decisions(a, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(d1, d2, rtol=0, atol=0)
    # P(keep) of the Gumbel-max trick is a itself
    torch.testing.assert_close(d1.mean(0), torch.tensor([0.1, 0.5, 0.9]), rtol=0, atol=0.015)


def test_gumbel_scores_at_zero_and_one_give_no_nan():
    a = torch.tensor([0.0, 1.0, 0.0, 1.0], requires_grad=True)
    d = gumbel_keep_decisions(a, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(d.sum(), a)
    assert bool(torch.isfinite(d).all()) and bool(torch.isfinite(grad).all())
    # the clamp keeps exactly-0 scores from ever being kept in practice, and exactly-1 from being dropped
    many = gumbel_keep_decisions(
        torch.tensor([0.0, 1.0]).expand(5000, 2), generator=torch.Generator().manual_seed(1)
    )
    assert many[:, 0].sum() <= 5000 * SIGNIFICANCE_EPS * 10 and many[:, 1].sum() >= 5000 * (
        1 - SIGNIFICANCE_EPS * 10
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hard", [True, False])
def test_gumbel_half_precision_scores_are_clamped_as_in_float64(dtype, hard):
    # 1 - eps is 1 in bfloat16 / float16: the logits are computed in float32 at least, so a score of
    # 1 is clamped there too and strong noise can still drop it (and no gradient is NaN).
    a = torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=dtype, requires_grad=True)
    noise = torch.tensor([-20.0, 20.0, 0.25, 3.0])
    d = gumbel_keep_decisions(a, 0.5, hard=hard, noise=noise.to(dtype))
    want = gumbel_keep_decisions(a.detach().double(), 0.5, hard=hard, noise=noise.double())
    assert d.dtype == dtype
    torch.testing.assert_close(d.double(), want, atol=1e-2, rtol=0.0)
    if hard:
        assert d.tolist() == [0.0, 1.0, 1.0, 1.0]
    (grad,) = torch.autograd.grad(d.float().sum(), a)
    assert bool(torch.isfinite(grad).all())


def test_gumbel_mask_and_bad_inputs():
    a = torch.full((2, 3), 0.999)
    d = gumbel_keep_decisions(
        a, mask=torch.tensor([[True, False, True]]), generator=torch.Generator().manual_seed(0)
    )
    assert bool((d[:, 1] == 0).all())
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        gumbel_keep_decisions(a, tau=0.0)
    with pytest.raises(ValueError, match=r"eps must lie in \(0, 0.5\)"):
        gumbel_keep_decisions(a, eps=0.7)
    with pytest.raises(ValueError, match="noise has shape"):
        gumbel_keep_decisions(a, noise=torch.zeros(3))
    with pytest.raises(TypeError, match="scores must be a floating tensor"):
        gumbel_keep_decisions(torch.ones(3, dtype=torch.long))


@SETTINGS
@given(seed=st.integers(0, 10_000), ratio=st.sampled_from([0.1, 0.3, 0.5, 0.7, 1.0]))
def test_top_keep_decisions_keep_exactly_ceil_rho_n(seed, ratio):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(3, 10, generator=g)
    lengths = torch.randint(1, 11, (3,), generator=g)
    mask = torch.arange(10)[None, :] < lengths[:, None]
    d = top_keep_decisions(scores, ratio, mask)
    for b in range(3):
        n = int(lengths[b])
        k = math.ceil(round(ratio * n, 9))
        assert int(d[b].sum()) == k and bool((d[b, n:] == 0).all())
        kept = set(torch.nonzero(d[b]).flatten().tolist())
        order = sorted(range(n), key=lambda j: -float(scores[b, j]))
        assert kept == set(order[:k])


def test_num_kept_floating_point_edge():
    assert num_kept(torch.tensor([10, 196, 1, 3]), 0.7).tolist() == [7, 138, 1, 3]
    assert num_kept(torch.tensor([5]), 1.0).tolist() == [5]


# ---------------------------------------------------------------------------- Eq. 6-7
def test_aggregation_weights_equal_the_loop_and_sum_to_one_over_kept():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 3, generator=g, dtype=torch.float64) * 5
    dec = (torch.rand(2, 4, 6, generator=g) > 0.5).double()
    dec[0, 0] = 0  # a pair that keeps nothing
    W = aggregation_weights(logits, dec)
    for i in range(2):
        for t in range(4):
            kept = [n for n in range(6) if dec[i, t, n] == 1]
            for j in range(3):
                if not kept:
                    assert bool((W[i, t, :, j] == 0).all())
                    continue
                z = sum(math.exp(float(logits[i, n, j])) for n in kept)
                for n in range(6):
                    want = math.exp(float(logits[i, n, j])) / z if n in kept else 0.0
                    assert abs(float(W[i, t, n, j]) - want) < 1e-12
                assert abs(float(W[i, t, :, j].sum()) - 1) < 1e-12


def test_aggregation_weights_stable_for_large_logits():
    logits = torch.tensor([[[1000.0], [0.0], [-1000.0]]])
    W = aggregation_weights(logits, torch.tensor([[[0.0, 1.0, 1.0]]]))
    torch.testing.assert_close(W[0, 0, :, 0], torch.tensor([0.0, 1.0, 0.0]))


def test_fusion_weights_equal_the_loop():
    a = torch.tensor([[0.9, 0.2, 0.4, 0.7, 0.1]], dtype=torch.float64)
    d = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, False]])
    w = fusion_weights(a, d, mask)
    z = math.exp(0.2) + math.exp(0.4)
    torch.testing.assert_close(
        w, torch.tensor([[0, math.exp(0.2) / z, math.exp(0.4) / z, 0, 0]], dtype=torch.float64)
    )
    assert bool(
        (fusion_weights(a, torch.ones_like(a)) == 0).all()
    )  # nothing dropped: no fused token


def test_slimmed_cosines_equal_built_tokens_forward_and_gradient():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = F.normalize(torch.randn(3, 4, 7, generator=g, dtype=torch.float64), dim=-1)
    W = torch.rand(2, 5, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    got = slimmed_cosines(torch.einsum("ind,tmd->intm", v, t), v @ v.transpose(1, 2), W)
    built = aggregate_tokens(v, W.permute(0, 2, 1, 3))  # (2, 3, 2, 7)
    want = torch.zeros(2, 3, 2, 4, dtype=torch.float64)
    for i in range(2):
        for c in range(3):
            for k in range(2):
                for m in range(4):
                    want[i, c, k, m] = F.cosine_similarity(built[i, c, k], t[c, m], dim=0)
    torch.testing.assert_close(got, want)
    w = torch.randn_like(want)
    for a, b in zip(
        torch.autograd.grad((got * w).sum(), (v, W)), torch.autograd.grad((want * w).sum(), (v, W))
    ):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- Eq. 10
def test_ratio_loss_equals_the_loop_and_masks():
    d = torch.tensor([[[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]])
    mask = torch.tensor([[[True, True, True, False]]])
    want = ((0.5 - 2 / 3) ** 2 + (0.5 - 0 / 3) ** 2) / 2
    torch.testing.assert_close(ratio_loss(d, 0.5, mask), torch.tensor(want))
    torch.testing.assert_close(
        ratio_loss(d, 0.5), torch.tensor(((0.5 - 0.75) ** 2 + (0.5 - 0.25) ** 2) / 2)
    )


def test_ratio_loss_bad_inputs():
    d = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"rho must be a number in \(0, 1\]"):
        ratio_loss(d, 1.5)
    with pytest.raises(TypeError, match="decisions must be a floating tensor"):
        ratio_loss(d.long(), 0.5)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        ratio_loss(d, 0.5, torch.ones(2, 3))
    with pytest.raises(ValueError, match="does not broadcast"):
        ratio_loss(d, 0.5, torch.ones(4, 3, dtype=torch.bool))


def test_zero_weights_give_cosine_zero_and_bounded_gradients():
    # All weights zero (a pair that keeps nothing): cosine 0, and gradients of the size of
    # the dot products, not of 1 / sqrt(tiny).
    from imtm.functional.patch_slimming import slimmed_cosines, weighted_cosine

    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 4, 8, generator=g)
    t = torch.nn.functional.normalize(torch.randn(3, 5, 8, generator=g), dim=-1)
    pw = torch.einsum("ind,tmd->intm", v, t)
    gram = v @ v.transpose(1, 2)
    for fn, shape in ((weighted_cosine, (2, 4, 3)), (slimmed_cosines, (2, 4, 3, 2))):
        w = torch.zeros(shape, requires_grad=True)
        out = fn(pw, gram, w)
        assert torch.equal(out, torch.zeros_like(out))
        out.sum().backward()
        assert bool(torch.isfinite(w.grad).all()) and float(w.grad.abs().max()) < 100


# ---------------------------------------------------------------------------- DPC-KNN (Table 4's clustering row)
def _loop_dpc_knn(x, keep, c, k):
    """DPC-KNN for one pair, point by point; returns {frozenset(members)} of the non-empty clusters."""
    idx = [n for n in range(x.shape[0]) if keep[n]]
    d = x.shape[1]
    dist = {
        (a, b): float(torch.linalg.vector_norm(x[a] - x[b])) / math.sqrt(d)
        for a in idx
        for b in idx
    }
    rho = {}
    for a in idx:
        near = sorted(dist[a, b] for b in idx)[: min(k, len(idx))]
        rho[a] = math.exp(-sum(v * v for v in near) / len(near)) - a * 1e-9
    delta = {}
    for a in idx:
        denser = [dist[a, b] for b in idx if rho[b] > rho[a]]
        delta[a] = min(denser) if denser else max(dist[a, b] for b in idx)
    centres = sorted(idx, key=lambda a: -rho[a] * delta[a])[:c]
    groups = {ce: set() for ce in centres}
    for a in idx:
        groups[min(centres, key=lambda ce: (dist[a, ce], centres.index(ce)))].add(a)
    return {frozenset(g) for g in groups.values() if g}


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10**6), c=st.integers(1, 4), k=st.integers(1, 6), extra=st.integers(0, 2)
)
def test_dpc_knn_matches_loop_and_ignores_padding(seed, c, k, extra):
    from imtm.functional.patch_slimming import dpc_knn_weights

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    dec = (torch.rand(2, 6, 3, generator=g) < 0.6).double()
    w, valid = dpc_knn_weights(x, dec, c, k=k)
    assert w.shape == (2, 6, 3, c) and valid.shape == (2, 3, c)
    for i in range(2):
        for t in range(3):
            got = {
                frozenset(int(n) for n in torch.nonzero(w[i, :, t, j]).flatten())
                for j in range(c)
                if valid[i, t, j]
            }
            assert got == _loop_dpc_knn(x[i], dec[i, :, t] > 0, c, k)
            for j in range(c):  # each cluster's weights are its mean
                members = w[i, :, t, j] > 0
                if members.any():
                    torch.testing.assert_close(
                        w[i, members, t, j].sum(), torch.tensor(1.0, dtype=torch.float64)
                    )
    # Padded patches (any values) change nothing.
    xp = torch.cat([x, torch.randn(2, extra, 3, generator=g, dtype=torch.float64) * 100], 1)
    dp = torch.cat([dec, torch.ones(2, extra, 3, dtype=torch.float64)], 1)
    mask = torch.arange(6 + extra)[None].expand(2, -1) < 6
    wp, vp = dpc_knn_weights(xp, dp, c, k=k, mask=mask)
    torch.testing.assert_close(wp[:, :6], w)
    assert torch.equal(vp, valid) and bool((wp[:, 6:] == 0).all())


def test_dpc_knn_bad_inputs():
    from imtm.functional.patch_slimming import dpc_knn_weights

    with pytest.raises(ValueError, match="num_clusters must be a positive int"):
        dpc_knn_weights(torch.randn(1, 3, 2), torch.ones(1, 3, 1), 0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        dpc_knn_weights(torch.randn(1, 3, 2), torch.ones(1, 3, 1), 2, k=0)
    with pytest.raises(ValueError, match=r"expected patches \(Bi, N, D\) and decisions"):
        dpc_knn_weights(torch.randn(1, 3, 2), torch.ones(1, 4, 1), 2)


# ---------------------------------------------------------------------------- the whole scorer (Eq. 1-8)
def loop_slimming_scores(
    v, vmask, t, tmask, a_p, logits, *, prefix, beta, ratio, fusion, align=None
):
    """Eq. 1-8 for every image and caption, one pair at a time and one patch at a time (inference)."""
    bi, n, d = v.shape
    scores = torch.zeros(bi, t.shape[0], dtype=v.dtype)
    keep = torch.zeros(bi, t.shape[0], n, dtype=v.dtype)
    for i in range(bi):
        real = [j for j in range(prefix, n) if vmask[i, j]]
        patches = [v[i, j] for j in real]
        v_glo = sum(patches) / len(patches)
        a_s = loop_norm([float(x @ v_glo) / d for x in patches])
        for c in range(t.shape[0]):
            words = [t[c, m] for m in range(t.shape[1]) if tmask[c, m]]
            t_glo = sum(words) / len(words)
            a_r = loop_norm([float(x @ t_glo) / d for x in patches])
            a = [
                (1 - beta) * float(a_p[i, j - prefix]) + beta / 2 * (s + r)
                for j, s, r in zip(real, a_s, a_r)
            ]
            n_s = math.ceil(round(ratio * len(patches), 9))
            order = sorted(range(len(patches)), key=lambda k: -a[k])
            kept, dropped = sorted(order[:n_s]), sorted(order[n_s:])
            tokens = [v[i, j] for j in range(prefix) if vmask[i, j]]
            for col in range(logits.shape[-1]):
                z = sum(math.exp(float(logits[i, real[k] - prefix, col])) for k in kept)
                tokens.append(
                    sum(
                        math.exp(float(logits[i, real[k] - prefix, col])) / z * patches[k]
                        for k in kept
                    )
                )
            if fusion and dropped:
                z = sum(math.exp(a[k]) for k in dropped)
                tokens.append(sum(math.exp(a[k]) / z * patches[k] for k in dropped))
            if align is not None:
                scores[i, c] = align(torch.stack(tokens), torch.stack(words))
            else:
                A = [[float(F.cosine_similarity(x, w, dim=0)) for w in words] for x in tokens]
                scores[i, c] = sum(max(r) for r in A) / len(A) + sum(
                    max(A[k][m] for k in range(len(A))) for m in range(len(words))
                ) / len(words)
            keep[i, c, :prefix] = vmask[i, :prefix].to(v.dtype)
            for k in kept:
                keep[i, c, real[k]] = 1
    return scores, keep


def slimming_problem(seed=0, bi=3, n=8, bt=4, m=5, d=6, prefix=1, k=2, ragged=True):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(bi, n, d, generator=g, dtype=torch.float64)
    t = torch.randn(bt, m, d, generator=g, dtype=torch.float64)
    vlen = torch.randint(prefix + 1, n + 1, (bi,), generator=g) if ragged else torch.full((bi,), n)
    tlen = torch.randint(1, m + 1, (bt,), generator=g) if ragged else torch.full((bt,), m)
    vmask = torch.arange(n) < vlen[:, None]
    tmask = torch.arange(m) < tlen[:, None]
    v = torch.where(vmask[..., None], v, torch.nan)  # padding may hold anything
    a_p = torch.rand(bi, n - prefix, generator=g, dtype=torch.float64)
    logits = torch.randn(bi, n - prefix, k, generator=g, dtype=torch.float64)
    return v, vmask, t, tmask, a_p, logits


@pytest.mark.parametrize("route", ["auto", "gram", "tokens"])
@pytest.mark.parametrize(
    "prefix,fusion,ragged", [(1, True, True), (0, True, False), (2, False, True)]
)
def test_patch_slimming_scores_equal_the_per_pair_loop(route, prefix, fusion, ragged):
    from imtm.functional import patch_slimming_scores

    v, vm, t, tm, a_p, logits = slimming_problem(prefix=prefix, ragged=ragged)
    out = patch_slimming_scores(
        v,
        t,
        vm,
        tm,
        predicted=a_p,
        num_prefix_tokens=prefix,
        aggregation_logits=logits,
        beta=0.6,
        ratio=0.5,
        fusion=fusion,
        cosine_route=route,
    )
    want_s, want_k = loop_slimming_scores(
        v, vm, t, tm, a_p, logits, prefix=prefix, beta=0.6, ratio=0.5, fusion=fusion
    )
    torch.testing.assert_close(out.scores, want_s)
    torch.testing.assert_close(out.keep_decisions, want_k)


def test_patch_slimming_scores_hard_assignment_and_token_align_equal_the_loop():
    from imtm.functional import hard_assignment_from_cosines, patch_slimming_scores

    v, vm, t, tm, a_p, logits = slimming_problem(seed=3)

    def chan(tokens, words):  # Eq. 5-8 of CHAN on one pair: every word keeps its best token, LSE
        A = F.normalize(tokens, dim=-1) @ F.normalize(words, dim=-1).t()
        return 0.1 * torch.logsumexp(A.amax(0) / 0.1, 0)

    want, _ = loop_slimming_scores(
        v, vm, t, tm, a_p, logits, prefix=1, beta=0.8, ratio=0.5, fusion=True, align=chan
    )
    kw = dict(predicted=a_p, num_prefix_tokens=1, aggregation_logits=logits)
    got = patch_slimming_scores(v, t, vm, tm, reduce=hard_assignment_from_cosines, **kw)
    torch.testing.assert_close(got.scores, want)

    def align(tokens, token_mask, words, word_mask):  # built tokens, each set against its caption
        out = torch.empty(tokens.shape[:2], dtype=tokens.dtype)
        for i in range(tokens.shape[0]):
            for c in range(tokens.shape[1]):
                wm = slice(None) if word_mask is None else word_mask[c]
                out[i, c] = chan(tokens[i, c][token_mask[i, c]], words[c][wm])
        return out

    built = patch_slimming_scores(v, t, vm, tm, align=align, **kw)
    torch.testing.assert_close(built.scores, want)


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    budget=st.integers(1, 3000),
    train=st.booleans(),
    route=st.sampled_from(["gram", "tokens"]),
)
def test_patch_slimming_scores_blocked_equal_unblocked_and_padding_is_inert(
    seed, budget, train, route
):
    from imtm.functional import patch_slimming_scores

    v, vm, t, tm, a_p, logits = slimming_problem(seed=seed)
    kw = dict(
        predicted=a_p,
        num_prefix_tokens=1,
        aggregation_logits=logits,
        training=train,
        cosine_route=route,
    )
    full = patch_slimming_scores(v, t, vm, tm, generator=torch.Generator().manual_seed(seed), **kw)
    blocked = patch_slimming_scores(
        v, t, vm, tm, generator=torch.Generator().manual_seed(seed), max_block_elements=budget, **kw
    )
    torch.testing.assert_close(blocked.scores, full.scores)
    torch.testing.assert_close(blocked.keep_decisions, full.keep_decisions)
    # more padding (other values in it) changes nothing
    v2 = torch.cat([v, torch.full((3, 2, 6), 1e3, dtype=v.dtype)], 1)
    vm2 = torch.cat([vm, torch.zeros(3, 2, dtype=torch.bool)], 1)
    a2 = torch.cat([a_p, torch.rand(3, 2, dtype=a_p.dtype)], 1)
    l2 = torch.cat([logits, torch.randn(3, 2, 2, dtype=logits.dtype)], 1)
    if not train:  # (the Gumbel noise has one draw per position, so padding shifts it)
        padded = patch_slimming_scores(
            v2,
            t,
            vm2,
            tm,
            predicted=a2,
            num_prefix_tokens=1,
            aggregation_logits=l2,
            cosine_route=route,
        )
        torch.testing.assert_close(padded.scores, full.scores)
        torch.testing.assert_close(padded.keep_decisions[..., :8], full.keep_decisions)
    assert bool((full.scores.abs() <= 2 + 1e-9).all())


def test_patch_slimming_scores_gradients_equal_the_built_token_path():
    from imtm.functional import patch_slimming_scores, sparse_alignment_from_cosines

    v, vm, t, tm, a_p, logits = slimming_problem(seed=5, ragged=False)
    for x in (v, t, a_p, logits):
        x.requires_grad_(True)

    def align(tokens, token_mask, words, word_mask):
        A = F.normalize(tokens, dim=-1) @ F.normalize(words, dim=-1).transpose(-1, -2).unsqueeze(0)
        return sparse_alignment_from_cosines(A, token_mask, word_mask)

    # At inference the decisions are constants, so both paths differentiate the same function (in
    # training the built tokens' masked softmax caps dropped logits, which changes only gradients
    # through the straight-through decisions).
    kw = dict(predicted=a_p, num_prefix_tokens=1, aggregation_logits=logits)
    built = patch_slimming_scores(
        v, t, generator=torch.Generator().manual_seed(1), align=align, **kw
    )
    want = torch.autograd.grad(built.scores.sum(), (v, t, a_p, logits))
    for route in ("gram", "tokens"):
        fast = patch_slimming_scores(
            v, t, generator=torch.Generator().manual_seed(1), cosine_route=route, **kw
        )
        torch.testing.assert_close(fast.scores, built.scores)
        for g1, g2 in zip(torch.autograd.grad(fast.scores.sum(), (v, t, a_p, logits)), want):
            torch.testing.assert_close(g1, g2)


def test_patch_slimming_scores_bad_inputs():
    from imtm.functional import patch_slimming_scores

    v, vm, t, tm, a_p, logits = slimming_problem()
    kw = dict(predicted=a_p, num_prefix_tokens=1, aggregation_logits=logits)
    with pytest.raises(
        ValueError, match=r"patch_slimming_scores: ratio must be a finite number in \(0.0"
    ):
        patch_slimming_scores(v, t, vm, tm, ratio=0.0, **kw)
    with pytest.raises(
        ValueError, match=r"patch_slimming_scores: beta must be a finite number in \[0.0"
    ):
        patch_slimming_scores(v, t, vm, tm, beta=True, **kw)
    with pytest.raises(ValueError, match="tau must be"):
        patch_slimming_scores(v, t, vm, tm, tau=float("inf"), **kw)
    with pytest.raises(ValueError, match="num_prefix_tokens must be an int >= 0"):
        patch_slimming_scores(v, t, vm, tm, predicted=a_p, num_prefix_tokens=-1)
    with pytest.raises(ValueError, match=r"predicted must have shape \(3, 7\), got \(3, 6\)"):
        patch_slimming_scores(v, t, vm, tm, predicted=a_p[:, 1:], num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"aggregation_logits must have shape \(3, 7, 'Nc'\)"):
        patch_slimming_scores(
            v, t, vm, tm, predicted=a_p, num_prefix_tokens=1, aggregation_logits=a_p
        )
    with pytest.raises(ValueError, match="give reduce or align, not both"):
        patch_slimming_scores(v, t, vm, tm, reduce=lambda *a: a, align=lambda *a: a, **kw)
    with pytest.raises(ValueError, match="give aggregation_logits or dpc_knn, not both"):
        patch_slimming_scores(v, t, vm, tm, dpc_knn=(2, 3), **kw)
    with pytest.raises(ValueError, match=r"dpc_knn must be None or \(num_clusters, k\)"):
        patch_slimming_scores(v, t, vm, tm, predicted=a_p, num_prefix_tokens=1, dpc_knn=(2, 0))
    with pytest.raises(ValueError, match="so no patch is left to select"):
        patch_slimming_scores(v, t, vm, tm, predicted=a_p[:, :0], num_prefix_tokens=8)
    with pytest.raises(ValueError, match="patch_slimming_scores: images .* NaN or inf"):
        patch_slimming_scores(torch.full_like(v, math.nan), t, None, tm, **kw)
    empty = patch_slimming_scores(v[:0], t, vm[:0], tm, predicted=a_p[:0], num_prefix_tokens=1)
    assert empty.scores.shape == (0, 4) and empty.keep_decisions.shape == (0, 4, 8)


def test_masked_softmax_gradient_equals_the_softmax_over_kept_entries():
    # The largest kept logit sits exactly on the shift: its gradient must not be cut there.
    from imtm.functional.patch_slimming import masked_softmax

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    keep = (torch.rand(2, 6, 1, generator=g) > 0.4).double()
    keep[:, 0] = 1.0

    def reference(x):
        return torch.where(keep > 0, x, -math.inf).softmax(1)

    got = torch.autograd.functional.jacobian(lambda x: masked_softmax(x, keep, dim=1), logits)
    want = torch.autograd.functional.jacobian(reference, logits)
    torch.testing.assert_close(got, torch.nan_to_num(want))
    assert torch.autograd.gradcheck(
        lambda x: masked_softmax(x, keep, dim=1), (logits.requires_grad_(),)
    )


@SETTINGS
@given(seed=st.integers(0, 10_000), budget=st.sampled_from([50, 400, None]), train=st.booleans())
def test_patch_slimming_scores_cut_to_caption_extents_equal_the_full_width(seed, budget, train):
    """Captions sorted by extent, each block cut to its longest (the fast path), against every block at
    the full width in the given order (the reference path): same scores, decisions and Gumbel draws."""
    import imtm.functional.patch_slimming as ps

    v, vm, t, tm, a_p, logits = slimming_problem(seed=seed, bt=7, m=6)
    kw = dict(
        predicted=a_p,
        num_prefix_tokens=1,
        aggregation_logits=logits,
        training=train,
        max_block_elements=budget,
        beta=0.6,
        ratio=0.5,
        fusion=True,
        cosine_route="gram",  # the route that multiplies patches by words (the tokens route cuts nothing)
    )
    fast = ps.patch_slimming_scores(v, t, vm, tm, generator=torch.Generator().manual_seed(1), **kw)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ps, "order_by_extent", lambda mask, n: (None, None))
        ref = ps.patch_slimming_scores(
            v, t, vm, tm, generator=torch.Generator().manual_seed(1), **kw
        )
    torch.testing.assert_close(fast.scores, ref.scores)
    torch.testing.assert_close(fast.keep_decisions, ref.keep_decisions)
    if not train:
        want_s, want_k = loop_slimming_scores(
            v, vm, t, tm, a_p, logits, prefix=1, beta=0.6, ratio=0.5, fusion=True
        )
        torch.testing.assert_close(fast.scores, want_s)
        torch.testing.assert_close(fast.keep_decisions, want_k)


# ---------------------------------------------------------------------------- the two cosine routes
def test_cosine_route_costs_pick_the_gram_route_at_paper_widths_and_tokens_at_small_ones():
    from imtm.functional.patch_slimming import cheaper_cosine_route, cosine_route_costs

    # LAPS with ViT-B/16 at 224 (196 patches + [CLS], D = 512 after the projection), 12 words.
    assert cheaper_cosine_route(196, 12, 512, 39, 1) == "gram"
    assert cheaper_cosine_route(196, 12, 1024, 39, 1) == "gram"
    # The synthetic benchmark's widths: 64 patches, D = 64.
    assert cheaper_cosine_route(64, 19, 64, 12, 1) == "tokens"
    c = cosine_route_costs(8, 5, 6, 2, 1)  # written out term by term
    assert c["gram"] == 9 * 5 * 6 + 2 * 8 * 5 + 8 * 8 * 2 + 8 * 5 + 8 * 8
    assert c["tokens"] == 3 * 8 * 6 + 3 * 6 + 4 * 5 * 6


def test_token_helpers_equal_the_nested_loop():
    from imtm.functional.patch_slimming import aggregated_tokens, token_cosines, weighted_tokens

    g = torch.Generator().manual_seed(0)
    bi, n, bt, k, m, d = 2, 5, 3, 2, 4, 6
    v = torch.randn(bi, n, d, generator=g, dtype=torch.float64)
    E = torch.rand(bi, n, k, generator=g, dtype=torch.float64)
    D = (torch.rand(bi, n, bt, generator=g) > 0.5).to(torch.float64)
    D[0, :, 1] = 0  # a pair that keeps nothing: zero tokens, cosine 0
    W = torch.rand(bi, bt, k, n, generator=g, dtype=torch.float64)
    words = F.normalize(torch.randn(bt, m, d, generator=g, dtype=torch.float64), dim=-1)
    agg, wt = aggregated_tokens(v, E, D), weighted_tokens(v, W)
    cos = token_cosines(agg, words)
    for i in range(bi):
        for t in range(bt):
            for c in range(k):
                want = sum(D[i, j, t] * E[i, j, c] * v[i, j] for j in range(n))
                torch.testing.assert_close(agg[i, t, c], want)
                torch.testing.assert_close(
                    wt[i, t, c], sum(W[i, t, c, j] * v[i, j] for j in range(n))
                )
                for w in range(m):
                    norm = float(want.norm())
                    expect = 0.0 if norm == 0 else float(want @ words[t, w]) / norm
                    assert math.isclose(float(cos[i, t, c, w]), expect, abs_tol=1e-12)
    assert bool((cos[0, 1] == 0).all())
    # At least D captions: the image-only Z route (above: fewer, the pair-sized weights).
    many = (torch.rand(bi, n, 2 * d, generator=g) > 0.5).to(torch.float64)
    torch.testing.assert_close(
        aggregated_tokens(v, E, many), torch.einsum("int,ink,ind->itkd", many, E, v)
    )
    zero = torch.zeros(1, 1, 1, d, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(token_cosines(zero, words[:1]).sum(), zero)
    assert bool(torch.isfinite(grad).all())


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    train=st.booleans(),
    prefix=st.integers(0, 2),
    clusters=st.booleans(),
    budget=st.sampled_from([60, 500, None]),
)
def test_cosine_routes_give_the_same_scores_decisions_and_gradients(
    seed, train, prefix, clusters, budget
):
    """The tokens route (the tokens built, small widths) against the Gram route (the papers' widths):
    the same scores, decisions and gradients to every input, in training too, blocked or not, for the
    learned aggregation and for DPC-KNN clusters."""
    from imtm.functional import patch_slimming_scores

    v, vm, t, tm, a_p, logits = slimming_problem(seed=seed, prefix=prefix, k=3)
    v = torch.where(vm.unsqueeze(-1), v, 0.0)  # (NaN padding has no gradient to compare)
    leaves = [x.requires_grad_(True) for x in (v, t, a_p, logits)]
    outs = []
    for route in ("gram", "tokens"):
        kw = dict(dpc_knn=(2, 2)) if clusters else dict(aggregation_logits=logits)
        out = patch_slimming_scores(
            v,
            t,
            vm,
            tm,
            predicted=a_p,
            num_prefix_tokens=prefix,
            training=train,
            generator=torch.Generator().manual_seed(seed),
            max_block_elements=budget,
            cosine_route=route,
            **kw,
        )
        if train:
            # A set of one kept patch makes the aggregated tokens parallel: the maxima of Eq. 8 then
            # tie, and rounding picks which token's straight-through gradient the dropped patches get.
            assume(bool(((out.keep_decisions[..., prefix:] > 0).sum(-1) >= 2).all()))
        loss = out.scores.sum() + (out.keep_decisions * torch.arange(v.shape[1])).sum()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        outs.append((out, grads))
    (gram, g_gram), (tok, g_tok) = outs
    torch.testing.assert_close(tok.scores, gram.scores)
    torch.testing.assert_close(tok.keep_decisions, gram.keep_decisions)
    for a, b in zip(g_gram, g_tok):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a)


def test_cosine_route_bad_value():
    from imtm.functional import patch_slimming_scores

    v, vm, t, tm, a_p, logits = slimming_problem()
    with pytest.raises(ValueError, match=r"cosine_route must be one of 'auto', 'gram', 'tokens'"):
        patch_slimming_scores(
            v,
            t,
            vm,
            tm,
            predicted=a_p,
            num_prefix_tokens=1,
            aggregation_logits=logits,
            cosine_route="tokenz",
        )
