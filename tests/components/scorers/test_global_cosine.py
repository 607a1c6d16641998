import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens
from imtm.components import GlobalCosine
from imtm.functional import global_cosine_scores
from imtm.testing import check_component, tokens

SETTINGS = settings(max_examples=20, deadline=None)


def test_conformance_and_functional_twin():
    inputs = {
        "image_tokens": Tokens.from_lengths(torch.randn(3, 5, 8), [5, 3, 1]),
        "text_tokens": Tokens.from_lengths(torch.randn(4, 6, 8), [6, 2, 1, 4]),
    }
    report = check_component(
        GlobalCosine(),
        inputs,
        functional=lambda im, tx: global_cosine_scores(im.feats, tx.feats, im.mask, tx.mask),
    )
    assert report.skipped == {}


def test_shape_and_renamed_values():
    scorer = GlobalCosine(requires=("image_tokens", "phrase_tokens"), provides=("scores_t2i",))
    s = scorer(Tokens(torch.randn(2, 5, 8)), torch.randn(3, 4, 8))
    assert s.shape == (2, 3) and scorer.provides == ("scores_t2i",)


@SETTINGS
@given(
    images=tokens(batch=st.integers(1, 3), max_tokens=5, dim=4, dtype=torch.float64),
    texts=tokens(batch=st.integers(1, 3), max_tokens=5, dim=4, dtype=torch.float64),
)
def test_matches_per_pair_loop_and_is_bounded(images, texts):
    s = GlobalCosine()(images, texts)
    for i in range(images.batch_size):
        vi = (
            sum(images.feats[i, n] for n in range(images.num_tokens) if images.mask[i, n])
            / images.lengths[i]
        )
        for t in range(texts.batch_size):
            vt = (
                sum(texts.feats[t, m] for m in range(texts.num_tokens) if texts.mask[t, m])
                / texts.lengths[t]
            )
            torch.testing.assert_close(s[i, t], F.cosine_similarity(vi, vt, dim=0))
    assert bool((s.abs() <= 1 + 1e-12).all())


@SETTINGS
@given(
    images=tokens(batch=st.integers(1, 3), max_tokens=5, dim=4, dtype=torch.float64),
    texts=tokens(batch=st.integers(1, 3), max_tokens=5, dim=4, dtype=torch.float64),
    extra=st.integers(1, 3),
)
def test_padding_garbage_never_changes_scores(images, texts, extra):
    def pad(t):
        feats = torch.cat(
            [t.feats, torch.full((t.batch_size, extra, t.dim), 1e6, dtype=t.dtype)], 1
        )
        feats = feats.masked_fill(
            ~torch.cat([t.mask, t.mask.new_zeros(t.batch_size, extra)], 1).unsqueeze(-1),
            float("nan"),
        )
        return Tokens(feats, torch.cat([t.mask, t.mask.new_zeros(t.batch_size, extra)], 1))

    torch.testing.assert_close(
        GlobalCosine()(pad(images), pad(texts)), GlobalCosine()(images, texts)
    )


def test_blocks_of_images_and_captions_give_the_same_scores():
    images = Tokens.from_lengths(torch.randn(6, 5, 8), [5, 4, 3, 2, 1, 5])
    texts = Tokens.from_lengths(torch.randn(5, 7, 8), [7, 1, 3, 6, 2])
    full = GlobalCosine()(images, texts)
    blocked = torch.cat(
        [
            torch.cat(
                [GlobalCosine()(images[i : i + 4], texts[t : t + 2]) for t in range(0, 5, 2)], 1
            )
            for i in range(0, 6, 4)
        ]
    )
    torch.testing.assert_close(blocked, full)


@pytest.mark.parametrize(
    "images, texts, error, match",
    [
        (
            torch.randn(2, 3, 8),
            torch.randn(2, 3, 6),
            ValueError,
            "image tokens have dimension 8 but text tokens have 6",
        ),
        (
            torch.randn(2, 8),
            torch.randn(2, 3, 8),
            ValueError,
            r"expected image tokens of shape \(B, N, D\), got \(2, 8\)",
        ),
        (torch.randn(2, 3, 8), [1, 2], TypeError, "expected text tokens as Tokens"),
        (
            Tokens(torch.randn(2, 3, 8), torch.tensor([[True] * 3, [False] * 3])),
            torch.randn(2, 3, 8),
            ValueError,
            "no real token",
        ),
        (torch.randn(2, 3, 8), torch.full((2, 3, 8), float("nan")), ValueError, "NaN"),
        (
            torch.randn(2, 3, 8),
            torch.randn(2, 3, 8).double(),
            TypeError,
            "float32 but text tokens are torch.float64",
        ),
    ],
)
def test_bad_inputs(images, texts, error, match):
    with pytest.raises(error, match=match):
        GlobalCosine()(images, texts)
