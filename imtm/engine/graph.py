"""The pipeline plan: which block reads what, which modality each value depends on.

Every value is traced back to the raw batch: ``images`` depend on the image side,
``texts`` and ``image_ids`` on the caption side, ``positives`` on both. A block
whose inputs depend on one side only is *single-modality*: during evaluation it
runs once per image (or per caption) and its outputs are cached. A block whose
inputs depend on both sides is *pairwise*: it runs on blocks of images x
captions. Losses run only in training.

The first design split the list at the first pairwise block; tracing each value is the
same split for the usual ordering and also accepts a single-modality block placed
after a scorer (for example a lexicon head that only a loss reads). See
``docs/design.md`` ("How a Matcher runs the blocks"). The side of each batch value comes
from the vocabulary of :mod:`imtm.contract`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from imtm.component import COMPONENT_REGISTRY, Component, Loss
from imtm.contract import side_of

__all__ = ["Plan", "PipelineError", "BATCH_VALUES", "SCORE_VALUES", "build_plan", "name_components"]

IMAGE, TEXT = "image", "text"

#: Values a batch provides, and the sides each depends on (from their value specs).
BATCH_VALUES: dict[str, frozenset] = {
    name: side_of(name) for name in ("images", "texts", "image_ids", "positives")
}

#: The score values evaluation ranks with: one shared matrix, or one per direction.
SCORE_VALUES = ("scores", "scores_i2t", "scores_t2i")


class PipelineError(ValueError):
    """A component list whose requirements cannot be met, or that cannot be evaluated."""


def name_components(components: Sequence[Any]) -> list[tuple[str, Component]]:
    """Names for the blocks: given ``(name, block)`` pairs kept, others named like ``make_pipeline``.

    Repeated automatic names get ``-1``, ``-2``, ... suffixes on every repeat.
    """
    if isinstance(components, (str, bytes)) or not hasattr(components, "__iter__"):
        raise TypeError(
            f"Matcher: components must be a list of blocks, got {type(components).__name__}"
        )
    items: list[tuple[str | None, Any]] = []
    for k, c in enumerate(components):
        if isinstance(c, tuple):
            if len(c) != 2 or not isinstance(c[0], str):
                raise TypeError(
                    f"Matcher: component {k} must be a block or a (name, block) pair, got {c!r}"
                )
            items.append((c[0], c[1]))
        else:
            items.append((None, c))
    for k, (name, block) in enumerate(items):
        if not isinstance(block, Component):
            raise TypeError(
                f"Matcher: component {k} is a {type(block).__name__}, not an imtm.Component; "
                "wrap custom nn.Modules in a Component subclass that declares requires/provides"
            )
        if name is not None and ("__" in name or not name):
            raise ValueError(
                f"Matcher: component name {name!r} must be non-empty and must not contain '__'"
            )
        if name is not None and ("." in name or hasattr(torch.nn.ModuleDict(), name)):
            # The fitted blocks live in a ModuleDict: its keys name parameters ("a.b" would be ambiguous)
            # and must not shadow its attributes ("training", "forward", "parameters"...).
            raise ValueError(
                f"Matcher: component name {name!r} (component {k}) cannot name a block: "
                + ("it contains '.'" if "." in name else "it is an attribute of torch.nn.Module")
                + "; choose another name"
            )
    auto = [block.name_hint for name, block in items if name is None]
    counts = {n: auto.count(n) for n in auto}
    seen: dict[str, int] = {}
    named: list[tuple[str, Component]] = []
    for name, block in items:
        if name is None:
            base = block.name_hint
            if counts[base] > 1:
                seen[base] = seen.get(base, 0) + 1
                name = f"{base}-{seen[base]}"
            else:
                name = base
        named.append((name, block))
    names = [n for n, _ in named]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"Matcher: component names must be unique, got repeated {dupes}")
    return named


@dataclass
class Plan:
    """The analysed pipeline."""

    names: list[str]
    blocks: list[Component]
    sides: dict[str, frozenset] = field(default_factory=dict)  # value -> sides it depends on
    block_sides: list[frozenset] = field(default_factory=list)
    producers: dict[str, int] = field(
        default_factory=dict
    )  # value -> index of the last block providing it
    score_values: tuple[str, ...] = ()

    def is_loss(self, k: int) -> bool:
        return isinstance(self.blocks[k], Loss)

    def losses(self) -> list[int]:
        return [k for k in range(len(self.blocks)) if self.is_loss(k)]

    def needed_for(self, targets: Sequence[str], *, exclude_losses: bool = False) -> list[int]:
        """Indices of the blocks needed to compute ``targets`` (values or loss block names), in order."""
        needed: set[int] = set()
        stack: list[tuple[str, int]] = []
        for t in targets:
            if t in self.names:
                stack.append(("block", self.names.index(t)))
            elif t in self.producers:
                stack.append(("block", self.producers[t]))
        while stack:
            _, k = stack.pop()
            if k in needed:
                continue
            needed.add(k)
            for r in self.blocks[k].requires:
                # the producer of r *before* block k
                prod = self._producer_before(r, k)
                if prod is not None:
                    stack.append(("block", prod))
        out = sorted(needed)
        if exclude_losses:
            out = [k for k in out if not self.is_loss(k)]
        return out

    def _producer_before(self, value: str, k: int) -> int | None:
        for j in range(k - 1, -1, -1):
            if value in self.blocks[j].provides:
                return j
        return None

    def split(self, indices: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        """Partition block indices into (image-side, text-side, pairwise)."""
        img, txt, pair = [], [], []
        for k in indices:
            s = self.block_sides[k]
            if s == frozenset({IMAGE}):
                img.append(k)
            elif s == frozenset({TEXT}):
                txt.append(k)
            else:
                pair.append(k)
        return img, txt, pair


def build_plan(named: list[tuple[str, Component]]) -> Plan:
    """Check every requirement is met and trace the sides of every value.

    Raises:
        PipelineError: naming the block, its position, the missing value, and
            the blocks that could provide it.
    """
    names = [n for n, _ in named]
    blocks = [b for _, b in named]
    if not blocks:
        raise PipelineError("Matcher: the component list is empty")
    sides: dict[str, frozenset] = dict(BATCH_VALUES)
    producers: dict[str, int] = {}
    block_sides: list[frozenset] = []
    for k, (name, block) in enumerate(named):
        req = tuple(block.requires)
        prov = tuple(block.provides)
        if isinstance(req, str) or isinstance(prov, str):
            raise PipelineError(
                f"Matcher: block {name!r} (position {k}, {type(block).__name__}): requires/provides must be "
                f"tuples of names, got requires={req!r}, provides={prov!r}"
            )
        if not req:
            raise PipelineError(
                f"Matcher: block {name!r} (position {k}, {type(block).__name__}) requires nothing; "
                "every block must read at least one value"
            )
        for value in req:
            if value not in sides:
                later = [
                    f"{names[j]!r} (position {j})"
                    for j in range(k + 1, len(blocks))
                    if value in blocks[j].provides
                ]
                classes = sorted(
                    c.__name__
                    for c in set(COMPONENT_REGISTRY.values())
                    if value in getattr(c, "provides", ()) and not c.__name__.startswith("_")
                )
                hint = []
                if later:
                    hint.append(
                        f"later blocks provide it: {', '.join(later)}; move one before position {k}"
                    )
                if classes:
                    hint.append(f"blocks that provide it: {', '.join(classes)}")
                known = sorted(sides)
                raise PipelineError(
                    f"Matcher: block {name!r} (position {k}, {type(block).__name__}) requires {value!r}, "
                    f"which neither the batch nor an earlier block provides (available: {known})."
                    + (" " + "; ".join(hint) + "." if hint else " No known block provides it.")
                )
        s = frozenset().union(*(sides[v] for v in req))
        block_sides.append(s)
        if isinstance(block, Loss):
            continue
        for value in prov:
            sides[value] = s
            producers[value] = k
    # Blocks that name another block (a tied embedding, a shared encoder) resolve it now, on the
    # blocks this plan runs: after clone, get_config / from_config and load alike.
    by_name = dict(named)
    for k, (name, block) in enumerate(named):
        try:
            block.link(by_name)
        except (KeyError, TypeError, ValueError) as err:
            raise PipelineError(
                f"Matcher: block {name!r} (position {k}, {type(block).__name__}): {err}"
            ) from err
    if "scores" in producers:
        score_values: tuple[str, ...] = ("scores",)
    elif "scores_i2t" in producers and "scores_t2i" in producers:
        score_values = ("scores_i2t", "scores_t2i")
    else:
        score_values = ()
    return Plan(names, blocks, sides, block_sides, producers, score_values)
