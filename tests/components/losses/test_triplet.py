import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone

from imtm.components import TripletLoss
from imtm.functional import triplet_loss
from imtm.testing import check_component, image_ids

SETTINGS = settings(max_examples=20, deadline=None)
PAIR = ("scores_i2t", "scores_t2i", "positives")


def batch(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([0, 0, 1, 2, 3])[:n]
    return torch.rand(n, n, generator=g) * 2 - 1, ids[:, None] == ids[None, :]


@pytest.mark.parametrize("kwargs", [{}, {"hardest": False, "reduction": "mean", "margin": 0.5}])
def test_conformance_with_functional_twin(kwargs):
    scores, positives = batch()
    block = TripletLoss(**kwargs)
    report = check_component(
        block,
        {"scores": scores, "positives": positives},
        functional=lambda s, p: triplet_loss(s, p, **kwargs),
    )
    assert "functional" in report.passed and "gradients" in report.passed


def test_conformance_with_direction_specific_scores():
    scores, positives = batch()
    block = TripletLoss(requires=PAIR)
    inputs = {"scores_i2t": scores, "scores_t2i": scores.flip(1), "positives": positives}
    check_component(block, inputs, functional=lambda a, b, p: triplet_loss((a, b), p))


def test_both_arities():
    scores, positives = batch()
    loss = TripletLoss()
    torch.testing.assert_close(loss(scores, positives), triplet_loss(scores, positives))
    torch.testing.assert_close(loss(scores, scores, positives), triplet_loss(scores, positives))
    other = torch.rand_like(scores)
    torch.testing.assert_close(
        TripletLoss(requires=PAIR)(scores, other, positives),
        triplet_loss((scores, other), positives),
    )


@SETTINGS
@given(
    ids=image_ids(batch=st.integers(2, 6), max_images=3),
    seed=st.integers(0, 10_000),
    hardest=st.booleans(),
)
def test_captions_of_one_image_are_never_negatives(ids, seed, hardest):
    g = torch.Generator().manual_seed(seed)
    positives = ids[:, None] == ids[None, :]
    scores = torch.rand(len(ids), len(ids), generator=g, dtype=torch.float64)
    # Every positive pair far above every negative: the loss is 0 only if no other positive
    # (another caption of the same image, the same image repeated) is ranked as a negative.
    scores = scores.masked_fill(positives, 5.0)
    assert float(TripletLoss(hardest=hardest)(scores, positives)) == 0.0


def test_gradient_reaches_scores():
    scores, positives = batch()
    scores.requires_grad_(True)
    TripletLoss()(scores, positives).backward()
    assert scores.grad is not None and bool(torch.isfinite(scores.grad).all())


def test_params_and_clone():
    loss = TripletLoss(margin=0.3, hardest=False, reduction="mean", weight=0.5, requires=PAIR)
    params = loss.get_params()
    assert params["margin"] == 0.3 and params["weight"] == 0.5 and params["requires"] == PAIR
    assert clone(loss).get_params() == params


def test_errors_name_the_block():
    scores, _ = batch()
    with pytest.raises(
        TypeError, match="TripletLoss: triplet_loss: positives must be a bool tensor"
    ):
        TripletLoss()(scores, torch.eye(5))
    with pytest.raises(
        TypeError,
        match=r"forward takes \(scores, positives\) or \(scores_i2t, scores_t2i, positives\), got 1",
    ):
        TripletLoss()(scores)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"reduction": "summ"}, ValueError, "Did you mean 'sum'"),
        ({"margin": -1}, ValueError, "margin must be a finite number >= 0"),
        ({"hardest": 1}, TypeError, "hardest must be True"),
        ({"requires": ("scores",)}, ValueError, "requires must name 2 values"),
        ({"weight": -1.0}, ValueError, "weight must be a finite number >= 0"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    # The constructor only stores (scikit-learn); validate() and the first forward check.
    loss = TripletLoss(**kwargs)
    with pytest.raises(error, match=match):
        loss.validate()
    scores, positives = batch()
    with pytest.raises(error, match=match):
        loss(scores, positives)
