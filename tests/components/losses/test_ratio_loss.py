import pytest
import torch

from imtm import Tokens
from imtm.components import RatioLoss
from imtm.functional import ratio_loss
from imtm.testing import check_component


def test_counts_real_patches_only_and_matches_the_functional():
    images = Tokens(
        torch.randn(2, 5, 4),
        torch.tensor([[True] * 5, [True, True, True, False, False]]),
        num_prefix_tokens=1,
    )
    d = torch.tensor([[[1.0, 1.0, 0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 0.0, 0.0]]])
    # image 0: 1 of 4 patches kept; image 1: 2 of 2 real patches kept
    want = ((0.5 - 0.25) ** 2 + (0.5 - 1.0) ** 2) / 2
    torch.testing.assert_close(RatioLoss(0.5)(d, images), torch.tensor(want))
    mask = torch.tensor([[[False, True, True, True, True]], [[False, True, True, False, False]]])
    torch.testing.assert_close(RatioLoss(0.5)(d, images), ratio_loss(d, 0.5, mask))


def test_conformance_and_gradient():
    images = Tokens(torch.randn(2, 5, 4), num_prefix_tokens=1)
    report = check_component(
        RatioLoss(0.3, weight=2.0),
        {"keep_decisions": torch.rand(2, 3, 5), "image_tokens": images},
        skip=["padding"],
    )
    assert "gradients" in report.passed
    assert RatioLoss.requires == ("keep_decisions", "image_tokens") and RatioLoss().weight == 1.0


def test_bad_inputs():
    images = Tokens(torch.randn(2, 5, 4), num_prefix_tokens=1)
    with pytest.raises(
        ValueError,
        match=r"RatioLoss: expected keep_decisions of shape \(Bi, Bt, N\) = \(2, Bt, 5\)",
    ):
        RatioLoss()(torch.ones(2, 5), images)
    with pytest.raises(ValueError, match=r"RatioLoss: rho must be a finite number in \(0, 1\]"):
        RatioLoss(rho=2)(torch.ones(2, 3, 5), images)
    with pytest.raises(
        TypeError, match="RatioLoss: ratio_loss: decisions must be a floating tensor"
    ):
        RatioLoss()(torch.ones(2, 3, 5, dtype=torch.long), images)
