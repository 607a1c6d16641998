import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone

from imtm import Tokens
from imtm.components import DimensionAlignmentLoss, SpatialConstraintLoss
from imtm.functional import dimension_alignment_loss, spatial_constraint_loss, word_region_pairs
from imtm.testing import check_component, tokens

SETTINGS = settings(max_examples=20, deadline=None)


def embeddings(b=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image_embedding": torch.randn(b, d, generator=g),
        "text_embedding": torch.randn(b, d, generator=g),
    }


def test_dimension_alignment_conformance_and_functional_twin():
    report = check_component(
        DimensionAlignmentLoss(temperature=0.2, weight=10.0),
        embeddings(),
        functional=lambda v, t: dimension_alignment_loss(v, t, temperature=0.2),
    )
    assert "functional" in report.passed and "gradients" in report.passed


@pytest.mark.parametrize("kind", ["inter", "intra"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("rule", ["intent", "printed"])
def test_spatial_constraint_conformance_and_functional_twin(kind, sparse, rule):
    loss = SpatialConstraintLoss(kind=kind, sparse=sparse, beta=0.3, weight=0.05, rule=rule)
    ids = torch.tensor([0, 1, 0, 2, 3, 1])  # images 0 and 1 have two captions each in the batch
    report = check_component(
        loss,
        {**embeddings(), "positives": ids[:, None] == ids[None, :]},
        functional=lambda v, t, p: spatial_constraint_loss(
            v, t, kind=kind, sparse=sparse, beta=0.3, rule=rule, positives=p
        ),
    )
    assert "functional" in report.passed and "gradients" in report.passed
    assert [n for n, _ in loss.named_parameters()] == (["learned_beta"] if sparse else [])


def test_beta_is_one_learnable_scalar_that_trains_and_the_argument_stays():
    loss = SpatialConstraintLoss(kind="inter", beta=0.25)
    assert loss.learned_beta.shape == () and float(loss.learned_beta.detach()) == 0.25
    opt = torch.optim.SGD(loss.parameters(), lr=1.0)
    e = embeddings(b=8, seed=1)
    loss(e["image_embedding"], e["text_embedding"]).backward()
    assert loss.learned_beta.grad is not None and float(loss.learned_beta.grad) != 0.0
    opt.step()
    assert float(loss.learned_beta.detach()) != 0.25 and loss.get_params()["beta"] == 0.25
    fresh = clone(loss)
    assert float(fresh.learned_beta.detach()) == 0.25
    fixed = SpatialConstraintLoss(beta=0.25, learn_beta=False)
    assert list(fixed.parameters()) == [] and fixed.current_beta() == 0.25


def test_per_instance_beta_is_a_learnable_vector_sliced_to_the_batch():
    loss = SpatialConstraintLoss(kind="inter", beta=0.2, beta_instances=8, temperature=0.3)
    assert loss.learned_beta.shape == (8,)
    e = embeddings(b=6, seed=3)
    out = loss(e["image_embedding"], e["text_embedding"])
    beta = torch.full((6,), 0.2)
    torch.testing.assert_close(
        out,
        spatial_constraint_loss(
            e["image_embedding"], e["text_embedding"], beta=beta, temperature=0.3
        ),
    )
    out.backward()
    assert bool((loss.learned_beta.grad[:6] != 0).any()) and bool(
        (loss.learned_beta.grad[6:] == 0).all()
    )
    fixed = SpatialConstraintLoss(beta=0.2, beta_instances=8, learn_beta=False)
    assert list(fixed.parameters()) == [] and fixed.current_beta(5).shape == (5,)


def test_dimension_options_reach_the_functional():
    e = embeddings(b=9, seed=4)
    v, t = e["image_embedding"] + 1.0, e["text_embedding"]
    for kw in (
        {"correlation": "pearson"},
        {"objective": "intuitive"},
        {"objective": "intuitive", "off_diagonal_weight": 0.5},
    ):
        torch.testing.assert_close(
            DimensionAlignmentLoss(**kw)(v, t), dimension_alignment_loss(v, t, **kw)
        )


def test_zero_for_identical_modalities_and_finite_for_a_batch_of_two():
    v = torch.randn(5, 4)
    for kind in ("inter", "intra"):
        assert float(SpatialConstraintLoss(kind=kind)(v, v.clone()).detach()) == pytest.approx(
            0.0, abs=1e-6
        )
    two = torch.randn(2, 4, requires_grad=True)
    out = DimensionAlignmentLoss()(two, two) + SpatialConstraintLoss()(two, torch.randn(2, 4))
    out.backward()
    assert torch.isfinite(out) and bool(torch.isfinite(two.grad).all())


def test_word_pairs_reading_requires_tokens_and_matches_the_functional():
    loss = DimensionAlignmentLoss(pairs="words")
    assert tuple(loss.requires) == ("image_tokens", "text_tokens")
    images = Tokens.from_lengths(torch.randn(3, 5, 4), [5, 2, 3])
    texts = Tokens.from_lengths(torch.randn(3, 6, 4), [6, 1, 4])
    regions, words = word_region_pairs(images.feats, texts.feats, images.mask, texts.mask)
    torch.testing.assert_close(loss(images, texts), dimension_alignment_loss(regions, words))
    report = check_component(loss, {"image_tokens": images, "text_tokens": texts})
    assert "padding" in report.passed
    assert tuple(clone(loss).requires) == ("image_tokens", "text_tokens")


@SETTINGS
@given(
    images=tokens(batch=4, max_tokens=5, dim=3),
    texts=tokens(batch=4, max_tokens=4, dim=3),
    extra=st.integers(1, 3),
)
def test_word_pairs_padding_never_changes_the_loss(images, texts, extra):
    loss = DimensionAlignmentLoss(pairs="words")
    base = loss(images, texts)
    pad = Tokens(
        torch.cat([images.feats, 1e3 * torch.ones(4, extra, 3)], 1),
        torch.cat([images.mask, torch.zeros(4, extra, dtype=torch.bool)], 1),
    )
    torch.testing.assert_close(loss(pad, texts), base)


@pytest.mark.parametrize(
    "block, args, error, match",
    [
        (
            DimensionAlignmentLoss(temperature=0.0),
            None,
            ValueError,
            "DimensionAlignmentLoss: temperature",
        ),
        (DimensionAlignmentLoss(reduction="avg"), None, ValueError, "reduction must be one of"),
        (DimensionAlignmentLoss(pairs="word"), None, ValueError, "Did you mean 'words'"),
        (
            DimensionAlignmentLoss(weight=-1.0),
            None,
            ValueError,
            "weight must be a finite number >= 0",
        ),
        (
            DimensionAlignmentLoss(requires=("image_embedding",)),
            None,
            ValueError,
            "requires must name 2 values",
        ),
        (
            DimensionAlignmentLoss(),
            (torch.randn(4, 3), torch.randn(5, 3)),
            ValueError,
            "DimensionAlignmentLoss: dimension_alignment_loss: image_embedding",
        ),
        (
            DimensionAlignmentLoss(pairs="words"),
            (torch.randn(4, 3), torch.randn(4, 3)),
            ValueError,
            r"expected image tokens of shape \(B, N, D\)",
        ),
        (SpatialConstraintLoss(kind="intro"), None, ValueError, "Did you mean 'intra'"),
        (SpatialConstraintLoss(distance="l2"), None, ValueError, "distance must be one of"),
        (SpatialConstraintLoss(sparse="yes"), None, TypeError, "sparse must be True or False"),
        (
            SpatialConstraintLoss(beta=float("nan")),
            None,
            ValueError,
            "beta must be a finite number",
        ),
        (SpatialConstraintLoss(temperature=-1.0), None, ValueError, "temperature"),
        (
            SpatialConstraintLoss(weight=float("inf")),
            None,
            ValueError,
            "weight must be a finite number",
        ),
        (
            SpatialConstraintLoss(),
            (torch.randn(1, 3), torch.randn(1, 3)),
            ValueError,
            "at least 2 pairs",
        ),
        (SpatialConstraintLoss(rule="paper"), None, ValueError, "rule must be one of"),
        (SpatialConstraintLoss(beta_instances=1), None, ValueError, "beta_instances must be None"),
        (
            SpatialConstraintLoss(beta_instances=3),
            None,
            ValueError,
            "a batch of 4 pairs but beta_instances=3",
        ),
        (
            SpatialConstraintLoss(requires=("a", "b", "c", "d")),
            None,
            ValueError,
            "requires must name 2 values",
        ),
        (
            SpatialConstraintLoss(),
            (torch.randn(4, 3), torch.randn(4, 3), torch.eye(4)),
            ValueError,
            "positives must be a bool",
        ),
        (
            DimensionAlignmentLoss(correlation="spearman"),
            None,
            ValueError,
            "correlation must be one of",
        ),
        (
            DimensionAlignmentLoss(objective="intuitive", off_diagonal_weight=-0.5),
            None,
            ValueError,
            "off_diagonal_weight must be None or a finite number >= 0",
        ),
    ],
)
def test_bad_inputs(block, args, error, match):
    args = args or (torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(error, match=match):
        block(*args)


def test_finite_under_bf16_autocast():
    e = embeddings(b=8, d=16, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = torch.nn.functional.linear(
            e["image_embedding"], torch.eye(16)
        )  # a bf16 activation, as in training
        t = torch.nn.functional.linear(e["text_embedding"], torch.eye(16))
        values = [
            DimensionAlignmentLoss()(v, t),
            SpatialConstraintLoss()(v, t),
            SpatialConstraintLoss(kind="intra")(v, t),
        ]
    assert all(bool(torch.isfinite(x)) for x in values)
    torch.testing.assert_close(
        values[0].float(), DimensionAlignmentLoss()(v.float(), t.float()), atol=0.05, rtol=0.05
    )
