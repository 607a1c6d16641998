import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens
from imtm.functional.scan_attention import scan_t2i_scores
from imtm.testing import tokens

SETTINGS = settings(max_examples=15, deadline=None)
SIDES = {"batch": st.integers(1, 3), "max_tokens": 5, "dim": 4, "dtype": torch.float64}


def loop_scan(images: Tokens, texts: Tokens, smooth=9.0):
    """SCAN t2i with average pooling, one pair and one word at a time, on the real tokens only."""
    out = torch.zeros(images.batch_size, texts.batch_size, dtype=torch.float64)
    for i in range(images.batch_size):
        v = [
            images.feats[i, n] / images.feats[i, n].norm()
            for n in range(images.num_tokens)
            if images.mask[i, n]
        ]
        for t in range(texts.batch_size):
            e = [
                texts.feats[t, m] / texts.feats[t, m].norm()
                for m in range(texts.num_tokens)
                if texts.mask[t, m]
            ]
            s = [[float(x @ w) for w in e] for x in v]
            s = [[c if c > 0 else 0.1 * c for c in row] for row in s]  # LeakyReLU(0.1)
            s = [
                [c / (math.sqrt(sum(x * x for x in row)) + 1e-8) for c in row] for row in s
            ]  # over words
            total = 0.0
            for j, w in enumerate(e):
                z = sum(math.exp(smooth * s[r][j]) for r in range(len(v)))
                a = sum(math.exp(smooth * s[r][j]) / z * v[r] for r in range(len(v)))
                total += float(w @ a) / float(a.norm())
            out[i, t] = total / len(e)
    return out


@SETTINGS
@given(images=tokens(**SIDES), texts=tokens(**SIDES), data=st.data())
def test_matches_the_per_pair_loop_for_every_block_size(images, texts, data):
    got = scan_t2i_scores(images.feats, texts.feats, images.mask, texts.mask)
    torch.testing.assert_close(got, loop_scan(images, texts))
    assert bool((got.abs() <= 1 + 1e-9).all())
    budget = data.draw(st.integers(1, 200))
    torch.testing.assert_close(
        scan_t2i_scores(
            images.feats, texts.feats, images.mask, texts.mask, max_block_elements=budget
        ),
        got,
    )


def test_padding_and_permutations():
    g = torch.Generator().manual_seed(0)
    images = Tokens.from_lengths(torch.randn(3, 6, 4, generator=g, dtype=torch.float64), [6, 3, 5])
    texts = Tokens.from_lengths(
        torch.randn(4, 5, 4, generator=g, dtype=torch.float64), [5, 1, 3, 4]
    )
    base = scan_t2i_scores(images.feats, texts.feats, images.mask, texts.mask)
    dirty = images.feats.masked_fill(~images.mask.unsqueeze(-1), float("nan"))
    torch.testing.assert_close(scan_t2i_scores(dirty, texts.feats, images.mask, texts.mask), base)
    pi, pt = torch.randperm(3, generator=g), torch.randperm(4, generator=g)
    torch.testing.assert_close(
        scan_t2i_scores(images.feats[pi], texts.feats[pt], images.mask[pi], texts.mask[pt]),
        base[pi][:, pt],
    )


def test_bad_inputs():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="smooth must be a finite number > 0"):
        scan_t2i_scores(x, x, smooth=0)
    with pytest.raises(ValueError, match="max_block_elements must be a positive int"):
        scan_t2i_scores(x, x, max_block_elements=0)
    with pytest.raises(ValueError, match="must share the feature dimension"):
        scan_t2i_scores(x, x[..., :2])
