import math

import pytest
import torch

from imtm.components import InfoNCELoss
from imtm.components.losses.info_nce import MAX_TEMPERATURE, MIN_TEMPERATURE
from imtm.functional import info_nce_loss
from imtm.testing import check_component


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([0, 0, 1, 2])
    return torch.rand(4, 4, generator=g) * 2 - 1, ids[:, None] == ids[None, :]


@pytest.mark.parametrize("learnable", [False, True])
def test_conformance_with_functional_twin(learnable):
    scores, positives = batch()
    report = check_component(
        InfoNCELoss(temperature=0.1, learnable=learnable),
        {"scores": scores, "positives": positives},
        functional=lambda s, p: info_nce_loss(s, p, temperature=0.1),
    )
    assert "functional" in report.passed


def test_direction_specific_scores():
    scores, positives = batch()
    other = scores.flip(0)
    loss = InfoNCELoss(requires=("scores_i2t", "scores_t2i", "positives"))
    torch.testing.assert_close(
        loss(scores, other, positives), info_nce_loss((scores, other), positives)
    )
    check_component(loss, {"scores_i2t": scores, "scores_t2i": other, "positives": positives})


def test_learnable_temperature_trains_and_the_argument_stays():
    scores, positives = batch()
    loss = InfoNCELoss(temperature=0.07, learnable=True)
    assert [n for n, _ in loss.named_parameters()] == ["log_temperature"]
    torch.testing.assert_close(loss.log_temperature.detach(), torch.tensor(math.log(0.07)))
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    loss(scores, positives).backward()
    assert loss.log_temperature.grad is not None and float(loss.log_temperature.grad) != 0.0
    opt.step()
    assert loss.temperature == 0.07 and loss.get_params()["temperature"] == 0.07
    assert abs(float(loss.current_temperature().detach()) - 0.07) > 1e-6


def test_learnable_temperature_is_clamped():
    loss = InfoNCELoss(learnable=True)
    with torch.no_grad():
        loss.log_temperature.fill_(10.0)
    torch.testing.assert_close(loss.current_temperature(), torch.tensor(MAX_TEMPERATURE))
    with torch.no_grad():
        loss.log_temperature.fill_(-50.0)
    torch.testing.assert_close(loss.current_temperature(), torch.tensor(MIN_TEMPERATURE))


def test_fixed_temperature_has_no_parameter():
    loss = InfoNCELoss(temperature=0.2)
    assert list(loss.parameters()) == [] and loss.current_temperature() == 0.2
    assert "log_temperature" not in loss.state_dict()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"temperature": 0}, ValueError, "temperature must be a finite number > 0"),
        (
            {"temperature": 5.0, "learnable": True},
            ValueError,
            r"learnable temperature must start in \[0.001, 1.0\]",
        ),
        ({"learnable": "yes"}, TypeError, "learnable must be True or False"),
        ({"requires": ("a", "b", "c", "d")}, ValueError, "requires must name 2 values"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    if kwargs.get("learnable") is True:
        # A learnable temperature builds its parameter from the initial value, so it is checked at once.
        with pytest.raises(error, match=match):
            InfoNCELoss(**kwargs)
        return
    # Otherwise the constructor only stores (scikit-learn); validate() and the first forward check.
    loss = InfoNCELoss(**kwargs)
    with pytest.raises(error, match=match):
        loss.validate()
    scores, positives = batch()
    with pytest.raises(error, match=match):
        loss(scores, positives)


def test_bad_inputs_name_the_block():
    scores, _ = batch()
    with pytest.raises(
        ValueError, match="InfoNCELoss: info_nce_loss: positives holds no True entry"
    ):
        InfoNCELoss()(scores, torch.zeros(4, 4, dtype=torch.bool))
