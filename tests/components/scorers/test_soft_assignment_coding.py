import pytest
import torch
from sklearn.base import clone

from imtm import Tokens
from imtm.components import SoftAssignmentCoding
from imtm.functional import soft_assignment_scores
from imtm.testing import check_component


def example_inputs():
    return {
        "image_tokens": Tokens.from_lengths(torch.randn(3, 5, 8), [5, 3, 1]),
        "text_tokens": Tokens.from_lengths(torch.randn(4, 6, 8), [6, 2, 1, 4]),
    }


@pytest.mark.parametrize("codebook", ["visual", "textual"])
def test_conformance_and_functional_twin(codebook):
    block = SoftAssignmentCoding(tau=0.2, codebook=codebook, max_block_elements=40)
    report = check_component(
        block,
        example_inputs(),
        functional=lambda im, tx: soft_assignment_scores(
            im.feats, tx.feats, im.mask, tx.mask, tau=0.2, codebook=codebook
        ),
    )
    assert report.skipped == {}


def test_requires_provides_params_and_clone():
    assert SoftAssignmentCoding.requires == ("image_tokens", "text_tokens")
    assert SoftAssignmentCoding.provides == ("scores",)
    block = SoftAssignmentCoding(tau=0.05, pooling="mean")
    copy = clone(block)
    assert copy.get_params() == block.get_params() and copy.tau == 0.05
    assert block.state_dict() == {}
    inputs = example_inputs()
    torch.testing.assert_close(copy(*inputs.values()), block(*inputs.values()), rtol=0, atol=0)


def test_validate_and_errors_name_the_block():
    with pytest.raises(ValueError, match="SoftAssignmentCoding: tau must be a finite number > 0"):
        SoftAssignmentCoding(tau=-0.1).validate()
    with pytest.raises(ValueError, match="SoftAssignmentCoding: .*feature dimension"):
        SoftAssignmentCoding()(torch.randn(2, 3, 8), torch.randn(2, 3, 4))
