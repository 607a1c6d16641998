"""Tests of the synthetic benchmark imtm.data.synthetic."""

from __future__ import annotations

import random
import time
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.data import ImageCaptionDataset, Vocabulary, collate, synthetic, tokenize
from imtm.data.synthetic import (
    GRID,
    SHAPES,
    Background,
    PixelImages,
    Scene,
    SceneObject,
    SyntheticConfig,
    attribute_features,
    compose_caption,
    describe,
    region_features,
    render,
    sample_scene,
    scene_region_attributes,
    shape_mask,
    swap_colours,
)
from imtm.data.synthetic.captions import COLOUR_WORDS, RELATION_WORDS, SHAPE_WORDS
from imtm.data.synthetic.scenes import REACH
from imtm.tokens import Tokens

SMALL = {"n_train": 60, "n_dev": 10, "n_test": 40}
FAST = settings(max_examples=20, deadline=None)


@pytest.fixture(scope="module")
def regions():
    return synthetic.load("regions", seed=0, **SMALL)


@pytest.fixture(scope="module")
def pixels():
    return synthetic.load("pixels", seed=0, **SMALL)


def _obj(shape, colour, cell, size="medium"):
    row, col = cell
    return SceneObject(
        shape=shape,
        colour=colour,
        size=size,
        cell=cell,
        center=((col + 0.5) / GRID, (row + 0.5) / GRID),
        radius=0.3 / GRID,
        rgb=synthetic.scenes.COLOUR_RGB[colour],
    )


_BG = Background(
    texture="plain",
    tint="grey",
    rgb=(0.5, 0.5, 0.5),
    contrast=0.05,
    frequency=5.0,
    angle=0.0,
    phase=0.0,
    seed=7,
)


# ---------------------------------------------------------------- shapes, dtypes, protocol
def test_regions_view_shapes_and_protocol(regions):
    train, dev, test = regions
    for ds, n in zip((train, dev, test), (60, 10, 40)):
        assert isinstance(ds, ImageCaptionDataset)
        assert ds.n_images == n and ds.n_captions == 5 * n
        torch.testing.assert_close(ds.caption_to_image, torch.arange(n).repeat_interleave(5))
        assert len(ds.scenes) == len(ds.boxes) == len(ds.region_objects) == n
        for x, which, boxes, scene in zip(ds.images, ds.region_objects, ds.boxes, ds.scenes):
            n_obj = len(scene.objects)
            assert x.dtype == torch.float32 and x.shape == (n_obj + 3, 128)
            assert torch.isfinite(x).all()
            assert sorted(which.tolist()) == [-1] * 3 + list(range(n_obj))
            assert boxes.shape == (n_obj + 3, 4)
            for r, j in enumerate(which.tolist()):
                if j >= 0:  # an object's region box is its object's box
                    torch.testing.assert_close(
                        boxes[r], torch.tensor(scene.objects[j].box(64), dtype=torch.float32)
                    )
    assert (test.region_dim, test.image_size, test.captions_per_image) == (128, 64, 5)
    batch = collate([test[k] for k in range(7)])
    assert isinstance(batch["images"], Tokens) and batch["images"].feats.shape[-1] == 128
    torch.testing.assert_close(
        batch["images"].mask.sum(1),
        torch.tensor([x.shape[0] for x in (test[k]["images"] for k in range(7))]),
    )
    assert batch["image_ids"].tolist() == [0, 0, 0, 0, 0, 1, 1]


def test_pixels_view_shapes_range_and_boxes(pixels):
    _train, _dev, test = pixels
    assert isinstance(test.images, PixelImages) and test.images.shape == (40, 3, 64, 64)
    assert test.region_objects is None and test.region_dim is None
    x = test.images[3]
    assert x.dtype == torch.float32 and x.shape == (3, 64, 64)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    torch.testing.assert_close(test.images[[3, 5]], torch.stack([test.images[3], test.images[5]]))
    torch.testing.assert_close(test.images[torch.tensor(3)], x)
    assert test.images[1:4].shape == (3, 3, 64, 64)
    for boxes, scene in zip(test.boxes, test.scenes):
        assert boxes.shape == (len(scene.objects), 4)
        assert float(boxes.min()) >= 0.0 and float(boxes.max()) <= 64.0
    batch = collate([test[k] for k in range(4)])
    assert batch["images"].shape == (4, 3, 64, 64)


