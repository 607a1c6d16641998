import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone

from imtm import Tokens
from imtm.components import (
    DPCKNNAggregation,
    GumbelSelector,
    HardAssignmentCoding,
    PatchScorer,
    PatchSlimming,
    RatioLoss,
    RedundantFusion,
    SoftAssignmentCoding,
    SparsePatchWordAlignment,
    TokenAggregation,
)
from imtm.testing import check_component

SETTINGS = settings(max_examples=10, deadline=None)
D = 8


def laps(
    num_out=2,
    ratio=0.5,
    fusion=True,
    alignment=None,
    budget=None,
    aggregation="learned",
    **scorer_kw,
):
    torch.manual_seed(0)
    agg = {
        "learned": lambda: TokenAggregation(D, num_out),
        "none": lambda: None,
        "dpc_knn": lambda: DPCKNNAggregation(num_out, k=2),
    }[aggregation]()
    return PatchSlimming(
        PatchScorer(D, **scorer_kw),
        GumbelSelector(ratio=ratio),
        agg,
        alignment if alignment is not None else SparsePatchWordAlignment(),
        fusion=fusion,
        max_block_elements=budget,
    )


def image_tokens(b=3, n=7, prefix=1, lengths=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, n, D, generator=g, dtype=dtype)
    mask = None if lengths is None else torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return Tokens(feats, mask, num_prefix_tokens=prefix)


