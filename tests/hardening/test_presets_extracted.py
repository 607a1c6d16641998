"""presets.build reads region_dim from extracted features (ExtractedDataset items are Tokens)."""

import inspect

import pytest
import torch

from imtm import Matcher, Tokens, presets
from imtm.data import ImageCaptionDataset, Vocabulary, extract_features
from imtm.data.extracted import ExtractedDataset

WIDTH = 5  # feature width of the extracted tokens
CAPTIONS = [
    "a red dog runs",
    "a blue cat sits",
    "one big car",
    "a small red car",
    "two dogs play",
    "a cat on a mat",
    "blue sky above",
    "a dog and a cat",
]


def encoder(x):
    """Pixels (B, 3, 4, 4) -> 16 tokens of width WIDTH on a 4 x 4 grid (a fixed random projection)."""
    w = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(0))
    return Tokens(x.flatten(2).transpose(1, 2) @ w, grid=(4, 4))


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    n = len(CAPTIONS) // 2
    pixels = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ds = ImageCaptionDataset(pixels, CAPTIONS, [k % n for k in range(len(CAPTIONS))])
    out = extract_features(
        encoder, ds, tmp_path_factory.mktemp("extracted"), "train", progress=False
    )
    return ExtractedDataset(out, "train", build_vocab=True)


REGION_PRESETS = sorted(
    name for name, fn in presets.PRESETS.items() if "region_dim" in inspect.signature(fn).parameters
)


def test_items_are_tokens(extracted):
    # The case build has to handle: one image is Tokens (1, N, D), not a (N, D) tensor.
    assert isinstance(extracted.images[0], Tokens) and extracted.images[0].feats.shape == (
        1,
        16,
        WIDTH,
    )


@pytest.mark.parametrize("name", REGION_PRESETS)
def test_build_reads_region_dim_from_extracted_tokens(extracted, name):
    blocks = dict(presets.build(name, extracted, embed_dim=8))
    assert blocks["image"].get_params()["in_dim"] == WIDTH


def test_built_pipeline_trains_on_extracted_features(extracted):
    m = Matcher(
        presets.build("vsepp", extracted, embed_dim=8), epochs=1, batch_size=4, random_state=0
    )
    m.fit(extracted)
    scores = m.similarity(extracted.images, extracted.captions)
    assert scores.shape == (extracted.n_images, extracted.n_captions) and bool(
        torch.isfinite(scores).all()
    )
    assert set(m.evaluate(extracted)) >= {"i2t_r1", "t2i_r1", "rsum"}


def test_pixels_are_still_refused():
    ds = ImageCaptionDataset(
        torch.rand(2, 3, 4, 4), ["a b", "c d"], [0, 1], vocab=Vocabulary.build(["a b", "c d"])
    )
    with pytest.raises(
        ValueError, match=r"needs region features \(N, D\); the data holds images of shape"
    ):
        presets.build("vsepp", ds)
