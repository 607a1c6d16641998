import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.functional import local_matching_scores, local_weights
from imtm.testing import tokens

SETTINGS = settings(max_examples=20, deadline=None)
SIDES = {"batch": st.integers(1, 4), "max_tokens": 5, "dim": 4, "dtype": torch.float64}


def unit(a):
    n = math.sqrt(sum(x * x for x in a))
    return [x / max(n, 1e-8) for x in a]


def cos(a, b):
    return sum(x * y for x, y in zip(unit(a), unit(b)))


def loop_weights(sims, weighting, tau):
    """Eq. 1's weights over one list of cosines: the printed ratio on clamped cosines, or a softmax."""
    if weighting == "softmax":
        top = max(sims)
        e = [math.exp((s - top) / tau) for s in sims]
        return [x / sum(e) for x in e]
    pos = [max(s, 0.0) for s in sims]
    total = sum(pos)
    return [p / total for p in pos] if total > 1e-8 else [1 / len(sims)] * len(sims)


def loop_score(regions, words, weighting, tau):
    """Eq. 1-3 for one pair, written out: update every region and word, average, cosine."""
    v = [unit(r) for r in regions]
    t = [unit(w) for w in words]
    s = [[sum(x * y for x, y in zip(vi, tj)) for tj in t] for vi in v]
    d = len(v[0])
    v_hat = []  # Eq. 1: region i <- weighted mean of the words
    for i in range(len(v)):
        w = loop_weights(s[i], weighting, tau)
        v_hat.append([sum(w[j] * t[j][k] for j in range(len(t))) for k in range(d)])
    t_hat = []  # Eq. 1: word j <- weighted mean of the regions
    for j in range(len(t)):
        w = loop_weights([s[i][j] for i in range(len(v))], weighting, tau)
        t_hat.append([sum(w[i] * v[i][k] for i in range(len(v))) for k in range(d)])
    V = [sum(x[k] for x in v_hat) / len(v_hat) for k in range(d)]  # Eq. 2
    T = [sum(x[k] for x in t_hat) / len(t_hat) for k in range(d)]
    return cos(V, T)  # Eq. 3


def loop_scores(images, texts, weighting="linear", tau=0.1):
    out = torch.empty(images.feats.shape[0], texts.feats.shape[0], dtype=torch.float64)
    for b in range(images.feats.shape[0]):
        regions = [
            images.feats[b, n].tolist() for n in range(images.feats.shape[1]) if images.mask[b, n]
        ]
        for c in range(texts.feats.shape[0]):
            words = [
                texts.feats[c, m].tolist() for m in range(texts.feats.shape[1]) if texts.mask[c, m]
            ]
            out[b, c] = loop_score(regions, words, weighting, tau)
    return out


@SETTINGS
@given(
    images=tokens(**SIDES),
    texts=tokens(**SIDES),
    weighting=st.sampled_from(["linear", "softmax"]),
    tau=st.sampled_from([0.05, 0.1, 1.0]),
)
def test_matches_the_loop_of_eq_1_to_3(images, texts, weighting, tau):
    got = local_matching_scores(
        images.feats, texts.feats, images.mask, texts.mask, weighting=weighting, tau=tau
    )
    torch.testing.assert_close(got, loop_scores(images, texts, weighting, tau))


def test_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 3, 4, dtype=torch.float64, generator=g).requires_grad_()
    t = torch.randn(3, 2, 4, dtype=torch.float64, generator=g).requires_grad_()
    for weighting in ("linear", "softmax"):
        assert torch.autograd.gradcheck(
            lambda a, b, w=weighting: local_matching_scores(a, b, weighting=w), (v, t)
        )