def text_tokens(lengths=(4, 2, 3, 1), m=4, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return Tokens.from_lengths(
        torch.randn(len(lengths), m, D, generator=g, dtype=dtype), list(lengths)
    )


# ---------------------------------------------------------------------------- the plain per-pair reference
def reference_slimmed_set(slim: PatchSlimming, images: Tokens, i: int, words: torch.Tensor):
    """Eq. 1-7 for one image and one caption, patch by patch (inference: top N_s)."""
    p = images.num_prefix_tokens
    real = [n for n in range(p, images.num_tokens) if images.mask[i, n]]
    v = [images.feats[i, n] for n in real]
    d = images.dim
    sc, beta = slim.scorer, slim.scorer.beta
    a_p = [torch.sigmoid(sc.mlp(x)).squeeze() for x in v]
    v_glo = sum(v) / len(v)
    t_glo = sum(words) / len(words)

    def norm(xs):
        lo, hi = min(xs), max(xs)
        return [(x - lo) / (hi - lo) if hi > lo else 0 * x for x in xs]

    a_s = norm([torch.dot(x, v_glo) / d for x in v])
    a_r = norm([torch.dot(x, t_glo) / d for x in v])
    parts = [a for a, use in ((a_s, sc.self_attention), (a_r, sc.language_context)) if use]
    a = []
    for k in range(len(v)):
        ctx = sum(part[k] for part in parts) / len(parts) if parts else 0
        a.append((1 - beta) * a_p[k] + beta * ctx if parts else a_p[k])
    n_s = math.ceil(round(slim.selector.ratio * len(v), 9))
    order = sorted(range(len(v)), key=lambda k: -float(a[k].detach()))
    kept, dropped = sorted(order[:n_s]), sorted(order[n_s:])
    tokens = [images.feats[i, n] for n in range(p) if images.mask[i, n]]
    if slim.aggregation is None:  # "without patch calibration": the kept patches as they are
        tokens += [v[k] for k in kept]
    elif isinstance(slim.aggregation, DPCKNNAggregation):
        tokens += loop_dpc_knn(
            [v[k] for k in kept], kept, slim.aggregation.num_out, slim.aggregation.k
        )
    else:
        logits = [slim.aggregation.mlp(x) for x in v]
        for j in range(slim.aggregation.num_out):
            z = sum(math.exp(float(logits[k][j].detach())) for k in kept)
            tokens.append(sum(torch.exp(logits[k][j]) / z * v[k] for k in kept))
    if slim.fusion and dropped:
        z = sum(torch.exp(a[k]) for k in dropped)
        tokens.append(sum(torch.exp(a[k]) / z * v[k] for k in dropped))
    decisions = torch.zeros(images.num_tokens, dtype=images.dtype)
    decisions[:p] = images.mask[i, :p].to(images.dtype)
    for k in kept:
        decisions[real[k]] = 1
    return tokens, decisions


def loop_dpc_knn(xs, positions, num_clusters, k):
    """DPC-KNN written out point by point: density from the k nearest (self included), distance to a
    denser point, the num_clusters largest products are centres, every point joins its nearest centre."""
    n, d = len(xs), xs[0].shape[0]
    dist = [
        [float(torch.linalg.vector_norm(xs[a] - xs[b])) / math.sqrt(d) for b in range(n)]
        for a in range(n)
    ]
    rho = []
    for a in range(n):
        near = sorted(dist[a])[: min(k, n)]
        rho.append(math.exp(-sum(x * x for x in near) / len(near)) - positions[a] * 1e-9)
    delta = []
    for a in range(n):
        denser = [dist[a][b] for b in range(n) if rho[b] > rho[a]]
        delta.append(min(denser) if denser else max(dist[a]))
    centres = sorted(range(n), key=lambda a: -rho[a] * delta[a])[:num_clusters]
    members = {c: [] for c in centres}
    for a in range(n):
        members[min(centres, key=lambda c: (dist[a][c], centres.index(c)))].append(a)
    return [sum(xs[a] for a in ms) / len(ms) for ms in members.values() if ms]


def reference(slim: PatchSlimming, images: Tokens, texts: Tokens, align=None):
    scores = torch.zeros(images.batch_size, texts.batch_size, dtype=images.dtype)
    decisions = torch.zeros(
        images.batch_size, texts.batch_size, images.num_tokens, dtype=images.dtype
    )
    for i in range(images.batch_size):
        for t in range(texts.batch_size):
            words = [texts.feats[t, m] for m in range(texts.num_tokens) if texts.mask[t, m]]
            tokens, decisions[i, t] = reference_slimmed_set(slim, images, i, words)
            if align is not None:
                scores[i, t] = align(torch.stack(tokens)[None], torch.stack(words)[None])[0, 0]
                continue
            A = [[F.cosine_similarity(x, w, dim=0) for w in words] for x in tokens]
            scores[i, t] = sum(max(r) for r in A) / len(A) + sum(
                max(A[k][m] for k in range(len(A))) for m in range(len(words))
            ) / len(words)
    return scores, decisions


@pytest.mark.parametrize("prefix,lengths", [(1, None), (0, None), (1, [7, 5, 4]), (2, [7, 6, 3])])
def test_equals_the_per_pair_loop_at_inference(prefix, lengths):
    slim = laps().double().eval()
    images, texts = image_tokens(prefix=prefix, lengths=lengths), text_tokens()
    with torch.no_grad():
        scores, keep = slim(images, texts)
        want_s, want_d = reference(slim, images, texts)
    torch.testing.assert_close(scores, want_s)
    torch.testing.assert_close(keep, want_d)


def test_inference_keeps_exactly_ns_and_holds_nc_plus_two_tokens():
    slim = laps(num_out=2).double().eval()
    images, texts = image_tokens(n=9, prefix=1), text_tokens()
    _, keep = slim(images, texts)
    assert keep[..., 0].eq(1).all() and keep[..., 1:].sum(-1).eq(4).all()  # ceil(0.5 * 8)
    tokens, _ = reference_slimmed_set(slim, images, 0, [texts.feats[0, m] for m in range(4)])
    assert len(tokens) == 2 + 2  # [CLS], N_c = 2 aggregated, fused


@pytest.mark.parametrize(
    "kw",
    [
        dict(ratio=1.0),
        dict(ratio=0.5, num_out=3),
        dict(fusion=False),
        dict(language_context=False),
        dict(self_attention=False),
        dict(beta=0.0),
        dict(beta=1.0),
        dict(aggregation="none"),
        dict(aggregation="none", fusion=False),
        dict(aggregation="dpc_knn"),
        dict(aggregation="dpc_knn", num_out=4, ratio=0.9),
    ],
)
def test_edge_cases_and_ablations_equal_the_loop(kw):
    # ratio 1: nothing dropped, no fused token; N_s = N_c = 3 with 6 patches; ablations of Table 4
    slim = laps(**kw).double().eval()
    images, texts = image_tokens(n=7, prefix=1, lengths=[7, 6, 7]), text_tokens()
    with torch.no_grad():
        scores, keep = slim(images, texts)
        want_s, want_d = reference(slim, images, texts)
    torch.testing.assert_close(scores, want_s)
    torch.testing.assert_close(keep, want_d)


def test_training_decisions_are_binary_and_gradients_reach_the_scorer_mlp():
    slim = laps().double().train()
    images, texts = image_tokens(), text_tokens()
    torch.manual_seed(0)
    scores, keep = slim(images, texts)
    assert set(keep.detach().unique().tolist()) <= {0.0, 1.0}
    assert bool(torch.isfinite(scores).all())
    loss = scores.sum() + RatioLoss(0.5)(keep, images)
    loss.backward()
    for p in slim.scorer.mlp.parameters():
        assert (
            p.grad is not None and bool(torch.isfinite(p.grad).all()) and bool((p.grad != 0).any())
        )
    for p in slim.aggregation.mlp.parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())
    # the ratio loss alone reaches the scorer (straight-through decisions)
    slim.zero_grad()
    torch.manual_seed(0)
    RatioLoss(0.5)(slim(images, texts)[1], images).backward()
    assert bool((slim.scorer.mlp[0].weight.grad != 0).any())


