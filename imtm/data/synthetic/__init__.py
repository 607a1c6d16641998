"""The built-in synthetic benchmark: procedurally generated scenes where binding matters.

Every image holds 2-5 objects (shape, colour, size, cell of a 3 x 3 grid) over a
textured background; every caption names a random subset of them, with synonyms
("red" / "crimson", "circle" / "disk"), counts ("two red circles") and spatial
relations ("a red circle left of a blue square"). Half of each split comes in
*binding twins*: two scenes identical but for two objects that exchanged colours.
A bag of words, or a global embedding that forgets which colour went with which
shape, cannot tell twins apart; a region-word alignment that binds colour to shape
can. Everything is generated in seconds on a CPU, deterministically per seed, with
no download.

Two views of the same scenes:

- ``view="regions"``: one detector-like feature vector per object plus a few
  background boxes, ``(N_b, D)`` per image, like bottom-up-attention features;
- ``view="pixels"``: ``(3, H, W)`` float images in ``[0, 1]`` for patch-based models.

Example:
    >>> from imtm.data import synthetic
    >>> train, dev, test = synthetic.load(view="regions", seed=0, n_train=20, n_dev=4, n_test=6)
    >>> len(train.captions) == 5 * train.n_images, test.vocab is train.vocab
    (True, True)

Entry point: :func:`load`; :func:`load_pretraining` gives a split disjoint from the
benchmark's, for pre-training backbones. :data:`PATCH_SCENES` (64 x 64 images, 8 x 8
patches) is the pixel setting where objects touch a minority of patches
(:func:`object_patch_fraction`). The parts (:func:`sample_scene`, :func:`swap_colours`,
:func:`describe`, :func:`render_scene`, :func:`attribute_features`,
:func:`region_features`) are public for visualisations and custom variants.
"""

from imtm.data.synthetic.captions import Caption, choose_mentions, compose_caption, describe
from imtm.data.synthetic.patches import (
    PATCH_SCENES,
    object_patch_fraction,
    patch_coverage,
    patch_objects,
)
from imtm.data.synthetic.pixels import render, render_scene, shape_mask
from imtm.data.synthetic.regions import (
    FEATURE_SEED,
    RegionAttributes,
    attribute_features,
    region_features,
    scene_region_attributes,
)
from imtm.data.synthetic.scenes import (
    COLOURS,
    GRID,
    SHAPES,
    SIZES,
    TEXTURES,
    TINTS,
    Background,
    Scene,
    SceneObject,
    sample_scene,
    swap_colours,
)
from imtm.data.synthetic.splits import (
    PRETRAIN_SEED,
    SPLITS,
    VIEWS,
    PixelImages,
    SyntheticConfig,
    SyntheticDataset,
    load,
    load_pretraining,
)

__all__ = [
    "COLOURS",
    "FEATURE_SEED",
    "PATCH_SCENES",
    "PRETRAIN_SEED",
    "GRID",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TEXTURES",
    "TINTS",
    "VIEWS",
    "Background",
    "Caption",
    "PixelImages",
    "RegionAttributes",
    "Scene",
    "SceneObject",
    "SyntheticConfig",
    "SyntheticDataset",
    "attribute_features",
    "choose_mentions",
    "compose_caption",
    "describe",
    "load",
    "load_pretraining",
    "object_patch_fraction",
    "patch_coverage",
    "patch_objects",
    "region_features",
    "render",
    "render_scene",
    "sample_scene",
    "scene_region_attributes",
    "shape_mask",
    "swap_colours",
]
