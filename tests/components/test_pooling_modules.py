import pytest
import torch
from sklearn.base import clone

from imtm.components import LSEPooling, MaxPooling, MeanPooling, SoftmaxPooling, SumPooling
from imtm.functional.pooling import masked_pool
from imtm.testing import check_component

BLOCKS = [
    (MaxPooling(), "max"),
    (MeanPooling(), "mean"),
    (SumPooling(), "sum"),
    (SoftmaxPooling(temperature=0.3), "softmax"),
    (LSEPooling(temperature=0.3), "lse"),
]


@pytest.mark.parametrize("block, name", BLOCKS, ids=[n for _, n in BLOCKS])
def test_modules_match_functional_and_pass_the_contract(block, name):
    x = torch.rand(3, 4, 5, dtype=torch.float64) * 2 - 1
    mask = torch.rand(3, 4, 5) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(block(x, mask), masked_pool(x, mask, name, 0.3))
    assert block.requires == ("token_scores", "token_mask") and block.provides == ("scores",)
    report = check_component(
        block, {"token_scores": x.float(), "token_mask": mask}, skip=("padding",)
    )
    assert "clone" in report.passed and "state_dict" in report.passed


def test_dim_and_temperature_are_parameters():
    block = LSEPooling(temperature=0.05, dim=0)
    assert clone(block).get_params()["temperature"] == 0.05
    x = torch.randn(4, 3)
    torch.testing.assert_close(block(x), masked_pool(x, None, "lse", 0.05, dim=0))


def test_errors_name_the_block():
    with pytest.raises(
        ValueError, match="LSEPooling: (masked_pool: )?temperature must be a finite number > 0"
    ):
        LSEPooling(temperature=0.0)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="MeanPooling: masked_pool: 1 set"):
        MeanPooling()(
            torch.randn(2, 3), torch.tensor([[True, False, False], [False, False, False]])
        )