@SETTINGS
@given(budget=st.integers(1, 2000), seed=st.integers(0, 1000), train=st.booleans())
def test_blocked_equals_unblocked(budget, seed, train):
    slim = laps(budget=None).double().train(train)
    images, texts = image_tokens(seed=seed, lengths=[7, 5, 6]), text_tokens(seed=seed + 1)
    torch.manual_seed(seed)
    full = slim(images, texts)
    slim.max_block_elements = budget
    torch.manual_seed(seed)
    blocked = slim(images, texts)
    for a, b in zip(full, blocked):
        torch.testing.assert_close(a, b)


@SETTINGS
@given(seed=st.integers(0, 1000))
def test_permutation_equivariance_and_bounds(seed):
    slim = laps().double().eval()
    images, texts = image_tokens(seed=seed), text_tokens(seed=seed + 1)
    g = torch.Generator().manual_seed(seed)
    pi, pt = torch.randperm(3, generator=g), torch.randperm(4, generator=g)
    s, d = slim(images, texts)
    s2, d2 = slim(Tokens(images.feats[pi], num_prefix_tokens=1), texts[pt])
    torch.testing.assert_close(s2, s[pi][:, pt])
    torch.testing.assert_close(d2, d[pi][:, pt])
    assert bool((s.abs() <= 2 + 1e-9).all())


def test_hard_assignment_plug_in_equals_the_loop():
    # LAPS as a plug-in (Table 4): CHAN's hard assignment coding aligns the slimmed sets
    for codebook in ("visual", "textual"):
        coding = HardAssignmentCoding(codebook=codebook, pooling="lse", temperature=0.1)
        slim = laps(alignment=coding).double().eval()
        images, texts = image_tokens(lengths=[7, 5, 6]), text_tokens()
        with torch.no_grad():
            scores, _ = slim(images, texts)
            want, _ = reference(slim, images, texts, align=coding)
        torch.testing.assert_close(scores, want)


@pytest.mark.parametrize("aggregation", ["learned", "none", "dpc_knn"])
def test_soft_assignment_plug_in_builds_tokens_and_equals_the_loop(aggregation):
    coding = SoftAssignmentCoding(tau=0.1)
    slim = laps(alignment=coding, budget=50, aggregation=aggregation).double().eval()
    images, texts = image_tokens(lengths=[7, 5, 6]), text_tokens()
    with torch.no_grad():
        scores, _ = slim(images, texts)
        want, _ = reference(slim, images, texts, align=coding)
    torch.testing.assert_close(scores, want)


def test_without_calibration_aligns_the_selected_patches_and_changes_the_scores():
    """Table 4's "without patch calibration": no TokenAggregation; the kept patches are aligned as they are."""
    full, plain = laps().double().eval(), laps(aggregation="none").double().eval()
    plain.scorer.load_state_dict(full.scorer.state_dict())
    images, texts = image_tokens(lengths=[7, 5, 6]), text_tokens()
    with torch.no_grad():
        (s_full, d_full), (s_plain, d_plain) = full(images, texts), plain(images, texts)
    torch.testing.assert_close(d_plain, d_full)  # the same selection ...
    assert float((s_plain - s_full).abs().max()) > 1e-3  # ... aligned without the aggregation
    assert not any(isinstance(m, TokenAggregation) for m in plain.modules())


