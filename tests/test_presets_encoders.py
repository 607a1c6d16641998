"""Every preset x text encoder (gru, gru-glove, bert, clip) and the image backbones: one training step
runs, and the saved model reloads with the same scores (tiny random models built here, offline)."""

import numpy as np
import pytest
import torch

from imtm import Matcher, presets
from imtm.components.encoders.hf_text import write_local_bert, write_local_clip
from imtm.data import synthetic

pytestmark = pytest.mark.slow

DIM = 16
TINY_VIT = dict(depth=1, embed_dim=16, num_heads=2, patch_size=8)
REGION_PRESETS = {
    "vsepp": {},
    "chan": {"context_heads": 2},
    "dcpa": {"heads": 2, "k": 3},
    "dias": {"context_heads": 2},
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    regions = synthetic.load(view="regions", seed=0, n_train=6, n_dev=2, n_test=3)
    pixels = synthetic.load(view="pixels", seed=0, n_train=6, n_dev=2, n_test=3, image_size=32)
    captions = regions[0].captions + regions[2].captions + pixels[0].captions + pixels[2].captions
    bert = write_local_bert(root / "bert", captions, hidden_size=DIM, num_layers=1, num_heads=2)
    clip = write_local_clip(root / "clip", captions, hidden_size=DIM, num_layers=1, num_heads=2)
    rng = np.random.default_rng(0)
    words = sorted(set(regions[0].vocab.itos) | set(pixels[0].vocab.itos))[
        ::2
    ]  # half the words: the rest unknown
    glove = root / "glove.txt"
    glove.write_text(
        "".join(
            w + " " + " ".join(f"{x:.4f}" for x in rng.standard_normal(8)) + "\n" for w in words
        )
    )
    return {
        "regions": regions,
        "pixels": pixels,
        "bert": str(bert),
        "clip": str(clip),
        "glove": str(glove),
    }


def text_kwargs(text, assets):
    return {
        "gru": {"text": "gru"},
        "gru-glove": {"text": "gru-glove", "word_vectors": assets["glove"]},
        "bert": {"text": "bert", "text_model": assets["bert"]},
        "clip": {"text": "clip", "text_model": assets["clip"]},
    }[text]


def fit_save_reload(components, train, test, tmp_path, stages=None):
    m = Matcher(
        components,
        epochs=1,
        batch_size=15,
        lr=1e-3,
        checkpoint_dir=None,
        verbose=False,
        random_state=0,
        stages=stages,
    )
    m.fit(train)
    losses = [v for k, v in m.history_[-1].items() if k.startswith("loss")]
    assert losses and np.isfinite(losses).all()
    m.save(tmp_path / "model")
    again = Matcher.load(tmp_path / "model")
    images, captions = test.images[:3], test.captions[:4]
    torch.testing.assert_close(again.similarity(images, captions), m.similarity(images, captions))
    return m, again


@pytest.mark.parametrize("text", ["gru", "gru-glove", "bert", "clip"])
@pytest.mark.parametrize("preset", sorted(REGION_PRESETS))
def test_region_preset_with_each_text_encoder_trains_and_reloads(preset, text, assets, tmp_path):
    train, _, test = assets["regions"]
    comps = presets.build(
        preset,
        train,
        embed_dim=DIM,
        word_dim=8,
        **REGION_PRESETS[preset],
        **text_kwargs(text, assets),
    )
    kind = {
        "gru": "GRUTextEncoder",
        "gru-glove": "GRUTextEncoder",
        "bert": "HFTextEncoder",
        "clip": "HFTextEncoder",
    }
    assert type(dict(comps)["text"]).__name__ == kind[text]
    stages = presets.default_stages(preset, 2)  # DCPA: one epoch per stage
    m, again = fit_save_reload(comps, train, test, tmp_path, stages)
    if text == "gru-glove":
        assert m.components_["text"].word_vector_hits > 0
        assert again.components_["text"].word_vectors == "glove.txt"  # the base name, not the path


@pytest.mark.parametrize("text", ["gru", "gru-glove", "bert", "clip"])
def test_laps_with_each_text_encoder_trains_and_reloads(text, assets, tmp_path):
    train, _, test = assets["pixels"]
    comps = presets.laps(
        vocab=train.vocab,
        image="vit_tiny_patch16_224",
        img_size=32,
        embed_dim=DIM,
        word_dim=8,
        model_kwargs=dict(TINY_VIT),
        **text_kwargs(text, assets),
    )
    fit_save_reload(comps, train, test, tmp_path)


@pytest.mark.parametrize(
    "image,kw",
    [
        ("resnet50", {"model_kwargs": {"layers": (1, 1, 1, 1), "base_width": 8}}),
        ("convnext_atto", {"model_kwargs": {"dims": (8, 16, 24, 32), "depths": (1, 1, 1, 1)}}),
        ("eva02_tiny_patch14_224", {"img_size": 32, "model_kwargs": dict(TINY_VIT)}),
        ("vit_base_patch16_clip_224", {"img_size": 32, "model_kwargs": dict(TINY_VIT)}),
    ],
    ids=["resnet", "convnext", "eva", "clip-vit"],
)
def test_pixel_backbones(image, kw, assets, tmp_path):
    """CNN grid tokens in CHAN (VSE-infinity-style grids instead of regions); ViT-like ones in LAPS."""
    train, _, test = assets["pixels"]
    if image in ("resnet50", "convnext_atto"):
        comps = presets.chan(
            vocab=train.vocab,
            image=image,
            image_options=kw,
            embed_dim=DIM,
            word_dim=8,
            context_heads=2,
        )
    else:
        comps = presets.laps(
            vocab=train.vocab,
            text="gru",
            image=image,
            embed_dim=DIM,
            word_dim=8,
            img_size=kw.get("img_size"),
            model_kwargs=kw["model_kwargs"],
        )
    fit_save_reload(comps, train, test, tmp_path)


def test_clip_pair_laps(assets, tmp_path):
    """CLIP-initialised LAPS (LAPS Table 2's CLIP rows): the CLIP image tower and text tower."""
    train, _, test = assets["pixels"]
    comps = presets.laps(
        image="vit_base_patch16_clip_224",
        img_size=32,
        model_kwargs=dict(TINY_VIT),
        embed_dim=DIM,
        text="clip",
        text_model=assets["clip"],
    )
    fit_save_reload(comps, train, test, tmp_path)


def test_ela_with_bert(assets, tmp_path):
    train, _, test = assets["pixels"]
    comps = presets.ela(
        text_model=assets["bert"],
        image_model="vit_tiny_patch16_224",
        img_size=32,
        embed_dim=DIM,
        model_kwargs=dict(TINY_VIT),
        heads=2,
        cross_layers=1,
        rerank_k=2,
    )
    fit_save_reload(comps, train, test, tmp_path)


def test_ela_with_a_clip_text_tower_is_refused_with_what_to_use(assets):
    # ELA's masked-LM needs [MASK]; a CLIP tokenizer has none: refused when the pipeline is built.
    train, _, _ = assets["pixels"]
    comps = presets.ela(
        text_model=assets["clip"],
        image_model="vit_tiny_patch16_224",
        img_size=32,
        embed_dim=DIM,
        model_kwargs=dict(TINY_VIT),
        heads=2,
        cross_layers=1,
        rerank_k=2,
    )
    m = Matcher(comps, epochs=1, batch_size=15, checkpoint_dir=None, verbose=False)
    with pytest.raises(
        ValueError, match="the text encoder 'text'.*without a mask token.*text='bert'"
    ):
        m.fit(train)


def test_text_and_image_choices_are_checked(assets):
    train = assets["regions"][0]
    with pytest.raises(ValueError, match="text must be one of.*Did you mean 'bert'"):
        presets.chan(vocab=train.vocab, region_dim=8, text="bertt")
    with pytest.raises(ValueError, match="needs word_vectors="):
        presets.chan(vocab=train.vocab, region_dim=8, text="gru-glove")
    with pytest.raises(ValueError, match="text='gru' needs vocab="):
        presets.vsepp(region_dim=8)
    with pytest.raises(ValueError, match="image='regions' needs region_dim="):
        presets.dcpa(vocab=train.vocab)
    with pytest.raises(ValueError, match="patch slimming needs a patch grid"):
        presets.laps(vocab=train.vocab, text="gru", image="regions")
    with pytest.raises(ValueError, match="name two backbones"):
        presets.laps(
            vocab=train.vocab,
            text="gru",
            image="vit_tiny_patch16_224",
            model_name="swin_tiny_patch4_window7_224",
        )


def test_laps_defaults_to_bert_as_the_paper(monkeypatch):
    # No hub here: the default asks for bert-base-uncased, which says how to pass a local folder.
    import huggingface_hub.constants as hf_constants

    from imtm.components.encoders import WeightsUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    seen = {}
    real = presets.text_encoder

    def spy(text="gru", **kw):
        seen["text"], seen["model"] = text, kw.get("text_model")
        return real(text, **kw)

    monkeypatch.setattr(presets, "text_encoder", spy)
    with pytest.raises((WeightsUnavailableError, OSError)):
        presets.laps(
            image="vit_tiny_patch16_224", img_size=32, model_kwargs=dict(TINY_VIT), embed_dim=DIM
        )
    assert seen == {"text": "bert", "model": None}
    assert presets.DEFAULT_TEXT_MODELS["bert"] == "bert-base-uncased"
