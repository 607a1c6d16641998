import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens
from imtm.functional import AttentionWeights, FeedForwardWeights, phrase_attention_scores
from imtm.functional.phrase_attention import feed_forward, self_attention
from imtm.testing import tokens

SETTINGS = settings(max_examples=15, deadline=None)
D, H = 4, 2
SIDES = {"batch": st.integers(1, 3), "max_tokens": 5, "dim": D, "dtype": torch.float64}


FFN = 6  # hidden width of the feed-forward sub-layer in these tests


def modules(seed=0, ffn=True):
    """Random float64 decoder-layer weights; biases and LayerNorm affine drawn too, so every weight matters.

    ``ffn``: seven layers (attention, norm, attention, norm, linear1, linear2, norm3), else the first four.
    """
    torch.manual_seed(seed)
    layers = [
        torch.nn.MultiheadAttention(D, H, batch_first=True),
        torch.nn.LayerNorm(D),
        torch.nn.MultiheadAttention(D, H, batch_first=True),
        torch.nn.LayerNorm(D),
    ]
    if ffn:
        layers += [torch.nn.Linear(D, FFN), torch.nn.Linear(FFN, D), torch.nn.LayerNorm(D)]
    for layer in layers:
        layer.double()
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.7)
    return layers


def call(queries, keys, layers, **kw):
    sa, n1, ca, n2 = layers[:4]
    ff = FeedForwardWeights.from_modules(*layers[4:]) if len(layers) == 7 else None
    return phrase_attention_scores(
        queries.feats,
        keys.feats,
        queries.mask,
        keys.mask,
        self_attn=AttentionWeights.from_modules(sa, n1),
        cross_attn=AttentionWeights.from_modules(ca, n2),
        heads=H,
        feed_forward=ff,
        **kw,
    )


def loop_scores(queries: Tokens, keys: Tokens, layers, k, average="features"):
    """Eq. 11-14 one pair at a time, on the real tokens only, with torch's own attention modules."""
    sa, n1, ca, n2 = layers[:4]
    out = []
    for i in range(queries.batch_size):
        v = queries.feats[i][queries.mask[i]][None]
        x = n1(v + sa(v, v, v, need_weights=False)[0])  # the queries attend to each other
        row = []
        for t in range(keys.batch_size):
            w = keys.feats[t][keys.mask[t]][None]
            y = n2(x + ca(x, w, w, need_weights=False)[0])[0]  # then query the other modality
            if len(layers) == 7:  # then the feed-forward sub-layer
                l1, l2, n3 = layers[4:]
                y = n3(y + l2(torch.relu(l1(y))))
            if (
                k is None and average == "features"
            ):  # the global average: pool both sides, one cosine
                row.append(F.cosine_similarity(y.mean(0), w[0].mean(0), dim=0))
                continue
            best = torch.stack(
                [
                    max(F.cosine_similarity(y[a], w[0, b], dim=0) for b in range(w.shape[1]))
                    for a in range(y.shape[0])
                ]
            )
            kk = best.numel() if k is None else min(k, best.numel())
            row.append(best.topk(kk).values.mean())
        out.append(torch.stack(row))
    return torch.stack(out)


def test_self_attention_matches_torch():
    sa, n1 = modules()[:2]
    x = torch.randn(3, 5, D, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 0, 1, 0]], dtype=torch.bool)
    got = self_attention(x, mask, AttentionWeights.from_modules(sa, n1), H)
    for b in range(3):
        v = x[b][mask[b]][None]
        torch.testing.assert_close(got[b][mask[b]], n1(v + sa(v, v, v)[0])[0])


@SETTINGS
@given(
    queries=tokens(**SIDES),
    keys=tokens(**SIDES),
    k=st.sampled_from([1, 2, 10, None]),
    average=st.sampled_from(["features", "cosines"]),
    ffn=st.booleans(),
    data=st.data(),
)
def test_matches_loop_for_every_block_size(queries, keys, k, average, ffn, data):
    layers = modules(ffn=ffn)
    full = call(queries, keys, layers, k=k, average=average)
    with torch.no_grad():
        torch.testing.assert_close(full, loop_scores(queries, keys, layers, k, average))
    assert bool((full.abs() <= 1 + 1e-9).all())
    budget = data.draw(
        st.integers(1, queries.batch_size * keys.batch_size * 5 * max(D, H * 5, FFN))
    )
    torch.testing.assert_close(
        call(queries, keys, layers, k=k, average=average, max_block_elements=budget), full
    )