def test_same_seed_same_scenes_and_captions_in_both_views(regions, pixels):
    for a, b in zip(regions, pixels):
        assert a.scenes == b.scenes and a.captions == b.captions
        assert a.vocab == b.vocab


# ---------------------------------------------------------------- determinism, splits, vocab
def test_deterministic_per_seed_bit_for_bit(regions, pixels):
    again = synthetic.load("regions", seed=0, **SMALL)
    for a, b in zip(regions, again):
        assert a.captions == b.captions and a.scenes == b.scenes
        assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))
        assert a.fingerprint() == b.fingerprint()
    test_again = synthetic.load("pixels", seed=0, **SMALL)[2]
    assert torch.equal(test_again.images.data, pixels[2].images.data)


def test_different_seeds_differ(regions):
    other = synthetic.load("regions", seed=1, **SMALL)
    for a, b in zip(regions, other):
        assert a.captions != b.captions
        assert a.fingerprint() != b.fingerprint()


def test_test_split_does_not_depend_on_train_or_dev_sizes(regions):
    bigger = synthetic.load("regions", seed=0, n_train=80, n_dev=15, n_test=40)
    assert bigger[2].captions == regions[2].captions
    assert all(torch.equal(x, y) for x, y in zip(bigger[2].images, regions[2].images))


def test_splits_share_no_scene(regions):
    sigs = [{s.signature() for s in ds.scenes} for ds in regions]
    assert all(
        len(sig) == ds.n_images for sig, ds in zip(sigs, regions)
    )  # no repeat within a split
    assert not (sigs[0] & sigs[1]) and not (sigs[0] & sigs[2]) and not (sigs[1] & sigs[2])


def test_vocab_is_built_from_train_only_and_shared(regions):
    train, dev, test = regions
    assert dev.vocab is train.vocab and test.vocab is train.vocab
    assert train.vocab == Vocabulary.build(train.captions)
    assert len(train.vocab) < 300
    ids = train.vocab.encode_batch(test.captions)  # unseen words map to <unk>
    assert ids.feats.shape[0] == test.n_captions and int(ids.feats.max()) < len(train.vocab)


# ---------------------------------------------------------------- captions
def test_captions_are_nonempty_and_name_what_they_mention(regions):
    for ds in regions:
        for k, (text, mentions) in enumerate(zip(ds.captions, ds.caption_mentions)):
            assert text.strip() and text == text.strip()
            assert len(mentions) >= 1
            scene = ds.scenes[int(ds.caption_to_image[k])]
            lower = text.lower()
            for j in mentions:
                o = scene.objects[j]
                assert any(w in lower for w in COLOUR_WORDS[o.colour]), (text, o)
                assert any(form in lower for names in SHAPE_WORDS[o.shape] for form in names), (
                    text,
                    o,
                )


def test_captions_of_one_image_name_different_objects(regions):
    train = regions[0]
    for i, scene in enumerate(train.scenes):
        mentions = train.caption_mentions[5 * i : 5 * i + 5]
        assert len(set(mentions)) >= 2, (scene, mentions)


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6))
def test_describe_property(seed, n):
    rng = random.Random(seed)
    scene = sample_scene(rng)
    caps = describe(scene, rng, n)
    assert len(caps) == n
    for c in caps:
        assert isinstance(c.text, str) and c.text.strip()
        assert c.mentions and all(0 <= j < len(scene.objects) for j in c.mentions)
        assert list(c.mentions) == sorted(set(c.mentions))


def test_relations_are_true():
    # Red circle on the left of the middle row, blue square on its right: every
    # relation named must be "left of" read from the circle or "right of" from the square.
    scene = Scene(
        objects=(_obj("circle", "red", (1, 0)), _obj("square", "blue", (1, 2))), background=_BG
    )
    left, right = RELATION_WORDS["left"], RELATION_WORDS["right"]
    wrong = RELATION_WORDS["above"] + RELATION_WORDS["below"] + RELATION_WORDS["near"]
    seen = 0
    for seed in range(300):
        text = compose_caption(scene, random.Random(seed), (0, 1)).text.lower()
        assert not any(f" {w} " in f" {text} " for w in wrong), text
        if any(f" {w} " in text for w in left + right):
            seen += 1
            red_first = min(text.find(w) for w in COLOUR_WORDS["red"] if w in text) < min(
                text.find(w) for w in COLOUR_WORDS["blue"] if w in text
            )
            says_left = any(f" {w} " in text for w in left)
            assert red_first == says_left, text
    assert seen > 50


