"""phrase_attention_token_scores: the per-token scores behind DCPA's inter-modal branch (Eq. 13)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.functional.phrase_attention import (
    AttentionWeights,
    phrase_attention_scores,
    phrase_attention_token_scores,
)
from imtm.functional.topk import topk_mean


def weights(dim=8, heads=2, seed=0):
    torch.manual_seed(seed)
    mk = lambda: AttentionWeights.from_modules(
        torch.nn.MultiheadAttention(dim, heads), torch.nn.LayerNorm(dim)
    )
    return mk(), mk()


def loop_reference(q, k, qm, km, sa, ca, heads):
    """Eq. 11-13 for one pair at a time, with torch's own multi-head attention."""
    out = torch.full(qm.shape, -math.inf, dtype=q.dtype)
    for b in range(q.shape[0]):
        x, w = q[b][qm[b]], k[b][km[b]]
        for attn_w, kv in ((sa, None), (ca, w)):
            mha = torch.nn.MultiheadAttention(x.shape[-1], heads, batch_first=True).to(q.dtype)
            with torch.no_grad():
                mha.in_proj_weight.copy_(attn_w.in_proj_weight)
                mha.in_proj_bias.copy_(attn_w.in_proj_bias)
                mha.out_proj.weight.copy_(attn_w.out_proj_weight)
                mha.out_proj.bias.copy_(attn_w.out_proj_bias)
            src = x if kv is None else kv
            a, _ = mha(x[None], src[None], src[None])
            x = F.layer_norm(x + a[0], (x.shape[-1],), attn_w.norm_weight, attn_w.norm_bias, 1e-5)
        n = 0
        for l in range(q.shape[1]):
            if qm[b, l]:
                out[b, l] = max(F.cosine_similarity(x[n], w[m], dim=0) for m in range(len(w)))
                n += 1
    return out


def test_matches_a_per_pair_loop_and_the_blocked_scores():
    sa, ca = weights()
    q, k = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(3, 4, 8, dtype=torch.float64)
    qm = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    km = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    sa, ca = (AttentionWeights(*(t.detach().double() for t in vars(w).values())) for w in (sa, ca))
    got = phrase_attention_token_scores(q, k, qm, km, self_attn=sa, cross_attn=ca, heads=2)
    torch.testing.assert_close(got, loop_reference(q, k, qm, km, sa, ca, 2))
    full = phrase_attention_scores(q, k, qm, km, self_attn=sa, cross_attn=ca, heads=2, k=2)
    torch.testing.assert_close(topk_mean(got.masked_fill(~qm, 0), qm, 2), full.diagonal())


@settings(max_examples=15, deadline=None)
@given(pad_q=st.integers(0, 3), pad_k=st.integers(0, 3), seed=st.integers(0, 100))
def test_padding_never_changes_a_score_and_scores_are_cosines(pad_q, pad_k, seed):
    sa, ca = weights(seed=seed)
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 4, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    base = phrase_attention_token_scores(q, k, self_attn=sa, cross_attn=ca, heads=2)
    qp = torch.cat([q, torch.randn(2, pad_q, 8, generator=g) * 1e3], 1)
    kp = torch.cat([k, torch.randn(2, pad_k, 8, generator=g) * 1e3], 1)
    qm = torch.arange(4 + pad_q) < 4
    km = torch.arange(3 + pad_k) < 3
    padded = phrase_attention_token_scores(
        qp, kp, qm.expand(2, -1), km.expand(2, -1), self_attn=sa, cross_attn=ca, heads=2
    )
    torch.testing.assert_close(padded[:, :4], base)
    assert bool((padded[:, 4:] == -math.inf).all())
    assert bool((base.abs() <= 1 + 1e-5).all())


def test_bad_inputs():
    sa, ca = weights()
    with pytest.raises(ValueError, match="pair row by row"):
        phrase_attention_token_scores(
            torch.randn(2, 3, 8), torch.randn(3, 3, 8), self_attn=sa, cross_attn=ca, heads=2
        )
    with pytest.raises(ValueError, match="heads must be a positive int"):
        phrase_attention_token_scores(
            torch.randn(2, 3, 8), torch.randn(2, 3, 8), self_attn=sa, cross_attn=ca, heads=3
        )