def test_the_layer_is_torchs_transformer_decoder_layer():
    """With the feed-forward sub-layer, each pair's outputs are nn.TransformerDecoderLayer's (post-norm, ReLU)."""
    torch.manual_seed(3)
    layer = (
        torch.nn.TransformerDecoderLayer(D, H, FFN, dropout=0.0, batch_first=True).double().eval()
    )
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.7)
    layers = [
        layer.self_attn,
        layer.norm1,
        layer.multihead_attn,
        layer.norm2,
        layer.linear1,
        layer.linear2,
        layer.norm3,
    ]
    q = Tokens.from_lengths(torch.randn(3, 5, D, dtype=torch.float64), [5, 2, 4])
    kk = Tokens.from_lengths(torch.randn(2, 4, D, dtype=torch.float64), [4, 3])
    got = call(q, kk, layers, k=2)
    with torch.no_grad():
        want = torch.zeros(3, 2, dtype=torch.float64)
        for i in range(3):
            for t in range(2):
                v, w = q.feats[i][q.mask[i]][None], kk.feats[t][kk.mask[t]][None]
                y = layer(v, w)[0]
                cos = F.normalize(y, dim=-1) @ F.normalize(w[0], dim=-1).t()
                want[i, t] = cos.amax(1).topk(min(2, y.shape[0])).values.mean()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        feed_forward(q.feats, FeedForwardWeights.from_modules(*layers[4:])),
        layer.norm3(q.feats + layer.linear2(torch.relu(layer.linear1(q.feats)))),
    )


def test_global_average_pools_first_and_differs_from_the_mean_of_cosines():
    layers = modules(4)
    q = Tokens.from_lengths(torch.randn(4, 5, D, dtype=torch.float64), [5, 2, 4, 3])
    kk = Tokens.from_lengths(torch.randn(3, 4, D, dtype=torch.float64), [4, 3, 2])
    pooled, mean_cos = call(q, kk, layers, k=None), call(q, kk, layers, k=None, average="cosines")
    with torch.no_grad():
        torch.testing.assert_close(pooled, loop_scores(q, kk, layers, None, "features"))
    assert float((pooled - mean_cos).abs().max()) > 1e-3


