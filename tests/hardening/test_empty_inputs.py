"""Empty batches are refused with a clear error, never a NaN or a low-level crash."""

import pytest
import torch

from imtm.functional import distance_weighted_negatives, ratio_loss, sample_hard_negatives


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0)])
def test_samplers_refuse_an_empty_batch(shape):
    scores, positives = torch.randn(shape), torch.zeros(shape, dtype=torch.bool)
    with pytest.raises(
        ValueError, match=r"sample_hard_negatives: needs at least one image and one caption"
    ):
        sample_hard_negatives(scores, positives)
    with pytest.raises(
        ValueError, match=r"distance_weighted_negatives: needs at least one image and one caption"
    ):
        distance_weighted_negatives(scores, positives, dim=8)


@pytest.mark.parametrize("shape", [(0, 4), (2, 0), (0, 3, 4)])
def test_ratio_loss_refuses_empty_decisions(shape):
    with pytest.raises(ValueError, match="hold no pair or no patch"):
        ratio_loss(torch.rand(shape), 0.5)


def test_one_pair_still_works():
    s, p = torch.randn(1, 2), torch.tensor([[True, False]])
    assert sample_hard_negatives(s, p, sample=False)[0].tolist() == [1]
    assert torch.isfinite(ratio_loss(torch.rand(1, 1), 0.5))
