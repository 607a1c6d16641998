"""Determinism: two seeded CPU fits give bitwise-identical weights and history; another seed does not.

Each configuration exercises a different source of randomness: initialisation and data
order (all), dropout (the GRU and attention blocks), Gumbel noise (LAPS), negatives drawn
by distance (DIAS's miner), patch and word masking (ELA), DataLoader worker processes,
and caption augmentation drawn in the main process and in workers.
"""

import os
import random

import numpy as np
import pytest
import torch

from imtm import Matcher, presets
from imtm.data import CaptionAugment, ImageCaptionDataset, synthetic
from imtm.matcher import CUBLAS_WORKSPACE_CONFIG, seed_everything

LAPS_TINY = {
    "model_name": "vit_tiny_patch16_224",
    "img_size": 32,
    "embed_dim": 16,
    "word_dim": 16,
    "model_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 8},
}


@pytest.fixture(scope="module")
def regions():
    return synthetic.load(view="regions", seed=0, n_train=8, n_dev=2, n_test=2)[0]  # 40 captions


@pytest.fixture(scope="module")
def pixels():
    return synthetic.load(view="pixels", seed=0, n_train=4, n_dev=2, n_test=2, image_size=32)[
        0
    ]  # 20 captions


def fit(components, train, seed, **kw):
    kw = {"epochs": 1, "batch_size": 10, "verbose": False, "device": "cpu", "lr": 1e-3, **kw}
    return Matcher(components, random_state=seed, **kw).fit(train)


def disturb_global_rngs():
    """Draw from every global generator: a fit must not depend on where they stood before it."""
    torch.rand(7)
    np.random.rand(3)
    random.random()


def assert_identical(a, b):
    sa, sb = a.components_.state_dict(), b.components_.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    strip = [{k: v for k, v in h.items() if k != "time_s"} for h in a.history_]
    assert strip == [{k: v for k, v in h.items() if k != "time_s"} for h in b.history_]


def assert_different(a, b):
    sa, sb = a.components_.state_dict(), b.components_.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if sa[k].is_floating_point())


def build(name, regions, pixels):
    if name == "vsepp":
        return presets.build("vsepp", regions, embed_dim=16, word_dim=8), regions
    if name == "chan":
        return presets.build("chan", regions, embed_dim=16, word_dim=8, context_heads=2), regions
    if name == "dias_miner":
        return presets.build(
            "dias", regions, embed_dim=16, word_dim=8, context_heads=2, miner=True
        ), regions
    if name == "laps_gumbel":
        return presets.build("laps", pixels, **LAPS_TINY), pixels
    raise KeyError(name)


@pytest.mark.parametrize("name", ["vsepp", "chan", "dias_miner", "laps_gumbel"])
def test_two_seeded_fits_are_bitwise_identical_and_another_seed_differs(name, regions, pixels):
    components, train = build(name, regions, pixels)
    a = fit(components, train, seed=0)
    disturb_global_rngs()
    b = fit(components, train, seed=0)
    assert_identical(a, b)
    assert_different(a, fit(components, train, seed=1))


@pytest.mark.parametrize("name", ["laps_gumbel", "dias_miner"])
def test_the_noise_is_drawn_in_training_from_what_fit_seeds(name, regions, pixels, monkeypatch):
    """Guard: these pipelines do draw noise while training (else identical runs would prove little):
    the same initial weights with another noise stream end elsewhere."""
    components, train = build(name, regions, pixels)
    a = fit(components, train, seed=0)
    build_blocks = Matcher._build

    def build_then_reseed(self, seed):
        build_blocks(self, seed)
        torch.manual_seed(
            seed + 12345
        )  # same initial weights, other Gumbel noise / negatives / dropout

    monkeypatch.setattr(Matcher, "_build", build_then_reseed)
    assert_different(a, fit(components, train, seed=0))


def test_ela_masking_is_seeded(tmp_path):
    from imtm.components.encoders.hf_text import write_local_bert

    train = synthetic.load(view="pixels", seed=0, n_train=4, n_dev=2, n_test=2, image_size=24)[0]
    folder = str(
        write_local_bert(
            tmp_path / "bert", train.captions, hidden_size=16, num_layers=1, num_heads=2
        )
    )

    def components():
        return presets.ela(
            text_model=folder,
            image_model="vit_tiny_patch16_224",
            img_size=24,
            embed_dim=16,
            model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 8},
            heads=2,
            cross_layers=1,
            rerank_k=2,
        )

    a = fit(components(), train, seed=0)
    disturb_global_rngs()
    b = fit(components(), train, seed=0)
    assert_identical(a, b)
    assert_different(a, fit(components(), train, seed=1))


# ---------------------------------------------------------------- data loading
def augmented(regions):
    """The synthetic regions with VSE-infinity caption augmentation drawn in __getitem__."""

    class Augmented(ImageCaptionDataset):
        def __init__(self, base, augment):
            super().__init__(base.images, base.captions, base.caption_to_image, vocab=base.vocab)
            self.augment = augment

        def __getitem__(self, k):
            item = super().__getitem__(k)
            return {**item, "texts": self.augment(item["texts"])}

    return Augmented(regions, CaptionAugment.from_vocabulary(regions.vocab))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_workers_and_caption_augmentation_are_seeded(regions, num_workers):
    data = augmented(regions)
    components = presets.build("vsepp", regions, embed_dim=16, word_dim=8)
    a = fit(components, data, seed=0, num_workers=num_workers, epochs=2)
    disturb_global_rngs()
    b = fit(components, data, seed=0, num_workers=num_workers, epochs=2)
    assert_identical(a, b)
    assert_different(a, fit(components, data, seed=1, num_workers=num_workers, epochs=2))


# ---------------------------------------------------------------- deterministic algorithms (what a GPU needs)
@pytest.fixture
def restore_switches():
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    if saved[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


def test_seed_everything_deterministic_sets_and_clears_the_switches(restore_switches, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark = True
    seed_everything(3, deterministic=True)
    assert (
        torch.are_deterministic_algorithms_enabled()
        and not torch.is_deterministic_algorithms_warn_only_enabled()
    )
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE_CONFIG == ":4096:8"
    # None (what Matcher.fit passes) leaves them alone; a value the user set is kept.
    seed_everything(3)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    seed_everything(3, deterministic=True, warn_only=True)
    assert (
        torch.is_deterministic_algorithms_warn_only_enabled()
        and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    )
    seed_everything(3, deterministic=False)
    assert (
        not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    )
    # and it still seeds
    seed_everything(5, deterministic=False)
    x = torch.rand(3)
    seed_everything(5, deterministic=True)
    assert torch.equal(x, torch.rand(3))


@pytest.mark.parametrize("name", ["chan", "laps_gumbel"])
def test_fits_under_deterministic_algorithms(name, regions, pixels, restore_switches):
    """Every op of these pipelines has a deterministic implementation (no error under the switch), and
    the switch changes nothing on the CPU: the weights are those of a fit without it."""
    components, train = build(name, regions, pixels)
    plain = fit(components, train, seed=0)
    seed_everything(0, deterministic=True)
    strict = fit(components, train, seed=0)
    assert_identical(plain, strict)