def test_conformance_of_every_block():
    images, texts = (
        image_tokens(dtype=torch.float32, lengths=[7, 5, 6]),
        text_tokens(dtype=torch.float32),
    )
    report = check_component(laps(), {"image_tokens": images, "text_tokens": texts})
    assert "padding" in report.passed and "gradients" in report.passed
    check_component(PatchScorer(D), {"image_tokens": images, "text_tokens": texts})
    scores = torch.rand(3, 4, 7)
    check_component(
        GumbelSelector(0.5), {"patch_scores": scores, "image_tokens": images}, skip=["padding"]
    )
    keep = GumbelSelector(0.5).eval()(scores, images)
    check_component(
        TokenAggregation(D, 2), {"image_tokens": images, "keep_decisions": keep}, skip=["padding"]
    )
    check_component(
        RedundantFusion(),
        {"image_tokens": images, "patch_scores": scores, "keep_decisions": keep},
        skip=["padding"],
    )
    check_component(
        RatioLoss(0.5), {"keep_decisions": keep, "image_tokens": images}, skip=["padding"]
    )
    check_component(
        SparsePatchWordAlignment(max_block_elements=30),
        {"image_tokens": images, "text_tokens": texts},
    )


def test_selector_and_aggregation_standalone_match_patch_slimming():
    slim = laps().double().eval()
    images, texts = image_tokens(lengths=[7, 5, 6]), text_tokens()
    a = slim.scorer(images, texts)
    keep = slim.selector(a, images)
    torch.testing.assert_close(keep, slim(images, texts)[1])
    assert bool((a[..., 0] == 0).all()) and bool(((a >= 0) & (a <= 1)).all())
    agg = slim.aggregation(images, keep)
    fused = RedundantFusion()(images, a, keep)
    tokens, _ = reference_slimmed_set(slim, images, 1, [texts.feats[0, m] for m in range(4)])
    torch.testing.assert_close(agg[1, 0], torch.stack(tokens[1:3]))
    torch.testing.assert_close(fused[1, 0], tokens[3])


@SETTINGS
@given(seed=st.integers(0, 1000), extra=st.integers(1, 3))
def test_padded_and_dropped_patches_never_change_aggregated_tokens(seed, extra):
    agg = TokenAggregation(D, 3).double()
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 6, D, generator=g, dtype=torch.float64)
    keep = (torch.rand(2, 3, 6, generator=g) > 0.4).double()
    keep[..., 0] = 1
    out = agg(Tokens(feats), keep)
    # garbage padding, then new values in every dropped patch
    padded = Tokens(
        torch.cat([feats, 1e3 * torch.randn(2, extra, D, generator=g, dtype=torch.float64)], 1),
        torch.cat([torch.ones(2, 6, dtype=torch.bool), torch.zeros(2, extra, dtype=torch.bool)], 1),
    )
    keep_p = torch.cat([keep, torch.ones(2, 3, extra, dtype=torch.float64)], -1)
    torch.testing.assert_close(agg(padded, keep_p), out)
    for t in range(3):
        alt = feats.clone()
        drop = keep[:, t] == 0
        alt[drop] = torch.randn(int(drop.sum()), D, generator=g, dtype=torch.float64)
        torch.testing.assert_close(agg(Tokens(alt), keep)[:, t], out[:, t])