@pytest.mark.parametrize("budget", [1, 50, None])
def test_gradients_match_loop(budget):
    layers = modules(1)
    q = Tokens.from_lengths(
        torch.randn(3, 5, D, dtype=torch.float64, requires_grad=True), [5, 2, 3]
    )
    kk = Tokens.from_lengths(torch.randn(2, 4, D, dtype=torch.float64, requires_grad=True), [4, 1])
    weight = torch.randn(3, 2, dtype=torch.float64)
    params = [p for layer in layers for p in layer.parameters()]
    got = torch.autograd.grad(
        (call(q, kk, layers, k=2, max_block_elements=budget) * weight).sum(),
        [q.feats, kk.feats, *params],
    )
    want = torch.autograd.grad(
        (loop_scores(q, kk, layers, 2) * weight).sum(), [q.feats, kk.feats, *params]
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_padding_is_never_attended():
    layers = modules(2)
    q = Tokens.from_lengths(torch.randn(2, 4, D, dtype=torch.float64), [4, 2])
    feats = torch.randn(3, 6, D, dtype=torch.float64)
    kk = Tokens.from_lengths(feats, [6, 2, 3])
    clean = call(q, kk, layers)
    # NaN and huge values in the padded words change nothing ...
    dirty = torch.where(kk.mask.unsqueeze(-1), feats, torch.full_like(feats, float("nan")))
    dirty[1, 3] = 1e30
    torch.testing.assert_close(call(q, Tokens(dirty, kk.mask), layers), clean)
    # ... and no gradient reaches them: their attention weight is exactly zero.
    leaf = feats.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(call(q, Tokens(leaf, kk.mask), layers).sum(), leaf)
    assert bool((grad[~kk.mask] == 0).all()) and bool((grad[kk.mask] != 0).any())


def test_bad_inputs():
    sa, n1, ca, n2 = modules(ffn=False)
    w = AttentionWeights.from_modules(sa, n1)
    q, kk = torch.randn(2, 3, D, dtype=torch.float64), torch.randn(2, 4, D, dtype=torch.float64)
    with pytest.raises(TypeError, match="self_attn must be an AttentionWeights"):
        phrase_attention_scores(q, kk, self_attn=sa, cross_attn=w, heads=H)
    bad = AttentionWeights(w.in_proj_weight[:, :2], *list(vars(w).values())[1:])
    with pytest.raises(ValueError, match=r"cross_attn.in_proj_weight must have shape \(12, 4\)"):
        phrase_attention_scores(q, kk, self_attn=w, cross_attn=bad, heads=H)
    with pytest.raises(ValueError, match="heads must be a positive int dividing D=4"):
        phrase_attention_scores(q, kk, self_attn=w, cross_attn=w, heads=3)
    with pytest.raises(ValueError, match="k must be a positive int"):
        phrase_attention_scores(q, kk, self_attn=w, cross_attn=w, heads=H, k=-1)
    with pytest.raises(ValueError, match="max_block_elements must be a positive int"):
        phrase_attention_scores(q, kk, self_attn=w, cross_attn=w, heads=H, max_block_elements=0.5)
    with pytest.raises(ValueError, match="must share the feature dimension"):
        phrase_attention_scores(q, kk[..., :2], self_attn=w, cross_attn=w, heads=H)
    with pytest.raises(ValueError, match="have no real token"):
        phrase_attention_scores(
            q, kk, key_mask=torch.zeros(2, 4, dtype=torch.bool), self_attn=w, cross_attn=w, heads=H
        )
    with pytest.raises(ValueError, match="Did you mean 'features'"):
        phrase_attention_scores(
            q, kk, self_attn=w, cross_attn=w, heads=H, k=None, average="feature"
        )
    with pytest.raises(TypeError, match="feed_forward must be a FeedForwardWeights or None"):
        phrase_attention_scores(q, kk, self_attn=w, cross_attn=w, heads=H, feed_forward=w)
    l1, l2, n3 = modules()[4:]
    ff = FeedForwardWeights.from_modules(l1, l2, n3)
    bad = FeedForwardWeights(
        ff.linear1_weight,
        ff.linear1_bias,
        ff.linear2_weight[:, :2],
        ff.linear2_bias,
        ff.norm_weight,
        ff.norm_bias,
    )
    with pytest.raises(ValueError, match=r"feed_forward.linear2_weight must have shape \(4, 6\)"):
        phrase_attention_scores(q, kk, self_attn=w, cross_attn=w, heads=H, feed_forward=bad)


@pytest.mark.parametrize("budget", [1, 300, None])
def test_sets_of_every_extent_score_as_each_pair_alone(budget):
    """Blocks are cut to their longest set (sets sorted by extent, then put back): each score is the pair's own."""
    layers = modules(5)
    g = torch.Generator().manual_seed(0)
    # extents 1, 6, 4, 2, 3 (the third mask is not a prefix) and 5, 1, 3, 5 (the last not a prefix)
    q_mask = torch.tensor(
        [[1, 0, 0, 0, 0, 0], [1] * 6, [0, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]],
        dtype=torch.bool,
    )
    k_mask = torch.tensor(
        [[1] * 5, [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 1, 0, 1]], dtype=torch.bool
    )
    q = Tokens(torch.randn(5, 6, D, dtype=torch.float64, generator=g), q_mask)
    kk = Tokens(torch.randn(4, 5, D, dtype=torch.float64, generator=g), k_mask)
    for k in (2, None):
        got = call(q, kk, layers, k=k, max_block_elements=budget)
        alone = torch.stack(
            [
                torch.cat([call(q[i : i + 1], kk[t : t + 1], layers, k=k)[0] for t in range(4)])
                for i in range(5)
            ]
        )
        torch.testing.assert_close(got, alone)
        with torch.no_grad():
            torch.testing.assert_close(got, loop_scores(q, kk, layers, k))


@SETTINGS
@given(
    queries=tokens(**SIDES),
    keys=tokens(**SIDES),
    k=st.sampled_from([1, 2, None]),
    average=st.sampled_from(["features", "cosines"]),
    ffn=st.booleans(),
    data=st.data(),
)
def test_the_no_grad_path_equals_the_autograd_path(queries, keys, k, average, ffn, data):
    """Without autograd, blocks run in reused buffers with the LayerNorms written in place (values
    centred by linearity); with autograd, in fresh tensors with torch's LayerNorm: same scores."""
    layers = modules(ffn=ffn)
    budget = data.draw(st.sampled_from([1, 40, None]))
    with torch.no_grad():
        fast = call(queries, keys, layers, k=k, average=average, max_block_elements=budget)
    reference = call(queries, keys, layers, k=k, average=average, max_block_elements=budget)
    assert reference.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, reference.detach())
    with torch.no_grad():
        torch.testing.assert_close(fast, loop_scores(queries, keys, layers, k, average))


