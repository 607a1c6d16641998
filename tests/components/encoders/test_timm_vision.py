import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from imtm.components import TimmVisionEncoder
from imtm.components.encoders import WeightsUnavailableError
from imtm.components.encoders.timm_vision import _vit_features, load_state_file
from imtm.functional import num_masked_patches
from imtm.testing import check_component

SETTINGS = settings(max_examples=8, deadline=None)

VIT = "vit_tiny_patch16_224"
VIT_KW = {"depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 8}
SWIN = "swin_tiny_patch4_window7_224"
# Two stages: 4x4 patches, one merge -> output tokens cover 8x8 pixels.
SWIN_KW = {"embed_dim": 32, "depths": (1, 1), "num_heads": (1, 2), "window_size": 4}


def vit(img_size=64, **kw):
    return TimmVisionEncoder(VIT, img_size=img_size, model_kwargs=dict(VIT_KW), **kw)


def swin(img_size=64, **kw):
    return TimmVisionEncoder(SWIN, img_size=img_size, model_kwargs=dict(SWIN_KW), **kw)


def pixels(b=2, size=64, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- tokens and grids
@pytest.mark.parametrize("size", [64, 96])
def test_vit_token_count_and_grid(size):
    g = size // 8
    tokens, masked = vit(size)(pixels(2, size))
    assert tokens.feats.shape == (2, 1 + g * g, 64)
    assert tokens.grid == (g, g) and tokens.num_prefix_tokens == 1
    assert tokens.mask.all() and masked.shape == (2, 1 + g * g) and not masked.any()
    no_cls, masked = vit(size, keep_cls=False, out_dim=16)(pixels(2, size))
    assert no_cls.feats.shape == (2, g * g, 16) and no_cls.num_prefix_tokens == 0
    assert masked.shape == (2, g * g)


@pytest.mark.parametrize("size", [64, 96])
def test_swin_token_count_and_grid(size):
    enc = swin(size)
    g = size // 8
    tokens, masked = enc(pixels(2, size))
    assert tokens.feats.shape == (2, g * g, enc.dim) and enc.dim == 64
    assert tokens.grid == (g, g) and tokens.num_prefix_tokens == 0
    assert masked.shape == (2, g * g) and not masked.any()
    assert enc.grid_size(size, size) == (g, g)


def test_keep_cls_false_drops_exactly_the_prefix_token():
    with_cls, without = vit(), vit(keep_cls=False)
    without.load_state_dict(with_cls.state_dict())
    x = pixels()
    a, _ = with_cls.eval()(x)
    b, _ = without.eval()(x)
    torch.testing.assert_close(a.feats[:, 1:], b.feats)


def test_data_config_follows_img_size():
    cfg = vit(96).data_config()
    assert cfg["input_size"] == (3, 96, 96)
    assert len(cfg["mean"]) == 3 and len(cfg["std"]) == 3 and "interpolation" in cfg


def test_uint8_pixels_are_scaled_with_the_model_mean_and_std():
    enc = vit().eval()
    raw = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    cfg = enc.data_config()
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    a, _ = enc(raw)
    b, _ = enc((raw.float() / 255 - mean) / std)
    torch.testing.assert_close(a.feats, b.feats)


@SETTINGS
@given(perm_seed=st.integers(0, 1000))
def test_batch_permutation_equivariance(perm_seed):
    enc = vit(out_dim=8).eval()
    x = pixels(3)
    perm = torch.randperm(3, generator=torch.Generator().manual_seed(perm_seed))
    a, _ = enc(x)
    b, _ = enc(x[perm])
    torch.testing.assert_close(a.feats[perm], b.feats)


def test_per_image_loop_matches_the_batch():
    enc = swin(out_dim=8).eval()
    x = pixels(3)
    batch, _ = enc(x)
    for b in range(3):
        one, _ = enc(x[b : b + 1])
        torch.testing.assert_close(one.feats[0], batch.feats[b], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- conformance
def test_conformance_vit_with_projection_and_masking():
    report = check_component(vit(out_dim=16, mask_ratio=0.25), {"images": pixels()})
    assert "gradients" in report.passed and "dtypes" in report.passed


def test_conformance_swin():
    report = check_component(swin(mask_ratio=0.5), {"images": pixels()})
    assert "gradients" in report.passed


# ---------------------------------------------------------------------- freezing
def test_frozen_encoder_gets_no_gradient_and_stays_in_eval_mode():
    enc = vit(out_dim=8, freeze=True, mask_ratio=0.3)
    enc.train()
    assert enc.training and not enc.model.training
    tokens, _ = enc(pixels())
    tokens.feats.sum().backward()
    assert all(p.grad is None for p in enc.model.parameters())
    assert enc.mask_token.grad is None
    assert enc.proj.weight.grad is not None  # the projection on top still trains
    # A training loop that turns requires_grad back on still computes no backbone gradient.
    enc.requires_grad_(True)
    tokens, _ = enc(pixels())
    tokens.feats.sum().backward()
    assert all(p.grad is None for p in enc.model.parameters())


def test_frozen_without_projection_has_no_differentiable_output():
    tokens, _ = vit(freeze=True).train()(pixels())
    assert not tokens.feats.requires_grad


# ---------------------------------------------------------------------- weights
@pytest.mark.parametrize("fmt", ["safetensors", "pt", "wrapped"])
def test_checkpoint_path_loads_exactly_the_saved_weights(tmp_path, fmt):
    torch.manual_seed(1)
    source = vit()
    state = {k: v.clone() for k, v in source.model.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    elif fmt == "pt":
        path = tmp_path / "w.pt"
        torch.save(state, path)
    else:  # a training checkpoint: wrapped, saved from DistributedDataParallel
        path = tmp_path / "w.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    torch.manual_seed(2)
    loaded = vit(checkpoint_path=str(path))
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    torch.testing.assert_close(loaded.eval()(pixels())[0].feats, source.eval()(pixels())[0].feats)


def test_checkpoint_with_a_classifier_head_loads_into_the_headless_encoder(tmp_path):
    import timm

    full = timm.create_model(VIT, img_size=64, num_classes=10, **VIT_KW)
    path = tmp_path / "with_head.safetensors"
    save_file(full.state_dict(), str(path))
    enc = vit(checkpoint_path=str(path))
    torch.testing.assert_close(enc.model.pos_embed, full.pos_embed, rtol=0, atol=0)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vit(checkpoint_path=str(tmp_path / "missing.safetensors"))
    other = TimmVisionEncoder(VIT, img_size=64, model_kwargs=dict(VIT_KW, embed_dim=32))
    path = tmp_path / "other.safetensors"
    save_file(other.model.state_dict(), str(path))
    with pytest.raises(ValueError, match="does not fit this model"):
        vit(checkpoint_path=str(path))
    bad = tmp_path / "not_a_state.pt"
    torch.save([1, 2, 3], bad)
    with pytest.raises(ValueError, match="holds no state dict"):
        load_state_file(bad)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_file(garbage)


def test_offline_without_weights_gives_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(
        WeightsUnavailableError, match="checkpoint_path='path/to/model.safetensors'"
    ):
        TimmVisionEncoder(VIT, pretrained=True, img_size=64, model_kwargs=dict(VIT_KW))


# ---------------------------------------------------------------------- patch masking
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.75])
def test_masking_replaces_exactly_round_ratio_n_patches_in_training_and_none_in_eval(ratio):
    enc = vit(mask_ratio=ratio).train()
    _, masked = enc(pixels(3))
    k = round(ratio * 64)
    assert k == num_masked_patches(64, ratio)
    assert masked.sum(1).tolist() == [k] * 3
    assert not masked[:, 0].any()  # [CLS] is never masked
    _, masked = enc.eval()(pixels(3))
    assert not masked.any()


def test_dynamic_img_size_non_square_with_masking():
    enc = TimmVisionEncoder(
        VIT, img_size=64, mask_ratio=0.5, model_kwargs=dict(VIT_KW, dynamic_img_size=True)
    )
    tokens, masked = enc.train()(torch.randn(2, 3, 96, 64))
    assert tokens.grid == (12, 8) and tokens.feats.shape[1] == 1 + 96
    assert masked.sum(1).tolist() == [48, 48]


def test_swin_masking_counts_output_tokens():
    enc = swin(mask_ratio=0.3).train()
    _, masked = enc(pixels(2))
    assert masked.sum(1).tolist() == [round(0.3 * 64)] * 2


def test_masking_follows_the_global_seed():
    enc = vit(mask_ratio=0.3).train()
    torch.manual_seed(5)
    _, a = enc(pixels())
    torch.manual_seed(5)
    _, b = enc(pixels())
    assert torch.equal(a, b)


def test_eval_with_masking_configured_equals_timm_forward_features():
    enc = vit(mask_ratio=0.3).eval()
    x = pixels()
    tokens, _ = enc(x)
    torch.testing.assert_close(tokens.feats, enc.model.forward_features(x))
    # The masked path with nothing masked is timm's forward, too.
    none = torch.zeros(2, 64, dtype=torch.bool)
    feats, grid = _vit_features(enc.model, x, none, enc.mask_token)
    torch.testing.assert_close(feats, enc.model.forward_features(x))
    assert grid == (8, 8)


def test_vit_masking_matches_a_per_patch_loop():
    """Reference: embed the patches, overwrite each masked one in a loop, then run timm's ViT."""
    enc = vit(mask_ratio=0.5).train()
    enc.model.eval()  # no dropout or stochastic depth in the comparison
    x = pixels()
    torch.manual_seed(3)
    tokens, masked = enc(x)
    model = enc.model
    emb = model.patch_embed(x).clone()
    for b in range(emb.shape[0]):
        for n in range(emb.shape[1]):
            if masked[b, 1 + n]:
                emb[b, n] = enc.mask_token
    ref = model.norm(model.blocks(model.norm_pre(model._pos_embed(emb))))
    torch.testing.assert_close(tokens.feats, ref)
    # The gradient reaches the mask token through the masked patches only.
    tokens.feats.sum().backward()
    assert enc.mask_token.grad is not None and torch.isfinite(enc.mask_token.grad).all()


def test_swin_masking_matches_a_per_block_loop():
    enc = swin(mask_ratio=0.5).train()
    enc.model.eval()  # Swin-T has stochastic depth: keep it out of the comparison
    x = pixels()
    torch.manual_seed(4)
    tokens, masked = enc(x)
    model = enc.model
    emb = model.patch_embed(x).clone()  # (B, 16, 16, C): 4x4-pixel patches
    for b in range(2):
        for i in range(8):
            for j in range(8):
                if masked[b, i * 8 + j]:  # one output token covers 2x2 patch embeddings
                    emb[b, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = enc.mask_token
    ref = model.norm(model.layers(emb)).reshape(2, 64, -1)
    torch.testing.assert_close(tokens.feats, ref)


# ---------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    enc = vit()
    with pytest.raises(TypeError, match="expected pixels as a"):
        enc([pixels()])
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        enc(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match="built for"):
        enc(pixels(2, 96))
    with pytest.raises(ValueError, match="empty batch"):
        enc(torch.randn(0, 3, 64, 64))
    with pytest.raises(TypeError, match="float .normalised. or uint8"):
        enc(torch.zeros(2, 3, 64, 64, dtype=torch.int32))
    nan = pixels()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        enc(nan)
    dynamic = TimmVisionEncoder(VIT, img_size=64, model_kwargs=dict(VIT_KW, dynamic_img_size=True))
    assert dynamic(pixels(1, 96))[0].grid == (12, 12)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        dynamic(pixels(1, 60))


def test_bad_arguments():
    with pytest.raises(
        ValueError, match="unknown timm model .* Did you mean 'vit_tiny_patch16_224'"
    ):
        TimmVisionEncoder("vit_tiny_patch16_22")
    with pytest.raises(
        ValueError, match=r"mask_ratio must be a finite number in \[0, 1\), got 1.0"
    ):
        vit(mask_ratio=1.0)
    with pytest.raises(
        ValueError, match="TimmVisionEncoder: out_dim must be a positive int or None, got 0"
    ):
        vit(out_dim=0)
    with pytest.raises(TypeError, match="freeze must be True or False"):
        vit(freeze="yes")
    with pytest.raises(ValueError, match="not both"):
        vit(pretrained=True, checkpoint_path="w.safetensors")
    with pytest.raises(ValueError, match="model_kwargs may not set"):
        TimmVisionEncoder(VIT, model_kwargs={"num_classes": 10})
    with pytest.raises(TypeError, match="model_kwargs must be a dict"):
        TimmVisionEncoder(VIT, model_kwargs=[("depth", 2)])
    with pytest.raises(TypeError, match="refused the arguments"):
        TimmVisionEncoder(VIT, model_kwargs={"no_such_argument": 1})
    with pytest.raises(ValueError, match="supported are ViT"):
        TimmVisionEncoder("mixer_s16_224")  # an MLP-Mixer: tokens without a patch grid map
    with pytest.raises(ValueError, match="patch_drop_rate"):
        TimmVisionEncoder(VIT, img_size=64, model_kwargs=dict(VIT_KW, patch_drop_rate=0.5))