def test_clone_get_params_and_validation():
    slim = laps(num_out=3)
    params = slim.get_params()
    assert params["aggregation__num_out"] == 3 and params["selector__ratio"] == 0.5
    copy = clone(slim)
    assert copy.scorer is not slim.scorer and copy.aggregation.num_out == 3
    with pytest.raises(ValueError, match="scorer.dim=8 and aggregation.dim=4 must be equal"):
        PatchSlimming(
            PatchScorer(8), GumbelSelector(), TokenAggregation(4, 2), SparsePatchWordAlignment()
        ).validate()
    with pytest.raises(TypeError, match="selector must be a GumbelSelector"):
        PatchSlimming(
            PatchScorer(8), None, TokenAggregation(8, 2), SparsePatchWordAlignment()
        ).validate()
    with pytest.raises(TypeError, match="alignment must be a Component that provides"):
        PatchSlimming(
            PatchScorer(8), GumbelSelector(), TokenAggregation(8, 2), RatioLoss()
        ).validate()
    with pytest.raises(TypeError, match="fusion must be True or False"):
        laps(fusion="yes").validate()
    with pytest.raises(
        ValueError, match=r"GumbelSelector: ratio must be a finite number in \(0, 1\], got 0.0"
    ):
        laps(ratio=0.0).validate()
    with pytest.raises(ValueError, match="GumbelSelector: tau must be a finite number > 0, got -1"):
        GumbelSelector(tau=-1).validate()
    with pytest.raises(
        ValueError, match=r"PatchScorer: beta must be a finite number in \[0, 1\], got 2.0"
    ):
        laps(beta=2.0).validate()
    with pytest.raises(TypeError, match="PatchScorer: language_context must be True or False"):
        PatchScorer(8, language_context=1).validate()
    with pytest.raises(ValueError, match="PatchScorer: dim must be a positive int, got 0"):
        PatchScorer(0)
    with pytest.raises(
        ValueError, match="PatchScorer: hidden_dim must be a positive int or None, got 0"
    ):
        PatchScorer(8, hidden_dim=0)
    with pytest.raises(ValueError, match="TokenAggregation: num_out must be a positive int, got 0"):
        TokenAggregation(8, 0)
    with pytest.raises(
        ValueError, match="TokenAggregation: hidden_ratio must be a finite number > 0, got 0"
    ):
        TokenAggregation(8, 2, hidden_ratio=0)
    with pytest.raises(ValueError, match="SparsePatchWordAlignment: direction must be one of"):
        SparsePatchWordAlignment(direction="up").validate()


def test_bad_inputs_raise_clear_errors():
    slim = laps().eval()
    images, texts = image_tokens(dtype=torch.float32), text_tokens(dtype=torch.float32)
    with pytest.raises(
        ValueError, match=r"PatchSlimming: expected image tokens of shape \(Bi, N, 8\)"
    ):
        slim(Tokens(torch.randn(2, 5, 4)), Tokens(torch.randn(2, 3, 4)))
    with pytest.raises(ValueError, match="PatchSlimming: image tokens hold 1 position"):
        slim(Tokens(torch.randn(2, 1, D), num_prefix_tokens=1), texts)
    with pytest.raises(ValueError, match="PatchSlimming: patch_slimming_scores: texts rows"):
        slim(images, Tokens(texts.feats, torch.zeros(4, 4, dtype=torch.bool)))
    with pytest.raises(
        ValueError, match="PatchSlimming: patch_slimming_scores: images .* NaN or inf"
    ):
        slim(Tokens(torch.full((2, 5, D), math.nan)), texts)
    with pytest.raises(TypeError, match="PatchSlimming: expected image tokens as Tokens"):
        slim("pixels", texts)
    with pytest.raises(
        ValueError, match=r"GumbelSelector: expected patch_scores of shape \(Bi, Bt, N\)"
    ):
        GumbelSelector()(torch.rand(3, 7), images)
    with pytest.raises(ValueError, match=r"TokenAggregation: expected keep_decisions of shape"):
        TokenAggregation(D, 2)(images, torch.ones(3, 4, 5))
    with pytest.raises(ValueError, match=r"RedundantFusion: expected keep_decisions of shape"):
        RedundantFusion()(images, torch.rand(3, 4, 7), torch.ones(2, 4, 7))
    with pytest.raises(
        ValueError, match="RedundantFusion: patch_scores must have the shape of keep_decisions"
    ):
        RedundantFusion()(images, torch.rand(3, 4, 6), torch.ones(3, 4, 7))
    with pytest.raises(ValueError, match="PatchScorer: expected token features of shape"):
        PatchScorer(D)(Tokens(torch.randn(2, 5, 3)), texts)
    with pytest.raises(ValueError, match=r"RatioLoss: expected keep_decisions of shape"):
        RatioLoss()(torch.ones(3, 4, 5), images)
    with pytest.raises(ValueError, match=r"RatioLoss: rho must be"):
        RatioLoss(rho=0.0)(torch.ones(3, 4, 7), images)