@SETTINGS
@given(
    images=tokens(**SIDES),
    texts=tokens(**SIDES),
    weighting=st.sampled_from(["linear", "softmax"]),
    extra=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_padding_permutations_bounds_and_block_size(images, texts, weighting, extra, seed):
    kw = {"weighting": weighting}
    base = local_matching_scores(images.feats, texts.feats, images.mask, texts.mask, **kw)
    assert bool((base.abs() <= 1 + 1e-9).all())
    g = torch.Generator().manual_seed(seed)
    # Extra padding holding large values changes nothing.
    pv = torch.cat(
        [
            images.feats,
            1e3 * torch.randn(images.feats.shape[0], extra, 4, generator=g, dtype=torch.float64),
        ],
        1,
    )
    pm = torch.cat([images.mask, torch.zeros(images.mask.shape[0], extra, dtype=torch.bool)], 1)
    torch.testing.assert_close(local_matching_scores(pv, texts.feats, pm, texts.mask, **kw), base)
    # Reordering the images and the captions reorders the scores; reordering tokens inside a set changes nothing.
    ri = torch.randperm(images.feats.shape[0], generator=g)
    rt = torch.randperm(texts.feats.shape[0], generator=g)
    torch.testing.assert_close(
        local_matching_scores(
            images.feats[ri], texts.feats[rt], images.mask[ri], texts.mask[rt], **kw
        ),
        base[ri][:, rt],
    )
    rn = torch.randperm(images.feats.shape[1], generator=g)
    torch.testing.assert_close(
        local_matching_scores(
            images.feats[:, rn], texts.feats, images.mask[:, rn], texts.mask, **kw
        ),
        base,
    )
    # Any block size gives the same scores (the training step and similarity() agree).
    for budget in (1, 7, 60):
        torch.testing.assert_close(
            local_matching_scores(
                images.feats, texts.feats, images.mask, texts.mask, max_block_elements=budget, **kw
            ),
            base,
        )


def test_linear_weights_clamp_negative_cosines_and_fall_back_to_uniform():
    mask = torch.ones(1, 3, dtype=torch.bool)
    lin = {"weighting": "linear"}
    torch.testing.assert_close(
        local_weights(torch.tensor([[0.6, -0.2, 0.2]]), mask, -1, **lin),
        torch.tensor([[0.75, 0.0, 0.25]]),
    )
    # Every cosine <= 0: the printed ratio is undefined (sum 0) or negative; the weights are uniform.
    torch.testing.assert_close(
        local_weights(torch.tensor([[-0.3, -0.1, 0.0]]), mask, -1, **lin), torch.full((1, 3), 1 / 3)
    )
    partial = torch.tensor([[True, True, False]])
    torch.testing.assert_close(
        local_weights(torch.tensor([[-0.3, -0.1, 0.9]]), partial, -1, **lin),
        torch.tensor([[0.5, 0.5, 0.0]]),
    )
    # A word that matches one region exactly scores 1 against an image made of that region.
    v = torch.tensor([[[1.0, 0.0]]])
    assert float(
        local_matching_scores(v, torch.tensor([[[2.0, 0.0], [0.0, -1.0]]]), **lin)
    ) == pytest.approx(1.0)
    # The softmax default: the softmax of the cosines over tau.
    torch.testing.assert_close(
        local_weights(torch.tensor([[0.6, -0.2, 0.2]]), mask, -1),
        torch.softmax(torch.tensor([[0.6, -0.2, 0.2]]) / 0.1, -1),
    )


def test_linear_and_softmax_differ():
    g = torch.Generator().manual_seed(3)
    v, t = torch.randn(3, 4, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    lin = local_matching_scores(v, t, weighting="linear")
    soft = local_matching_scores(v, t, weighting="softmax", tau=0.1)
    assert float((lin - soft).abs().max()) > 1e-3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"weighting": "linar"}, ValueError, "Did you mean 'linear'"),
        ({"tau": 0.0}, ValueError, "tau must be a finite number > 0"),
        ({"max_block_elements": 0}, ValueError, "max_block_elements must be a positive int"),
        ({"texts": torch.randn(2, 3, 5)}, ValueError, "feature dimension"),
        ({"images": torch.randn(2, 3, 4).long()}, TypeError, "floating"),
        ({"image_mask": torch.zeros(2, 3, dtype=torch.bool)}, ValueError, "padding"),
        ({"images": torch.full((2, 3, 4), float("nan"))}, ValueError, "NaN"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    args = {"images": torch.randn(2, 3, 4), "texts": torch.randn(2, 3, 4)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        local_matching_scores(**args)