def test_counts_of_repeated_objects_appear():
    objs = (
        _obj("circle", "red", (0, 0)),
        _obj("circle", "red", (2, 2), size="large"),
        _obj("star", "green", (1, 1)),
    )
    scene = Scene(objects=objs, background=_BG)
    texts = [compose_caption(scene, random.Random(s), (0,)).text.lower() for s in range(100)]
    reds = COLOUR_WORDS["red"]
    counted = [t for t in texts if "pair of" in t or any(f"two {w}" in t for w in reds)]
    assert len(counted) > 10
    for t in counted:
        assert any(f"{w} {names[1]}" in t for w in reds for names in SHAPE_WORDS["circle"]), t
    for t in texts:  # the star is never counted: it has no copy
        assert "two green" not in t and "two emerald" not in t


# ---------------------------------------------------------------- binding twins
def test_confusable_pairs_swap_bindings_but_keep_the_bag(regions):
    test = regions[2]
    pairs = test.confusable_pairs
    assert pairs.shape == (10, 2)  # confusable_fraction 0.5 of 40 images
    assert len(set(pairs.flatten().tolist())) == 20
    for a, b in pairs.tolist():
        sa, sb = test.scenes[a], test.scenes[b]
        assert sa.bag_of_attributes() == sb.bag_of_attributes()
        assert sa.bindings() != sb.bindings()
        # Every caption of a twin names a colour-shape binding that the other twin lacks.
        for img, other in ((a, b), (b, a)):
            for k in range(5 * img, 5 * img + 5):
                named = {test.scenes[img].objects[j].binding for j in test.caption_mentions[k]}
                assert named - set(test.scenes[other].bindings()), test.captions[k]


@FAST
@given(seed=st.integers(0, 10_000))
def test_swap_colours_property(seed):
    rng = random.Random(seed)
    scene = sample_scene(rng, min_objects=3, max_objects=5)
    made = swap_colours(scene, rng)
    if made is None:
        return
    twin, (a, b) = made
    assert twin.bag_of_attributes() == scene.bag_of_attributes()
    assert twin.bindings() != scene.bindings()
    assert [o.cell for o in twin.objects] == [o.cell for o in scene.objects]
    assert (
        twin.objects[a].colour == scene.objects[b].colour
        and twin.objects[a].shape == scene.objects[a].shape
    )
    assert (
        scene.objects[a].binding not in twin.bindings()
        and scene.objects[b].binding not in twin.bindings()
    )


def test_region_features_bind_colour_to_shape_but_their_mean_does_not():
    # "red circle + blue square" versus "blue circle + red square", same geometry.
    s1 = Scene(
        objects=(_obj("circle", "red", (0, 0)), _obj("square", "blue", (2, 2))), background=_BG
    )
    s2 = Scene(
        objects=(_obj("circle", "blue", (0, 0)), _obj("square", "red", (2, 2))), background=_BG
    )
    assert s1.bag_of_attributes() == s2.bag_of_attributes()
    f1 = torch.from_numpy(attribute_features(scene_region_attributes(s1)))
    f2 = torch.from_numpy(attribute_features(scene_region_attributes(s2)))
    # Each object region of one scene is far from every region of the other, compared
    # with the feature noise at the default level (0.1 per dimension)...
    noise_norm = 0.1 * f1.shape[1] ** 0.5
    assert float(torch.cdist(f1, f2).min()) > 5 * noise_norm
    # ...while the means over the regions agree: a mean-pooled embedding cannot bind.
    torch.testing.assert_close(f1.mean(0), f2.mean(0), rtol=1e-5, atol=1e-5)


