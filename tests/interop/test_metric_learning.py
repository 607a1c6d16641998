"""imtm <-> pytorch-metric-learning: PML miners' tuples in imtm's hinge, PML losses on imtm score matrices."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.interop.metric_learning import (
    labels_from_positives,
    pairs_to_triplets,
    tuple_triplet_loss,
)


def loop_triplet_loss(scores, a, p, n, margin, direction):
    total = []
    for k in range(len(a)):
        if direction == "i2t":
            pos, neg = scores[a[k], p[k]], scores[a[k], n[k]]
        else:
            pos, neg = scores[p[k], a[k]], scores[n[k], a[k]]
        total.append(torch.clamp(margin - pos + neg, min=0))
    return torch.stack(total)


@settings(max_examples=25, deadline=None)
@given(
    bi=st.integers(1, 5),
    bt=st.integers(1, 6),
    t=st.integers(0, 12),
    seed=st.integers(0, 999),
    direction=st.sampled_from(["i2t", "t2i"]),
    margin=st.floats(0, 1),
)
def test_tuple_triplet_loss_is_the_loop(bi, bt, t, seed, direction, margin):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(bi, bt, generator=g, dtype=torch.float64, requires_grad=True)
    rows, cols = (bi, bt) if direction == "i2t" else (bt, bi)
    a = torch.randint(0, rows, (t,), generator=g)
    p, n = torch.randint(0, cols, (t,), generator=g), torch.randint(0, cols, (t,), generator=g)
    got = tuple_triplet_loss(
        scores, (a, p, n), margin=margin, direction=direction, reduction="none"
    )
    if t == 0:
        assert got.shape == (0,)
        mean = tuple_triplet_loss(scores, (a, p, n), direction=direction)
        mean.backward()  # an empty mining keeps the graph
        assert float(mean.detach()) == 0.0
        return
    want = loop_triplet_loss(scores, a, p, n, margin, direction)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        tuple_triplet_loss(scores, (a, p, n), margin=margin, direction=direction), want.mean()
    )
    g1 = torch.autograd.grad(got.sum(), scores)[0]
    g2 = torch.autograd.grad(want.sum(), scores)[0]
    torch.testing.assert_close(g1, g2)


def test_pairs_become_triplets_per_anchor():
    a1, p, a2, n = (
        torch.tensor([0, 0, 2]),
        torch.tensor([1, 3, 0]),
        torch.tensor([0, 2, 2]),
        torch.tensor([5, 6, 7]),
    )
    ta, tp, tn = pairs_to_triplets((a1, p, a2, n))
    want = {(int(x), int(y), int(z)) for x, y in zip(a1, p) for w, z in zip(a2, n) if x == w}
    assert set(zip(ta.tolist(), tp.tolist(), tn.tolist())) == want and len(ta) == len(want)
    scores = torch.randn(3, 8)
    torch.testing.assert_close(
        tuple_triplet_loss(scores, (a1, p, a2, n)), tuple_triplet_loss(scores, (ta, tp, tn))
    )


def test_bad_tuples_and_options():
    s = torch.randn(2, 3)
    i = torch.tensor([0])
    with pytest.raises(ValueError, match="positive indices must lie in \\[0, 3\\)"):
        tuple_triplet_loss(s, (i, torch.tensor([3]), i))
    with pytest.raises(
        ValueError, match="anchor indices must lie in \\[0, 3\\) for direction='t2i'"
    ):
        tuple_triplet_loss(s, (torch.tensor([3]), i, i), direction="t2i")
    with pytest.raises(ValueError, match="expected PML triplets"):
        tuple_triplet_loss(s, (i, i))
    with pytest.raises(TypeError, match="integer indices"):
        tuple_triplet_loss(s, (i.float(), i, i))
    with pytest.raises(ValueError, match="direction must be one of.*Did you mean 'i2t'"):
        tuple_triplet_loss(s, (i, i, i), direction="i2")
    with pytest.raises(ValueError, match="margin must be a number >= 0"):
        tuple_triplet_loss(s, (i, i, i), margin=-1)
    with pytest.raises(ValueError, match="one length"):
        tuple_triplet_loss(s, (i, torch.tensor([0, 1]), i))


def test_labels_from_positives():
    ids = torch.tensor([3, 3, 1, 2])  # image 3 repeated in the batch
    pos = ids[:, None] == ids[None, :]
    rows, cols = labels_from_positives(pos)
    assert torch.equal(rows[:, None] == cols[None, :], pos) and rows[0] == rows[1]
    with pytest.raises(ValueError, match="not 'same label'"):
        labels_from_positives(torch.tensor([[True, True], [False, True]]))
    with pytest.raises(ValueError, match="has no positive image"):
        labels_from_positives(torch.tensor([[True, False], [False, False]]))


# ---------------------------------------------------------------------- with pytorch-metric-learning installed

pml = pytest.importorskip("pytorch_metric_learning")


def test_pml_miner_tuples_feed_imtm_loss():
    from pytorch_metric_learning.miners import BatchHardMiner, PairMarginMiner, TripletMarginMiner

    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = v @ t.T
    from pytorch_metric_learning.distances import CosineSimilarity

    triplets = TripletMarginMiner(margin=0.5, type_of_triplets="all", distance=CosineSimilarity())(
        v, labels, t, labels
    )
    assert len(triplets[0]) > 0
    got = tuple_triplet_loss(scores, triplets, margin=0.5, reduction="none")
    torch.testing.assert_close(got, loop_triplet_loss(scores, *triplets, 0.5, "i2t"))
    hard = BatchHardMiner(distance=CosineSimilarity())(v, labels, t, labels)
    assert tuple_triplet_loss(scores, hard).dim() == 0
    pairs = PairMarginMiner(pos_margin=0.0, neg_margin=1.0, distance=CosineSimilarity())(
        v, labels, t, labels
    )
    assert len(pairs) == 4 and tuple_triplet_loss(scores, pairs).dim() == 0


def test_pml_losses_on_imtm_scores_match_pml_on_embeddings():
    """On a cosine score matrix, a PML loss through ScoreMatrixDistance equals PML on the embeddings."""
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.losses import (
        ContrastiveLoss,
        MultiSimilarityLoss,
        TripletMarginLoss,
    )

    from imtm.interop.metric_learning import ScoreMatrixDistance, pml_loss_on_scores

    g = torch.Generator().manual_seed(1)
    v = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = torch.nn.functional.normalize(v, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T
    positives = ids[:, None] == ids[None, :]
    for make in (
        lambda d: TripletMarginLoss(margin=0.2, distance=d),
        lambda d: ContrastiveLoss(distance=d),
        lambda d: MultiSimilarityLoss(distance=d),
    ):
        ours = pml_loss_on_scores(make(ScoreMatrixDistance()), scores, positives)
        # ids.clone(): PML drops the diagonal's positives when ref_labels *is* labels (it takes that for
        # self-comparison, get_matches_and_diffs); image b and caption b are a real positive pair here.
        theirs = make(CosineSimilarity())(v, ids, ref_emb=t, ref_labels=ids.clone())
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(
            torch.autograd.grad(ours, v, retain_graph=True)[0],
            torch.autograd.grad(theirs, v, retain_graph=True)[0],
        )
        ours_t2i = pml_loss_on_scores(
            make(ScoreMatrixDistance()), scores, positives, direction="t2i"
        )
        theirs_t2i = make(CosineSimilarity())(t, ids, ref_emb=v, ref_labels=ids.clone())
        torch.testing.assert_close(ours_t2i, theirs_t2i)
    with pytest.raises(TypeError, match="must measure with ScoreMatrixDistance"):
        pml_loss_on_scores(TripletMarginLoss(), scores, positives)


def test_pml_loss_by_name_in_a_training_loop():
    from pytorch_metric_learning.losses import TripletMarginLoss

    from imtm.interop.metric_learning import ScoreMatrixDistance, pml_loss, pml_loss_on_scores

    ids = torch.tensor([0, 0, 1, 2])
    positives = ids[:, None] == ids[None, :]
    s = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    want = (
        sum(
            pml_loss_on_scores(
                TripletMarginLoss(margin=0.3, distance=ScoreMatrixDistance()),
                s,
                positives,
                direction=d,
            )
            for d in ("i2t", "t2i")
        )
        / 2
    )
    torch.testing.assert_close(pml_loss("TripletMarginLoss", {"margin": 0.3})(s, positives), want)
    # a few steps of a plain loop with a mined PML loss lower it
    torch.manual_seed(0)
    v, t = torch.randn(12, 8), torch.randn(12, 8)
    ids = torch.arange(12) // 2
    proj = torch.nn.Linear(8, 8)
    opt = torch.optim.Adam(proj.parameters(), lr=5e-2)
    fn = pml_loss(
        "TripletMarginLoss",
        {"margin": 0.2},
        miner="TripletMarginMiner",
        miner_params={"margin": 0.2},
    )
    losses = []
    for _ in range(30):
        scores = (
            torch.nn.functional.normalize(proj(v), dim=-1)
            @ torch.nn.functional.normalize(t, dim=-1).T
        )
        loss = fn(scores, ids[:, None] == ids[None, :])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert math.isfinite(losses[0]) and losses[-1] < losses[0]
    with pytest.raises(ValueError, match="direction must be 'i2t', 't2i' or 'both'"):
        pml_loss(direction="x")
    with pytest.raises(
        ValueError,
        match="loss must name a class of pytorch_metric_learning.losses.*Did you mean "
        "'TripletMarginLoss'",
    ):
        pml_loss("TripletMarginLos")
    with pytest.raises(TypeError, match="loss_params must be a dict"):
        pml_loss(loss_params=[1])