def test_the_no_grad_path_writes_its_layer_norms_in_place(monkeypatch):
    """The fast path is the one taken without autograd, and only then (so the test above compares two paths)."""
    import imtm.functional.phrase_attention as pa

    seen = []
    real = pa._layer_norm

    def spy(z, weight, bias, *, in_place, centered):
        seen.append(in_place)
        return real(z, weight, bias, in_place=in_place, centered=centered)

    monkeypatch.setattr(pa, "_layer_norm", spy)
    layers = modules(6)
    q = Tokens.from_lengths(torch.randn(2, 4, D, dtype=torch.float64), [4, 2])
    kk = Tokens.from_lengths(torch.randn(3, 5, D, dtype=torch.float64), [5, 1, 3])
    with torch.no_grad():
        call(q, kk, layers, k=2)
    assert seen and all(seen)
    seen.clear()
    call(q, kk, layers, k=2)
    assert seen and not any(seen)


def test_the_layer_norm_in_place_is_torchs():
    import imtm.functional.phrase_attention as pa

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 7, 16, dtype=torch.float64, generator=g) * 5 + 40  # a large mean
    w, b = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    want = F.layer_norm(z, (16,), w, b, pa.LAYER_NORM_EPS)
    torch.testing.assert_close(pa._layer_norm(z.clone(), w, b, in_place=True, centered=False), want)
    centred = z - z.mean(-1, keepdim=True)
    torch.testing.assert_close(pa._layer_norm(centred, w, b, in_place=True, centered=True), want)


def test_large_logits_are_shifted_before_exp():
    """The softmax skips its shift only when every logit is provably small; float32 logits in the
    hundreds would overflow exp without it."""
    import imtm.functional.phrase_attention as pa

    layers64 = modules(7, ffn=False)
    q = Tokens.from_lengths(torch.randn(3, 5, D, dtype=torch.float64), [5, 2, 4])
    kk = Tokens.from_lengths(torch.randn(4, 6, D, dtype=torch.float64), [6, 1, 3, 5])
    with torch.no_grad():
        layers64[2].in_proj_weight[:D] *= 300.0  # the cross-attention's query projection
        want = loop_scores(q, kk, layers64, 2)
    layers32 = [layer.float() for layer in modules(7, ffn=False)]
    with torch.no_grad():
        layers32[2].in_proj_weight[:D] *= 300.0
    q32, kk32 = Tokens(q.feats.float(), q.mask), Tokens(kk.feats.float(), kk.mask)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = call(q32, kk32, layers32, k=2)
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-4, atol=1e-4)
    big = torch.full((1, 1, 1, 4), 30.0)
    assert pa._logits_need_shift(big, big, 6)  # |q| |k| = 3600
    assert not pa._logits_need_shift(big / 10, big / 10, 6)  # 36 < ~80 in float32
    assert pa._logits_need_shift(big.half() / 10, big.half() / 10, 6)  # float16: exp(36) overflows
    assert pa._logits_need_shift(torch.full((1, 1, 1, 4), float("nan")), big / 10, 6)


def test_padded_query_tokens_are_never_read():
    """Projections run on the real tokens only: NaN in padded query tokens changes nothing, on both paths."""
    layers = modules(8)
    feats = torch.randn(3, 5, D, dtype=torch.float64)
    q = Tokens.from_lengths(feats, [5, 2, 3])
    kk = Tokens.from_lengths(torch.randn(2, 4, D, dtype=torch.float64), [4, 2])
    dirty = torch.where(q.mask.unsqueeze(-1), feats, torch.full_like(feats, float("nan")))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            clean = call(q, kk, layers, k=2)
            torch.testing.assert_close(call(Tokens(dirty, q.mask), kk, layers, k=2), clean)
    sa, n1 = layers[:2]
    out = self_attention(dirty, q.mask, AttentionWeights.from_modules(sa, n1), H)
    assert bool((out[~q.mask] == 0).all()) and bool(torch.isfinite(out).all())
