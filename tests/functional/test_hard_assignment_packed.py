"""CHAN's packed, aligned query blocks give the scores (and gradients) of the padded dense product."""

import math

import pytest
import torch
import torch.nn.functional as F

from imtm.functional import hard_assignment_scores
from imtm.functional.blocking import QUERY_ALIGN, blocked_query_scores
from imtm.functional.pooling import resolve_pooling


def padded_reference(images, texts, text_mask, temperature=0.1):
    """Every (image, caption, region, word slot) cosine, padding included, then masked max and log-sum-exp."""
    sims = torch.einsum("ind,tmd->itnm", F.normalize(images, dim=-1), F.normalize(texts, dim=-1))
    words = sims.amax(2).masked_fill(~text_mask[None], -math.inf)  # (Bi, Bt, M)
    return temperature * torch.logsumexp(words / temperature, dim=-1)


def _problem(seed, n_images=7, n_captions=40, n=9, m=20, d=16):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, n, d, generator=g, dtype=torch.float64)
    texts = torch.randn(n_captions, m, d, generator=g, dtype=torch.float64)
    lengths = torch.randint(3, m + 1, (n_captions,), generator=g)
    return images, texts, torch.arange(m) < lengths[:, None]


@pytest.mark.parametrize("budget", [None, 9 * 2 * 101, 9 * 3 * 77, 9 * 500])
def test_packed_blocks_equal_the_padded_product(budget):
    images, texts, text_mask = _problem(0)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    want = padded_reference(images, texts, text_mask)
    got = hard_assignment_scores(images, texts, text_mask=text_mask, max_block_elements=budget)
    torch.testing.assert_close(got, want)
    weights = torch.randn_like(want)
    g_want = torch.autograd.grad((want * weights).sum(), (images, texts))
    g_got = torch.autograd.grad((got * weights).sum(), (images, texts))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # the inference path (products into one reused buffer)
        torch.testing.assert_close(
            hard_assignment_scores(images, texts, text_mask=text_mask, max_block_elements=budget),
            want.detach(),
        )


def test_aligned_blocks_are_padded_and_cut_back(monkeypatch):
    # Blocks wide enough to be aligned: every product's width is a multiple of QUERY_ALIGN.
    images, texts, text_mask = _problem(1)
    widths = []
    real_mm = torch.mm

    def recording_mm(a, b, **kwargs):
        widths.append(b.shape[1])
        return real_mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", recording_mm)
    got = blocked_query_scores(
        images,
        texts,
        None,
        text_mask,
        pool=resolve_pooling("lse", 0.1),
        max_block_elements=9 * 7 * 200,
    )
    monkeypatch.setattr(torch, "mm", real_mm)
    assert widths and all(w % QUERY_ALIGN == 0 for w in widths), widths
    torch.testing.assert_close(got, padded_reference(images, texts, text_mask))
