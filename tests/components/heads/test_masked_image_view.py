"""MaskedImageView and TimmVisionEncoder(mask_in_forward=False): two views of the images for ELA."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.components import GlobalCosine, MaskedImageView, TimmVisionEncoder
from imtm.testing import check_component

VIT = "vit_tiny_patch16_224"
VIT_KW = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}


def vit(mask_ratio=0.3, mask_in_forward=False, **kw):
    return TimmVisionEncoder(
        VIT,
        img_size=32,
        out_dim=16,
        mask_ratio=mask_ratio,
        mask_in_forward=mask_in_forward,
        model_kwargs=dict(VIT_KW),
        **kw,
    )


def pixels(b=3, seed=0):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_masks_of_the_two_views():
    enc = vit().train()
    x = pixels()
    whole, none = enc(x)
    tokens, masked = MaskedImageView(enc).train()(x)
    assert whole.feats.shape == tokens.feats.shape == (3, 17, 16)
    assert tokens.grid == (4, 4) and tokens.num_prefix_tokens == 1
    assert none.shape == masked.shape == (3, 17) and not none.any()
    assert masked.sum(1).tolist() == [round(0.3 * 16)] * 3 and not masked[:, 0].any()
    # forward in training mode gives the whole image: exactly what evaluation sees.
    torch.testing.assert_close(whole.feats, enc.eval()(x)[0].feats)
    # In eval mode the masked view masks nothing either.
    tokens, masked = MaskedImageView(enc.eval())(x)
    assert not masked.any()
    torch.testing.assert_close(tokens.feats, whole.feats)


def test_mask_in_forward_true_is_one_masked_view():
    enc = vit(mask_in_forward=True).train()
    _, masked = enc(pixels())
    assert masked.sum(1).tolist() == [5] * 3


def test_masked_view_matches_a_per_image_loop():
    """Reference (BEiT's placement): per image, overwrite each masked patch embedding, then run timm's ViT."""
    enc = vit(mask_ratio=0.5).train()
    x = pixels(2)
    torch.manual_seed(7)
    tokens, masked = MaskedImageView(enc)(x)
    model = enc.model
    refs = []
    for b in range(x.shape[0]):
        emb = model.patch_embed(x[b : b + 1]).clone()
        for n in range(emb.shape[1]):
            if masked[b, 1 + n]:
                emb[0, n] = enc.mask_token
        refs.append(enc.proj(model.norm(model.blocks(model.norm_pre(model._pos_embed(emb))))))
    torch.testing.assert_close(tokens.feats, torch.cat(refs))
    # Unmasked patches differ from the whole view only through attention; the gradient reaches the mask token.
    tokens.feats.sum().backward()
    assert enc.mask_token.grad is not None and bool(torch.isfinite(enc.mask_token.grad).all())


@settings(max_examples=10, deadline=None)
@given(ratio=st.floats(0.05, 0.9), b=st.integers(1, 3), seed=st.integers(0, 100))
def test_property_counts_permutation_and_whole_view_untouched(ratio, b, seed):
    enc = vit(mask_ratio=ratio).train()
    x = pixels(b, seed)
    view = MaskedImageView(enc).train()
    torch.manual_seed(seed)
    tokens, masked = view(x)
    assert masked.sum(1).tolist() == [round(ratio * 16)] * b
    # Permuting the images permutes the masked view when the same masks follow them.
    perm = torch.randperm(b)
    from imtm.components.encoders.timm_vision import _vit_features

    feats, _ = _vit_features(enc.model, x[perm], masked[perm, 1:], enc.mask_token)
    torch.testing.assert_close(enc.proj(feats), tokens.feats[perm], rtol=1e-4, atol=1e-5)
    # The whole view never depends on the random masks.
    torch.manual_seed(seed + 1)
    torch.testing.assert_close(enc(x)[0].feats, enc.eval()(x)[0].feats)


def test_conformance():
    enc = vit()
    # The borrowed encoder is not part of the view's state_dict (its own block owns it, in a Matcher).
    check_component(MaskedImageView(enc), {"images": pixels(2)}, skip=("dtypes", "state_dict"))
    # forward never masks here, so the mask token gets its gradient through the view only (tested above).
    check_component(enc, {"images": pixels(2)}, skip=("dtypes", "gradients"))


def test_bad_inputs():
    with pytest.raises(TypeError, match="encoder must be a block name or a vision encoder"):
        MaskedImageView(3).validate()
    with pytest.raises(TypeError, match="has no forward_masked"):
        MaskedImageView(GlobalCosine()).validate()
    with pytest.raises(ValueError, match="the encoder masks nothing"):
        MaskedImageView(vit(mask_ratio=0.0)).validate()
    with pytest.raises(RuntimeError, match="is not linked yet"):
        MaskedImageView("image")(pixels())
    view = MaskedImageView("image")
    with pytest.raises(KeyError, match="names no block of this pipeline"):
        view.link({"text": GlobalCosine()})
    with pytest.raises(TypeError, match="mask_in_forward must be True or False"):
        vit(mask_in_forward=1)
