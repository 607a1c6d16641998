import pytest
import torch
from sklearn.base import clone

from imtm import Tokens
from imtm.components import LocalMatching
from imtm.functional import local_matching_scores
from imtm.testing import check_component


def example_inputs():
    return {
        "image_tokens": Tokens.from_lengths(torch.randn(3, 5, 8), [5, 3, 1]),
        "text_tokens": Tokens.from_lengths(torch.randn(4, 6, 8), [6, 2, 1, 4]),
    }


@pytest.mark.parametrize("weighting", ["linear", "softmax"])
def test_conformance_and_functional_twin(weighting):
    block = LocalMatching(weighting=weighting, tau=0.2, max_block_elements=40)
    report = check_component(
        block,
        example_inputs(),
        functional=lambda im, tx: local_matching_scores(
            im.feats, tx.feats, im.mask, tx.mask, weighting=weighting, tau=0.2
        ),
    )
    assert report.skipped == {}


def test_requires_provides_params_and_clone():
    assert LocalMatching.requires == ("image_tokens", "text_tokens") and LocalMatching.provides == (
        "scores",
    )
    block = LocalMatching(weighting="softmax", tau=0.05)
    copy = clone(block)
    assert copy.get_params() == block.get_params() and block.state_dict() == {}
    inputs = example_inputs()
    torch.testing.assert_close(copy(*inputs.values()), block(*inputs.values()), rtol=0, atol=0)


def test_validate_and_errors_name_the_block():
    with pytest.raises(ValueError, match="LocalMatching: weighting must be one of"):
        LocalMatching(weighting="sparsemax").validate()
    with pytest.raises(ValueError, match="LocalMatching: tau must be a finite number > 0"):
        LocalMatching(tau=-1.0).validate()
    with pytest.raises(ValueError, match="LocalMatching: .*feature dimension"):
        LocalMatching()(torch.randn(2, 3, 8), torch.randn(2, 3, 4))
