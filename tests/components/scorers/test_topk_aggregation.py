import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens
from imtm.components import TopKAggregation
from imtm.functional import topk_mean_scores
from imtm.testing import check_component, tokens

SETTINGS = settings(max_examples=15, deadline=None)


def test_shape_and_functional_twin():
    phrases = Tokens.from_lengths(torch.randn(3, 6, 8), [6, 2, 4])
    sentences = torch.randn(5, 8)
    block = TopKAggregation(k=3)
    s = block(phrases, sentences)
    assert s.shape == (3, 5) and block.provides == ("scores_intra",)
    torch.testing.assert_close(s, topk_mean_scores(phrases.feats, sentences, phrases.mask, k=3))
    # k=None, average="cosines": the mean of the region cosines.
    unit = torch.nn.functional.normalize(phrases.feats, dim=-1)
    cos = torch.einsum("ind,td->itn", unit, torch.nn.functional.normalize(sentences, dim=-1))
    mean = (cos * phrases.mask[:, None]).sum(-1) / phrases.mask.sum(-1, keepdim=True)
    torch.testing.assert_close(TopKAggregation(k=None, average="cosines")(phrases, sentences), mean)
    # k=None (default average="features"): the global average of Table III / IV, the mean region's cosine.
    pooled = (phrases.feats * phrases.mask[..., None]).sum(1) / phrases.mask.sum(-1, keepdim=True)
    want = (
        torch.nn.functional.normalize(pooled, dim=-1)
        @ torch.nn.functional.normalize(sentences, dim=-1).t()
    )
    torch.testing.assert_close(TopKAggregation(k=None)(phrases, sentences), want)


@SETTINGS
@given(
    phrases=tokens(batch=st.integers(1, 4), max_tokens=6, dim=4, dtype=torch.float64),
    n=st.integers(1, 4),
    k=st.sampled_from([1, 3, 10, None]),
    average=st.sampled_from(["features", "cosines"]),
)
def test_bounds_and_permutation_equivariance(phrases, n, k, average):
    block = TopKAggregation(k=k, average=average)
    sentences = torch.randn(n, 4, dtype=torch.float64)
    s = block(phrases, sentences)
    assert bool((s.abs() <= 1 + 1e-12).all())
    pi, pt, pn = (
        torch.randperm(phrases.batch_size),
        torch.randperm(n),
        torch.randperm(phrases.num_tokens),
    )
    permuted = block(Tokens(phrases.feats[pi][:, pn], phrases.mask[pi][:, pn]), sentences[pt])
    torch.testing.assert_close(permuted, s[pi][:, pt])


def test_conformance():
    block = TopKAggregation(k=2, max_block_elements=5)
    inputs = {
        "visual_phrases": Tokens.from_lengths(torch.randn(3, 5, 8), [5, 2, 4]),
        "text_phrase": torch.randn(4, 8),
    }
    report = check_component(
        block, inputs, functional=lambda v, t: topk_mean_scores(v.feats, t, v.mask, k=2)
    )
    assert "functional" in report.passed and "padding" in report.passed


def test_bad_inputs():
    with pytest.raises(ValueError, match="TopKAggregation: k must be a positive int"):
        TopKAggregation(k=0).validate()
    with pytest.raises(ValueError, match="max_block_elements must be a positive int"):
        TopKAggregation(max_block_elements=-1).validate()
    with pytest.raises(ValueError, match="TopKAggregation: average must be one of"):
        TopKAggregation(k=None, average="pooled").validate()
    with pytest.raises(
        ValueError, match="TopKAggregation: topk_mean_scores: images and texts must share"
    ):
        TopKAggregation()(Tokens(torch.randn(2, 3, 4)), torch.randn(3, 5))
    with pytest.raises(TypeError, match="TopKAggregation: expected visual phrases as Tokens"):
        TopKAggregation()("regions", torch.randn(3, 4))