def test_matcher_trains_and_blocked_similarity_equals_one_forward():
    from toy import ToyImage, ToyText, toy_data

    from imtm import Matcher
    from imtm.components import TripletLoss
    from imtm.data import collate
    from imtm.engine.evaluation import run_blocks

    data = toy_data(n_images=8)
    torch.manual_seed(0)
    components = [
        ToyImage(out_dim=D),
        ToyText(vocab=data.vocab, out_dim=D),
        ("laps", laps(num_out=2)),
        TripletLoss(hardest=False),
        RatioLoss(0.5),
    ]
    m = Matcher(components, epochs=1, batch_size=6, verbose=False).fit(data)
    assert "loss/ratioloss" in m.history_[0]
    full = m.similarity(data.images, data.captions)
    m.set_params(image_block=5, text_block=7, eval_batch_size=3)
    torch.testing.assert_close(m.similarity(data.images, data.captions), full)
    vals = {
        "images": collate([{"images": x, "texts": "a", "image_ids": 0} for x in data.images])[
            "images"
        ],
        "texts": data.captions,
    }
    m.components_.eval()
    with torch.no_grad():
        run_blocks(m.plan_, [0, 1, 2], vals)
    torch.testing.assert_close(vals["scores"], full)
    assert vals["keep_decisions"].shape[:2] == full.shape


@pytest.mark.parametrize("bias", [100.0, -100.0])
def test_saturated_significance_gives_no_nan_in_training(bias):
    # beta = 0: a = a^p = sigmoid(+-100), exactly 1 or 0 in float32; the log clamp keeps everything finite
    slim = laps(beta=0.0).train()
    with torch.no_grad():
        slim.scorer.mlp[2].bias.fill_(bias)
        slim.scorer.mlp[2].weight.zero_()
    images, texts = image_tokens(dtype=torch.float32), text_tokens(dtype=torch.float32)
    images = Tokens(images.feats.requires_grad_(True), num_prefix_tokens=1)
    scores, keep = slim(images, texts)
    assert set(keep[..., 1:].unique().tolist()) == {1.0 if bias > 0 else 0.0}
    (scores.sum() + RatioLoss(0.5)(keep, images)).backward()
    assert bool(torch.isfinite(scores).all()) and bool(torch.isfinite(images.feats.grad).all())
    for p in slim.parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all())


def reference_training_pair(slim, feats, words, noise):
    """Eq. 1-8 in training for one pair, patch by patch: Gumbel decisions with the given noise (through
    the tested functional), Eq. 6 as D_i exp(L_ij) / sum_k D_k exp(L_kj), Eq. 7 over the dropped patches."""
    from imtm.functional import gumbel_keep_decisions

    cls, v = feats[0], [feats[n] for n in range(1, feats.shape[0])]
    d_ = feats.shape[-1]
    sc, beta = slim.scorer, slim.scorer.beta

    def norm(xs):
        lo, hi = min(xs), max(xs)
        return [(x - lo) / (hi - lo) for x in xs]

    v_glo, t_glo = sum(v) / len(v), sum(words) / len(words)
    a_s = norm([torch.dot(x, v_glo) / d_ for x in v])
    a_r = norm([torch.dot(x, t_glo) / d_ for x in v])
    a = torch.stack(
        [
            (1 - beta) * torch.sigmoid(sc.mlp(x)).squeeze() + beta / 2 * (s + r)
            for x, s, r in zip(v, a_s, a_r)
        ]
    )
    d = gumbel_keep_decisions(a, slim.selector.tau, noise=noise)
    logits = torch.stack([slim.aggregation.mlp(x) for x in v])  # (Np, Nc)
    tokens = [cls]
    if bool((d > 0).any()):
        for j in range(logits.shape[1]):
            e = d * torch.exp(logits[:, j])
            tokens.append(sum(e[k] / e.sum() * v[k] for k in range(len(v))))
    if bool((d < 1).any()):
        e = (1 - d) * torch.exp(a)
        tokens.append(sum(e[k] / e.sum() * v[k] for k in range(len(v))))
    A = [[F.cosine_similarity(x, w, dim=0) for w in words] for x in tokens]
    score = sum(max(r) for r in A) / len(A) + sum(
        max(A[k][m] for k in range(len(A))) for m in range(len(words))
    ) / len(words)
    return score, d


