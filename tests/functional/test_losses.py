import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.functional import info_nce_loss, row_multiplicity, triplet_loss
from imtm.testing import image_ids, score_matrices

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def problems(draw, min_size=1, max_size=5):
    """Scores (float64), a second score matrix for the pair form, and any bool positives with a True."""
    bi = draw(st.integers(min_size, max_size))
    bt = draw(st.integers(min_size, max_size))
    s1 = draw(score_matrices(bi=bi, bt=bt))
    s2 = draw(score_matrices(bi=bi, bt=bt))
    bits = draw(st.lists(st.booleans(), min_size=bi * bt, max_size=bi * bt))
    pos = torch.tensor(bits, dtype=torch.bool).reshape(bi, bt)
    if not bool(pos.any()):
        pos[draw(st.integers(0, bi - 1)), draw(st.integers(0, bt - 1))] = True
    return s1, s2, pos


# ---------------------------------------------------------------------- plain loop references
def loop_triplet(s_i2t, s_t2i, pos, margin, hardest):
    """VSE++ Eqs. 5/6 written pair by pair: (Bi, Bt) terms, zero off the positives."""
    bi, bt = pos.shape
    rows = []
    for i in range(bi):
        row = []
        for t in range(bt):
            term = s_i2t.new_zeros(())
            if pos[i, t]:
                i2t = [
                    torch.clamp(margin - s_i2t[i, t] + s_i2t[i, u], min=0)
                    for u in range(bt)
                    if not pos[i, u]
                ]
                t2i = [
                    torch.clamp(margin - s_t2i[i, t] + s_t2i[j, t], min=0)
                    for j in range(bi)
                    if not pos[j, t]
                ]
                for hinges in (i2t, t2i):
                    if hinges:
                        stacked = torch.stack(hinges)
                        term = term + (stacked.max() if hardest else stacked.sum())
            row.append(term)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def loop_info_nce(s_i2t, s_t2i, pos, tau):
    bi, bt = pos.shape
    i2t, t2i = [], []
    for i in range(bi):
        if pos[i].any():
            num = sum(torch.exp(s_i2t[i, t] / tau) for t in range(bt) if pos[i, t])
            den = sum(torch.exp(s_i2t[i, t] / tau) for t in range(bt))
            i2t.append(-torch.log(num / den))
    for t in range(bt):
        if pos[:, t].any():
            num = sum(torch.exp(s_t2i[i, t] / tau) for i in range(bi) if pos[i, t])
            den = sum(torch.exp(s_t2i[i, t] / tau) for i in range(bi))
            t2i.append(-torch.log(num / den))
    return (torch.stack(i2t).mean() + torch.stack(t2i).mean()) / 2


# ---------------------------------------------------------------------- triplet_loss
@SETTINGS
@given(
    problem=problems(),
    margin=st.sampled_from([0.0, 0.2, 0.5]),
    hardest=st.booleans(),
    reduction=st.sampled_from(["sum", "mean", "none"]),
    paired=st.booleans(),
)
def test_triplet_matches_loop_forward_and_gradient(problem, margin, hardest, reduction, paired):
    s1, s2, pos = problem
    if not paired:
        s2 = s1
    a1, a2 = s1.clone().requires_grad_(), s2.clone().requires_grad_()
    b1, b2 = s1.clone().requires_grad_(), s2.clone().requires_grad_()
    scores = (a1, a2) if paired else a1
    # Arbitrary positives may repeat a row: every row counts here; "once" has its own loop below.
    out = triplet_loss(
        scores, pos, margin=margin, hardest=hardest, reduction=reduction, count_pairs="per_row"
    )
    ref_terms = loop_triplet(b1, b2 if paired else b1, pos, margin, hardest)
    ref = {"sum": ref_terms.sum(), "mean": ref_terms.sum() / pos.sum(), "none": ref_terms}[
        reduction
    ]
    ref = ref + 0 * (
        b1.sum() + b2.sum()
    )  # a graph (and zero gradients) even where no hinge is active
    torch.testing.assert_close(out, ref)
    assert bool((out >= 0).all())
    weights = torch.rand(out.shape, dtype=out.dtype)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(a1.grad, b1.grad)
    if paired:
        torch.testing.assert_close(a2.grad, b2.grad)


@SETTINGS
@given(problem=problems(max_size=6), hardest=st.booleans())
def test_triplet_with_tied_scores_matches_loop(problem, hardest):
    # Scores on a coarse grid make many negatives tie with each other and with s(i, t) - margin.
    s, _, pos = problem
    s = (s * 4).round() / 4
    out = triplet_loss(
        s, pos, margin=0.25, hardest=hardest, reduction="none", count_pairs="per_row"
    )
    torch.testing.assert_close(out, loop_triplet(s, s, pos, 0.25, hardest))


