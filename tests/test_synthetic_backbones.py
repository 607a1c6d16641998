"""The packaged synthetic backbones: loaded offline by name, and reproduced by their script."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imtm.components import HFTextEncoder, TimmVisionEncoder
from imtm.data import synthetic
from imtm.weights import PACKAGED_VISION, packaged_text_path, packaged_vision, record

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pretrain_synthetic.py"


def _script():
    spec = importlib.util.spec_from_file_location("pretrain_synthetic", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_synthetic_vit_loads_the_packaged_weights_by_name():
    enc = TimmVisionEncoder("synthetic-vit", out_dim=16)
    state = load_file(packaged_vision("synthetic-vit")["file"])
    own = enc.model.state_dict()
    assert set(own) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(own[k], v)
    tokens, _ = enc(torch.rand(2, 3, 64, 64))
    assert (
        tokens.feats.shape == (2, 65, 16)
        and tokens.grid == (8, 8)
        and tokens.num_prefix_tokens == 1
    )
    assert enc.get_params()["model_name"] == "synthetic-vit"
    # Another image side: timm resamples the position embedding, as for real pretrained weights.
    assert TimmVisionEncoder("synthetic-vit", img_size=32)(torch.rand(1, 3, 32, 32))[0].grid == (
        4,
        4,
    )


def test_a_random_vit_of_the_same_shape_differs_from_the_packaged_one():
    import timm

    entry = PACKAGED_VISION["synthetic-vit"]
    scratch = timm.create_model(
        entry["model_name"], num_classes=0, img_size=entry["img_size"], **entry["model_kwargs"]
    )
    packaged = TimmVisionEncoder("synthetic-vit").model
    w = "blocks.0.attn.qkv.weight"
    assert not torch.allclose(scratch.state_dict()[w], packaged.state_dict()[w])


def test_synthetic_bert_loads_by_name_and_covers_the_benchmark_words():
    enc = HFTextEncoder("synthetic-bert", out_dim=8)
    folder = Path(packaged_text_path("synthetic-bert"))
    state = load_file(str(folder / "model.safetensors"))
    own = enc.model.state_dict()
    for k, v in own.items():
        torch.testing.assert_close(v, state[k])
    train, _, _ = synthetic.load("regions", 5, n_train=200, n_dev=2, n_test=2)
    ids = enc.tokenizer(list(train.captions))["input_ids"]
    assert all(enc.tokenizer.unk_token_id not in row for row in ids)
    out = enc(["a red circle left of a blue square"])
    assert out.feats.shape[-1] == 8


def test_packaged_names_refuse_nothing_else():
    assert (
        packaged_vision("vit_base_patch16_224") is None
        and packaged_text_path("bert-base-uncased") is None
    )
    with pytest.raises(ValueError, match="unknown timm model 'synthetic-vitt'"):
        TimmVisionEncoder("synthetic-vitt")


def test_record_says_how_the_weights_were_made():
    rec = record()
    assert rec["seed"] == synthetic.PRETRAIN_SEED and rec["excluded_benchmark_seeds"] == [0, 1, 2]
    assert 0.2 < rec["object_patch_fraction"] < 0.4 and "InfoNCE" in rec["objective"]
    sizes = sum(
        p.stat().st_size
        for p in Path(packaged_text_path("synthetic-bert")).parent.rglob("*")
        if p.is_file()
    )
    assert sizes < 4_000_000  # a few MB in all


def test_quick_pretraining_is_reproducible(tmp_path):
    mod = _script()
    kw = {"n_images": 24, "epochs": 1, "batch_size": 12, "lr": 1e-3, "verbose": False}
    mod.pretrain(tmp_path / "a", seed=3, **kw)
    mod.pretrain(tmp_path / "b", seed=3, **kw)
    mod.pretrain(tmp_path / "c", seed=4, **kw)
    a, b, c = (load_file(str(tmp_path / d / "synthetic_vit.safetensors")) for d in "abc")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    ta, tb = (load_file(str(tmp_path / d / "synthetic_bert" / "model.safetensors")) for d in "ab")
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0)
    rec = json.loads((tmp_path / "a" / "synthetic_backbones.json").read_text())
    assert rec["steps"] == 2 and len(rec["history"]) == 1
    # What it wrote loads as the packaged weights do.
    enc = TimmVisionEncoder(
        PACKAGED_VISION["synthetic-vit"]["model_name"],
        img_size=64,
        model_kwargs=PACKAGED_VISION["synthetic-vit"]["model_kwargs"],
        checkpoint_path=str(tmp_path / "a" / "synthetic_vit.safetensors"),
    )
    torch.testing.assert_close(enc.model.state_dict()["cls_token"], a["cls_token"])
    assert HFTextEncoder(str(tmp_path / "a" / "synthetic_bert")).vocab_size > 5
