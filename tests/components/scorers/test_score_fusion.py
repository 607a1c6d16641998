import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.components import ScoreFusion
from imtm.testing import check_component

SETTINGS = settings(max_examples=20, deadline=None)


@SETTINGS
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 4)), seed=st.integers(0, 1000))
def test_default_is_dcpa_fusion(shape, seed):
    g = torch.Generator().manual_seed(seed)
    intra, i2t, t2i = (torch.randn(*shape, dtype=torch.float64, generator=g) for _ in range(3))
    s_i2t, s_t2i = ScoreFusion()(intra, i2t, t2i)
    torch.testing.assert_close(s_i2t, 0.6 * intra + 0.4 * i2t)
    torch.testing.assert_close(s_t2i, 0.6 * intra + 0.4 * t2i)
    # The two directions read different branches.
    torch.testing.assert_close(s_i2t - s_t2i, 0.4 * (i2t - t2i))


def test_custom_weights_single_output():
    fusion = ScoreFusion(
        {"scores": {"a": 0.5, "b": 2.0}}, requires=("a", "b"), provides=("scores",)
    )
    a, b = torch.ones(2, 3), torch.full((2, 3), 3.0)
    torch.testing.assert_close(fusion(a, b), torch.full((2, 3), 6.5))


def test_conformance():
    x = {
        "scores_intra": torch.randn(3, 4),
        "scores_inter_i2t": torch.randn(3, 4),
        "scores_inter_t2i": torch.randn(3, 4),
    }
    report = check_component(ScoreFusion(), x)
    assert "clone" in report.passed and "outputs" in report.passed


def test_bad_weights_and_inputs():
    with pytest.raises(ValueError, match="one entry per provided value"):
        ScoreFusion({"scores_i2t": {"scores_intra": 1.0}}).validate()
    with pytest.raises(
        ValueError,
        match="names 'scores_itra', which is not in requires.*Did you mean 'scores_intra'",
    ):
        ScoreFusion(
            {"scores_i2t": {"scores_itra": 1.0}, "scores_t2i": {"scores_intra": 1.0}}
        ).validate()
    with pytest.raises(ValueError, match="must be a finite number"):
        ScoreFusion(
            {"scores_i2t": {"scores_intra": float("nan")}, "scores_t2i": {"scores_intra": 1.0}}
        ).validate()
    with pytest.raises(ValueError, match="must be a non-empty dict"):
        ScoreFusion({"scores_i2t": {}, "scores_t2i": {"scores_intra": 1.0}}).validate()
    with pytest.raises(TypeError, match="weights must be a dict"):
        ScoreFusion([0.6, 0.4]).validate()
    with pytest.raises(TypeError, match="forward takes 3 score matrices"):
        ScoreFusion()(torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="'scores_inter_t2i' is \\(3, 2\\)"):
        ScoreFusion()(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3, 2))
