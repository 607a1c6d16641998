"""The pixel view: scenes drawn with numpy as RGB images.

Backgrounds are drawn for all images at once per texture; shapes are drawn with
2 x 2 supersampled coverage (soft, anti-aliased edges), all objects of one shape
and size class at once; then uniform pixel noise is added and the image is
quantised to ``uint8``, as a camera image would be.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from imtm.data.synthetic.scenes import REACH, SHAPES, SIZES, Scene

__all__ = ["PIXEL_NOISE_SCALE", "render", "render_scene", "shape_mask"]

#: Pixel noise standard deviation (in [0, 1] units) per unit of the ``noise`` argument.
PIXEL_NOISE_SCALE = 0.5
# Uniform noise on [-h, h] has standard deviation h / sqrt(3). Uniform rather than
# Gaussian noise: as good a sensor model here, and three times cheaper to draw.
_UNIFORM_HALF_WIDTH = np.sqrt(3.0)
# Sub-pixel samples per side when measuring how much of a pixel a shape covers.
_SUPERSAMPLE = 2
# Side of the coarse random grid that the "plain" texture interpolates (smooth blotches).
_BLOTCH_GRID = 6
# Star geometry: outer and inner radius (relative to the object radius); 5 points.
_STAR_OUTER, _STAR_INNER, _STAR_POINTS = REACH, 0.45, 5
# Images per chunk when adding noise, to bound the float32 scratch memory.
_CHUNK = 512


def _star_edge():
    # Edge from the tip at angle 0 to the inner vertex at half the point spacing; a
    # point (in the sector folded onto [0, half]) is inside when on the centre's side.
    half = np.pi / _STAR_POINTS
    p1 = np.array([_STAR_OUTER, 0.0])
    p2 = _STAR_INNER * np.array([np.cos(half), np.sin(half)])
    d = p2 - p1
    n = np.array([d[1], -d[0]])
    n = n if n @ p1 > 0 else -n  # outward normal
    return n, float(n @ p1)


_STAR_NORMAL, _STAR_OFFSET = _star_edge()


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of a unit-radius shape centred at the origin.

    Every shape fits in the square ``|u|, |v| <= REACH``.

    Args:
        shape: one of the scene shapes.
        u, v: coordinates in object radii, ``u`` to the right and ``v`` up.

    Returns:
        bool array of the broadcast shape of ``u`` and ``v``.

    Example:
        >>> bool(shape_mask("circle", np.array(0.5), np.array(0.5)))
        True
        >>> bool(shape_mask("cross", np.array(0.6), np.array(0.6)))
        False
    """
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        # Side 1.64 radii: about the area of the unit circle.
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":
        # Upward equilateral triangle of circumradius R = REACH: three half-planes at
        # the inradius R / 2, outward normals pointing down, up-right and up-left.
        r, c30 = REACH, np.cos(np.pi / 6)
        return (v >= -r / 2) & (u * c30 + v * 0.5 <= r / 2) & (-u * c30 + v * 0.5 <= r / 2)
    if shape == "diamond":
        # Taller than wide, so that it is not a square turned by 45 degrees.
        return np.abs(u) / 0.8 + np.abs(v) / REACH <= 1.0
    if shape == "cross":
        arm = 0.33
        au, av = np.abs(u), np.abs(v)
        return ((au <= arm) & (av <= 1.0)) | ((av <= arm) & (au <= 1.0))
    if shape == "star":
        rho = np.hypot(u, v)
        theta = np.arctan2(u, v)  # 0 = straight up, so one point is at the top
        spacing = 2 * np.pi / _STAR_POINTS
        a = np.abs(np.mod(theta + spacing / 2, spacing) - spacing / 2)  # angle to the nearest tip
        return rho * (np.cos(a) * _STAR_NORMAL[0] + np.sin(a) * _STAR_NORMAL[1]) <= _STAR_OFFSET
    raise ValueError(f"shape_mask: shape must be one of {sorted(SHAPES)}, got {shape!r}")


@functools.lru_cache(maxsize=8)
def _interp_matrix(size: int, coarse: int) -> np.ndarray:
    # (size, coarse) linear-interpolation weights from a coarse grid to pixel centres.
    pos = (np.arange(size) + 0.5) / size * (coarse - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, coarse - 2)
    frac = pos - lo
    w = np.zeros((size, coarse), dtype=np.float32)
    w[np.arange(size), lo] = 1.0 - frac
    w[np.arange(size), lo + 1] = frac
    return w


