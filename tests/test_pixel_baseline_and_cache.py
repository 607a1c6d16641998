"""The pixel presets' global baseline from ``imtm train``, and ``imtm compare``'s cache of frozen ViT tokens."""

import json

import pytest
import torch

from imtm import presets
from imtm.cli import main
from imtm.compare import (
    CompareSettings,
    build_components,
    cacheable_encoder,
    cached_image_block,
    compare,
    encode_frozen,
)
from imtm.data import load_dataset
from imtm.data.collate import collate_images

SIZES = {"n_train": 12, "n_dev": 2, "n_test": 6}


@pytest.fixture(scope="module")
def pixels():
    return load_dataset("synthetic", view="pixels", seed=0, sizes=SIZES)


def test_a_region_preset_on_synthetic_pixels_reads_them_through_the_frozen_packaged_vit(pixels):
    train = pixels[0]
    blocks = dict(presets.build("vsepp", train, embed_dim=16, word_dim=8))
    enc = blocks["image"]
    assert enc.get_params()["model_name"] == "synthetic-vit"
    assert enc.freeze and enc.img_size == 64
    tokens, _ = enc.train()(torch.stack([train.images[0], train.images[1]]))
    assert tokens.feats.shape == (2, 65, 16) and tokens.grid == (8, 8)
    tokens.feats.sum().backward()
    assert all(p.grad is None for p in enc.model.parameters())
    assert all(p.grad is not None for p in enc.proj.parameters())
    # Given freeze explicitly, the caller's choice stands.
    options = {"freeze": False}
    blocks = dict(presets.build("vsepp", train, embed_dim=16, word_dim=8, image_options=options))
    assert not blocks["image"].freeze
    # Region features still go to the region projection.
    regions = load_dataset("synthetic", view="regions", seed=0, sizes=SIZES)[0]
    blocks = dict(presets.build("vsepp", regions, embed_dim=16, word_dim=8))
    assert type(blocks["image"]).__name__ == "PrecomputedEncoder"


@pytest.mark.parametrize("name", ["laps", "vsepp"])
def test_over_the_frozen_vit_the_triplet_loss_sums_over_the_negatives(pixels, name):
    train = pixels[0]
    loss = dict(presets.build(name, train, embed_dim=16, word_dim=8))["loss"]
    assert loss.hardest is False and not loss.hardest_now
    loss.set_epoch(3)
    assert not loss.hardest_now
    # Asked for, the hardest negative stays.
    loss = dict(presets.build(name, train, embed_dim=16, word_dim=8, hardest=True))["loss"]
    assert loss.hardest is True
    # On region features the presets keep their warm-up then the hardest negative.
    regions = load_dataset("synthetic", view="regions", seed=0, sizes=SIZES)[0]
    loss = dict(presets.build("vsepp", regions, embed_dim=16, word_dim=8))["loss"]
    assert loss.hardest is True and loss.warmup_epochs == 1


def test_laps_on_synthetic_pixels_fine_tunes_the_packaged_bert_unless_a_text_encoder_is_named(
    pixels,
):
    from imtm.components import GRUTextEncoder, HFTextEncoder

    train = pixels[0]
    text = dict(presets.build("laps", train, embed_dim=16, word_dim=8))["text"]
    assert isinstance(text, HFTextEncoder) and text.model_name_or_path == "synthetic-bert"
    assert all(p.requires_grad for p in text.parameters())
    named = dict(presets.build("laps", train, embed_dim=16, word_dim=8, text="gru"))["text"]
    assert isinstance(named, GRUTextEncoder) and named.vocab is train.vocab
    # Image files (no packaged backbone) keep the GRU over the data's vocabulary.
    scratch = dict(
        presets.build(
            "laps",
            train,
            embed_dim=16,
            word_dim=8,
            model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 8},
        )
    )["text"]
    assert isinstance(scratch, GRUTextEncoder)


def test_imtm_train_vsepp_on_the_pixels_view(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IMTM_SYNTHETIC", "n_train=16,n_dev=4,n_test=6")
    out = tmp_path / "run"
    args = ["train", "--preset", "vsepp", "--view", "pixels", "--epochs", "1"]
    args += ["--embed-dim", "16", "--word-dim", "8", "--batch-size", "16", "--quiet"]
    assert main(args + ["--out", str(out)]) == 0
    assert "| vsepp |" in capsys.readouterr().out
    config = json.loads((out / "final" / "config.json").read_text())
    assert "synthetic-vit" in json.dumps(config)


def test_cached_tokens_give_what_the_frozen_encoder_gives(pixels):
    train, _, test = pixels
    s = CompareSettings(n_train=12, n_dev=2, n_test=6, embed_dim=16, word_dim=8)
    comps, _ = build_components("laps", train, s, None)
    enc = dict(comps)["image"]
    cached = encode_frozen(enc, test.images, batch_size=4)
    assert len(cached) == len(test.images)
    assert cached[0].feats.shape == (1, 65, 64)
    assert enc.proj is not None  # put back after encoding
    block = cached_image_block(enc)
    with torch.no_grad():
        want, _ = enc(torch.stack(list(test.images)))
        got = block(collate_images([cached[k] for k in range(len(cached))]))
    assert (got.grid, got.num_prefix_tokens) == (want.grid, want.num_prefix_tokens)
    torch.testing.assert_close(got.feats, want.feats, rtol=1e-5, atol=1e-6)
    # The projection is a copy: training the cached block leaves the encoder alone.
    assert block.mlp[0].weight.data_ptr() != enc.proj.weight.data_ptr()


def test_only_frozen_unmasked_encoders_are_cached(pixels, tmp_path):
    train = pixels[0]
    s = CompareSettings(n_train=12, n_dev=2, n_test=6, embed_dim=16, word_dim=8)
    assert cacheable_encoder(build_components("laps", train, s, tmp_path)[0])
    assert cacheable_encoder(build_components("vsepp-vit", train, s, tmp_path)[0])
    # ELA runs its ViT again on masked patches (the masked view): no cache.
    assert not cacheable_encoder(build_components("ela", train, s, tmp_path)[0])
    s.freeze_backbone = False
    assert not cacheable_encoder(build_components("laps", train, s, tmp_path)[0])
    assert not cacheable_encoder(
        build_components(
            "vsepp", load_dataset("synthetic", view="regions", seed=0, sizes=SIZES)[0], s, tmp_path
        )[0]
    )


def test_compare_encodes_the_frozen_vit_once_and_says_so(tmp_path):
    s = CompareSettings(
        epochs=1, n_train=12, n_dev=2, n_test=6, embed_dim=16, word_dim=16, batch_size=12
    )
    rows = compare("vsepp-vit,laps", settings=s, out=tmp_path, verbose=False)
    assert [r["backbone_cached"] for r in rows] == [True, True]
    assert rows[0]["cache_s"] > 0 and rows[1]["cache_s"] < rows[0]["cache_s"]
    md = (tmp_path / "compare.md").read_text()
    assert "vsepp-vit, laps trained and scored on those cached tokens" in md
    s.cache_backbone = False
    plain = compare("vsepp-vit", settings=s, verbose=False)
    assert plain[0]["backbone_cached"] is False and plain[0]["cache_s"] == 0.0
    # The same model either way: the same seed trains the same weights and ranks alike.
    assert plain[0]["rsum"] == pytest.approx(rows[0]["rsum"], abs=1e-6)
