"""Which image patches the objects of a scene cover: per-patch labels and the object fraction.

A patch model (a ViT) cuts an ``S x S`` image into ``(S / P)^2`` patches of ``P x P``
pixels. LAPS's premise is that most of them are redundant for a caption: here, a patch
that no object touches shows only background. :func:`patch_coverage` measures, for
every patch, the share of its pixels each object covers (with supersampling, from the
scene's geometry, not from the rendered pixels); :func:`patch_objects` turns that into
one object index per patch (``-1`` for background) and :func:`object_patch_fraction`
into the share of patches that any object touches.

:data:`PATCH_SCENES` is the pixel setting in which patch selection matters: 64 x 64
images in 8 x 8 patches, 64 patches per image, about 29% of them touched by an object
(measured on the benchmark's scenes; the older 32 x 32 images in 8 x 8 patches have 16
patches, about half of them touched).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imtm.data.synthetic.pixels import shape_mask
from imtm.data.synthetic.scenes import Scene

__all__ = ["PATCH_SCENES", "object_patch_fraction", "patch_coverage", "patch_objects"]

#: Image side and patch side of the pixel scenes where most patches are redundant (64 patches).
PATCH_SCENES = {"image_size": 64, "patch_size": 8}
# Sub-pixel samples per pixel side when measuring coverage.
_SUPERSAMPLE = 2


def _check(image_size: int, patch_size: int, where: str) -> int:
    for name, value in (("image_size", image_size), ("patch_size", patch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    if image_size % patch_size:
        raise ValueError(
            f"{where}: image_size={image_size} is not a multiple of patch_size={patch_size}; "
            "choose a patch size that divides the image side"
        )
    return image_size // patch_size


def patch_coverage(scene: Scene, image_size: int, patch_size: int) -> np.ndarray:
    """Share of each patch's area covered by each object of ``scene``.

    Args:
        scene: the scene.
        image_size: side ``S`` of the square image, in pixels.
        patch_size: side ``P`` of a square patch, in pixels (divides ``S``).

    Returns:
        ``(n_objects, g * g)`` float32 in ``[0, 1]``, ``g = S // P``, patches in row-major
        order (the order of a ViT's patch tokens).

    Example:
        >>> import random
        >>> from imtm.data.synthetic.scenes import sample_scene
        >>> patch_coverage(sample_scene(random.Random(0)), 64, 8).shape[1]
        64
    """
    g = _check(image_size, patch_size, "patch_coverage")
    side = image_size * _SUPERSAMPLE
    x = (np.arange(side, dtype=np.float64) + 0.5) / _SUPERSAMPLE
    out = np.zeros((len(scene.objects), g * g), dtype=np.float32)
    for k, o in enumerate(scene.objects):
        cx, cy, r = o.center[0] * image_size, o.center[1] * image_size, o.radius * image_size
        inside = shape_mask(o.shape, (x[None, :] - cx) / r, (cy - x[:, None]) / r)
        cells = inside.reshape(g, side // g, g, side // g).mean(axis=(1, 3), dtype=np.float32)
        out[k] = cells.reshape(-1)
    return out


def patch_objects(
    scenes: Sequence[Scene], image_size: int, patch_size: int, min_coverage: float = 0.25
) -> np.ndarray:
    """One object per patch: the object covering most of it, when it covers at least ``min_coverage``.

    Args:
        scenes: the scenes.
        image_size, patch_size: see :func:`patch_coverage`.
        min_coverage: the least share of a patch's area an object must cover to label it.

    Returns:
        ``(n, g * g)`` int64: index into the scene's objects, or ``-1`` (background).

    Example:
        >>> import random
        >>> from imtm.data.synthetic.scenes import sample_scene
        >>> labels = patch_objects([sample_scene(random.Random(0))], 64, 8)
        >>> labels.shape, int(labels.min())
        ((1, 64), -1)
    """
    g = _check(image_size, patch_size, "patch_objects")
    if not 0.0 < min_coverage <= 1.0:
        raise ValueError(f"patch_objects: min_coverage must be in (0, 1], got {min_coverage!r}")
    out = np.full((len(scenes), g * g), -1, dtype=np.int64)
    for i, s in enumerate(scenes):
        if not s.objects:
            continue
        cov = patch_coverage(s, image_size, patch_size)
        best = cov.argmax(axis=0)
        keep = cov.max(axis=0) >= min_coverage
        out[i, keep] = best[keep]
    return out


def object_patch_fraction(scenes: Sequence[Scene], image_size: int, patch_size: int) -> float:
    """Share of all patches (over all ``scenes``) that some object touches (any covered area).

    Example:
        >>> import random
        >>> from imtm.data.synthetic.scenes import sample_scene
        >>> 0.0 < object_patch_fraction([sample_scene(random.Random(0))], 64, 8) < 0.5
        True
    """
    g = _check(image_size, patch_size, "object_patch_fraction")
    if len(scenes) == 0:
        raise ValueError("object_patch_fraction: got no scenes")
    touched = sum(
        int((patch_coverage(s, image_size, patch_size) > 0).any(axis=0).sum()) if s.objects else 0
        for s in scenes
    )
    return touched / (len(scenes) * g * g)
