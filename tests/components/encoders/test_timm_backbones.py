"""TimmVisionEncoder beyond ViT and Swin: CNN grid tokens, EVA, CLIP image towers, hf-hub / local-dir
names and local checkpoints, all with tiny random models built here (nothing is downloaded)."""

import json

import pytest
import torch
from clip_towers import openai_clip_visual_state
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from imtm.components import TimmVisionEncoder
from imtm.components.encoders import WeightsUnavailableError
from imtm.components.encoders.timm_vision import _eva_features
from imtm.testing import check_component

SETTINGS = settings(max_examples=4, deadline=None)

# Tiny members of each family (timm names with small dims; random weights).
CONVNEXT_KW = {"dims": (8, 16, 24, 32), "depths": (1, 1, 1, 1)}
RESNET_KW = {"layers": (1, 1, 1, 1), "base_width": 8}
EVA_KW = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}
CLIP_KW = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}


def resnet(**kw):
    return TimmVisionEncoder("resnet50", model_kwargs=dict(RESNET_KW), **kw)


def convnext(**kw):
    return TimmVisionEncoder("convnext_atto", model_kwargs=dict(CONVNEXT_KW), **kw)


def eva(img_size=32, **kw):
    return TimmVisionEncoder(
        "eva02_tiny_patch14_224", img_size=img_size, model_kwargs=dict(EVA_KW), **kw
    )


