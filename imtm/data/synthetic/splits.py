"""Train / dev / test splits of the synthetic benchmark, in either view."""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from imtm._checks import suggest
from imtm.data.base import ImageCaptionDataset
from imtm.data.synthetic._random import permutation as _permutation
from imtm.data.synthetic.captions import describe
from imtm.data.synthetic.pixels import render
from imtm.data.synthetic.regions import region_features
from imtm.data.synthetic.scenes import GRID, Scene, sample_scene, swap_colours
from imtm.data.vocabulary import Vocabulary

__all__ = [
    "PRETRAIN_SEED",
    "SPLITS",
    "VIEWS",
    "PixelImages",
    "SyntheticConfig",
    "SyntheticDataset",
    "load",
    "load_pretraining",
]

VIEWS = ("pixels", "regions")
#: Split names in the order they are generated: the test set first, so that it
#: depends on neither n_train nor n_dev, and later splits never repeat its scenes.
SPLITS = ("test", "dev", "train")
_SPLIT_STREAM = {"train": 0, "dev": 1, "test": 2, "pretrain": 3}
#: Seed of the pre-training split the packaged synthetic backbones were trained on.
PRETRAIN_SEED = 1000
# Independent random streams per split: scenes, captions, view (pixels or features).
_SCENES, _CAPTIONS, _VIEW = 0, 1, 2
# Redraws of a scene that repeats an earlier one before giving up (never reached in practice).
_MAX_REDRAWS = 1000
_MIN_IMAGE_SIZE = 24  # below this a small shape covers only a few pixels


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and difficulty of the synthetic benchmark (defaults: train a small model
    on 2 CPU cores in a minute or two).

    Attributes:
        n_train, n_dev, n_test: images per split.
        captions_per_image: captions per image.
        image_size: side of the pixel images; region boxes are given in this frame too.
        region_dim: region feature width ``D`` (regions view).
        num_background_regions: background regions per image (regions view).
        noise: nuisance level: pixel noise std ``noise * 0.5`` (in ``[0, 1]`` units);
            region feature noise std ``noise`` (the clean features have unit spread).
        min_objects, max_objects: objects per image (at most 9, the 3 x 3 grid).
        confusable_fraction: share of each split's images that come in binding-twin
            pairs (two objects' colours swapped; see :func:`swap_colours`).
    """

    n_train: int = 4000
    n_dev: int = 500
    n_test: int = 1000
    captions_per_image: int = 5
    image_size: int = 64
    region_dim: int = 128
    num_background_regions: int = 3
    noise: float = 0.1
    min_objects: int = 2
    max_objects: int = 5
    confusable_fraction: float = 0.5

    def validate(self) -> SyntheticConfig:
        """Raise ``ValueError`` / ``TypeError`` on an out-of-range setting; returns self."""
        for f in fields(self):
            value = getattr(self, f.name)
            want_int = f.type in ("int", int)
            if want_int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise TypeError(
                    f"synthetic.load: {f.name} must be an int, got {type(value).__name__} {value!r}"
                )
            if not want_int and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise TypeError(
                    f"synthetic.load: {f.name} must be a number, got {type(value).__name__} {value!r}"
                )
        for name in ("n_train", "n_dev", "n_test", "captions_per_image", "min_objects"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"synthetic.load: {name} must be at least 1, got {getattr(self, name)}"
                )
        if self.image_size < _MIN_IMAGE_SIZE:
            raise ValueError(
                f"synthetic.load: image_size must be at least {_MIN_IMAGE_SIZE}, got {self.image_size}"
            )
        if self.region_dim < 1:
            raise ValueError(
                f"synthetic.load: region_dim must be at least 1, got {self.region_dim}"
            )
        if self.num_background_regions < 0:
            raise ValueError(
                f"synthetic.load: num_background_regions must be >= 0, got {self.num_background_regions}"
            )
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(
                f"synthetic.load: noise must be a finite number >= 0, got {self.noise}"
            )
        if not self.min_objects <= self.max_objects <= GRID * GRID:
            raise ValueError(
                f"synthetic.load: need min_objects <= max_objects <= {GRID * GRID}, "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        if not 0.0 <= self.confusable_fraction <= 1.0:
            raise ValueError(
                f"synthetic.load: confusable_fraction must be in [0, 1], got {self.confusable_fraction}"
            )
        if self.confusable_fraction > 0 and self.max_objects < 2:
            raise ValueError(
                "synthetic.load: binding twins need max_objects >= 2 (or confusable_fraction=0)"
            )
        return self


class PixelImages(Sequence):
    """Images stored as ``uint8`` and handed out as float tensors in ``[0, 1]``.

    ``images[i]`` is a ``(3, H, W)`` float32 tensor; ``images[idx]`` with a slice,
    list or index tensor is a stacked ``(k, 3, H, W)`` float32 tensor. Storing bytes
    keeps the default train split at a quarter of the float size.

    Args:
        data: ``(n, 3, H, W)`` uint8 tensor.
    """

    def __init__(self, data: torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 4 or data.shape[1] != 3:
            raise ValueError(
                f"PixelImages: expected a (n, 3, H, W) uint8 tensor, got {data.dtype} {tuple(data.shape)}"
            )
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index):
        if isinstance(index, bool):
            raise TypeError(
                "PixelImages: index with an int, a slice, a list or a tensor of indices, not a bool"
            )
        if isinstance(index, numbers.Integral) or (
            isinstance(index, torch.Tensor) and index.dim() == 0
        ):
            index = int(index)
        return self.data[index].float().div_(255.0)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def __repr__(self) -> str:
        return f"PixelImages(n={len(self)}, size={tuple(self.data.shape[1:])}, dtype=uint8 -> float32 in [0, 1])"


class SyntheticDataset(ImageCaptionDataset):
    """One split of the synthetic benchmark: an :class:`~imtm.data.ImageCaptionDataset`
    that also keeps the structured scenes.

    Captions are stored image by image: captions ``k * c .. k * c + c - 1`` describe
    image ``k`` (``c = captions_per_image``).

    Attributes (beyond those of ImageCaptionDataset):
        scenes: ``list[Scene]``, one per image: objects with shape, colour, size,
            grid cell, centre, radius and colour; background texture and tint.
        caption_mentions: ``list[tuple[int, ...]]``, per caption the indices (into its
            scene's objects) of the objects it names.
        confusable_pairs: ``(P, 2)`` long, image index pairs of binding twins (same
            bag of colours and shapes, two colours swapped).
        boxes: per image, float32 boxes ``(x0, y0, x1, y1)`` in pixels of an
            ``image_size`` image: ``(n_objects, 4)`` in object order (pixels view) or
            ``(N_b, 4)`` in region order (regions view).
        region_objects: regions view: per image ``(N_b,)`` long, the object index of
            each region, ``-1`` for background regions; None in the pixels view.
        view, split, seed, config: how the split was made.
        captions_per_image, region_dim, image_size: read from ``config``
            (``region_dim`` is None in the pixels view).
    """

    def __init__(
        self,
        images,
        captions,
        caption_to_image,
        *,
        scenes: list[Scene],
        caption_mentions: list[tuple[int, ...]],
        confusable_pairs: torch.Tensor,
        boxes: list[torch.Tensor],
        region_objects: list[torch.Tensor] | None,
        view: str,
        split: str,
        seed: int,
        config: SyntheticConfig,
        vocab=None,
        name: str | None = None,
    ):
        super().__init__(
            images,
            captions,
            caption_to_image,
            vocab=vocab,
            name=name or f"synthetic-{view}-{split}",
        )
        self.scenes = scenes
        self.caption_mentions = caption_mentions
        self.confusable_pairs = confusable_pairs
        self.boxes = boxes
        self.region_objects = region_objects
        self.view = view
        self.split = split
        self.seed = seed
        self.config = config

    @property
    def captions_per_image(self) -> int:
        return self.config.captions_per_image

    @property
    def region_dim(self) -> int | None:
        """Width ``D`` of the region features (regions view); None in the pixels view."""
        return self.config.region_dim if self.view == "regions" else None

    @property
    def image_size(self) -> int:
        """Side of the pixel images, and the frame of :attr:`boxes` in both views."""
        return self.config.image_size

    def binding_accuracy(self, scores) -> float:
        """How often a score matrix prefers a twin image's own captions to its twin.

        For every caption of an image in :attr:`confusable_pairs`, compares its score
        with its own image against its score with the twin (the same scene with two
        colours swapped); ties count half. A bag-of-words model scores about 0.5, a
        model that binds colour to shape 1.0.

        Args:
            scores: ``(n_images, n_captions)`` similarities of this split, ``scores[i, t]``.

        Returns:
            the accuracy, in ``[0, 1]``.

        Example:
            >>> train, dev, test = load("regions", n_train=20, n_dev=4, n_test=8)
            >>> test.binding_accuracy(torch.zeros(test.n_images, test.n_captions))
            0.5
        """
        scores = torch.as_tensor(scores)
        if tuple(scores.shape) != (self.n_images, self.n_captions):
            raise ValueError(
                f"{self.name}: binding_accuracy expects scores of shape (n_images, n_captions) = "
                f"({self.n_images}, {self.n_captions}), got {tuple(scores.shape)}"
            )
        if len(self.confusable_pairs) == 0:
            raise ValueError(
                f"{self.name}: this split has no binding twins (confusable_fraction=0 or too few images)"
            )
        pairs = self.confusable_pairs.to(scores.device)
        image = torch.cat([pairs[:, 0], pairs[:, 1]])
        twin = torch.cat([pairs[:, 1], pairs[:, 0]])
        # Captions are stored image by image, captions_per_image each.
        c = self.captions_per_image
        caps = image[:, None] * c + torch.arange(c, device=scores.device)
        own, other = scores[image[:, None], caps], scores[twin[:, None], caps]
        return float(((own > other).double() + 0.5 * (own == other).double()).mean())


def _split_scenes(n: int, rng: random.Random, cfg: SyntheticConfig, seen: set):
    """``n`` scenes never seen before, ``confusable_fraction`` of them in twin pairs, shuffled.

    Returns the scenes, each scene's focus pair (``()`` for a single) and the twin pairs.
    """

    def fresh():
        for _ in range(_MAX_REDRAWS):
            s = sample_scene(rng, min_objects=cfg.min_objects, max_objects=cfg.max_objects)
            if s.signature() not in seen:
                return s
        raise RuntimeError(
            "synthetic: could not draw a new scene; raise max_objects or lower the split sizes"
        )

    scenes: list[Scene] = []
    focus: list[tuple[int, ...]] = []
    pairs: list[tuple[int, int]] = []
    n_pairs = int(cfg.confusable_fraction * n) // 2
    while len(pairs) < n_pairs:
        s = fresh()
        made = swap_colours(s, rng)
        if made is None or made[0].signature() in seen or made[0].signature() == s.signature():
            continue  # too few distinct objects to swap; draw another
        twin, ab = made
        seen.add(s.signature())
        seen.add(twin.signature())
        pairs.append((len(scenes), len(scenes) + 1))
        scenes += [s, twin]
        focus += [ab, ab]
    while len(scenes) < n:
        s = fresh()
        seen.add(s.signature())
        scenes.append(s)
        focus.append(())
    perm = _permutation(rng, n)  # twins must not sit side by side
    where = [0] * n
    for new, old in enumerate(perm):
        where[old] = new
    scenes = [scenes[p] for p in perm]
    focus = [focus[p] for p in perm]
    pairs_t = torch.as_tensor([[where[a], where[b]] for a, b in pairs], dtype=torch.long).reshape(
        -1, 2
    )
    return scenes, focus, pairs_t


def _seed(seed: int, split: str, stream: int) -> int:
    # Well-mixed, independent 128-bit seeds per (seed, split, stream).
    words = np.random.SeedSequence([seed, _SPLIT_STREAM[split], stream]).generate_state(4)
    return int.from_bytes(words.astype("<u4").tobytes(), "little")


def load(
    view: str = "regions",
    seed: int = 0,
    *,
    n_train: int = 4000,
    n_dev: int = 500,
    n_test: int = 1000,
    captions_per_image: int = 5,
    image_size: int = 64,
    region_dim: int = 128,
    num_background_regions: int = 3,
    noise: float = 0.1,
    min_objects: int = 2,
    max_objects: int = 5,
    confusable_fraction: float = 0.5,
) -> tuple[SyntheticDataset, SyntheticDataset, SyntheticDataset]:
    """Generate the synthetic image-caption benchmark: ``(train, dev, test)``.

    Each image holds 2-5 objects (shape, colour, size, cell of a 3 x 3 grid) over a
    textured background; each caption names a random subset of them, with synonyms,
    counts and spatial relations. Half of every split's images (``confusable_fraction``)
    come in binding-twin pairs that differ only by two objects exchanging colours,
    so a bag-of-words model confuses them and only colour-shape binding separates them.

    The same ``seed`` gives the same scenes and captions in both views, bit for bit;
    the splits never share a scene. Nothing is downloaded.

    Args:
        view: ``"regions"``: each image is a float32 tensor ``(N_b, D)`` of its real
            regions only (objects plus background boxes, in random order; collate pads
            and masks); ``"pixels"``: each image is a float32 tensor ``(3, H, W)`` in
            ``[0, 1]``, not normalised.
        seed: the benchmark's seed (the region feature map itself never changes).
        n_train, n_dev, n_test, captions_per_image, image_size, region_dim: see :class:`SyntheticConfig`.
        num_background_regions, noise, min_objects, max_objects, confusable_fraction: see
            :class:`SyntheticConfig`.

    Returns:
        three :class:`SyntheticDataset`; ``vocab`` is built from the train captions
        and the very same object is shared by dev and test.

    Example:
        >>> train, dev, test = load("regions", seed=0, n_train=20, n_dev=4, n_test=6)
        >>> test.n_images, test.n_captions, test.images[0].shape[1]
        (6, 30, 128)
        >>> dev.vocab is train.vocab
        True
    """
    if not isinstance(view, str) or view not in VIEWS:
        raise ValueError(
            f"synthetic.load: view must be one of {sorted(VIEWS)}, got {view!r}."
            + suggest(view, VIEWS)
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"synthetic.load: seed must be an int, got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"synthetic.load: seed must be a non-negative int, got {seed}")
    seed = int(seed)
    cfg = SyntheticConfig(
        n_train=n_train,
        n_dev=n_dev,
        n_test=n_test,
        captions_per_image=captions_per_image,
        image_size=image_size,
        region_dim=region_dim,
        num_background_regions=num_background_regions,
        noise=noise,
        min_objects=min_objects,
        max_objects=max_objects,
        confusable_fraction=confusable_fraction,
    ).validate()
    sizes = {"train": cfg.n_train, "dev": cfg.n_dev, "test": cfg.n_test}
    seen: set = set()
    made = {}
    for split in SPLITS:
        made[split] = _make_split(split, sizes[split], view, seed, cfg, seen)
    vocab = Vocabulary.build(made["train"].captions)
    for ds in made.values():
        ds.vocab = vocab
    return made["train"], made["dev"], made["test"]


def _make_split(
    split: str, n: int, view: str, seed: int, cfg: SyntheticConfig, seen: set
) -> SyntheticDataset:
    scenes, focus, pairs = _split_scenes(n, random.Random(_seed(seed, split, _SCENES)), cfg, seen)
    text_rng = random.Random(_seed(seed, split, _CAPTIONS))
    captions, mentions = [], []
    for s, f in zip(scenes, focus):
        for cap in describe(s, text_rng, cfg.captions_per_image, focus=f):
            captions.append(cap.text)
            mentions.append(cap.mentions)
    c2i = torch.arange(n).repeat_interleave(cfg.captions_per_image)
    view_rng = np.random.default_rng(_seed(seed, split, _VIEW))
    size = cfg.image_size
    if view == "pixels":
        images = PixelImages(torch.from_numpy(render(scenes, view_rng, size, cfg.noise)))
        boxes = [
            torch.tensor([o.box(size) for o in s.objects], dtype=torch.float32) for s in scenes
        ]
        region_objects = None
    else:
        feats, which, bxs = region_features(
            scenes,
            view_rng,
            region_dim=cfg.region_dim,
            num_background_regions=cfg.num_background_regions,
            noise=cfg.noise,
        )
        images = [torch.from_numpy(f) for f in feats]
        region_objects = [torch.from_numpy(w) for w in which]
        boxes = [torch.from_numpy(b * size).float() for b in bxs]
    return SyntheticDataset(
        images,
        captions,
        c2i,
        scenes=scenes,
        caption_mentions=mentions,
        confusable_pairs=pairs,
        boxes=boxes,
        region_objects=region_objects,
        view=view,
        split=split,
        seed=seed,
        config=cfg,
    )


def load_pretraining(
    n: int,
    seed: int = PRETRAIN_SEED,
    *,
    view: str = "pixels",
    exclude_seeds: Sequence[int] = (0, 1, 2),
    benchmark_sizes: dict | None = None,
    **config,
) -> SyntheticDataset:
    """A pre-training split: ``n`` scenes disjoint from the benchmark's train, dev and test splits.

    The scenes come from their own random stream (split ``"pretrain"``) and every scene
    whose signature (objects' cells, shapes, colours and sizes, background texture and
    tint) occurs in the train, dev or test split of the benchmark made with any of
    ``exclude_seeds`` at ``benchmark_sizes`` is redrawn, so a backbone pre-trained on this
    split has never seen a benchmark scene of those seeds. Captions are drawn as for the
    other splits; the vocabulary is built from this split's captions.

    Args:
        n: images of the split.
        seed: the split's seed (:data:`PRETRAIN_SEED`: the one of the packaged backbones).
        view: ``"pixels"`` or ``"regions"``.
        exclude_seeds: benchmark seeds whose scenes are kept out.
        benchmark_sizes: ``n_train``, ``n_dev``, ``n_test`` (and any other keyword of :func:`load`
            that changes the scenes) of the excluded benchmarks (``None``: those of
            ``imtm compare``: 1000, 20 and 200 images).
        **config: keywords of :class:`SyntheticConfig` for this split (``image_size``, ``noise``...).

    Returns:
        a :class:`SyntheticDataset` with ``split == "pretrain"``.

    Example:
        >>> pre = load_pretraining(6, exclude_seeds=(0,), benchmark_sizes={"n_train": 20, "n_dev": 4, "n_test": 6})
        >>> train, dev, test = load("pixels", 0, n_train=20, n_dev=4, n_test=6)
        >>> bench = {s.signature() for d in (train, dev, test) for s in d.scenes}
        >>> any(s.signature() in bench for s in pre.scenes), pre.split
        (False, 'pretrain')
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"synthetic.load_pretraining: n must be a positive int, got {n!r}")
    if not isinstance(view, str) or view not in VIEWS:
        raise ValueError(
            f"synthetic.load_pretraining: view must be one of {sorted(VIEWS)}, got {view!r}."
            + suggest(view, VIEWS)
        )
    sizes = (
        {"n_train": 1000, "n_dev": 20, "n_test": 200}
        if benchmark_sizes is None
        else dict(benchmark_sizes)
    )
    bench_cfg = SyntheticConfig(
        **{
            **{
                k: v
                for k, v in config.items()
                if k in ("min_objects", "max_objects", "confusable_fraction")
            },
            **sizes,
        }
    ).validate()
    seen: set = set()
    for s in exclude_seeds:
        # Replay load()'s scene draws (no rendering): the very scenes of that benchmark.
        counts = {"train": bench_cfg.n_train, "dev": bench_cfg.n_dev, "test": bench_cfg.n_test}
        for split in SPLITS:
            _split_scenes(
                counts[split], random.Random(_seed(int(s), split, _SCENES)), bench_cfg, seen
            )
    cfg = SyntheticConfig(**{**config, "n_train": n}).validate()
    ds = _make_split("pretrain", n, view, int(seed), cfg, seen)
    ds.vocab = Vocabulary.build(ds.captions)
    return ds
