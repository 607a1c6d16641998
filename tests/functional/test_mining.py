import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.functional import distance_weighted_negatives, triplet_loss
from imtm.testing import image_ids

SETTINGS = settings(max_examples=20, deadline=None)


def loop_weights(row_scores, row_positives, dim, cutoff=0.5, nonzero_loss_cutoff=1.4):
    """Wu et al. Eq. 3-4 for one anchor: weight of every candidate column, normalised."""
    w = []
    for s, pos in zip(row_scores, row_positives):
        d = max(math.sqrt(max(2 - 2 * s, 0.0)), cutoff)
        if pos or d >= nonzero_loss_cutoff:
            w.append(0.0)
            continue
        log_q = (dim - 2) * math.log(d) + (dim - 3) / 2 * math.log(max(1 - d * d / 4, 1e-6))
        w.append(math.exp(-log_q))  # 1 / q(d); the cutoff is the cap lambda
    if sum(w) == 0:  # no negative within the cut-off: uniform over the negatives
        w = [0.0 if pos else 1.0 for pos in row_positives]
    total = sum(w)
    return [x / total for x in w]


def test_draws_follow_the_distance_weights():
    scores = torch.tensor(
        [[0.95, 0.9, 0.6, 0.2, -0.3, 0.5], [0.1, 0.99, 0.3, 0.35, 0.0, 0.95]], dtype=torch.float64
    )
    positives = torch.zeros(2, 6, dtype=torch.bool)
    positives[0, 0] = positives[1, 1] = True
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.zeros(2, 6)
    for _ in range(n // 6):
        i2t, _ = distance_weighted_negatives(scores, positives, dim=8, generator=g)
        for r in range(2):
            counts[r] += torch.bincount(i2t[r], minlength=6)
    total = counts.sum(1, keepdim=True)
    for r in range(2):
        expect = torch.tensor(
            loop_weights(scores[r].tolist(), positives[r].tolist(), 8), dtype=torch.float32
        )
        torch.testing.assert_close(counts[r] / total[r], expect, atol=0.03, rtol=0)


@SETTINGS
@given(
    ids=image_ids(batch=st.integers(2, 8)),
    seed=st.integers(0, 2**16),
    dim=st.sampled_from([4, 16, 128]),
)
def test_never_a_positive_where_a_negative_exists(ids, seed, dim):
    positives = ids[:, None] == ids[None, :]
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(len(ids), len(ids), generator=g, dtype=torch.float64) * 2 - 1
    i2t, t2i = distance_weighted_negatives(scores, positives, dim=dim, generator=g)
    assert i2t.shape == t2i.shape == positives.shape and i2t.dtype == torch.long
    rows = torch.arange(len(ids))[:, None]
    cols = torch.arange(len(ids))[None, :]
    has_neg_row = (~positives).any(1, keepdim=True).expand_as(positives)
    has_neg_col = (~positives).any(0, keepdim=True).expand_as(positives)
    assert not bool((positives[rows, i2t] & has_neg_row).any())
    assert not bool((positives[t2i, cols] & has_neg_col).any())
    loss = triplet_loss(scores, positives, negatives=(i2t, t2i))
    assert torch.isfinite(loss) and float(loss) >= 0


def test_same_generator_seed_same_draws_and_pair_scores():
    g = torch.Generator().manual_seed(1)
    scores, other = torch.rand(5, 5, generator=g), torch.rand(5, 5, generator=g)
    positives = torch.eye(5, dtype=torch.bool)
    a = distance_weighted_negatives(
        scores, positives, dim=8, generator=torch.Generator().manual_seed(3)
    )
    b = distance_weighted_negatives(
        scores, positives, dim=8, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # With a pair, image-to-text draws read the first matrix and text-to-image draws the second.
    pair = distance_weighted_negatives(
        (scores, other), positives, dim=8, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(pair[0], a[0])
    only_t2i = distance_weighted_negatives(
        other, positives, dim=8, generator=torch.Generator().manual_seed(3)
    )
    assert pair[1].shape == only_t2i[1].shape


def test_triplet_with_negatives_matches_the_loop():
    g = torch.Generator().manual_seed(2)
    ids = torch.tensor([0, 0, 1, 2])
    positives = ids[:, None] == ids[None, :]
    scores = torch.rand(4, 4, generator=g, dtype=torch.float64)
    i2t, t2i = distance_weighted_negatives(scores, positives, dim=8, generator=g)
    copies = [2, 2, 1, 1]  # image 0 fills rows 0 and 1: each of its pairs counts once in all
    expect = 0.0
    for i in range(4):
        for t in range(4):
            if positives[i, t]:
                expect += (
                    max(0.0, 0.2 - float(scores[i, t]) + float(scores[i, i2t[i, t]])) / copies[i]
                )
                expect += (
                    max(0.0, 0.2 - float(scores[i, t]) + float(scores[t2i[i, t], t])) / copies[i]
                )
    torch.testing.assert_close(
        triplet_loss(scores, positives, negatives=(i2t, t2i)),
        torch.tensor(expect, dtype=torch.float64),
    )
    # 4 distinct matched pairs (one per caption)
    torch.testing.assert_close(
        triplet_loss(scores, positives, negatives=(i2t, t2i), reduction="mean"),
        torch.tensor(expect / 4, dtype=torch.float64),
    )
    # A batch of one image has no negative: the loss is 0.
    one = torch.ones(2, 2, dtype=torch.bool)
    negs = distance_weighted_negatives(scores[:2, :2], one, dim=8)
    assert float(triplet_loss(scores[:2, :2], one, negatives=negs)) == 0.0


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s, p: distance_weighted_negatives("s", p, dim=8), TypeError, "scores must be a"),
        (
            lambda s, p: distance_weighted_negatives(s[0], p, dim=8),
            ValueError,
            r"floating \(Bi, Bt\)",
        ),
        (
            lambda s, p: distance_weighted_negatives((s, s[:2]), p, dim=8),
            ValueError,
            "differ in shape",
        ),
        (
            lambda s, p: distance_weighted_negatives(s, p.float(), dim=8),
            ValueError,
            "positives must be a bool tensor",
        ),
        (
            lambda s, p: distance_weighted_negatives(s, p, dim=3),
            ValueError,
            "dim must be the embedding dimension",
        ),
        (
            lambda s, p: distance_weighted_negatives(s, p, dim=8, cutoff=0.0),
            ValueError,
            "cutoff must be a number",
        ),
        (
            lambda s, p: distance_weighted_negatives(s, p, dim=8, nonzero_loss_cutoff=0.2),
            ValueError,
            "nonzero_loss_cutoff",
        ),
        (
            lambda s, p: distance_weighted_negatives(s, p, dim=8, generator=0),
            TypeError,
            "generator must be a torch.Generator",
        ),
        (
            lambda s, p: distance_weighted_negatives(s * float("nan"), p, dim=8),
            ValueError,
            "NaN or inf",
        ),
        (
            lambda s, p: triplet_loss(s, p, negatives=torch.zeros(3, 3)),
            TypeError,
            "negatives must be a pair",
        ),
        (
            lambda s, p: triplet_loss(s, p, negatives=(torch.zeros(3, 3), torch.zeros(3, 3))),
            ValueError,
            "must be a long tensor",
        ),
        (
            lambda s, p: triplet_loss(
                s, p, negatives=(torch.full((3, 3), 3), torch.zeros(3, 3, dtype=torch.long))
            ),
            ValueError,
            "outside",
        ),
        (
            lambda s, p: triplet_loss(s, p, negatives=(torch.zeros(3, 3, dtype=torch.long),) * 2),
            ValueError,
            "picks a matching pair",
        ),
    ],
)
def test_bad_inputs(call, error, match):
    s, p = torch.rand(3, 3), torch.eye(3, dtype=torch.bool)
    with pytest.raises(error, match=match):
        call(s, p)