def test_binding_accuracy(regions):
    test = regions[2]
    oracle = torch.zeros(test.n_images, test.n_captions)
    oracle[test.caption_to_image, torch.arange(test.n_captions)] = 1.0
    assert test.binding_accuracy(oracle) == 1.0
    assert test.binding_accuracy(torch.zeros(test.n_images, test.n_captions)) == 0.5
    # A plain loop over pairs and captions.
    scores = torch.randn(test.n_images, test.n_captions, generator=torch.Generator().manual_seed(0))
    hits = []
    for a, b in test.confusable_pairs.tolist():
        for img, other in ((a, b), (b, a)):
            for k in range(test.n_captions):
                if int(test.caption_to_image[k]) == img:
                    hits.append(float(scores[img, k] > scores[other, k]))
    assert test.binding_accuracy(scores) == pytest.approx(sum(hits) / len(hits))
    with pytest.raises(ValueError, match=r"scores of shape \(n_images, n_captions\) = \(40, 200\)"):
        test.binding_accuracy(torch.zeros(3, 4))
    no_twins = synthetic.load(
        "regions", seed=0, n_train=5, n_dev=2, n_test=4, confusable_fraction=0.0
    )[2]
    with pytest.raises(ValueError, match="no binding twins"):
        no_twins.binding_accuracy(torch.zeros(4, 20))


# ---------------------------------------------------------------- region features
def test_region_feature_map_is_fixed_across_seeds_and_splits():
    for seed in (0, 3):
        for ds in synthetic.load("regions", seed=seed, n_train=6, n_dev=2, n_test=4, noise=0.0):
            for x, which, scene in zip(ds.images, ds.region_objects, ds.scenes):
                clean = torch.from_numpy(attribute_features(scene_region_attributes(scene)))
                obj = which >= 0
                torch.testing.assert_close(x[obj], clean[which[obj]])


def test_region_noise_level():
    scene = sample_scene(random.Random(0))
    clean, which_c, _ = region_features(
        [scene] * 400, np.random.default_rng(0), num_background_regions=0, noise=0.0
    )
    noisy, which_n, _ = region_features(
        [scene] * 400, np.random.default_rng(0), num_background_regions=0, noise=0.3
    )
    # Back to object order (the region order is random).
    clean = np.stack([f[np.argsort(w)] for f, w in zip(clean, which_c)])
    noisy = np.stack([f[np.argsort(w)] for f, w in zip(noisy, which_n)])
    diff = noisy - clean
    assert abs(diff.std() - 0.3) < 0.01 and abs(diff.mean()) < 0.01


# ---------------------------------------------------------------- pixels
def _reference_render(scene: Scene, size: int) -> np.ndarray:
    # A plain loop over pixels and 2 x 2 sub-pixel samples: background, then each
    # object mixed in by the share of samples inside it.
    from imtm.data.synthetic.pixels import _backgrounds

    img = _backgrounds([scene], size)[0].astype(np.float64)
    for o in scene.objects:
        cx, cy, r = o.center[0] * size, o.center[1] * size, o.radius * size
        for y in range(size):
            for x in range(size):
                inside = 0
                for sy in (0.25, 0.75):
                    for sx in (0.25, 0.75):
                        u, v = (x + sx - cx) / r, (cy - (y + sy)) / r
                        inside += bool(shape_mask(o.shape, np.float64(u), np.float64(v)))
                a = inside / 4
                img[:, y, x] += a * (np.asarray(o.rgb) - img[:, y, x])
    return np.clip(np.rint(img * 255), 0, 255)


def test_render_matches_a_plain_loop():
    rng = random.Random(5)
    scene = sample_scene(rng, min_objects=5, max_objects=5)
    got = render([scene], np.random.default_rng(0), image_size=24, noise=0.0)[0].astype(np.float64)
    want = _reference_render(scene, 24)
    assert np.abs(got - want).max() <= 1.0  # float32 vs float64 rounding


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_is_drawn_in_its_colour_and_stays_in_its_reach(shape):
    o = _obj(shape, "red", (1, 1), size="small")
    img = render(
        [Scene(objects=(o,), background=_BG)], np.random.default_rng(0), image_size=48, noise=0.0
    )[0]
    c = 24  # the centre pixel lies inside every shape
    np.testing.assert_allclose(img[:, c, c] / 255.0, o.rgb, atol=1 / 255)
    bare = render(
        [Scene(objects=(), background=_BG)], np.random.default_rng(0), image_size=48, noise=0.0
    )[0]
    changed = np.argwhere((img != bare).any(0))
    reach = REACH * o.radius * 48
    assert np.abs(changed + 0.5 - c).max() <= reach + 1


def test_pixel_noise_level():
    scene = Scene(objects=(), background=_BG)
    clean = render([scene], np.random.default_rng(0), 64, noise=0.0).astype(np.float64)
    noisy = render([scene] * 4, np.random.default_rng(0), 64, noise=0.1).astype(np.float64)
    assert abs((noisy - clean).std() / 255 - 0.05) < 0.005