def _backgrounds(scenes: Sequence[Scene], size: int) -> np.ndarray:
    """``(n, 3, size, size)`` float32 backgrounds (a pure function of the scenes)."""
    bgs = [s.background for s in scenes]
    n = len(bgs)
    f = np.array([b.frequency for b in bgs], dtype=np.float32)[:, None, None] * np.float32(
        2 * np.pi
    )
    angle = np.array([b.angle for b in bgs], dtype=np.float32)[:, None, None]
    phase = np.array([b.phase for b in bgs], dtype=np.float32)[:, None, None]
    texture = np.array([b.texture for b in bgs])
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = coords[None, None, :], coords[None, :, None]
    pattern = np.empty((n, size, size), dtype=np.float32)
    for name in ("striped", "dotted", "checkered", "plain"):
        k = np.flatnonzero(texture == name)
        if len(k) == 0:
            continue
        fk, ak, pk = f[k], angle[k], phase[k]
        if name == "striped":
            pattern[k] = np.sin(fk * (x * np.cos(ak) + y * np.sin(ak)) + pk)
        elif name == "dotted":
            s = np.sin(fk * x + pk) * np.sin(fk * y + pk)
            pattern[k] = np.where(s > 0.6, 1.0, -0.25)
        elif name == "checkered":
            pattern[k] = np.sign(np.sin(0.5 * fk * x + pk) * np.sin(0.5 * fk * y + pk))
        else:  # smooth blotches from the scene's own seed
            coarse = np.stack(
                [
                    np.random.default_rng(bgs[i].seed).standard_normal(
                        (_BLOTCH_GRID, _BLOTCH_GRID), dtype=np.float32
                    )
                    for i in k
                ]
            )
            w = _interp_matrix(size, _BLOTCH_GRID)
            pattern[k] = w @ coarse @ w.T
    rgb = np.array([b.rgb for b in bgs], dtype=np.float32)[:, :, None, None]
    contrast = np.array([b.contrast for b in bgs], dtype=np.float32)[:, None, None, None]
    return rgb + contrast * pattern[:, None]


def _draw_objects(canvas: np.ndarray, scenes: Sequence[Scene]) -> None:
    """Draw every object into ``canvas`` (``(n, 3, S, S)``, in place)."""
    size = canvas.shape[-1]
    rows = [(i, o) for i, s in enumerate(scenes) for o in s.objects]
    if not rows:
        return
    image = np.array([i for i, _ in rows])
    shape = np.array([o.shape for _, o in rows])
    size_class = np.array([o.size for _, o in rows])
    cx = np.array([o.center[0] for _, o in rows]) * size
    cy = np.array([o.center[1] for _, o in rows]) * size
    r = np.array([o.radius for _, o in rows]) * size
    rgb = np.array([o.rgb for _, o in rows], dtype=np.float32)
    ss = _SUPERSAMPLE
    for sh in SHAPES:
        for sz in SIZES:
            k = np.flatnonzero((shape == sh) & (size_class == sz))
            if len(k) == 0:
                continue
            # One window side for the group, wide enough for its largest object; the
            # window is moved inside the image, which the shape never leaves.
            side = min(int(np.ceil(2 * REACH * r[k].max())) + 2, size)
            x0 = np.clip(np.floor(cx[k] - side / 2).astype(int), 0, size - side)
            y0 = np.clip(np.floor(cy[k] - side / 2).astype(int), 0, size - side)
            sub = (np.arange(side * ss) + 0.5) / ss
            u = (x0[:, None] + sub[None, :] - cx[k, None]) / r[k, None]
            v = (cy[k, None] - (y0[:, None] + sub[None, :])) / r[k, None]
            inside = shape_mask(sh, u[:, None, :], v[:, :, None])
            alpha = inside.reshape(len(k), side, ss, side, ss).mean(axis=(2, 4), dtype=np.float32)
            # Shapes never overlap (each stays in its own grid cell), so drawing them one
            # after the other is exact whatever the order.
            for j, idx in enumerate(k):
                win = canvas[image[idx], :, y0[j] : y0[j] + side, x0[j] : x0[j] + side]
                win += alpha[j] * (rgb[idx][:, None, None] - win)


def render(
    scenes: Sequence[Scene], rng: np.random.Generator, image_size: int = 64, noise: float = 0.1
) -> np.ndarray:
    """Draw scenes as RGB images.

    Args:
        scenes: the scenes.
        rng: the random generator of the pixel noise (consumed).
        image_size: side ``S`` of the square images.
        noise: pixel noise level: zero-mean uniform noise of standard deviation
            ``noise * PIXEL_NOISE_SCALE`` in ``[0, 1]`` units.

    Returns:
        ``(n, 3, S, S)`` uint8 RGB.

    Example:
        >>> import random
        >>> from imtm.data.synthetic.scenes import sample_scene
        >>> scenes = [sample_scene(random.Random(k)) for k in range(2)]
        >>> render(scenes, np.random.default_rng(0), image_size=32).shape
        (2, 3, 32, 32)
    """
    n = len(scenes)
    out = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    half = np.float32(noise * PIXEL_NOISE_SCALE * 255.0 * _UNIFORM_HALF_WIDTH)
    for start in range(0, n, _CHUNK):
        part = scenes[start : start + _CHUNK]
        img = _backgrounds(part, image_size)
        _draw_objects(img, part)
        img *= np.float32(255.0)
        if noise > 0:
            u = rng.random(img.shape, dtype=np.float32)
            u *= 2 * half
            img += u
            img -= half
        # + 0.5 then truncation by the uint8 cast rounds to the nearest level.
        img += np.float32(0.5)
        np.clip(img, 0, 255, out=img)
        out[start : start + len(part)] = img
    return out


def render_scene(
    scene: Scene, rng: np.random.Generator, image_size: int = 64, noise: float = 0.1
) -> np.ndarray:
    """Draw one scene: ``(3, S, S)`` uint8 (see :func:`render`)."""
    return render([scene], rng, image_size, noise)[0]