def pixels(b=2, h=64, w=64, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- CNN grid tokens
@pytest.mark.parametrize("make", [resnet, convnext], ids=["resnet", "convnext"])
def test_cnn_tokens_are_the_last_feature_map_cell_by_cell(make):
    enc = make(out_dim=None).eval()
    x = pixels(2, 64, 96)
    tokens, masked = enc(x)
    fmap = enc.model.forward_features(x)  # (B, C, h, w)
    b, c, h, w = fmap.shape
    assert tokens.grid == (h, w) and tokens.num_prefix_tokens == 0 and enc.family == "cnn"
    assert tokens.feats.shape == (b, h * w, c) and tokens.mask.all()
    assert masked.shape == (b, h * w) and not masked.any()
    for i in range(h):  # the plain loop: token i*w + j is cell (i, j) of the map
        for j in range(w):
            torch.testing.assert_close(tokens.feats[:, i * w + j], fmap[:, :, i, j])


@SETTINGS
@given(h=st.integers(32, 72), w=st.integers(32, 72))
def test_cnn_grid_size_matches_the_feature_map(h, w):
    # ResNet's padded strides round up, ConvNeXt's patchify stem rounds down: both read from the model.
    for enc in (RES, CNX):
        tokens, _ = enc(pixels(1, h, w))
        assert enc.grid_size(h, w) == tokens.grid


RES = resnet().eval()
CNX = convnext().eval()


def test_cnn_with_projection_and_img_size():
    enc = convnext(out_dim=8, img_size=64)
    assert enc.data_config()["input_size"] == (
        3,
        64,
        64,
    )  # CNNs take no img_size; data_config reports it
    tokens, _ = enc(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert tokens.feats.shape == (2, 4, 8) and tokens.grid == (2, 2) and enc.dim == 8


def test_conformance_cnn():
    report = check_component(convnext(out_dim=8), {"images": pixels(2, 64, 64)})
    assert "gradients" in report.passed


def test_cnn_refuses_patch_masking():
    with pytest.raises(ValueError, match="masks patch embeddings.*ViT, Swin or EVA"):
        resnet(mask_ratio=0.3)


def test_bad_cnn_inputs():
    enc = resnet()
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        enc(torch.randn(2, 1, 32, 32))
    with pytest.raises(TypeError, match="pixels as a"):
        enc([1, 2])


# ---------------------------------------------------------------------- EVA
def test_eva_tokens_and_grid():
    enc = eva(32, out_dim=8).eval()
    tokens, masked = enc(pixels(2, 32, 32))
    assert enc.family == "eva" and tokens.grid == (4, 4) and tokens.num_prefix_tokens == 1
    assert tokens.feats.shape == (2, 17, 8) and masked.shape == (2, 17)
    plain = enc.proj(enc.model.forward_features(pixels(2, 32, 32)))
    torch.testing.assert_close(tokens.feats, plain)


def test_eva_masking_replaces_patch_embeddings_before_the_blocks():
    enc = eva(32, mask_ratio=0.25)
    model, token = enc.model.eval(), enc.mask_token
    every = torch.ones(2, 16, dtype=torch.bool)
    # Every patch masked: the image no longer matters (only the mask token and the positions are left).
    a, grid = _eva_features(model, pixels(2, 32, 32, seed=1), every, token)
    b, _ = _eva_features(model, pixels(2, 32, 32, seed=2), every, token)
    torch.testing.assert_close(a, b)
    # Nothing masked: timm's forward_features; the hook is removed after the call.
    c, _ = _eva_features(model, pixels(2, 32, 32), torch.zeros(2, 16, dtype=torch.bool), token)
    torch.testing.assert_close(c, model.forward_features(pixels(2, 32, 32)))
    assert not model.patch_embed._forward_hooks and grid == (4, 4)


def test_eva_masking_counts_in_training():
    enc = eva(32, mask_ratio=0.25).train()
    _, masked = enc(pixels(3, 32, 32))
    assert masked[:, 0].logical_not().all() and masked.sum(1).tolist() == [4, 4, 4]


# ---------------------------------------------------------------------- CLIP image tower
def _openai_clip_visual_state(width=32, layers=2, patch=8, grid=4, out=16, seed=0):
    """A random CLIP image tower in OpenAI's / open_clip's layout (``visual.*`` keys) plus a text key."""
    state = openai_clip_visual_state(width, layers, patch, grid, out, seed)
    g = torch.Generator().manual_seed(seed + 1)
    # The text tower's: ignored by the image tower.
    state["token_embedding.weight"] = torch.randn(10, width, generator=g) * 0.05
    return state


def _clip_visual_reference(state, x, heads=2, layers=2):
    """CLIP's image transformer written out from its weights (exact GELU, as open_clip's LAION models;
    ``ln_post`` on every token, as the tokens of a matching model are read)."""
    f = torch.nn.functional
    s = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    width = s["class_embedding"].shape[0]
    patches = (
        f.conv2d(x, s["conv1.weight"], stride=s["conv1.weight"].shape[-1])
        .flatten(2)
        .transpose(1, 2)
    )
    h = (
        torch.cat([s["class_embedding"].expand(x.shape[0], 1, width), patches], 1)
        + s["positional_embedding"]
    )
    h = f.layer_norm(h, (width,), s["ln_pre.weight"], s["ln_pre.bias"], eps=1e-5)
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        y = f.layer_norm(h, (width,), s[p + "ln_1.weight"], s[p + "ln_1.bias"], eps=1e-5)
        q, k, v = f.linear(y, s[p + "attn.in_proj_weight"], s[p + "attn.in_proj_bias"]).chunk(3, -1)
        split = lambda t: t.unflatten(-1, (heads, width // heads)).transpose(1, 2)  # noqa: E731
        att = torch.softmax(
            split(q) @ split(k).transpose(-1, -2) / (width // heads) ** 0.5, -1
        ) @ split(v)
        h = h + f.linear(
            att.transpose(1, 2).flatten(2),
            s[p + "attn.out_proj.weight"],
            s[p + "attn.out_proj.bias"],
        )
        y = f.layer_norm(h, (width,), s[p + "ln_2.weight"], s[p + "ln_2.bias"], eps=1e-5)
        y = f.linear(
            f.gelu(f.linear(y, s[p + "mlp.c_fc.weight"], s[p + "mlp.c_fc.bias"])),
            s[p + "mlp.c_proj.weight"],
            s[p + "mlp.c_proj.bias"],
        )
        h = h + y
    return f.layer_norm(h, (width,), s["ln_post.weight"], s["ln_post.bias"], eps=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_clip_image_tower_loads_openai_and_open_clip_layouts(tmp_path, suffix):
    state = _openai_clip_visual_state()
    path = tmp_path / f"open_clip_model{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    enc = TimmVisionEncoder(
        "vit_base_patch16_clip_224",
        img_size=32,
        checkpoint_path=str(path),
        model_kwargs=dict(CLIP_KW),
    ).eval()
    x = pixels(2, 32, 32)
    tokens, _ = enc(x)
    assert tokens.grid == (4, 4) and tokens.num_prefix_tokens == 1
    torch.testing.assert_close(tokens.feats, _clip_visual_reference(state, x), rtol=1e-4, atol=1e-5)


def test_clip_checkpoint_of_another_size_is_refused(tmp_path):
    path = tmp_path / "clip.safetensors"
    save_file(_openai_clip_visual_state(width=64), str(path))
    with pytest.raises(ValueError, match="does not fit this model"):
        TimmVisionEncoder(
            "vit_base_patch16_clip_224",
            img_size=32,
            checkpoint_path=str(path),
            model_kwargs=dict(CLIP_KW),
        )


# ---------------------------------------------------------------------- local checkpoints
@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_cnn_checkpoint_loads_exactly(tmp_path, suffix):
    source = convnext().eval()
    path = tmp_path / f"convnext{suffix}"
    state = source.model.state_dict()
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(
        {"state_dict": state}, path
    )
    loaded = convnext(checkpoint_path=str(path)).eval()
    x = pixels(2, 64, 64)
    torch.testing.assert_close(loaded(x)[0].feats, source(x)[0].feats)


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": resnet().model.state_dict(), "opaque": object()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        resnet(checkpoint_path=str(path))


# ---------------------------------------------------------------------- hf-hub: and local-dir: names
def _timm_folder(folder, architecture="vit_tiny_patch16_224", **model_args):
    """A folder as timm writes it for the hub: config.json (architecture + model_args) and model.safetensors."""
    import timm

    model = timm.create_model(architecture, pretrained=False, num_classes=0, **model_args)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": model.num_features,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, 32, 32],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "num_classes": 0,
        },
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    return model


def _hub_cache(cache, repo):
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


def _offline(monkeypatch, cache):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))


def test_hf_hub_name_reads_config_and_weights_from_the_cache(tmp_path, monkeypatch):
    kw = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "img_size": 32}
    source = _timm_folder(_hub_cache(tmp_path, "someone/tiny-vit"), **kw).eval()
    _offline(monkeypatch, tmp_path)
    enc = TimmVisionEncoder("hf-hub:someone/tiny-vit", pretrained=True).eval()
    assert enc.family == "vit" and enc.data_config()["input_size"] == (3, 32, 32)
    x = pixels(2, 32, 32)
    torch.testing.assert_close(enc(x)[0].feats, source.forward_features(x))
    random_init = TimmVisionEncoder("hf-hub:someone/tiny-vit")  # the config alone
    assert random_init.grid_size(32, 32) == (4, 4)


def test_hf_hub_name_not_in_the_cache_says_what_to_do(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(
        WeightsUnavailableError, match="reads config.json from the Hugging Face hub"
    ):
        TimmVisionEncoder("hf-hub:someone/absent")


def test_local_dir_name(tmp_path):
    import timm.models._factory as factory

    if "local-dir" not in getattr(factory, "_MODEL_SOURCES", ()):
        pytest.skip("this timm has no local-dir: source (timm >= 1.0.16)")
    kw = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "img_size": 32}
    source = _timm_folder(tmp_path / "tiny", **kw).eval()
    enc = TimmVisionEncoder(f"local-dir:{tmp_path / 'tiny'}", pretrained=True).eval()
    x = pixels(2, 32, 32)
    torch.testing.assert_close(enc(x)[0].feats, source.forward_features(x))


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown timm model 'resnet5O'.*Did you mean"):
        TimmVisionEncoder("resnet5O")
