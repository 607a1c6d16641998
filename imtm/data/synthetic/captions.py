"""Captions of synthetic scenes: templates, synonyms, counts and spatial relations.

Each caption names a random subset of a scene's objects, so a caption sees only part
of its image and several captions of one image differ in what they mention. Colour
always stays bound to its shape in the sentence ("a red circle left of a blue square"),
which a bag of words loses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

from imtm.data.synthetic._random import permutation as _permutation
from imtm.data.synthetic._random import pick as _pick
from imtm.data.synthetic.scenes import GRID, Scene, SceneObject

__all__ = [
    "COLOUR_WORDS",
    "SHAPE_WORDS",
    "Caption",
    "choose_mentions",
    "compose_caption",
    "describe",
]

# Every table lists the plain word first, then its synonyms.
COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald"),
    "blue": ("blue", "azure"),
    "yellow": ("yellow", "golden"),
    "purple": ("purple", "violet"),
    "orange": ("orange", "amber"),
    "white": ("white", "ivory"),
    "black": ("black", "ebony"),
}
#: (singular, plural) forms of each shape's names.
SHAPE_WORDS = {
    "circle": (("circle", "circles"), ("disk", "disks"), ("disc", "discs")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"),),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "star": (("star", "stars"),),
}
SIZE_WORDS = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium sized", "mid sized"),
    "large": ("large", "big", "huge"),
}
TEXTURE_WORDS = {
    "plain": ("plain", "grainy"),
    "striped": ("striped", "stripy"),
    "dotted": ("dotted", "spotted"),
    "checkered": ("checkered", "chequered"),
}
TINT_WORDS = {
    "grey": ("grey", "gray"),
    "sand": ("sand coloured", "beige"),
    "slate": ("slate", "bluish"),
}
# Absolute position of a grid cell (row, col) on the 3 x 3 board.
POSITION_WORDS = {
    (0, 0): ("in the top left corner", "at the top left", "in the upper left"),
    (0, 1): ("at the top", "at the top centre", "along the top"),
    (0, 2): ("in the top right corner", "at the top right", "in the upper right"),
    (1, 0): ("on the left", "at the left side", "on the left side"),
    (1, 1): ("in the centre", "in the middle", "at the center"),
    (1, 2): ("on the right", "at the right side", "on the right side"),
    (2, 0): ("in the bottom left corner", "at the bottom left", "in the lower left"),
    (2, 1): ("at the bottom", "at the bottom centre", "along the bottom"),
    (2, 2): ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
assert GRID == 3, "POSITION_WORDS names the cells of a 3 x 3 board"
RELATION_WORDS = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
    "near": ("next to", "beside", "near"),
}
COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THING_WORDS = (("shape", "shapes"), ("object", "objects"), ("item", "items"))
LIST_FRAMES = (
    "{}",
    "{}",
    "there {be} {}",
    "a picture of {}",
    "an image with {}",
    "a scene with {}",
    "we can see {}",
    "{} in the picture",
    "a photo showing {}",
)
RELATION_FRAMES = (
    "{a} {rel} {b}",
    "{a} {rel} {b}",
    "{the_a} is {rel} {b}",
    "there is {a} {rel} {b}",
)

# How many objects one caption names, with weights: mostly two or three, so that
# most captions pair at least two colour-shape bindings.
MENTION_COUNTS = ((1, 0.15), (2, 0.50), (3, 0.35))
# Chance of the plain word rather than one of its synonyms.
PLAIN_WORD_PROB = 0.6
SIZE_PROB = 0.4  # name the size of a singled-out object
POSITION_PROB = 0.25  # name the absolute position of a singled-out object
RELATION_PROB = 0.45  # two singled-out objects: relate them rather than list them
GROUP_PROB = 0.5  # an object with same-colour same-shape copies: count them all ("two red circles")
COLOUR_AFTER_PROB = 0.08  # "a square in red" rather than "a red square"
COUNT_CLAUSE_PROB = 0.25  # "four shapes including ..."
BACKGROUND_PROB = 0.15  # "... on a striped grey background"
CAPITAL_PROB = 0.15
PERIOD_PROB = 0.7  # end with " ."
# Twin scenes: how many captions name both swapped objects (the rest name at least one).
FOCUS_BOTH = 2
# Draws of a caption's subset before accepting one that an earlier caption already used.
_SUBSET_TRIES = 4


class Caption(NamedTuple):
    """A caption and the indices (into ``scene.objects``) of the objects it names."""

    text: str
    mentions: tuple[int, ...]


def _word(rng, options: Sequence):
    if len(options) == 1 or rng.random() < PLAIN_WORD_PROB:
        return options[0]
    return _pick(rng, options[1:])


def _weighted(rng, table):
    u, acc = rng.random() * sum(w for _, w in table), 0.0
    for value, w in table:
        acc += w
        if u < acc:
            return value
    return table[-1][0]


def _article(next_word: str) -> str:
    # Every colour, size and shape word that starts with a vowel letter takes "an"
    # ("an orange", "an ivory", "an emerald"); none starts with a vowel sound otherwise.
    return "an" if next_word[0] in "aeiou" else "a"


def _object_phrase(rng, o: SceneObject, *, definite: bool, position_prob: float) -> str:
    size = _word(rng, SIZE_WORDS[o.size]) + " " if rng.random() < SIZE_PROB else ""
    colour = _word(rng, COLOUR_WORDS[o.colour])
    shape = _word(rng, SHAPE_WORDS[o.shape])[0]
    body = (
        f"{size}{shape} in {colour}"
        if rng.random() < COLOUR_AFTER_PROB
        else f"{size}{colour} {shape}"
    )
    det = "the" if definite else _article(body)
    phrase = f"{det} {body}"
    if rng.random() < position_prob:
        phrase += " " + _word(rng, POSITION_WORDS[o.cell])
    return phrase


def _group_phrase(rng, objs: Sequence[SceneObject]) -> str:
    o = objs[0]
    colour = _word(rng, COLOUR_WORDS[o.colour])
    shapes = _word(rng, SHAPE_WORDS[o.shape])[1]
    sizes = {x.size for x in objs}
    size = (
        _word(rng, SIZE_WORDS[o.size]) + " " if len(sizes) == 1 and rng.random() < SIZE_PROB else ""
    )
    if len(objs) == 2 and rng.random() < 0.2:
        return f"a pair of {size}{colour} {shapes}"
    return f"{COUNT_WORDS[len(objs)]} {size}{colour} {shapes}"


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _relations(a: SceneObject, b: SceneObject) -> list[str]:
    """The relations that hold of ``a`` with respect to ``b`` (row 0 is the top)."""
    (ra, ca), (rb, cb) = a.cell, b.cell
    out = []
    if ca < cb:
        out.append("left")
    if ca > cb:
        out.append("right")
    if ra < rb:
        out.append("above")
    if ra > rb:
        out.append("below")
    if max(abs(ra - rb), abs(ca - cb)) == 1:
        out.append("near")
    return out


def _things(rng, n: int, *, other: bool = False) -> str:
    singular, plural = _pick(rng, THING_WORDS)
    return f"{COUNT_WORDS[n]} {'other ' if other else ''}{singular if n == 1 else plural}"


def compose_caption(scene: Scene, rng: random.Random, subset: Sequence[int]) -> Caption:
    """One caption that names the objects ``subset`` of ``scene`` (at least one).

    An object whose colour and shape repeat in the scene may be counted together
    with its copies ("two red circles"); two singled-out objects may be related
    ("a red circle left of a blue square"), otherwise the objects are listed.

    Args:
        scene: the scene.
        rng: the random generator (consumed).
        subset: indices into ``scene.objects``.

    Returns:
        a :class:`Caption` whose ``mentions`` hold ``subset`` plus any counted copies.
    """
    objs = scene.objects
    if len(subset) == 0:
        raise ValueError("compose_caption: the subset of objects to name is empty")
    order = [subset[k] for k in _permutation(rng, len(subset))]
    counts: dict[tuple[str, str], int] = {}  # a plain dict: Counter is slow to build
    for o in objs:
        counts[o.binding] = counts.get(o.binding, 0) + 1
    groups: list[list[int]] = []
    seen: set[int] = set()
    for i in order:
        if i in seen:
            continue
        key = objs[i].binding
        if counts[key] > 1 and rng.random() < GROUP_PROB:
            group = [j for j in range(len(objs)) if objs[j].binding == key]
        else:
            group = [i]
        seen.update(group)
        groups.append(group)
    mentions = tuple(sorted(seen))

    if len(groups) == 2 and len(groups[0]) == len(groups[1]) == 1 and rng.random() < RELATION_PROB:
        a, b = objs[groups[0][0]], objs[groups[1][0]]
        rel = _word(rng, RELATION_WORDS[_pick(rng, _relations(a, b))])
        frame = _pick(rng, RELATION_FRAMES)
        if "{the_a}" in frame and counts[a.binding] > 1:
            frame = RELATION_FRAMES[0]  # "the red circle" must pick out one object
        pos = POSITION_PROB / 3  # relations already place the objects
        text = frame.format(
            a=_object_phrase(rng, a, definite=False, position_prob=pos) if "{a}" in frame else "",
            the_a=_object_phrase(rng, a, definite=True, position_prob=0.0)
            if "{the_a}" in frame
            else "",
            rel=rel,
            b=_object_phrase(rng, b, definite=False, position_prob=pos),
        )
    else:
        phrases = [
            _object_phrase(rng, objs[g[0]], definite=False, position_prob=POSITION_PROB)
            if len(g) == 1
            else _group_phrase(rng, [objs[j] for j in g])
            for g in groups
        ]
        listing = _join(phrases)
        n_other = len(objs) - len(mentions)
        if rng.random() < COUNT_CLAUSE_PROB:
            if n_other > 0 and rng.random() < 0.5:
                text = f"{listing} and {_things(rng, n_other, other=True)}"
            else:
                text = f"{_things(rng, len(objs))} including {listing}"
        else:
            be = "are" if len(groups) > 1 or len(groups[0]) > 1 else "is"
            text = _pick(rng, LIST_FRAMES).replace("{be}", be).format(listing)
    if rng.random() < BACKGROUND_PROB:
        bg = scene.background
        texture, tint = _word(rng, TEXTURE_WORDS[bg.texture]), _word(rng, TINT_WORDS[bg.tint])
        text += _pick(
            rng,
            (
                f" on a {texture} {tint} background",
                f" on a {texture} background",
                f" against a {tint} background",
            ),
        )
    if rng.random() < CAPITAL_PROB:
        text = text[0].upper() + text[1:]
    if rng.random() < PERIOD_PROB:
        text += " ."
    return Caption(text, mentions)


def choose_mentions(
    scene: Scene, rng: random.Random, n: int, focus: Sequence[int] = ()
) -> list[tuple[int, ...]]:
    """Which objects each of ``n`` captions names.

    Subset sizes follow :data:`MENTION_COUNTS`; a subset already used by an earlier
    caption is redrawn (with any size) a few times, so the captions of one image differ. With
    ``focus = (a, b)`` (the swapped pair of a binding twin), :data:`FOCUS_BOTH`
    captions name both and every other caption names at least one of them.
    """
    n_obj = len(scene.objects)
    focus = tuple(int(f) for f in focus)
    if focus and (len(focus) != 2 or not all(0 <= f < n_obj for f in focus)):
        raise ValueError(
            f"choose_mentions: focus must be two object indices in [0, {n_obj}), got {focus}"
        )
    out: list[tuple[int, ...]] = []
    used: set[tuple[int, ...]] = set()
    for j in range(n):
        for attempt in range(_SUBSET_TRIES):
            # A redraw takes any size, so that small scenes still get different subsets.
            k = (
                min(_weighted(rng, MENTION_COUNTS), n_obj)
                if attempt == 0
                else 1 + int(rng.random() * n_obj)
            )
            if focus:
                must = list(focus) if j < FOCUS_BOTH else [focus[int(rng.random() * 2)]]
                pool = [i for i in range(n_obj) if i not in must]
                extra = _permutation(rng, len(pool))[: max(k - len(must), 0)]
                subset = tuple(sorted(must + [pool[e] for e in extra]))
            else:
                subset = tuple(sorted(_permutation(rng, n_obj)[:k]))
            if subset not in used:
                break
        used.add(subset)
        out.append(subset)
    # The focus captions come first above; shuffle so their place says nothing.
    return [out[k] for k in _permutation(rng, n)]


def describe(
    scene: Scene, rng: random.Random, n: int = 5, *, focus: Sequence[int] = ()
) -> list[Caption]:
    """``n`` captions of ``scene``, each naming a different random subset of its objects.

    Args:
        scene: the scene to describe.
        rng: the random generator (consumed).
        n: how many captions.
        focus: for a binding twin, the two swapped object indices that the captions
            must name (see :func:`choose_mentions`).

    Returns:
        ``n`` :class:`Caption` (text and mentioned object indices).

    Example:
        >>> from imtm.data.synthetic.scenes import sample_scene
        >>> rng = random.Random(0)
        >>> caps = describe(sample_scene(rng), rng, n=5)
        >>> len(caps), all(c.text.strip() for c in caps)
        (5, True)
    """
    return [compose_caption(scene, rng, s) for s in choose_mentions(scene, rng, n, focus)]
