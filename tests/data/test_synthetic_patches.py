"""Patch coverage of the synthetic scenes, and the pre-training split disjoint from the benchmark."""

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.data import synthetic
from imtm.data.synthetic.pixels import shape_mask
from imtm.data.synthetic.scenes import sample_scene


def loop_coverage(scene, image_size, patch_size, ss=2):
    """The equation as a plain loop: the share of each patch's sub-pixel samples inside each object."""
    g = image_size // patch_size
    out = np.zeros((len(scene.objects), g * g))
    for k, o in enumerate(scene.objects):
        cx, cy, r = o.center[0] * image_size, o.center[1] * image_size, o.radius * image_size
        for py in range(g):
            for px in range(g):
                inside = 0
                for yy in range(patch_size * ss):
                    for xx in range(patch_size * ss):
                        x = px * patch_size + (xx + 0.5) / ss
                        y = py * patch_size + (yy + 0.5) / ss
                        inside += bool(
                            shape_mask(o.shape, np.array((x - cx) / r), np.array((cy - y) / r))
                        )
                out[k, py * g + px] = inside / (patch_size * ss) ** 2
    return out


def test_patch_coverage_matches_a_plain_loop():
    scene = sample_scene(random.Random(3), min_objects=3, max_objects=3)
    got = synthetic.patch_coverage(scene, 24, 6)
    assert got.shape == (3, 16)
    torch.testing.assert_close(
        torch.from_numpy(got).double(), torch.from_numpy(loop_coverage(scene, 24, 6))
    )


def test_objects_touch_a_minority_of_the_patch_scenes_patches():
    _, _, test = synthetic.load("pixels", 0, n_train=4, n_dev=2, n_test=200)
    size, patch = synthetic.PATCH_SCENES["image_size"], synthetic.PATCH_SCENES["patch_size"]
    assert (size // patch) ** 2 == 64
    frac = synthetic.object_patch_fraction(test.scenes, size, patch)
    assert 0.2 < frac < 0.4  # measured 0.284 on these 200 scenes
    assert (
        synthetic.object_patch_fraction(test.scenes, 32, 8) > 0.45
    )  # the older 16-patch images: half


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), min_cov=st.floats(0.05, 1.0))
def test_patch_objects_label_the_object_covering_most(seed, min_cov):
    scene = sample_scene(random.Random(seed))
    labels = synthetic.patch_objects([scene], 32, 8, min_coverage=min_cov)[0]
    cov = synthetic.patch_coverage(scene, 32, 8)
    assert labels.min() >= -1 and labels.max() < len(scene.objects)
    for p, k in enumerate(labels):
        if k >= 0:
            assert cov[k, p] >= min_cov and cov[k, p] == cov[:, p].max()
        else:
            assert cov[:, p].max() < min_cov


def test_patch_functions_refuse_bad_sizes():
    scene = sample_scene(random.Random(0))
    with pytest.raises(ValueError, match="not a multiple of patch_size=7"):
        synthetic.patch_coverage(scene, 64, 7)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        synthetic.patch_objects([scene], 64, 0)
    with pytest.raises(ValueError, match="min_coverage must be in"):
        synthetic.patch_objects([scene], 64, 8, min_coverage=0.0)
    with pytest.raises(ValueError, match="got no scenes"):
        synthetic.object_patch_fraction([], 64, 8)


def test_pretraining_split_is_disjoint_from_the_benchmark_and_seeded():
    sizes = {"n_train": 60, "n_dev": 10, "n_test": 30}
    pre = synthetic.load_pretraining(40, exclude_seeds=(0, 1), benchmark_sizes=sizes, image_size=32)
    again = synthetic.load_pretraining(
        40, exclude_seeds=(0, 1), benchmark_sizes=sizes, image_size=32
    )
    assert pre.split == "pretrain" and pre.n_images == 40 and len(pre.captions) == 200
    assert pre.captions == again.captions
    torch.testing.assert_close(pre.images[:], again.images[:])
    for seed in (0, 1):
        bench = {s.signature() for d in synthetic.load("regions", seed, **sizes) for s in d.scenes}
        assert not any(s.signature() in bench for s in pre.scenes)
    other = synthetic.load_pretraining(40, seed=7, exclude_seeds=(), image_size=32)
    assert other.captions != pre.captions


def test_pretraining_split_bad_inputs():
    with pytest.raises(ValueError, match="n must be a positive int"):
        synthetic.load_pretraining(0)
    with pytest.raises(ValueError, match="view must be one of"):
        synthetic.load_pretraining(4, view="pixel", exclude_seeds=())
