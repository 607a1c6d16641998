import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone

from imtm import Tokens
from imtm.components import DistanceWeightedMiner, MeanEmbedding, SparseCorrelation, TripletLoss
from imtm.functional import (
    distance_weighted_negatives,
    masked_mean,
    sparse_correlation_mask,
    spatial_differences,
    triplet_loss,
)
from imtm.testing import check_component, tokens

SETTINGS = settings(max_examples=20, deadline=None)


# ---------------------------------------------------------------------- MeanEmbedding
@pytest.mark.parametrize("side", ["image", "text"])
def test_mean_embedding_conformance_and_functional_twin(side):
    block = MeanEmbedding(side=side)
    name = f"{side}_tokens"
    assert tuple(block.requires) == (name,) and tuple(block.provides) == (f"{side}_embedding",)
    feats = Tokens.from_lengths(torch.randn(3, 5, 4), [5, 1, 3])
    report = check_component(
        block, {name: feats}, functional=lambda t: masked_mean(t.feats, t.mask)
    )
    assert {"padding", "functional"} <= set(report.passed)


def test_mean_embedding_skips_prefix_tokens_when_asked():
    feats = torch.arange(12.0).reshape(1, 4, 3)
    t = Tokens(feats, num_prefix_tokens=1)
    torch.testing.assert_close(MeanEmbedding(skip_prefix=True)(t), feats[:, 1:].mean(1))
    torch.testing.assert_close(MeanEmbedding()(t), feats.mean(1))


@SETTINGS
@given(t=tokens(batch=st.integers(1, 4), max_tokens=5, dim=3))
def test_mean_embedding_is_permutation_equivariant(t):
    perm = torch.randperm(t.batch_size)
    out = MeanEmbedding()(t)
    torch.testing.assert_close(MeanEmbedding()(t[perm]), out[perm])


def test_mean_embedding_bad_inputs():
    with pytest.raises(ValueError, match="side must be one of"):
        MeanEmbedding(side="audio")(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="skip_prefix must be True or False"):
        MeanEmbedding(skip_prefix=1)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="no real token"):
        MeanEmbedding()(Tokens.from_lengths(torch.randn(2, 3, 4), [3, 0]))


# ---------------------------------------------------------------------- SparseCorrelation
@pytest.mark.parametrize("kind", ["inter", "intra"])
def test_sparse_correlation_conformance_functional_twin_and_beta_gradient(kind):
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    block = SparseCorrelation(kind=kind, beta=0.2, temperature=0.3)
    report = check_component(
        block,
        {"image_embedding": v, "text_embedding": t},
        functional=lambda a, b: sparse_correlation_mask(
            spatial_differences(a, b, kind=kind), 0.2, temperature=0.3
        ),
    )
    assert {"gradients", "functional"} <= set(report.passed)
    (block(v, t) * torch.rand(6, 6, generator=g)).sum().backward()
    assert block.learned_beta.grad is not None and torch.isfinite(block.learned_beta.grad)
    assert list(SparseCorrelation(learnable=False).parameters()) == []


def test_sparse_correlation_bad_inputs():
    with pytest.raises(ValueError, match="kind must be one of"):
        SparseCorrelation(kind="both")(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(TypeError, match="learnable must be True or False"):
        SparseCorrelation(learnable=None)(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="beta must be a finite number"):
        SparseCorrelation(beta=float("inf"), learnable=False)(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="SparseCorrelation: spatial_differences"):
        SparseCorrelation()(torch.randn(3, 2), torch.randn(4, 2))


# ---------------------------------------------------------------------- DistanceWeightedMiner
def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    return torch.rand(6, 6, generator=g) * 2 - 1, ids[:, None] == ids[None, :]


def test_miner_conformance_and_randomness():
    scores, positives = batch()
    miner = DistanceWeightedMiner(dim=16, random_state=3)
    check_component(miner, {"scores": scores, "positives": positives})
    a = miner.train()(scores, positives)
    b = miner(scores, positives)
    assert not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))  # the own stream advances
    again = clone(miner).train()(scores, positives)
    assert torch.equal(again[0], a[0]) and torch.equal(again[1], a[1])  # a clone restarts it
    miner.eval()
    first, second = miner(scores, positives), miner(scores, positives)
    assert torch.equal(first[0], second[0])  # eval mode: reproducible
    torch.manual_seed(0)
    glob = DistanceWeightedMiner(dim=16).train()(scores, positives)
    torch.manual_seed(0)
    expect = distance_weighted_negatives(scores, positives, dim=16)
    assert torch.equal(glob[0], expect[0]) and torch.equal(
        glob[1], expect[1]
    )  # random_state=None: global RNG


def test_triplet_loss_with_a_miner_matches_the_functional_and_the_default_is_unchanged():
    scores, positives = batch(1)
    miner = DistanceWeightedMiner(dim=16, random_state=0).eval()
    loss = TripletLoss(miner=miner).eval()
    negatives = miner(scores, positives)
    torch.testing.assert_close(
        loss(scores, positives), triplet_loss(scores, positives, negatives=negatives)
    )
    torch.testing.assert_close(TripletLoss()(scores, positives), triplet_loss(scores, positives))
    report = check_component(
        TripletLoss(miner=DistanceWeightedMiner(dim=16, random_state=0)),
        {"scores": scores, "positives": positives},
    )
    assert "clone" in report.passed
    assert TripletLoss(miner=miner).get_params()["miner__dim"] == 16
    other = scores.flip(0)
    pair = TripletLoss(miner=miner, requires=("scores_i2t", "scores_t2i", "positives")).eval()
    torch.testing.assert_close(
        pair(scores, other, positives),
        triplet_loss((scores, other), positives, negatives=miner((scores, other), positives)),
    )


def test_miner_bad_inputs():
    scores, positives = batch()
    with pytest.raises(
        ValueError, match="DistanceWeightedMiner: (distance_weighted_negatives: )?dim must be"
    ):
        DistanceWeightedMiner(dim=2)(scores, positives)
    with pytest.raises(TypeError, match="random_state must be an integer or None"):
        DistanceWeightedMiner(dim=8, random_state=1.5)(scores, positives)
    with pytest.raises(TypeError, match="miner must be None or a callable"):
        TripletLoss(miner=3).validate()
