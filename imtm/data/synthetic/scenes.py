"""Structured scenes of the synthetic benchmark: objects on a coarse grid over a textured background.

A scene is pure data (frozen dataclasses of Python scalars), shared by both views:
the pixel renderer draws it, the region featurizer encodes it, the caption grammar
describes it.

Scenes and captions draw only scalars, so they take a :class:`random.Random` (any
object whose ``random()`` returns floats in ``[0, 1)`` works, a numpy Generator too).
They use nothing but ``random()``, the one method whose stream Python guarantees
across versions, so a seed gives the same scenes on every Python.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, replace

from imtm.data.synthetic._random import permutation as _permutation
from imtm.data.synthetic._random import pick as _pick

__all__ = [
    "COLOURS",
    "COLOUR_RGB",
    "GRID",
    "REACH",
    "SHAPES",
    "SIZES",
    "SIZE_RADIUS",
    "TEXTURES",
    "TINTS",
    "TINT_RGB",
    "Background",
    "Scene",
    "SceneObject",
    "sample_scene",
    "swap_colours",
]

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SIZES = ("small", "medium", "large")
TEXTURES = ("plain", "striped", "dotted", "checkered")
TINTS = ("grey", "sand", "slate")

#: The scene is a GRID x GRID board; each object owns one cell, so objects never overlap.
GRID = 3

#: Reference colour of each colour name, RGB in [0, 1]; every object jitters around it.
COLOUR_RGB = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.13, 0.66, 0.22),
    "blue": (0.15, 0.30, 0.88),
    "yellow": (0.93, 0.86, 0.14),
    "purple": (0.56, 0.18, 0.72),
    "orange": (0.97, 0.55, 0.07),
    "white": (0.97, 0.97, 0.97),
    "black": (0.06, 0.06, 0.06),
}

#: Background tints: muted mid-tones, so that every object colour (white and black
#: included) stands out against them.
TINT_RGB = {
    "grey": (0.50, 0.50, 0.50),
    "sand": (0.60, 0.55, 0.43),
    "slate": (0.40, 0.46, 0.55),
}

#: Object radius as a fraction of the cell side (half the cell is the largest that fits).
SIZE_RADIUS = {"small": 0.20, "medium": 0.30, "large": 0.42}

#: Every shape fits in a square of half-side REACH * radius around its centre (the
#: triangle's apex and the star's points reach 1.1 radii).
REACH = 1.1
# Relative spread of the radius around its size class: small enough that the three
# classes never overlap (0.20 * 1.08 < 0.30 * 0.92), and REACH * 0.42 * 1.08 < 0.5,
# so that a shape always stays inside its own cell and objects never overlap.
_RADIUS_JITTER = 0.08
# Each RGB channel of an object spreads uniformly this far around the reference colour.
_COLOUR_JITTER = 0.08
# Share of the free room in a cell that an object's centre may wander.
_POSITION_JITTER = 0.6
# Chance that a new object copies the colour and shape of an earlier one, so that
# counts ("two red circles") occur in captions.
DUPLICATE_PROB = 0.2


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    Attributes:
        shape, colour, size: attribute names from :data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`.
        cell: ``(row, col)`` on the grid, row 0 at the top, col 0 on the left.
        center: ``(x, y)`` of the centre in image units, both in ``[0, 1]`` (y points down).
        radius: in image units (a fraction of the image side).
        rgb: the object's actual colour, in ``[0, 1]``.
    """

    shape: str
    colour: str
    size: str
    cell: tuple[int, int]
    center: tuple[float, float]
    radius: float
    rgb: tuple[float, float, float]

    def box(self, image_size: float = 1.0) -> tuple[float, float, float, float]:
        """Bounding box ``(x0, y0, x1, y1)`` in pixels of an ``image_size`` image
        (in image units with the default 1): the square of half-side ``REACH * radius``."""
        cx, cy = self.center[0] * image_size, self.center[1] * image_size
        r = REACH * self.radius * image_size
        return (cx - r, cy - r, cx + r, cy + r)

    @property
    def binding(self) -> tuple[str, str]:
        """``(colour, shape)``: the pair that a bag of words cannot bind."""
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Background:
    """A textured background.

    Attributes:
        texture: one of :data:`TEXTURES`.
        tint: one of :data:`TINTS`.
        rgb: the base colour actually used (the tint, jittered).
        contrast: amplitude of the texture pattern, in ``[0, 1]`` pixel units.
        frequency: pattern cycles across the image.
        angle: orientation of stripes, radians.
        phase: pattern phase, radians.
        seed: seed of the random blotches of the "plain" texture, so that the scene
            fixes its background.
    """

    texture: str
    tint: str
    rgb: tuple[float, float, float]
    contrast: float
    frequency: float
    angle: float
    phase: float
    seed: int


@dataclass(frozen=True)
class Scene:
    """Objects over a background.

    Example:
        >>> s = sample_scene(random.Random(0))
        >>> 2 <= len(s.objects) <= 5
        True
    """

    objects: tuple[SceneObject, ...]
    background: Background

    def signature(self) -> tuple:
        """The discrete content (attributes and cells of every object, background
        texture and tint); two scenes with equal signatures are the same scene up to jitter."""
        objs = tuple(sorted((o.cell, o.shape, o.colour, o.size) for o in self.objects))
        return (objs, self.background.texture, self.background.tint)

    def bindings(self) -> Counter:
        """Multiset of ``(colour, shape)`` pairs."""
        return Counter(o.binding for o in self.objects)

    def bag_of_attributes(self) -> tuple[Counter, Counter]:
        """Multisets of colours and of shapes, with the binding between them forgotten."""
        return Counter(o.colour for o in self.objects), Counter(o.shape for o in self.objects)


