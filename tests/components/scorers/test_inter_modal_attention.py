import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone

from imtm import Tokens
from imtm.components import InterModalPhraseAttention
from imtm.engine.serialization import build_component, encode_params
from imtm.functional import AttentionWeights, phrase_attention_scores
from imtm.testing import check_component, tokens

SETTINGS = settings(max_examples=10, deadline=None)


def inputs():
    torch.manual_seed(0)
    return {
        "image_tokens": Tokens.from_lengths(torch.randn(3, 5, 8), [5, 2, 4]),
        "text_tokens": Tokens.from_lengths(torch.randn(4, 6, 8), [6, 1, 3, 4]),
    }


def twin(block):
    """The functional twin: the regions query the words (i2t), or the words query the regions (t2i)."""

    def f(images, texts):
        q, k = (images, texts) if block.direction == "i2t" else (texts, images)
        s = phrase_attention_scores(
            q.feats,
            k.feats,
            q.mask,
            k.mask,
            heads=block.heads,
            k=block.k,
            self_attn=AttentionWeights.from_modules(block.self_attn, block.norm1),
            cross_attn=AttentionWeights.from_modules(block.cross_attn, block.norm2),
            feed_forward=block.feed_forward_weights(),
            average=block.average,
        )
        return s if block.direction == "i2t" else s.t()

    return f


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
@pytest.mark.parametrize(
    "options", [{}, {"feed_forward": False}, {"k": None}, {"k": None, "average": "cosines"}]
)
def test_shape_provides_and_conformance(direction, options):
    block = InterModalPhraseAttention(direction, dim=8, heads=2, **{"k": 3, **options})
    assert block.provides == (f"scores_inter_{direction}",)
    # A standard decoder layer: self-attention, cross-attention and a feed-forward sub-layer (4 * dim wide).
    assert hasattr(block, "linear1") == options.get("feed_forward", True)
    if hasattr(block, "linear1"):
        assert tuple(block.linear1.weight.shape) == (32, 8)
    x = inputs()
    assert block(x["image_tokens"], x["text_tokens"]).shape == (3, 4)
    report = check_component(block, x, functional=twin(block))
    assert {"functional", "padding", "gradients", "clone"} <= set(report.passed)


def test_directions_differ_and_provides_follows_direction():
    x = inputs()
    block = InterModalPhraseAttention("i2t", dim=8, heads=2)
    i2t = block(x["image_tokens"], x["text_tokens"])
    block.set_params(direction="t2i")
    assert block.provides == ("scores_inter_t2i",)
    assert not torch.allclose(block(x["image_tokens"], x["text_tokens"]), i2t)
    # Read on the class, provides names both branches (for pipeline hints); a rename is kept.
    assert InterModalPhraseAttention.provides == ("scores_inter_i2t", "scores_inter_t2i")
    renamed = InterModalPhraseAttention("i2t", dim=8, heads=2, provides=("s",))
    assert renamed.provides == ("s",) and clone(renamed).provides == ("s",)
    # Unrenamed, the saved configuration stores no provides, so it follows direction when rebuilt.
    params = encode_params(InterModalPhraseAttention("t2i", dim=8, heads=2))
    assert params["provides"] is None
    assert build_component("InterModalPhraseAttention", params).provides == ("scores_inter_t2i",)


@SETTINGS
@given(
    images=tokens(batch=st.integers(1, 3), max_tokens=4, dim=4),
    texts=tokens(batch=st.integers(1, 3), max_tokens=4, dim=4),
    direction=st.sampled_from(["i2t", "t2i"]),
)
def test_permutation_equivariance_and_bounds(images, texts, direction):
    torch.manual_seed(0)
    block = InterModalPhraseAttention(direction, dim=4, heads=2, k=2).eval()
    s = block(images, texts)
    assert bool((s.abs() <= 1 + 1e-5).all())
    pi, pt = torch.randperm(images.batch_size), torch.randperm(texts.batch_size)
    pn, pm = torch.randperm(images.num_tokens), torch.randperm(texts.num_tokens)
    permuted = block(
        Tokens(images.feats[pi][:, pn], images.mask[pi][:, pn]),
        Tokens(texts.feats[pt][:, pm], texts.mask[pt][:, pm]),
    )
    torch.testing.assert_close(permuted, s[pi][:, pt], rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    with pytest.raises(
        ValueError, match="direction must be one of \\['i2t', 't2i'\\], got 'i2i'. Did you mean"
    ):
        InterModalPhraseAttention("i2i", dim=8, heads=2).validate()
    with pytest.raises(ValueError, match="direction must be one of"):
        InterModalPhraseAttention("both", dim=8, heads=2)(
            torch.randn(2, 3, 8), torch.randn(2, 3, 8)
        )
    with pytest.raises(ValueError, match="InterModalPhraseAttention: k must be a positive int"):
        InterModalPhraseAttention("i2t", dim=8, heads=2, k=0).validate()
    with pytest.raises(ValueError, match="max_block_elements must be a positive int or None"):
        InterModalPhraseAttention("i2t", dim=8, heads=2, max_block_elements=0).validate()
    with pytest.raises(ValueError, match="heads must be a positive int dividing dim=8"):
        InterModalPhraseAttention("i2t", dim=8, heads=3)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        InterModalPhraseAttention("i2t", dim=-8)
    with pytest.raises(
        ValueError,
        match="InterModalPhraseAttention: phrase_attention_scores: .*in_proj_weight must have shape",
    ):
        InterModalPhraseAttention("i2t", dim=8, heads=2)(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="expected text tokens as Tokens"):
        InterModalPhraseAttention("i2t", dim=8, heads=2)(torch.randn(2, 3, 8), ["a caption"])
    with pytest.raises(TypeError, match="feed_forward must be True or False"):
        InterModalPhraseAttention("i2t", dim=8, heads=2, feed_forward="yes")
    with pytest.raises(ValueError, match="ffn_dim must be a positive int or None"):
        InterModalPhraseAttention("i2t", dim=8, heads=2, ffn_dim=0)
    with pytest.raises(ValueError, match="average must be one of"):
        InterModalPhraseAttention("i2t", dim=8, heads=2, k=None, average="mean").validate()