# ---------------------------------------------------------------- scenes
@FAST
@given(seed=st.integers(0, 10_000), lo=st.integers(1, 4), extra=st.integers(0, 5))
def test_sample_scene_property(seed, lo, extra):
    hi = min(lo + extra, GRID * GRID)
    scene = sample_scene(random.Random(seed), min_objects=lo, max_objects=hi)
    assert lo <= len(scene.objects) <= hi
    cells = [o.cell for o in scene.objects]
    assert len(set(cells)) == len(cells)
    for o in scene.objects:  # each shape stays inside its own cell, so none overlap
        x0, y0, x1, y1 = o.box(GRID)
        row, col = o.cell
        assert col <= x0 and x1 <= col + 1 and row <= y0 and y1 <= row + 1
        assert all(0.0 <= c <= 1.0 for c in o.rgb)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"view": "regoins"},
            ValueError,
            r"view must be one of \['pixels', 'regions'\], got 'regoins'\. Did you mean 'regions'\?",
        ),
        ({"view": "foo"}, ValueError, r"view must be one of \['pixels', 'regions'\], got 'foo'"),
        ({"n_test": 0}, ValueError, "n_test must be at least 1, got 0"),
        ({"n_train": 2.5}, TypeError, "n_train must be an int, got float"),
        ({"captions_per_image": 0}, ValueError, "captions_per_image must be at least 1"),
        ({"noise": -0.1}, ValueError, "noise must be a finite number >= 0"),
        ({"noise": float("nan")}, ValueError, "noise must be a finite number >= 0"),
        ({"image_size": 8}, ValueError, "image_size must be at least 24"),
        ({"region_dim": 0}, ValueError, "region_dim must be at least 1"),
        ({"num_background_regions": -1}, ValueError, "num_background_regions must be >= 0"),
        ({"min_objects": 4, "max_objects": 3}, ValueError, "need min_objects <= max_objects <= 9"),
        ({"max_objects": 10}, ValueError, "need min_objects <= max_objects <= 9"),
        ({"confusable_fraction": 1.5}, ValueError, r"confusable_fraction must be in \[0, 1\]"),
        ({"min_objects": 1, "max_objects": 1}, ValueError, "binding twins need max_objects >= 2"),
        ({"seed": -1}, ValueError, "seed must be a non-negative int"),
        ({"seed": 1.5}, TypeError, "seed must be an int, got float"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        synthetic.load(**{"n_train": 4, "n_dev": 2, "n_test": 2, **kwargs})


def test_bad_inputs_of_the_parts():
    with pytest.raises(ValueError, match="need 1 <= min_objects <= max_objects <= 9"):
        sample_scene(random.Random(0), min_objects=0)
    with pytest.raises(ValueError, match="subset of objects to name is empty"):
        compose_caption(sample_scene(random.Random(0)), random.Random(0), ())
    with pytest.raises(ValueError, match="focus must be two object indices"):
        describe(sample_scene(random.Random(0), max_objects=2), random.Random(0), focus=(0, 5))
    with pytest.raises(ValueError, match="shape must be one of"):
        shape_mask("hexagon", np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match=r"expected a \(n, 3, H, W\) uint8 tensor"):
        PixelImages(torch.zeros(2, 3, 8, 8))
    with pytest.raises(TypeError, match="not a bool"):
        PixelImages(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))[True]
    assert SyntheticConfig().validate() == SyntheticConfig()


# ---------------------------------------------------------------- default sizes
def test_default_sizes():
    start = time.perf_counter()
    train, dev, test = synthetic.load("regions", seed=0)
    elapsed = time.perf_counter() - start
    print(f"synthetic.load('regions') with default sizes: {elapsed:.2f} s")
    assert (train.n_images, dev.n_images, test.n_images) == (4000, 500, 1000)
    assert test.n_captions == 5000 and test.confusable_pairs.shape == (250, 2)
    assert len(train.vocab) < 300
    # Words of dev and test are words of train (no <unk> with the default sizes).
    assert all(
        w in train.vocab for ds in (dev, test) for c in ds.captions[:500] for w in tokenize(c)
    )
    assert Counter(len(s.objects) for s in test.scenes).keys() == {2, 3, 4, 5}