def _uniform(rng, lo: float, hi: float) -> float:
    return lo + (hi - lo) * rng.random()


def _sample_object(rng, shape, colour, cell) -> SceneObject:
    size = _pick(rng, SIZES)
    r_cell = SIZE_RADIUS[size] * (1.0 + _RADIUS_JITTER * (2.0 * rng.random() - 1.0))
    room = (0.5 - REACH * r_cell) * _POSITION_JITTER
    row, col = cell
    cx = (col + 0.5 + _uniform(rng, -room, room)) / GRID
    cy = (row + 0.5 + _uniform(rng, -room, room)) / GRID
    rgb = tuple(
        min(max(c + _uniform(rng, -_COLOUR_JITTER, _COLOUR_JITTER), 0.0), 1.0)
        for c in COLOUR_RGB[colour]
    )
    return SceneObject(
        shape=shape,
        colour=colour,
        size=size,
        cell=cell,
        center=(cx, cy),
        radius=r_cell / GRID,
        rgb=rgb,
    )


def _sample_background(rng) -> Background:
    tint = _pick(rng, TINTS)
    brightness = _uniform(rng, 0.9, 1.1)
    return Background(
        texture=_pick(rng, TEXTURES),
        tint=tint,
        rgb=tuple(min(c * brightness, 1.0) for c in TINT_RGB[tint]),
        contrast=_uniform(rng, 0.05, 0.11),
        frequency=_uniform(rng, 4.0, 10.0),
        angle=_uniform(rng, 0.0, math.pi),
        phase=_uniform(rng, 0.0, 2.0 * math.pi),
        seed=int(rng.random() * 2**31),
    )


def sample_scene(
    rng: random.Random,
    *,
    min_objects: int = 2,
    max_objects: int = 5,
    duplicate_prob: float = DUPLICATE_PROB,
) -> Scene:
    """Draw a random scene: ``min_objects``..``max_objects`` objects in distinct grid cells.

    Each object's shape and colour are uniform; with probability ``duplicate_prob`` an
    object repeats the shape and colour of an earlier one (in another size and cell).

    Args:
        rng: the random generator (consumed).
        min_objects, max_objects: bounds on the object count, at most ``GRID ** 2``.
        duplicate_prob: chance of repeating an earlier object's shape and colour.

    Returns:
        a :class:`Scene`.
    """
    if not 1 <= min_objects <= max_objects <= GRID * GRID:
        raise ValueError(
            f"sample_scene: need 1 <= min_objects <= max_objects <= {GRID * GRID}, "
            f"got min_objects={min_objects}, max_objects={max_objects}"
        )
    n = min_objects + int(rng.random() * (max_objects - min_objects + 1))
    cells = _permutation(rng, GRID * GRID)[:n]
    objects: list[SceneObject] = []
    for k, c in enumerate(cells):
        if k > 0 and rng.random() < duplicate_prob:
            source = _pick(rng, objects)
            shape, colour = source.shape, source.colour
        else:
            shape, colour = _pick(rng, SHAPES), _pick(rng, COLOURS)
        objects.append(_sample_object(rng, shape, colour, divmod(c, GRID)))
    return Scene(objects=tuple(objects), background=_sample_background(rng))


def swap_colours(scene: Scene, rng: random.Random) -> tuple[Scene, tuple[int, int]] | None:
    """The binding twin of ``scene``: two objects exchange their colours.

    The pair ``(a, b)`` is drawn among objects of different colour and different shape
    whose bindings are unique in the scene and whose swapped bindings are absent from
    it. The twin then has exactly the same bag of colours, shapes, sizes and positions,
    but every caption that names object ``a`` or ``b`` by colour and shape is true of
    one scene and false of the other: only a model that binds colour to shape tells
    them apart.

    Returns:
        ``(twin, (a, b))``, or ``None`` when no such pair exists.

    Example:
        >>> rng = random.Random(0)
        >>> s = sample_scene(rng, min_objects=4, max_objects=4)
        >>> twin, (a, b) = swap_colours(s, rng)
        >>> twin.bag_of_attributes() == s.bag_of_attributes(), twin.bindings() == s.bindings()
        (True, False)
    """
    objs = scene.objects
    counts = scene.bindings()
    pairs = []
    for a in range(len(objs)):
        for b in range(a + 1, len(objs)):
            oa, ob = objs[a], objs[b]
            if oa.colour == ob.colour or oa.shape == ob.shape:
                continue
            if counts[oa.binding] != 1 or counts[ob.binding] != 1:
                continue
            if counts[(ob.colour, oa.shape)] or counts[(oa.colour, ob.shape)]:
                continue
            pairs.append((a, b))
    if not pairs:
        return None
    a, b = _pick(rng, pairs)
    new = list(objs)
    new[a] = replace(objs[a], colour=objs[b].colour, rgb=objs[b].rgb)
    new[b] = replace(objs[b], colour=objs[a].colour, rgb=objs[a].rgb)
    return Scene(objects=tuple(new), background=scene.background), (a, b)
