import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from imtm import Tokens
from imtm.components import SelfAttentionContext
from imtm.testing import check_component, tokens

SETTINGS = settings(max_examples=20, deadline=None)


def test_conformance():
    torch.manual_seed(0)
    layer = SelfAttentionContext(dim=8, heads=2)
    report = check_component(
        layer, {"image_tokens": Tokens.from_lengths(torch.randn(3, 5, 8), [5, 2, 1])}
    )
    assert report.skipped == {"functional": "no functional twin given"}


def test_matches_a_plain_loop_over_images_and_heads():
    torch.manual_seed(1)
    layer = SelfAttentionContext(dim=6, heads=2).double().eval()
    x = Tokens.from_lengths(torch.randn(2, 4, 6, dtype=torch.float64), [4, 3])
    out = layer(x)
    attn = layer.attn
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    for b in range(2):
        n = int(x.mask[b].sum())
        v = x.feats[b, :n]
        h = nn.functional.layer_norm(v, (6,), layer.norm.weight, layer.norm.bias)
        q, k, val = h @ wq.T + bq, h @ wk.T + bk, h @ wv.T + bv
        heads = []
        for head in range(2):
            sl = slice(3 * head, 3 * head + 3)
            a = torch.softmax(
                q[:, sl] @ k[:, sl].T / 3**0.5, dim=-1
            )  # scaled dot-product attention
            heads.append(a @ val[:, sl])
        expected = (
            v + torch.cat(heads, -1) @ attn.out_proj.weight.T + attn.out_proj.bias
        )  # residual
        torch.testing.assert_close(out.feats[b, :n], expected)
        assert bool((out.feats[b, n:] == 0).all())


@SETTINGS
@given(
    t=tokens(batch=st.integers(1, 3), max_tokens=5, dim=4, dtype=torch.float64),
    extra=st.integers(1, 3),
)
def test_padding_never_changes_real_tokens_and_permutation_equivariance(t, extra):
    layer = SelfAttentionContext(dim=4, heads=2).double().eval()
    base = layer(t)
    mask = torch.cat([t.mask, t.mask.new_zeros(t.batch_size, extra)], 1)
    feats = torch.cat(
        [t.feats, torch.full((t.batch_size, extra, 4), float("nan"), dtype=t.dtype)], 1
    )
    padded = layer(Tokens(feats, mask))
    torch.testing.assert_close(padded.feats[:, : t.num_tokens], base.feats)
    perm = torch.randperm(t.num_tokens)
    permuted = layer(Tokens(t.feats[:, perm], t.mask[:, perm]))
    torch.testing.assert_close(permuted.feats, base.feats[:, perm])


def test_train_and_eval_paths_agree_without_dropout():
    layer = SelfAttentionContext(dim=8, heads=4)
    x = Tokens.from_lengths(torch.randn(3, 5, 8), [5, 2, 4])
    train_out = layer.train()(x).feats
    with torch.no_grad():
        eval_out = layer.eval()(x).feats
    torch.testing.assert_close(train_out.detach(), eval_out)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 10, "heads": 3}, "heads must be a positive int dividing dim=10"),
        ({"dim": 0}, "dim must be a positive int"),
        ({"dim": 8, "dropout": 1.5}, r"dropout must be a finite number in \[0, 1\)"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=f"SelfAttentionContext: {match}"):
        SelfAttentionContext(**kwargs)


def test_bad_inputs():
    layer = SelfAttentionContext(dim=8, heads=2)
    with pytest.raises(
        ValueError, match=r"SelfAttentionContext: expected token features of shape \(B, N, 8\)"
    ):
        layer(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="no real token"):
        layer(Tokens(torch.randn(2, 3, 8), torch.tensor([[True] * 3, [False] * 3])))
    with pytest.raises(TypeError, match="expected image tokens as Tokens"):
        layer([1.0])
