import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone

from imtm import Tokens
from imtm.components import SparsePatchWordAlignment
from imtm.functional import sparse_alignment_scores
from imtm.testing import check_component, tokens


def inputs():
    return {
        "image_tokens": Tokens.from_lengths(torch.randn(3, 5, 8), [5, 3, 1]),
        "text_tokens": Tokens.from_lengths(torch.randn(4, 6, 8), [6, 2, 1, 4]),
    }


@pytest.mark.parametrize("direction", ["both", "patch_to_word", "word_to_patch"])
def test_conformance_and_functional_twin(direction):
    block = SparsePatchWordAlignment(direction=direction, max_block_elements=50)
    report = check_component(
        block,
        inputs(),
        functional=lambda im, tx: sparse_alignment_scores(
            im.feats, tx.feats, im.mask, tx.mask, direction=direction
        ),
    )
    assert report.skipped == {}


@settings(max_examples=15, deadline=None)
@given(
    images=tokens(batch=st.integers(1, 3), max_tokens=5, dim=4, dtype=torch.float64),
    texts=tokens(batch=st.integers(1, 3), max_tokens=5, dim=4, dtype=torch.float64),
    budget=st.integers(1, 100),
)
def test_module_equals_functional_for_any_block_size(images, texts, budget):
    got = SparsePatchWordAlignment(max_block_elements=budget)(images, texts)
    torch.testing.assert_close(
        got, sparse_alignment_scores(images.feats, texts.feats, images.mask, texts.mask)
    )
    # cosine matrices built by hand give the same numbers through reduce_cosines
    v = torch.nn.functional.normalize(images.feats, dim=-1)
    t = torch.nn.functional.normalize(texts.feats, dim=-1)
    A = torch.einsum("ind,tmd->itnm", v, t)
    via = SparsePatchWordAlignment().reduce_cosines(
        A, images.mask[:, None, :], texts.mask[None, :, :]
    )
    torch.testing.assert_close(via, got)


def test_params_clone_validate_and_errors():
    block = SparsePatchWordAlignment(direction="word_to_patch", compute_dtype=torch.float64)
    assert clone(block).get_params() == block.get_params() and block.state_dict() == {}
    assert block.validate() is block
    with pytest.raises(
        ValueError,
        match=r"SparsePatchWordAlignment: direction must be one of .* Did you mean 'both'",
    ):
        SparsePatchWordAlignment(direction="bth").validate()
    with pytest.raises(
        ValueError, match="SparsePatchWordAlignment: max_block_elements must be a positive int"
    ):
        SparsePatchWordAlignment(max_block_elements=-1).validate()
    with pytest.raises(ValueError, match="SparsePatchWordAlignment: .*share the feature dimension"):
        SparsePatchWordAlignment()(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(
        TypeError, match="SparsePatchWordAlignment: expected image tokens as Tokens"
    ):
        SparsePatchWordAlignment()([1, 2], torch.randn(2, 3, 5))