def test_training_forward_and_gradient_equal_the_per_pair_loop(monkeypatch):
    import imtm.functional.patch_slimming as ps

    # The block's Gumbel noise, from torch.rand (the same numbers on every torch release; the
    # exponential draws of logistic_noise changed between releases), with which every pair keeps
    # 2 to 5 of its 6 patches (asserted below). With a single kept patch every aggregated token
    # is that patch, their cosines tie, and which token the max's gradient reaches is a choice
    # (the loop's max takes the first, amax shares it), not a difference of the equations.
    u = torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    noise = u.log() - torch.log1p(-u)
    monkeypatch.setattr(ps, "logistic_noise", lambda shape, **kw: noise.clone())
    slim = laps(num_out=2).double().train()
    images, texts = image_tokens(n=7, prefix=1), text_tokens()
    feats = images.feats.clone().requires_grad_(True)
    words = texts.feats.clone().requires_grad_(True)
    scores, keep = slim(Tokens(feats, num_prefix_tokens=1), Tokens(words, texts.mask))
    kept = keep[..., 1:].detach().sum(-1)
    assert bool((kept >= 2).all()) and bool((kept <= 5).all()), kept
    want = torch.zeros(3, 4, dtype=torch.float64)
    want_d = torch.zeros(3, 4, 6, dtype=torch.float64)
    for i in range(3):
        for t in range(4):
            w = [words[t, m] for m in range(4) if texts.mask[t, m]]
            want[i, t], want_d[i, t] = reference_training_pair(slim, feats[i], w, noise[i, :, t])
    torch.testing.assert_close(scores, want)
    torch.testing.assert_close(keep[..., 1:], want_d)
    proj = torch.randn(3, 4, dtype=torch.float64)
    params = [feats, words, *slim.scorer.mlp.parameters(), *slim.aggregation.mlp.parameters()]
    got_g = torch.autograd.grad(
        (scores * proj).sum() + (keep[..., 1:] ** 2).sum(), params, allow_unused=True
    )
    want_g = torch.autograd.grad((want * proj).sum() + (want_d**2).sum(), params, allow_unused=True)
    for g, h in zip(got_g, want_g):
        torch.testing.assert_close(g, h)


def test_pairwise_arithmetic_stays_in_float32_under_bf16_autocast():
    slim = laps(num_out=3).eval()
    images, texts = image_tokens(dtype=torch.float32), text_tokens(dtype=torch.float32)
    ref, _ = slim(images, texts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, keep = slim(images, texts)
    assert scores.dtype == torch.float32 and keep.dtype == torch.float32
    # only the MLPs ran in bf16; the Gram norms and cosines did not (bf16 there is off by ~0.1)
    torch.testing.assert_close(scores, ref, rtol=0, atol=1e-2)


def test_scan_alignment_row_equals_the_loop():
    """Table 4's SCAN row: the slimmed sets aligned by SCAN's text-to-image attention."""
    from imtm.components import ScanAttention

    scan = ScanAttention()
    slim = laps(alignment=scan).double().eval()
    images, texts = image_tokens(lengths=[7, 5, 6]), text_tokens()
    with torch.no_grad():
        scores, _ = slim(images, texts)
        want, _ = reference(slim, images, texts, align=scan)
    torch.testing.assert_close(scores, want)


def test_module_is_a_thin_wrapper_over_the_functional():
    from imtm.functional import patch_slimming_scores

    slim = laps(num_out=3).double().eval()
    images, texts = image_tokens(lengths=[7, 5, 6]), text_tokens()
    scores, keep = slim(images, texts)
    patches = images.zero_padding().feats[:, 1:]
    out = patch_slimming_scores(
        images.feats,
        texts.feats,
        images.mask,
        texts.mask,
        predicted=torch.sigmoid(slim.scorer.mlp(patches).squeeze(-1)),
        num_prefix_tokens=1,
        aggregation_logits=slim.aggregation.mlp(patches),
    )
    torch.testing.assert_close(scores, out.scores)
    torch.testing.assert_close(keep, out.keep_decisions)


def test_parameters_are_checked_once_not_on_every_forward(monkeypatch):
    slim = laps().double().eval()
    images, texts = image_tokens(), text_tokens()
    calls = []
    for part in (slim, slim.scorer, slim.selector):
        original = part.validate
        monkeypatch.setattr(part, "validate", lambda o=original: calls.append(1) or o())
    slim(images, texts)
    first = len(calls)
    assert first >= 1
    slim(images, texts)
    slim(images, texts)
    assert len(calls) == first  # no check repeated per forward
    # a part changed after validation is checked again, at the next call
    slim.selector.ratio = 1.5
    with pytest.raises(
        ValueError, match=r"GumbelSelector: ratio must be a finite number in \(0, 1\]"
    ):
        slim(images, texts)
    import inspect

    for cls in (PatchScorer, GumbelSelector, DPCKNNAggregation, TokenAggregation):
        assert "validate(" not in inspect.getsource(cls.forward)
