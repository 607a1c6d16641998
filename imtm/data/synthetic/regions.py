"""The region view: one detector-like feature vector per object plus background regions.

The attribute -> feature map (:func:`attribute_features`) is a fixed random
nonlinear network, built once from :data:`FEATURE_SEED`: the meaning of every
feature dimension is the same for every split, every ``seed`` and every run, so a
model trained on one draw of the benchmark reads the features of another.

The map is a sum of one nonlinear term per attribute group (shape, colour, size,
position, region kind, background appearance):

.. math::

    x_r = \\sum_g w_g \\, \\mathrm{softplus}(A_g \\tanh(B_g a_{r,g} + c_g) + d_g) + \\epsilon_r

A region's vector mixes its own shape with its own colour, so a region-level
alignment ("which region is red *and* a circle?") recovers the binding. There is
deliberately no cross-attribute interaction term: the mean over an image's regions
is then a function of its bag of attributes only, and a global mean-pooled
embedding cannot tell "red circle, blue square" from "blue circle, red square".
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from imtm.data.synthetic.scenes import (
    COLOUR_RGB,
    COLOURS,
    GRID,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    TEXTURES,
    TINT_RGB,
    TINTS,
    Background,
    Scene,
    SceneObject,
)

__all__ = [
    "FEATURE_SEED",
    "REGION_NOISE_SCALE",
    "RegionAttributes",
    "attribute_features",
    "region_features",
    "scene_region_attributes",
]

#: Seed of the fixed attribute -> feature network; independent of the benchmark's seed.
FEATURE_SEED = 20240917
#: Feature noise standard deviation per unit of ``noise``, in units of the typical
#: per-dimension standard deviation of the clean features (which is 1).
REGION_NOISE_SCALE = 1.0
# Width of each group's hidden layer.
_HIDDEN = 32
# Per group: (input width, std of the input weights, output weight w_g).
_GROUPS = {
    "shape": (len(SHAPES), 1.5, 1.0),
    "colour": (3, 1.5, 1.0),
    "size": (1, 1.0, 0.6),
    "position": (2, 1.5, 0.6),
    "kind": (2, 1.5, 0.8),
    "appearance": (len(TEXTURES) + 4, 0.8, 1.0),
}
# An object's box also sees some of the background around it (as a detector's does),
# at this weight relative to a background region.
_CONTEXT_WEIGHT = 0.25
# Spread of a background region's tint around the scene's, so they are not copies.
_TINT_JITTER = 0.02
# Background region boxes: side between these fractions of the image.
_BG_MIN_SIDE, _BG_MAX_SIDE = 0.3, 0.7
# Reference regions drawn once to normalise the features to unit per-dimension spread.
_N_REFERENCE = 4096


@dataclass(frozen=True)
class RegionAttributes:
    """The attributes of ``R`` regions, as arrays.

    Attributes:
        is_object: ``(R,)`` bool, False for background regions.
        shape: ``(R,)`` int index into :data:`SHAPES` (ignored for background).
        rgb: ``(R, 3)`` object colour in ``[0, 1]`` (ignored for background).
        center: ``(R, 2)`` box centre ``(x, y)`` in image units.
        extent: ``(R,)`` region size in image units: an object's radius, or half the
            square root of a background box's area.
        texture: ``(R,)`` int index into :data:`TEXTURES` of the scene background.
        tint: ``(R, 3)`` background colour in ``[0, 1]``.
        contrast: ``(R,)`` background texture contrast.
    """

    is_object: np.ndarray
    shape: np.ndarray
    rgb: np.ndarray
    center: np.ndarray
    extent: np.ndarray
    texture: np.ndarray
    tint: np.ndarray
    contrast: np.ndarray

    def __len__(self) -> int:
        return len(self.is_object)

    @staticmethod
    def concat(parts: Sequence[RegionAttributes]) -> RegionAttributes:
        return RegionAttributes(
            **{
                f: np.concatenate([getattr(p, f) for p in parts])
                for f in RegionAttributes.__dataclass_fields__
            }
        )


# Groups whose input is one of a few one-hot codes: their outputs are looked up in a
# table (one row per code) rather than computed per region.
_DISCRETE = ("shape", "kind")


def _inputs(attrs: RegionAttributes) -> dict[str, np.ndarray]:
    # Each group's raw input, scaled to roughly unit range; the code index for discrete groups.
    r = len(attrs)
    appearance = np.concatenate(
        [
            np.eye(len(TEXTURES))[attrs.texture],
            (attrs.tint - 0.5) * 4.0,
            ((attrs.contrast - 0.08) / 0.03)[:, None],
        ],
        axis=1,
    )
    mid = SIZE_RADIUS["medium"] / GRID  # medium objects sit at 0, small near -1, large near +1
    return {
        "shape": np.where(attrs.is_object, attrs.shape, 0),
        "colour": (attrs.rgb - 0.5) * 2.0,
        "size": ((attrs.extent - mid) / (0.1 / GRID))[:, None],
        "position": attrs.center * 2.0 - 1.0,
        "kind": (~attrs.is_object).astype(np.int64),  # 0 object, 1 background
        "appearance": appearance if r else np.zeros((0, len(TEXTURES) + 4)),
    }


def _group_weights(attrs: RegionAttributes) -> dict[str, np.ndarray]:
    obj = attrs.is_object.astype(np.float32)
    ones = np.ones(len(attrs), dtype=np.float32)
    return {
        "shape": obj,
        "colour": obj,
        "size": ones,
        "position": ones,
        "kind": ones,
        "appearance": np.where(attrs.is_object, _CONTEXT_WEIGHT, 1.0).astype(np.float32),
    }


def _softplus(x: np.ndarray) -> np.ndarray:
    # log(1 + e^x) without overflow; several times faster than np.logaddexp(0, x).
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _reference_attributes(rng: np.random.Generator, n: int) -> RegionAttributes:
    # Objects and background boxes with every attribute drawn uniformly.
    k = np.arange(n)
    is_object = k % 3 != 0
    colour = np.array([COLOUR_RGB[c] for c in COLOURS])[rng.integers(len(COLOURS), size=n)]
    tint = np.array([TINT_RGB[t] for t in TINTS])[rng.integers(len(TINTS), size=n)]
    radius = np.array([SIZE_RADIUS[z] for z in SIZES])[rng.integers(len(SIZES), size=n)] / GRID
    bg_extent = rng.uniform(_BG_MIN_SIDE, _BG_MAX_SIDE, size=n) / 2.0
    return RegionAttributes(
        is_object=is_object,
        shape=rng.integers(len(SHAPES), size=n),
        rgb=colour,
        center=rng.random((n, 2)),
        extent=np.where(is_object, radius, bg_extent),
        texture=rng.integers(len(TEXTURES), size=n),
        tint=tint,
        contrast=rng.uniform(0.05, 0.11, size=n),
    )


@functools.lru_cache(maxsize=8)
def _feature_bank(region_dim: int) -> tuple[dict, float]:
    # Fixed weights: one generator from FEATURE_SEED and region_dim only.
    rng = np.random.default_rng([FEATURE_SEED, region_dim])
    bank = {}
    for name, (width, in_std, weight) in _GROUPS.items():
        b = in_std * rng.standard_normal((width, _HIDDEN))
        c = 0.5 * rng.standard_normal(_HIDDEN)
        a = 2.0 * rng.standard_normal((_HIDDEN, region_dim)) / np.sqrt(_HIDDEN)
        d = -0.5 + 0.5 * rng.standard_normal(region_dim)
        b, c, a, d = (x.astype(np.float32) for x in (b, c, a, d))
        # A one-hot input selects a row of b: the table holds the output for each code.
        table = _softplus(np.tanh(b + c) @ a + d) if name in _DISCRETE else None
        bank[name] = (b, c, a, d, np.float32(weight), table)
    # Normalise so that the clean features of typical regions have unit per-dimension spread.
    raw = _mix(bank, _reference_attributes(rng, _N_REFERENCE))
    return bank, np.float32(1.0 / raw.std(axis=0).mean())


def _mix(bank: dict, attrs: RegionAttributes) -> np.ndarray:
    inputs, weights = _inputs(attrs), _group_weights(attrs)
    out = np.zeros((len(attrs), next(iter(bank.values()))[2].shape[1]), dtype=np.float32)
    for name, (b, c, a, d, w, table) in bank.items():
        if not weights[name].any():
            continue  # e.g. shape and colour on background regions
        x = inputs[name]
        g = (
            table[x]
            if table is not None
            else _softplus(np.tanh(x.astype(np.float32) @ b + c) @ a + d)
        )
        g *= (w * weights[name])[:, None]
        out += g
    return out


def attribute_features(attrs: RegionAttributes, region_dim: int = 128) -> np.ndarray:
    """The clean (noise-free) feature vector of each region: the attribute -> feature map.

    Deterministic, and the same in every split and for every benchmark seed.

    Args:
        attrs: the attributes of ``R`` regions.
        region_dim: feature width ``D``.

    Shape:
        - output: ``(R, D)`` float32.

    Example:
        >>> import random
        >>> from imtm.data.synthetic.scenes import sample_scene
        >>> s = sample_scene(random.Random(0))
        >>> attribute_features(scene_region_attributes(s), region_dim=16).shape == (len(s.objects), 16)
        True
    """
    bank, scale = _feature_bank(int(region_dim))
    return _mix(bank, attrs) * scale


def _object_attributes(
    objects: Sequence[SceneObject], backgrounds: Sequence[Background]
) -> RegionAttributes:
    # One region per object; ``backgrounds[k]`` is the background behind ``objects[k]``.
    n = len(objects)
    return RegionAttributes(
        is_object=np.ones(n, dtype=bool),
        shape=np.array([SHAPES.index(o.shape) for o in objects], dtype=np.int64).reshape(n),
        rgb=np.array([o.rgb for o in objects], dtype=np.float64).reshape(n, 3),
        center=np.array([o.center for o in objects], dtype=np.float64).reshape(n, 2),
        extent=np.array([o.radius for o in objects], dtype=np.float64).reshape(n),
        texture=np.array([TEXTURES.index(b.texture) for b in backgrounds], dtype=np.int64).reshape(
            n
        ),
        tint=np.array([b.rgb for b in backgrounds], dtype=np.float64).reshape(n, 3),
        contrast=np.array([b.contrast for b in backgrounds], dtype=np.float64).reshape(n),
    )


def _background_attributes(
    backgrounds: Sequence[Background], boxes: np.ndarray
) -> RegionAttributes:
    # One region per box; ``backgrounds[k]`` is the background of ``boxes[k]``.
    n = len(boxes)
    wh = boxes[:, 2:] - boxes[:, :2]
    return RegionAttributes(
        is_object=np.zeros(n, dtype=bool),
        shape=np.zeros(n, dtype=np.int64),
        rgb=np.zeros((n, 3)),
        center=(boxes[:, :2] + boxes[:, 2:]) / 2.0,
        extent=np.sqrt(wh[:, 0] * wh[:, 1]) / 2.0,
        texture=np.array([TEXTURES.index(b.texture) for b in backgrounds], dtype=np.int64).reshape(
            n
        ),
        tint=np.array([b.rgb for b in backgrounds], dtype=np.float64).reshape(n, 3),
        contrast=np.array([b.contrast for b in backgrounds], dtype=np.float64).reshape(n),
    )


def scene_region_attributes(
    scene: Scene, background_boxes: np.ndarray | None = None
) -> RegionAttributes:
    """Attributes of a scene's object regions (in object order) followed by its background boxes.

    Args:
        scene: the scene.
        background_boxes: ``(K, 4)`` ``(x0, y0, x1, y1)`` boxes in image units, or None for none.
    """
    boxes = (
        np.zeros((0, 4))
        if background_boxes is None
        else np.asarray(background_boxes, dtype=np.float64)
    )
    bg = scene.background
    return RegionAttributes.concat(
        [
            _object_attributes(scene.objects, [bg] * len(scene.objects)),
            _background_attributes([bg] * len(boxes), boxes.reshape(-1, 4)),
        ]
    )


def region_features(
    scenes: Sequence[Scene],
    rng: np.random.Generator,
    *,
    region_dim: int = 128,
    num_background_regions: int = 3,
    noise: float = 0.1,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Detector-like region features of scenes, in a random region order per image.

    Each scene gets one region per object and ``num_background_regions`` background
    boxes placed at random; every region's vector is :func:`attribute_features` of its
    attributes (a background box's tint jittered a little) plus Gaussian noise of
    standard deviation ``noise * REGION_NOISE_SCALE``.

    Args:
        scenes: the scenes.
        rng: the random generator (background boxes, region order, noise; consumed).
        region_dim: feature width ``D``.
        num_background_regions: background regions per image.
        noise: feature noise level.

    Returns:
        ``(feats, region_objects, boxes)``, one entry per scene: ``(N_b, D)`` float32
        features, ``(N_b,)`` int64 index of each region's object (``-1`` for background),
        ``(N_b, 4)`` float64 ``(x0, y0, x1, y1)`` boxes in image units.

    Example:
        >>> import random
        >>> from imtm.data.synthetic.scenes import sample_scene
        >>> s = sample_scene(random.Random(0), min_objects=3, max_objects=3)
        >>> f, which, boxes = region_features([s], np.random.default_rng(0), region_dim=16, num_background_regions=2)
        >>> f[0].shape, sorted(which[0].tolist())
        ((5, 16), [-1, -1, 0, 1, 2])
    """
    n, k = len(scenes), num_background_regions
    objects = [o for s in scenes for o in s.objects]
    obj_bgs = [s.background for s in scenes for _ in s.objects]
    side = rng.uniform(_BG_MIN_SIDE, _BG_MAX_SIDE, size=(n, k, 2))
    corner = rng.random((n, k, 2)) * (1.0 - side)
    bg_boxes = np.concatenate([corner, corner + side], axis=2)
    bg_attrs = _background_attributes(
        [s.background for s in scenes for _ in range(k)], bg_boxes.reshape(-1, 4)
    )
    bg_attrs.tint[:] += _TINT_JITTER * rng.standard_normal(bg_attrs.tint.shape)
    obj_feats = attribute_features(_object_attributes(objects, obj_bgs), region_dim)
    bg_feats = attribute_features(bg_attrs, region_dim)
    if noise > 0:
        std = np.float32(noise * REGION_NOISE_SCALE)
        obj_feats += std * rng.standard_normal(obj_feats.shape, dtype=np.float32)
        bg_feats += std * rng.standard_normal(bg_feats.shape, dtype=np.float32)
    bg_feats = bg_feats.reshape(n, k, region_dim)
    obj_boxes = np.array([o.box() for o in objects], dtype=np.float64).reshape(-1, 4)
    out_f, out_which, out_boxes = [], [], []
    start = 0
    for i, s in enumerate(scenes):
        n_o = len(s.objects)
        order = rng.permutation(n_o + k)
        which = np.concatenate([np.arange(n_o), np.full(k, -1)])
        out_f.append(np.concatenate([obj_feats[start : start + n_o], bg_feats[i]])[order])
        out_which.append(which[order])
        out_boxes.append(np.concatenate([obj_boxes[start : start + n_o], bg_boxes[i]])[order])
        start += n_o
    return out_f, out_which, out_boxes
