import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone

from imtm import Tokens
from imtm.components import HardAssignmentCoding
from imtm.functional import hard_assignment_scores
from imtm.testing import check_component, parametrize_with_checks, tokens

SETTINGS = settings(max_examples=20, deadline=None)


def example_inputs():
    return {
        "image_tokens": Tokens.from_lengths(torch.randn(3, 5, 8), [5, 3, 1]),
        "text_tokens": Tokens.from_lengths(torch.randn(4, 6, 8), [6, 2, 1, 4]),
    }


@pytest.mark.parametrize("codebook", ["visual", "textual"])
@pytest.mark.parametrize("pooling", ["lse", "max", "sum"])
def test_conformance_and_functional_twin(codebook, pooling):
    block = HardAssignmentCoding(codebook=codebook, pooling=pooling, max_block_elements=40)
    report = check_component(
        block,
        example_inputs(),
        functional=lambda im, tx: hard_assignment_scores(
            im.feats, tx.feats, im.mask, tx.mask, codebook=codebook, pooling=pooling
        ),
    )
    assert report.skipped == {}


@parametrize_with_checks(
    [
        (
            HardAssignmentCoding(codebook="textual", pooling="softmax", max_block_elements=40),
            example_inputs(),
            {
                "functional": lambda im, tx: hard_assignment_scores(
                    im.feats, tx.feats, im.mask, tx.mask, codebook="textual", pooling="softmax"
                )
            },
        ),
    ]
)
def test_each_conformance_check_on_its_own(block, check):
    check(block)


def test_requires_provides_and_renaming():
    assert HardAssignmentCoding.requires == ("image_tokens", "text_tokens")
    assert HardAssignmentCoding.provides == ("scores",)
    block = HardAssignmentCoding(
        requires=("image_tokens", "phrase_tokens"), provides=("scores_i2t",)
    )
    assert block.requires == ("image_tokens", "phrase_tokens") and block.provides == ("scores_i2t",)
    assert block(torch.randn(2, 4, 8), torch.randn(3, 5, 8)).shape == (2, 3)


def test_get_params_clone_and_state_dict_round_trip():
    block = HardAssignmentCoding(
        codebook="textual", pooling="softmax", temperature=0.05, compute_dtype=torch.bfloat16
    )
    params = block.get_params()
    assert (
        params["codebook"] == "textual"
        and params["temperature"] == 0.05
        and params["compute_dtype"] is torch.bfloat16
    )
    copy = clone(block)
    assert copy is not block and copy.get_params() == params
    copy.set_params(temperature=0.2)
    assert block.temperature == 0.05 and copy.temperature == 0.2
    assert block.state_dict() == {}  # no parameters: the scorer is pure arithmetic
    fresh = HardAssignmentCoding(**{k: v for k, v in params.items()})
    fresh.load_state_dict(block.state_dict())
    inputs = example_inputs()
    torch.testing.assert_close(fresh(*inputs.values()), block(*inputs.values()), rtol=0, atol=0)


@SETTINGS
@given(
    images=tokens(batch=st.integers(1, 4), max_tokens=5, dim=4, dtype=torch.float64),
    texts=tokens(batch=st.integers(1, 4), max_tokens=5, dim=4, dtype=torch.float64),
    budget=st.integers(1, 200),
)
def test_module_equals_functional_for_any_block_size(images, texts, budget):
    block = HardAssignmentCoding(max_block_elements=budget)
    torch.testing.assert_close(
        block(images, texts),
        hard_assignment_scores(images.feats, texts.feats, images.mask, texts.mask),
    )


def test_validate_names_the_block():
    assert HardAssignmentCoding().validate().pooling == "lse"
    with pytest.raises(
        ValueError,
        match=r"HardAssignmentCoding: pooling must be one of .* got 'lsee'. Did you mean 'lse'\?",
    ):
        HardAssignmentCoding(pooling="lsee").validate()
    with pytest.raises(ValueError, match="HardAssignmentCoding: codebook must be one of"):
        HardAssignmentCoding(codebook="image").validate()
    with pytest.raises(
        ValueError, match="HardAssignmentCoding: temperature must be a finite number > 0"
    ):
        HardAssignmentCoding(temperature=0).validate()


@pytest.mark.parametrize(
    "images, texts, error, match",
    [
        (
            torch.randn(2, 3, 8),
            torch.randn(2, 3, 6),
            ValueError,
            "HardAssignmentCoding: hard_assignment_scores: images and texts must share",
        ),
        (
            torch.randn(2, 8),
            torch.randn(2, 3, 8),
            ValueError,
            r"HardAssignmentCoding: expected image tokens of shape \(B, N, D\)",
        ),
        (
            torch.randn(2, 3, 8),
            [1, 2],
            TypeError,
            "HardAssignmentCoding: expected text tokens as Tokens",
        ),
        (
            Tokens(torch.randn(2, 3, 8), torch.tensor([[True] * 3, [False] * 3])),
            torch.randn(2, 3, 8),
            ValueError,
            "no real token",
        ),
        (
            torch.full((2, 3, 8), float("nan")),
            torch.randn(2, 3, 8),
            ValueError,
            "HardAssignmentCoding: .*NaN or inf",
        ),
    ],
)
def test_bad_inputs(images, texts, error, match):
    with pytest.raises(error, match=match):
        HardAssignmentCoding()(images, texts)


def test_forward_with_unknown_pooling_names_the_block():
    with pytest.raises(
        ValueError, match="HardAssignmentCoding: (hard_assignment_scores: )?pooling must be one of"
    ):
        HardAssignmentCoding(pooling="average")(torch.randn(2, 3, 8), torch.randn(2, 3, 8))
