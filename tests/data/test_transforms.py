import random

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch.testing import assert_close

from imtm.components import TimmVisionEncoder
from imtm.data.transforms import image_transform
from imtm.data.transforms import resolve_data_config as imtm_resolve

TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}


def _image(w=50, h=40, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_eval_transform_is_timms_for_the_pretrained_config():
    im = _image()
    for name in ("vit_base_patch16_224", "swin_base_patch4_window7_224"):
        cfg = resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
        assert_close(image_transform(name)(im), create_transform(**cfg, is_training=False)(im))
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, **TINY)
    cfg = timm.data.resolve_model_data_config(model)
    assert_close(image_transform(model)(im), create_transform(**cfg, is_training=False)(im))


def test_encoder_data_config_sets_size_and_normalisation():
    enc = TimmVisionEncoder("vit_tiny_patch16_224", img_size=48, model_kwargs=TINY)
    t = image_transform(enc)
    x = t(_image())
    assert x.shape == (3, 48, 48)
    cfg = enc.data_config()
    # A flat grey image maps to (v - mean) / std in every channel.
    grey = image_transform(enc)(Image.new("RGB", (60, 60), (128, 128, 128)))
    expected = (128 / 255 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
    assert_close(grey.mean((1, 2)), expected.float(), atol=1e-3, rtol=0)
    tokens, _ = enc(x[None])
    assert tokens.grid == (6, 6)


def test_train_transform_is_light_and_random():
    cfg = {"input_size": (3, 32, 32)}
    t = image_transform(cfg, train=True)
    names = [type(s).__name__ for s in t.transforms]
    assert names[0].startswith("RandomResizedCrop") and "RandomHorizontalFlip" in names
    assert not any("Jitter" in n or "Augment" in n or "Erasing" in n for n in names)
    im = _image(80, 60)
    random.seed(0), torch.manual_seed(0)
    a, b = t(im), t(im)
    assert a.shape == b.shape == (3, 32, 32) and not torch.equal(a, b)
    random.seed(0), torch.manual_seed(0)
    assert_close(
        t(im), a
    )  # Python's and torch's generators drive it (a DataLoader seeds both per worker)
    flips = image_transform(cfg, train=True, hflip=0.0, scale=(1.0, 1.0))
    assert not any(type(s).__name__ == "RandomHorizontalFlip" and s.p > 0 for s in flips.transforms)


def test_size_override_and_bad_inputs():
    assert imtm_resolve({"img_size": 64})["input_size"] == (3, 64, 64)
    with pytest.raises(ValueError, match=r"unknown data-config key 'men'.*Did you mean 'mean'"):
        image_transform({"men": (0.5, 0.5, 0.5)})
    with pytest.raises(
        ValueError, match=r"not a timm model name .*Did you mean 'vit_base_patch16_224'"
    ):
        image_transform("vit_base_patch16_2244")
    with pytest.raises(TypeError, match="expected an encoder with data_config"):
        image_transform(3)
    with pytest.raises(TypeError, match="train must be a bool"):
        image_transform({"img_size": 8}, train="yes")
    with pytest.raises(ValueError, match="scale must satisfy"):
        image_transform({"img_size": 8}, train=True, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="hflip must be a probability"):
        image_transform({"img_size": 8}, train=True, hflip=2)

    class NoSize:
        def data_config(self):
            return {"mean": (0.5,) * 3}

    with pytest.raises(ValueError, match=r"lacks \['input_size', 'std'\]"):
        image_transform(NoSize())
