import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens
from imtm.components import VisualPhraseEncoder
from imtm.testing import check_component, tokens

SETTINGS = settings(max_examples=15, deadline=None)


def reference_layer(block: VisualPhraseEncoder) -> torch.nn.TransformerEncoderLayer:
    """torch's own post-norm encoder layer carrying the block's weights."""
    ref = torch.nn.TransformerEncoderLayer(
        block.dim,
        block.heads,
        dim_feedforward=block.ffn[0].out_features,
        dropout=0.0,
        batch_first=True,
        norm_first=False,
    )
    ref.self_attn.load_state_dict(block.attn.state_dict())
    ref.linear1.load_state_dict(block.ffn[0].state_dict())
    ref.linear2.load_state_dict(block.ffn[2].state_dict())
    ref.norm1.load_state_dict(block.norm1.state_dict())
    ref.norm2.load_state_dict(block.norm2.state_dict())
    return ref.to(block.norm1.weight.dtype).train()  # train mode: the plain (not fused) path


def test_shape_mask_unit_norm():
    block = VisualPhraseEncoder(dim=8, heads=2, ffn_dim=16)
    out = block(Tokens.from_lengths(torch.randn(3, 5, 8), [5, 2, 1]))
    assert isinstance(out, Tokens) and out.feats.shape == (3, 5, 8)
    assert out.mask.sum(1).tolist() == [5, 2, 1]
    norms = out.feats.norm(dim=-1)
    torch.testing.assert_close(norms[out.mask], torch.ones(8))
    assert bool((out.feats[~out.mask] == 0).all())
    # A plain tensor means every region is real.
    assert block(torch.randn(2, 4, 8)).mask.all()


def test_matches_torch_encoder_layer_per_image():
    """Eq. 1-6 against nn.TransformerEncoderLayer, one image at a time on its real regions (forward and gradient)."""
    torch.manual_seed(0)
    block = VisualPhraseEncoder(dim=8, heads=2, ffn_dim=12).double()
    ref = reference_layer(block)
    feats = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    tokens_in = Tokens.from_lengths(feats, [5, 3, 1])
    out = block(tokens_in)
    loop = [F.normalize(ref(feats[i : i + 1, :n]), dim=-1)[0] for i, n in enumerate([5, 3, 1])]
    for i, n in enumerate([5, 3, 1]):
        torch.testing.assert_close(out.feats[i, :n], loop[i])
    w = torch.randn(3, 5, 8, dtype=torch.float64)
    (g_block,) = torch.autograd.grad((out.feats * w).sum(), feats)
    (g_loop,) = torch.autograd.grad(
        sum((loop[i] * w[i, :n]).sum() for i, n in enumerate([5, 3, 1])), feats
    )
    torch.testing.assert_close(g_block, g_loop)


@SETTINGS
@given(
    x=tokens(batch=st.integers(1, 3), max_tokens=6, dim=4, dtype=torch.float64),
    seed=st.integers(0, 100),
)
def test_padding_invariance_and_permutation_equivariance(x, seed):
    torch.manual_seed(seed)
    block = VisualPhraseEncoder(dim=4, heads=2).double().eval()
    out = block(x)
    # Garbage (NaN) in the padding changes nothing.
    dirty = torch.where(x.mask.unsqueeze(-1), x.feats, torch.full_like(x.feats, float("nan")))
    torch.testing.assert_close(block(Tokens(dirty, x.mask)).feats, out.feats)
    # Permuting the regions permutes the phrases.
    perm = torch.randperm(x.num_tokens)
    permuted = block(Tokens(x.feats[:, perm], x.mask[:, perm]))
    torch.testing.assert_close(permuted.feats, out.feats[:, perm])


def test_conformance():
    block = VisualPhraseEncoder(dim=8, heads=2, ffn_dim=16)
    report = check_component(
        block, {"image_tokens": Tokens.from_lengths(torch.randn(3, 5, 8), [5, 2, 4])}
    )
    assert "padding" in report.passed and "gradients" in report.passed


def test_bad_inputs():
    with pytest.raises(ValueError, match="dim must be a positive int"):
        VisualPhraseEncoder(dim=0)
    with pytest.raises(ValueError, match="heads must be a positive int dividing dim=8"):
        VisualPhraseEncoder(dim=8, heads=3)
    with pytest.raises(ValueError, match="ffn_dim must be a positive int or None"):
        VisualPhraseEncoder(dim=8, heads=2, ffn_dim=-4)
    block = VisualPhraseEncoder(dim=8, heads=2)
    with pytest.raises(ValueError, match=r"expected token features of shape \(B, N, 8\)"):
        block(Tokens(torch.randn(2, 3, 6)))
    with pytest.raises(TypeError, match="VisualPhraseEncoder: expected image tokens as Tokens"):
        block([[0.0] * 8])
    with pytest.raises(ValueError, match="have no real token"):
        block(Tokens(torch.randn(2, 3, 8), torch.tensor([[True, False, False], [False] * 3])))