@SETTINGS
@given(ids=image_ids(batch=st.integers(2, 6), max_images=3), seed=st.integers(0, 1000))
def test_triplet_is_permutation_equivariant(ids, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(len(ids), len(ids), generator=g, dtype=torch.float64)
    pos = ids[:, None] == ids[None, :]
    rows, cols = torch.randperm(len(ids), generator=g), torch.randperm(len(ids), generator=g)
    for hardest in (True, False):
        full = triplet_loss(s, pos, hardest=hardest, reduction="none")
        permuted = triplet_loss(
            s[rows][:, cols], pos[rows][:, cols], hardest=hardest, reduction="none"
        )
        torch.testing.assert_close(permuted, full[rows][:, cols])


def loop_triplet_deduplicated(base, caption_image, margin, hardest):
    """VSE++ Eqs. 5/6 over the distinct images: ``base[u, c]`` scores image ``u`` with caption ``c``.

    Each matched pair (u, c) once; negatives are the captions of other images and the other
    distinct images, each once. The total of both directions.
    """
    n_images, n_captions = base.shape
    total = base.new_zeros(())
    for u in range(n_images):
        for c in range(n_captions):
            if caption_image[c] != u:
                continue
            i2t = [
                torch.clamp(margin - base[u, c] + base[u, d], min=0)
                for d in range(n_captions)
                if caption_image[d] != u
            ]
            t2i = [
                torch.clamp(margin - base[u, c] + base[v, c], min=0)
                for v in range(n_images)
                if v != u
            ]
            for hinges in (i2t, t2i):
                if hinges:
                    stacked = torch.stack(hinges)
                    total = total + (stacked.max() if hardest else stacked.sum())
    return total


@SETTINGS
@given(
    ids=image_ids(batch=st.integers(2, 7), max_images=3),
    seed=st.integers(0, 1000),
    margin=st.sampled_from([0.0, 0.2, 0.5]),
    hardest=st.booleans(),
)
def test_triplet_counts_each_pair_once_with_repeated_image_rows(ids, seed, margin, hardest):
    # A training batch: row b of the images is the image of caption b, so an image with k captions
    # fills k identical rows. The loss must equal the loss of the de-duplicated batch.
    g = torch.Generator().manual_seed(seed)
    distinct, caption_image = torch.unique(ids, return_inverse=True)
    base = torch.rand(len(distinct), len(ids), generator=g, dtype=torch.float64, requires_grad=True)
    scores = base[caption_image]  # (B, B): row b is the distinct image of caption b
    pos = ids[:, None] == ids[None, :]
    out = triplet_loss(scores, pos, margin=margin, hardest=hardest)
    ref = loop_triplet_deduplicated(base, caption_image.tolist(), margin, hardest)
    torch.testing.assert_close(out, ref)
    n_pairs = len(ids)  # one matched pair per caption
    torch.testing.assert_close(
        triplet_loss(scores, pos, margin=margin, hardest=hardest, reduction="mean"), ref / n_pairs
    )
    (grad,) = torch.autograd.grad(out, base)
    (ref_grad,) = torch.autograd.grad(ref + 0 * base.sum(), base)
    torch.testing.assert_close(grad, ref_grad)


def loop_triplet_copies(s, pos, margin, hardest):
    """The "once" rule written out: rows with the same non-empty positives are copies of one image;
    each copy's terms weigh 1 / copies, and in the summed loss a negative row weighs 1 / its copies."""
    bi, bt = pos.shape
    copies = [
        sum(1 for u in range(bi) if pos[u].any() and bool((pos[u] == pos[r]).all())) or 1
        for r in range(bi)
    ]
    total = s.new_zeros(())
    for i in range(bi):
        for t in range(bt):
            if not pos[i, t]:
                continue
            i2t = [
                torch.clamp(margin - s[i, t] + s[i, u], min=0) for u in range(bt) if not pos[i, u]
            ]
            t2i = [
                torch.clamp(margin - s[i, t] + s[j, t], min=0) / (1 if hardest else copies[j])
                for j in range(bi)
                if not pos[j, t]
            ]
            for hinges in (i2t, t2i):
                if hinges:
                    stacked = torch.stack(hinges)
                    total = total + (stacked.max() if hardest else stacked.sum()) / copies[i]
    return total


@SETTINGS
@given(
    ids=image_ids(batch=st.integers(2, 7), max_images=3),
    seed=st.integers(0, 1000),
    hardest=st.booleans(),
)
def test_triplet_once_with_unequal_copies_matches_loop(ids, seed, hardest):
    # Copies of one image need not score alike (dropout in the image encoder): each copy weighs 1 / k.
    s = torch.rand(
        len(ids), len(ids), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    pos = ids[:, None] == ids[None, :]
    torch.testing.assert_close(
        triplet_loss(s, pos, margin=0.3, hardest=hardest), loop_triplet_copies(s, pos, 0.3, hardest)
    )


def test_triplet_per_row_counts_a_pair_once_per_copy():
    # Image 7 has 3 captions in the batch: with identical rows, "per_row" counts its pairs 3 times.
    ids = torch.tensor([7, 7, 7, 3])
    base = torch.tensor([[0.5, 0.6, 0.4, 0.7], [0.2, 0.1, 0.3, 0.5]])
    s = base[torch.tensor([0, 0, 0, 1])]
    pos = ids[:, None] == ids[None, :]
    once = triplet_loss(s, pos, hardest=False, reduction="none")
    per_row = triplet_loss(s, pos, hardest=False, reduction="none", count_pairs="per_row")
    torch.testing.assert_close(per_row[:3].sum(0), 3 * once[:3].sum(0))
    # Caption 3 (image 3): in the summed loss "per_row" pushes it from image 7 three times, "once"
    # once; the hinge is 0.2 - 0.5 + 0.7 = 0.4.
    torch.testing.assert_close(per_row[3, 3] - once[3, 3], torch.tensor(2 * 0.4))
    assert row_multiplicity(pos).tolist() == [3, 3, 3, 1]


def test_triplet_vsepp_hand_computed():
    s = torch.tensor([[0.9, 0.8], [0.1, 0.5]])
    pos = torch.eye(2, dtype=torch.bool)
    # i2t: row 0 [0.2-0.9+0.8]=0.1, row 1 [0.2-0.5+0.1]=0; t2i: col 0 0, col 1 [0.2-0.5+0.8]=0.5
    torch.testing.assert_close(triplet_loss(s, pos), torch.tensor(0.6))
    torch.testing.assert_close(triplet_loss(s, pos, reduction="mean"), torch.tensor(0.3))
    torch.testing.assert_close(
        triplet_loss(s, pos, reduction="none"), torch.tensor([[0.1, 0.0], [0.0, 0.5]])
    )


def test_triplet_several_captions_of_one_image_are_not_negatives():
    # Batch of 4 items; items 0 and 1 are two captions of image 7 (so rows 0 and 1 are the same image).
    ids = torch.tensor([7, 7, 3, 5])
    pos = ids[:, None] == ids[None, :]
    s = torch.zeros(4, 4)
    s[pos] = 0.9
    s[0, 1] = s[1, 0] = (
        0.95  # the other caption of the same image scores even higher: still a positive
    )
    for hardest in (True, False):
        assert float(triplet_loss(s, pos, hardest=hardest)) == 0.0
        # Treating only the diagonal as positive would count those pairs as violations.
        assert float(triplet_loss(s, torch.eye(4, dtype=torch.bool), hardest=hardest)) > 0.0


def test_triplet_batch_of_one_image_has_no_negatives():
    s = torch.randn(3, 3, requires_grad=True)
    pos = torch.ones(3, 3, dtype=torch.bool)
    for hardest in (True, False):
        loss = triplet_loss(s, pos, hardest=hardest)
        assert float(loss.detach()) == 0.0
        loss.backward()
        assert bool(torch.isfinite(s.grad).all()) and float(s.grad.abs().sum()) == 0.0


def test_triplet_pair_reads_each_direction_from_its_matrix():
    pos = torch.eye(2, dtype=torch.bool)
    s_i2t = torch.tensor([[0.9, 0.8], [0.1, 0.5]])
    s_t2i = torch.tensor([[0.9, -1.0], [-1.0, 0.5]])  # no text-to-image violation at all
    torch.testing.assert_close(triplet_loss((s_i2t, s_t2i), pos), torch.tensor(0.1))
    torch.testing.assert_close(triplet_loss([s_i2t, s_i2t], pos), triplet_loss(s_i2t, pos))


def test_triplet_gradient_flows_to_hardest_negative_only():
    # Only row 0 violates the margin, against (0, 1) by 0.15 and (0, 2) by 0.1.
    s = torch.tensor([[0.5, 0.45, 0.4], [-1.0, 0.9, -1.0], [-1.0, -1.0, 0.9]], requires_grad=True)
    pos = torch.eye(3, dtype=torch.bool)
    triplet_loss(s, pos).backward()
    expected = torch.zeros(3, 3)
    expected[0, 0], expected[0, 1] = -1.0, 1.0  # the hardest negative alone gets the gradient
    torch.testing.assert_close(s.grad, expected)
    s.grad = None
    triplet_loss(s, pos, hardest=False).backward()
    expected[0, 0], expected[0, 2] = -2.0, 1.0  # the sum of hinges pushes both
    torch.testing.assert_close(s.grad, expected)


def test_triplet_sum_variant_scales_to_large_batches():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(400, 400, generator=g)
    ids = torch.arange(400) // 2
    out = triplet_loss(s, ids[:, None] == ids[None, :], hardest=False, reduction="none")
    assert out.shape == (400, 400) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"positives": torch.eye(3)}, TypeError, "positives must be a bool tensor"),
        (
            {"positives": torch.eye(2, dtype=torch.bool)},
            ValueError,
            r"positives has shape \(2, 2\)",
        ),
        ({"positives": torch.zeros(3, 3, dtype=torch.bool)}, ValueError, "no True entry"),
        ({"scores": torch.full((3, 3), float("nan"))}, ValueError, "NaN"),
        ({"scores": torch.randn(3)}, ValueError, r"shape \(Bi, Bt\)"),
        ({"scores": torch.ones(3, 3, dtype=torch.long)}, TypeError, "floating point"),
        ({"scores": [torch.randn(3, 3)] * 3}, ValueError, "got a sequence of 3"),
        ({"scores": (torch.randn(3, 3), torch.randn(3, 2))}, ValueError, "same shape"),
        ({"scores": "abc"}, TypeError, "got str"),
        ({"margin": -0.1}, ValueError, "margin must be a finite number >= 0"),
        ({"margin": float("nan")}, ValueError, "margin"),
        ({"hardest": "yes"}, TypeError, "hardest must be True"),
        ({"count_pairs": "onse"}, ValueError, "count_pairs must be one of .*Did you mean 'once'"),
        (
            {"reduction": "meen"},
            ValueError,
            r"reduction must be one of \['mean', 'none', 'sum'\], got 'meen'. Did you mean 'mean'",
        ),
    ],
)
def test_triplet_bad_inputs(kwargs, error, match):
    args = {"scores": torch.randn(3, 3), "positives": torch.eye(3, dtype=torch.bool)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        triplet_loss(**args)


# ---------------------------------------------------------------------- info_nce_loss
@SETTINGS
@given(problem=problems(), tau=st.sampled_from([0.05, 0.5, 1.0]), paired=st.booleans())
def test_info_nce_matches_loop_forward_and_gradient(problem, tau, paired):
    s1, s2, pos = problem
    if not paired:
        s2 = s1
    a1, a2 = s1.clone().requires_grad_(), s2.clone().requires_grad_()
    b1, b2 = s1.clone().requires_grad_(), s2.clone().requires_grad_()
    out = info_nce_loss((a1, a2) if paired else a1, pos, temperature=tau)
    ref = loop_info_nce(b1, b2 if paired else b1, pos, tau)
    torch.testing.assert_close(out, ref)
    assert float(out.detach()) >= 0
    out.backward()
    ref.backward()
    torch.testing.assert_close(a1.grad, b1.grad)
    if paired:
        torch.testing.assert_close(a2.grad, b2.grad)


def test_info_nce_with_one_positive_per_query_is_clip():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 5, generator=g)
    labels = torch.arange(5)
    clip = (F.cross_entropy(s / 0.07, labels) + F.cross_entropy(s.t() / 0.07, labels)) / 2
    torch.testing.assert_close(
        info_nce_loss(s, torch.eye(5, dtype=torch.bool), temperature=0.07), clip
    )


def test_info_nce_learnable_temperature_tensor_and_extreme_scale():
    log_tau = torch.tensor(math.log(0.001), requires_grad=True)
    s = torch.rand(4, 4) * 2 - 1
    loss = info_nce_loss(s, torch.eye(4, dtype=torch.bool), temperature=log_tau.exp())
    loss.backward()
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(log_tau.grad))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": True}, ValueError, "temperature"),
        ({"temperature": torch.ones(2)}, ValueError, "one-element tensor"),
        ({"positives": torch.eye(3).long()}, TypeError, "bool"),
        ({"scores": torch.full((3, 3), float("inf"))}, ValueError, "NaN or inf"),
    ],
)
def test_info_nce_bad_inputs(kwargs, error, match):
    args = {"scores": torch.randn(3, 3), "positives": torch.eye(3, dtype=torch.bool)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        info_nce_loss(**args)
