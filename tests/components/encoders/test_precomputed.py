import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens
from imtm.components import PrecomputedEncoder
from imtm.testing import check_component, tokens

SETTINGS = settings(max_examples=20, deadline=None)

CONFIGS = [
    {},
    {
        "num_layers": 2,
        "hidden_dim": 5,
        "residual": True,
        "activation": "gelu",
        "normalize": True,
        "dropout": 0.1,
    },
    {"num_layers": 3},
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_conformance(kwargs):
    images = Tokens.from_lengths(torch.randn(3, 5, 12), [5, 2, 1])
    report = check_component(PrecomputedEncoder(in_dim=12, out_dim=6, **kwargs), {"images": images})
    assert "padding" in report.passed and "gradients" in report.passed


def test_shape_mask_and_metadata_are_kept():
    images = Tokens.from_lengths(torch.randn(2, 4, 12), [4, 2], grid=(2, 2), num_prefix_tokens=0)
    out = PrecomputedEncoder(12, 6)(images)
    assert out.feats.shape == (2, 4, 6)
    assert torch.equal(out.mask, images.mask) and out.grid == (2, 2)
    assert not out.feats[1, 2:].any()  # padded positions are exactly zero


def test_plain_tensor_means_every_region_is_real():
    enc = PrecomputedEncoder(12, 6)
    x = torch.randn(2, 3, 12)
    out = enc(x)
    assert bool(out.mask.all())
    torch.testing.assert_close(out.feats, enc(Tokens(x)).feats)


def test_linear_projection_matches_per_region_loop():
    enc = PrecomputedEncoder(12, 6).double()
    images = Tokens.from_lengths(torch.randn(2, 4, 12, dtype=torch.float64), [4, 3])
    out = enc(images)
    w, b = enc.mlp[0].weight, enc.mlp[0].bias
    for i in range(2):
        for n in range(4):
            if images.mask[i, n]:
                expected = torch.stack(
                    [
                        sum(w[o, k] * images.feats[i, n, k] for k in range(12)) + b[o]
                        for o in range(6)
                    ]
                )
                torch.testing.assert_close(out.feats[i, n], expected)


def test_residual_mlp_is_mlp_plus_linear_shortcut():
    enc = PrecomputedEncoder(12, 6, num_layers=2, hidden_dim=4, residual=True).eval()
    x = torch.randn(1, 3, 12)
    l1, l2 = enc.mlp[0], enc.mlp[3]
    expected = l2(torch.relu(l1(x))) + enc.shortcut(x)
    torch.testing.assert_close(enc(x).feats, expected)


@SETTINGS
@given(images=tokens(batch=st.integers(1, 3), max_tokens=5, dim=12), residual=st.booleans())
def test_padding_is_never_read(images, residual):
    enc = PrecomputedEncoder(12, 6, num_layers=2, residual=residual).eval()
    # Garbage, even NaN, in the padding must not change a real token.
    dirty = images.with_feats(images.feats.masked_fill(~images.mask.unsqueeze(-1), float("nan")))
    out = enc(dirty)
    for b in range(images.batch_size):
        alone = enc(images.feats[b][images.mask[b]].unsqueeze(0)).feats[0]
        torch.testing.assert_close(out.feats[b][images.mask[b]], alone)
    assert bool(torch.isfinite(out.feats).all())


@pytest.mark.parametrize(
    "images, error, match",
    [
        (
            torch.randn(4, 36, 512),
            ValueError,
            r"PrecomputedEncoder: expected image tokens of shape \(B, N, 2048\), got \(4, 36, 512\)",
        ),
        (
            torch.randn(4, 2048),
            ValueError,
            r"expected image tokens of shape \(B, N, 2048\), got \(4, 2048\)",
        ),
        (Tokens(torch.full((1, 2, 2048), float("nan"))), ValueError, "NaN"),
        (
            Tokens(torch.randn(2, 3, 2048), torch.tensor([[True] * 3, [False] * 3])),
            ValueError,
            r"rows \[1\] have no real token",
        ),
        (Tokens(torch.ones(1, 2, 2048, dtype=torch.long)), TypeError, "floating-point"),
        ([[0.0] * 2048], TypeError, "got list"),
    ],
)
def test_bad_inputs(images, error, match):
    with pytest.raises(error, match=match):
        PrecomputedEncoder(2048, 8)(images)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"in_dim": 0}, "PrecomputedEncoder: in_dim must be a positive int, got 0"),
        ({"out_dim": 2.5}, "out_dim must be a positive int, got 2.5"),
        ({"num_layers": 0}, "num_layers"),
        ({"hidden_dim": -1}, "hidden_dim"),
        ({"dropout": 1.0}, r"dropout must be a finite number in \[0, 1\), got 1.0"),
        (
            {"activation": "rleu"},
            r"activation must be one of \['gelu', 'relu'\], got 'rleu'. Did you mean 'relu'",
        ),
        ({"residual": True}, "residual=True needs an MLP"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"in_dim": 8, "out_dim": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        PrecomputedEncoder(**args)
