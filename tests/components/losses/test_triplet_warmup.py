"""TripletLoss(warmup_epochs=k): summed negatives for k epochs, then the hardest (VSE-infinity's warm-up)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone

from imtm.components import TripletLoss
from imtm.testing import check_component, image_ids


def loop_triplet(scores, positives, margin, hardest):
    """VSE++ Eq. 5 (sum over negatives) / Eq. 6 (hardest negative), one positive pair at a time."""
    total = 0.0
    n_i, n_t = scores.shape
    for i in range(n_i):
        for t in range(n_t):
            if not positives[i, t]:
                continue
            cap = [
                max(0.0, margin - float(scores[i, t]) + float(scores[i, u]))
                for u in range(n_t)
                if not positives[i, u]
            ]
            img = [
                max(0.0, margin - float(scores[i, t]) + float(scores[j, t]))
                for j in range(n_i)
                if not positives[j, t]
            ]
            if hardest:
                total += max(cap, default=0.0) + max(img, default=0.0)
            else:
                total += sum(cap) + sum(img)
    return total


@settings(max_examples=25, deadline=None)
@given(
    ids=image_ids(batch=st.integers(2, 6), max_images=4),
    seed=st.integers(0, 10_000),
    warmup=st.integers(0, 3),
    epoch=st.integers(0, 5),
    margin=st.floats(0.0, 0.5),
)
def test_summed_during_the_warm_up_hardest_after(ids, seed, warmup, epoch, margin):
    g = torch.Generator().manual_seed(seed)
    positives = ids[:, None] == ids[None, :]
    scores = torch.rand(len(ids), len(ids), generator=g, dtype=torch.float64) * 2 - 1
    # count_pairs="per_row": every row of the batch counts, as in the plain loop of Eqs. 5-6.
    loss = TripletLoss(margin=margin, warmup_epochs=warmup, count_pairs="per_row")
    loss.set_epoch(epoch)
    expected = loop_triplet(scores, positives, margin, hardest=epoch >= warmup)
    torch.testing.assert_close(loss(scores, positives), torch.tensor(expected, dtype=torch.float64))
    assert loss.hardest_now == (epoch >= warmup)
    # With the default pair counting: the same value as the loss with hardest fixed to that epoch's choice.
    default = TripletLoss(margin=margin, warmup_epochs=warmup)
    default.set_epoch(epoch)
    torch.testing.assert_close(
        default(scores, positives),
        TripletLoss(margin=margin, hardest=epoch >= warmup)(scores, positives),
    )


def test_never_told_the_epoch_it_stays_in_its_warm_up_and_hardest_false_ignores_it():
    ids = torch.tensor([0, 0, 1, 2])
    positives = ids[:, None] == ids[None, :]
    scores = torch.rand(4, 4, generator=torch.Generator().manual_seed(1))
    summed = loop_triplet(scores, positives, 0.2, hardest=False)
    torch.testing.assert_close(
        TripletLoss(warmup_epochs=2, count_pairs="per_row")(scores, positives), torch.tensor(summed)
    )
    plain = TripletLoss(hardest=False, warmup_epochs=2, count_pairs="per_row")
    plain.set_epoch(9)
    torch.testing.assert_close(plain(scores, positives), torch.tensor(summed))
    hardest = TripletLoss(warmup_epochs=0, count_pairs="per_row")
    torch.testing.assert_close(
        hardest(scores, positives), torch.tensor(loop_triplet(scores, positives, 0.2, True))
    )


def test_conformance_params_and_clone_forget_the_epoch():
    ids = torch.tensor([0, 0, 1, 2, 3])
    scores, positives = torch.rand(5, 5), ids[:, None] == ids[None, :]
    loss = TripletLoss(margin=0.3, warmup_epochs=2)
    check_component(loss, {"scores": scores, "positives": positives})
    loss.set_epoch(4)
    assert loss.get_params()["warmup_epochs"] == 2
    fresh = clone(loss)
    assert fresh.get_params() == loss.get_params() and fresh.epoch_ == 0 and not fresh.hardest_now


@pytest.mark.parametrize("warmup", [-1, 1.5, True, "1"])
def test_bad_warmup_epochs(warmup):
    loss = TripletLoss(warmup_epochs=warmup)
    with pytest.raises(ValueError, match="warmup_epochs must be an integer >= 0"):
        loss.validate()


@pytest.mark.parametrize("epoch", [-1, 0.5, False])
def test_bad_epoch(epoch):
    with pytest.raises(ValueError, match=r"TripletLoss.set_epoch: epoch must be an integer >= 0"):
        TripletLoss(warmup_epochs=1).set_epoch(epoch)
