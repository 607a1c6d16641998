import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens
from imtm.components import GumbelSelector, PatchScorer, RatioLoss, RedundantFusion
from imtm.functional import ratio_loss

SETTINGS = settings(max_examples=15, deadline=None)


def images_with_lengths(seed, b, n, prefix, dim=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(prefix + 1, n + 1, (b,), generator=g)
    feats = torch.randn(b, n, dim, generator=g, dtype=torch.float64)
    return Tokens.from_lengths(feats, lengths, num_prefix_tokens=prefix), lengths


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    prefix=st.integers(0, 2),
    ratio=st.sampled_from([0.25, 0.5, 0.8, 1.0]),
    beta=st.floats(0, 1),
)
def test_scorer_bounds_and_selector_counts(seed, prefix, ratio, beta):
    images, lengths = images_with_lengths(seed, 3, 7, prefix)
    g = torch.Generator().manual_seed(seed + 1)
    texts = Tokens.from_lengths(torch.randn(2, 4, 6, generator=g, dtype=torch.float64), [4, 2])
    torch.manual_seed(seed)
    a = PatchScorer(6, beta=beta).double()(images, texts)
    assert a.shape == (3, 2, 7) and bool(((a >= 0) & (a <= 1)).all())
    assert bool((a[..., :prefix] == 0).all()) and bool(
        (a[~images.mask.unsqueeze(1).expand_as(a)] == 0).all()
    )
    keep = GumbelSelector(ratio).eval()(a, images)
    for i in range(3):
        n = int(lengths[i]) - prefix
        assert bool((keep[i, :, :prefix] == 1).all()) and bool(
            (keep[i, :, int(lengths[i]) :] == 0).all()
        )
        assert bool((keep[i, :, prefix:].sum(-1) == math.ceil(round(ratio * n, 9))).all())
    train_keep = GumbelSelector(ratio).train()(a, images)
    assert set(train_keep.unique().tolist()) <= {0.0, 1.0}
    assert bool((train_keep[~images.mask.unsqueeze(1).expand_as(a)] == 0).all())


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_fused_token_ignores_kept_patches_and_padding(seed):
    images, lengths = images_with_lengths(seed, 2, 6, 1)
    g = torch.Generator().manual_seed(seed + 1)
    scores = torch.rand(2, 3, 6, generator=g, dtype=torch.float64)
    keep = (torch.rand(2, 3, 6, generator=g) > 0.5).double()
    fused = RedundantFusion()(images, scores, keep)
    for t in range(3):
        alt = images.feats.clone()
        # new values in every kept patch, in [CLS] and in padding: the fused token of pair t stays
        change = (keep[:, t] == 1) | ~images.mask
        change[:, 0] = True
        alt[change] = torch.randn(int(change.sum()), 6, generator=g, dtype=torch.float64)
        torch.testing.assert_close(
            RedundantFusion()(images.with_feats(alt), scores, keep)[:, t], fused[:, t]
        )


@SETTINGS
@given(seed=st.integers(0, 10_000), rho=st.floats(0.05, 1.0))
def test_ratio_loss_bounds_and_loop(seed, rho):
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(2, 3, 5, generator=g) > 0.5).double()
    mask = torch.rand(2, 1, 5, generator=g) > 0.3
    mask[..., 0] = True
    got = ratio_loss(d, rho, mask)
    want = 0.0
    for i in range(2):
        for t in range(3):
            real = [float(d[i, t, n]) for n in range(5) if mask[i, 0, n]]
            want += (rho - sum(real) / len(real)) ** 2 / 6
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert 0 <= float(got) <= 1
    images = Tokens(torch.randn(2, 5, 4), mask[:, 0].clone())
    torch.testing.assert_close(RatioLoss(rho)(d, images), got)
