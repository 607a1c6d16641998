"""Every data format imtm reads, by name: one entry point from a path and a format to datasets.

:func:`load_dataset` is what ``imtm train``, ``imtm evaluate``, ``imtm extract``, ``imtm compare``
and ``imtm viz`` call with their ``--data`` and ``--format``; call it from Python the same way::

    from imtm.data import load_dataset
    train, dev, test = load_dataset("data/f30k_precomp", "precomp")
    test = load_dataset("dataset_flickr30k.json", "karpathy", split="test", image_root="flickr30k-images")

The formats (:data:`FORMATS`):

========================  ===============================================================
``synthetic``             the built-in benchmark (``data="synthetic"``; ``view`` regions or pixels)
``precomp``               a SCAN precomputed folder (:class:`~imtm.data.PrecompDataset`)
``karpathy``              a Karpathy split JSON + image folder (:class:`~imtm.data.KarpathyDataset`)
``caption-files``         ``{split}_caps.txt`` + ``{split}_ids.txt`` + ``id_mapping.json`` + images
                          (:class:`~imtm.data.CaptionFileDataset`)
``albef``                 ALBEF / LAVIS JSON files + image folder (:class:`~imtm.data.AlbefJsonDataset`)
``csv``                   CSV (or TSV) files of ``filepath,caption`` + images (:class:`~imtm.data.CsvDataset`)
``coco``                  the official COCO ``captions_*.json`` + images (:class:`~imtm.data.CocoCaptionsDataset`)
``flickr30k-token``       Flickr30K's ``results_20130124.token`` + images
                          (:class:`~imtm.data.Flickr30kTokenDataset`)
========================  ===============================================================

Splits: ``train``, ``dev`` and ``test``. Formats whose files name their splits (synthetic,
precomp, karpathy, caption-files) give all three. For ``albef``, ``csv`` and ``coco``,
``data`` is one file (one split) or a folder of one file per split, found by name
(``*train*``; ``*val*`` or ``*dev*``; ``*test*``; the official COCO files have no test
captions, so a COCO folder's ``captions_val*.json`` is also its test split). A single file
(and the Flickr30K token file, which holds no split) is the training split when all
splits are asked for, with no dev or test split (``None``), and the split asked for
otherwise. The training split builds the word vocabulary; the others share it.

The environment variable ``IMTM_SYNTHETIC`` shrinks the synthetic benchmark for every
command, for smoke tests and CI: ``IMTM_SYNTHETIC=n_train=60,n_dev=10,n_test=20``
(any keyword of :func:`imtm.data.synthetic.load`; its values replace the sizes a command asks for).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from imtm._checks import suggest

__all__ = [
    "FORMATS",
    "SPLITS",
    "SYNTHETIC_ENV",
    "attach_model_transforms",
    "image_encoder",
    "load_dataset",
    "set_image_transform",
    "synthetic_sizes",
]

#: The formats :func:`load_dataset` reads, with what ``data`` names for each.
FORMATS: dict[str, str] = {
    "synthetic": "the built-in benchmark: --data synthetic (--view regions or pixels)",
    "precomp": "a SCAN precomputed folder: {split}_ims.npy, {split}_caps.txt (optional {split}_ids.txt)",
    "karpathy": "a Karpathy split JSON (dataset_flickr30k.json, dataset_coco.json), with --image-root",
    "caption-files": "a SCAN / VSE-infinity folder: {split}_caps.txt, {split}_ids.txt, id_mapping.json "
    "(images in images/ or flickr30k-images/, or --image-root)",
    "albef": "an ALBEF / LAVIS JSON file, or a folder of *train.json, *val.json, *test.json, with --image-root",
    "csv": "a CSV / TSV file with 'filepath' and 'caption' columns, or a folder of train/dev/test files "
    "(paths relative to --image-root or to the file)",
    "coco": "an official COCO captions_*.json, or the folder holding captions_train*.json and "
    "captions_val*.json, with --image-root",
    "flickr30k-token": "Flickr30K's results_20130124.token (all images, no split), with --image-root",
}

#: The split names of :func:`load_dataset`, and the names found in file names for each.
SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "dev": ("dev", "val"),
    "test": ("test", "testall"),
}

#: Environment variable of synthetic sizes (``key=value`` pairs separated by commas).
SYNTHETIC_ENV = "IMTM_SYNTHETIC"

# Formats read from raw image files (the others hold features or generate them).
_RAW = ("karpathy", "caption-files", "albef", "csv", "coco", "flickr30k-token")
# File suffixes of the formats given as a folder of per-split files.
_SUFFIXES = {"albef": (".json",), "csv": (".csv", ".tsv"), "coco": (".json",)}


def synthetic_sizes(sizes: dict | None = None) -> dict:
    """``sizes`` with the values of :data:`SYNTHETIC_ENV` (when set) put over them.

    Example:
        >>> os.environ[SYNTHETIC_ENV] = "n_train=40, n_test=10"
        >>> synthetic_sizes({"n_train": 2000, "n_dev": 100})
        {'n_train': 40, 'n_dev': 100, 'n_test': 10}
        >>> del os.environ[SYNTHETIC_ENV]
    """
    from imtm.data.synthetic.splits import load

    out = dict(sizes or {})
    text = os.environ.get(SYNTHETIC_ENV, "").strip()
    if not text:
        return out
    import inspect

    known = [p for p in inspect.signature(load).parameters if p not in ("view", "seed")]
    for item in text.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or key not in known:
            raise ValueError(
                f"{SYNTHETIC_ENV}={text!r}: {item.strip()!r} is not key=value with a key of {known}."
                + suggest(key, known)
                + " Example: n_train=60,n_dev=10,n_test=20"
            )
        try:
            out[key] = float(value) if "." in value else int(value)
        except ValueError:
            raise ValueError(
                f"{SYNTHETIC_ENV}={text!r}: {key} must be a number, got {value!r}"
            ) from None
    return out


def set_image_transform(dataset, transform: Callable | None) -> None:
    """Give a raw-image dataset the transform its model needs (after the model is built).

    The command line reads the data first (the training split builds the vocabulary the
    text encoder needs), builds the model, then sets each split's transform from the
    model's image encoder (:func:`imtm.data.transforms.image_transform`). Datasets that
    hold tensors (synthetic, precomputed) have no transform and are left alone.
    """
    if dataset is None or not hasattr(getattr(dataset, "images", None), "transform"):
        return
    dataset.transform = transform
    dataset.images.transform = transform


def image_encoder(blocks):
    """The first block of ``blocks`` (a dict or ``nn.ModuleDict`` of blocks, or a list of
    ``(name, block)`` pairs) that reads pixels through timm (has ``data_config``), or ``None``."""
    items = blocks.items() if hasattr(blocks, "items") else blocks
    return next((b for _, b in items if callable(getattr(b, "data_config", None))), None)


def attach_model_transforms(blocks, *datasets, train: tuple[bool, ...] | None = None) -> None:
    """Give each raw-image dataset the transform of the model's image encoder (:func:`image_encoder`).

    ``train[k]`` says whether dataset ``k`` gets the training transform (random crops and
    flips) or the evaluation one; by default the first dataset trains. Datasets of tensors,
    ``None`` datasets and models without a timm encoder are left alone.
    """
    encoder = image_encoder(blocks)
    if encoder is None:
        return
    from imtm.data.transforms import image_transform

    train = train if train is not None else (True,) + (False,) * (len(datasets) - 1)
    for ds, is_train in zip(datasets, train):
        if ds is not None and hasattr(ds, "image_paths"):
            set_image_transform(ds, image_transform(encoder, train=is_train))


def _check_format(fmt: str, data) -> str:
    if fmt is None:
        if str(data) == "synthetic":
            return "synthetic"
        if Path(data).is_dir():
            return "precomp"  # what --data read before --format existed
        raise ValueError(
            f"--data {str(data)!r} needs --format, one of: {', '.join(FORMATS)} "
            "(imtm train --help says what each reads)"
        )
    if fmt not in FORMATS:
        raise ValueError(
            f"--format must be one of: {', '.join(FORMATS)}; got {fmt!r}." + suggest(fmt, FORMATS)
        )
    if fmt == "synthetic" and str(data) != "synthetic":
        raise ValueError(
            f"format 'synthetic' is the built-in benchmark: pass --data synthetic, not {str(data)!r}"
        )
    return fmt


def _split_files(root: Path, fmt: str) -> dict[str, Path]:
    """The file of each split in a folder of per-split files (``albef``, ``csv``, ``coco``)."""
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIXES[fmt])
    if fmt == "coco":
        files = [p for p in files if p.name.startswith("captions_")]
    found: dict[str, Path] = {}
    for split, names in SPLITS.items():
        hits = [
            p
            for p in files
            if any(
                p.stem.lower() == n
                or p.stem.lower().endswith(("_" + n, "-" + n))
                or (fmt == "coco" and p.stem.lower().startswith(f"captions_{n}"))
                for n in names
            )
        ]
        if len(hits) > 1:
            raise ValueError(
                f"{fmt}: {str(root)!r} holds several {split} files {[p.name for p in hits]}; pass the one to use "
                "as --data"
            )
        if hits:
            found[split] = hits[0]
    if fmt == "coco" and "dev" in found and "test" not in found:
        found["test"] = found["dev"]  # the official files have no test captions
    if "train" not in found and not found:
        raise FileNotFoundError(
            f"{fmt}: no {'/'.join(_SUFFIXES[fmt])} split files in {str(root)!r}; expected names ending in "
            f"train, val (or dev) and test, e.g. {_EXAMPLES[fmt]}, or pass one file as --data"
        )
    return found


_EXAMPLES = {"albef": "flickr30k_train.json", "csv": "train.csv", "coco": "captions_train2014.json"}


def _read_file(
    fmt: str,
    path: Path,
    image_root,
    transform,
    captions_per_image,
    *,
    name: str,
    vocab=None,
    build_vocab: bool = False,
):
    common = {"vocab": vocab, "build_vocab": build_vocab, "name": name}
    if fmt == "albef":
        from imtm.data.albef import AlbefJsonDataset

        return AlbefJsonDataset(path, image_root, transform, **common)
    if fmt == "csv":
        from imtm.data.csv_captions import CsvDataset

        return CsvDataset(path, image_root, transform, **common)
    if fmt == "coco":
        from imtm.data.coco_captions import CocoCaptionsDataset

        return CocoCaptionsDataset(
            path, image_root, transform, captions_per_image=captions_per_image, **common
        )
    from imtm.data.flickr30k_token import Flickr30kTokenDataset

    if path.is_dir():
        path = path / "results_20130124.token"
    return Flickr30kTokenDataset(
        path, image_root, transform, captions_per_image=captions_per_image, **common
    )


def load_dataset(
    data,
    format: str | None = None,
    split: str | None = None,
    *,
    image_root=None,
    view: str = "regions",
    seed: int = 0,
    sizes: dict | None = None,
    transform: Callable | None = None,
    captions_per_image: int | None = None,
    vocab=None,
):
    """Read ``data`` in ``format``: ``(train, dev, test)``, or the one dataset of ``split``.

    Args:
        data: ``"synthetic"``, or the file or folder the format reads (see :data:`FORMATS`).
        format: a key of :data:`FORMATS`. ``None``: ``"synthetic"`` for ``data="synthetic"``
            and ``"precomp"`` for a folder (what ``--data`` read before formats); a file needs it.
        split: ``None`` for all three splits, or ``"train"``, ``"dev"`` (``"val"``) or ``"test"``.
        image_root: the image folder of the raw-image formats (``None``: each format's default,
            see its class; ``karpathy`` needs it).
        view, seed, sizes: the synthetic benchmark's view (``"regions"`` or ``"pixels"``), seed and
            keywords of :func:`imtm.data.synthetic.load` (``n_train``, ``image_size``, ...), under
            the values of :data:`SYNTHETIC_ENV`.
        transform: each image's transform (raw-image formats; see also :func:`set_image_transform`).
        captions_per_image: keep the first ``k`` captions of each image (``karpathy``, ``coco``,
            ``flickr30k-token``); for ``caption-files``, ids files with one line per image.
        vocab: the word vocabulary of the splits; ``None``: built from the training split (all
            splits), or none (one split; a model brings its own).

    Returns:
        ``(train, dev, test)`` datasets (``dev``/``test`` ``None`` where a single file holds one split),
        or one dataset when ``split`` is given.

    Raises:
        ValueError: an unknown format (the error lists them), an unknown split, or what the
            format's reader raises for its files; FileNotFoundError: a missing file or folder.

    Example:
        >>> train, dev, test = load_dataset("synthetic", sizes={"n_train": 8, "n_dev": 2, "n_test": 4})
        >>> len(train.captions), test.vocab is train.vocab
        (40, True)
    """
    fmt = _check_format(format, data)
    if split is not None:
        split = {"val": "dev"}.get(split, split)
        if split not in SPLITS:
            raise ValueError(
                f"split must be one of {list(SPLITS)}, got {split!r}." + suggest(split, SPLITS)
            )
    wanted = list(SPLITS) if split is None else [split]
    if fmt == "synthetic":
        from imtm.data import synthetic

        splits = synthetic.load(view=view, seed=seed, **synthetic_sizes(sizes))
        return splits if split is None else dict(zip(SPLITS, splits))[split]
    if fmt not in _RAW and transform is not None:
        raise ValueError(f"format {fmt!r} holds features, not images: it takes no transform")
    root = Path(data)
    if not root.exists():
        raise FileNotFoundError(f"{fmt}: no file or folder {str(data)!r} ({FORMATS[fmt]})")
    if fmt == "karpathy" and image_root is None:
        raise ValueError(
            "karpathy: pass --image-root (image_root=), the folder of the images "
            "(flickr30k-images/, or COCO's folder of train2014/ and val2014/)"
        )
    out: dict = {}
    for s in wanted:
        first = s == wanted[0]
        build = vocab is None and split is None and s == "train"
        shared = vocab if vocab is not None else getattr(out.get("train"), "vocab", None)
        kw = {"build_vocab": True} if build else {"vocab": shared}
        if fmt == "precomp":
            from imtm.data.precomp import PrecompDataset

            name = "testall" if s == "test" and (root / "testall_caps.txt").exists() else s
            out[s] = PrecompDataset(root, name, captions_per_image=captions_per_image, **kw)
        elif fmt == "karpathy":
            from imtm.data.karpathy import KarpathyDataset

            out[s] = KarpathyDataset(
                root, image_root, s, transform, captions_per_image=captions_per_image, **kw
            )
        elif fmt == "caption-files":
            from imtm.data.caption_files import CaptionFileDataset

            name = s
            if (
                s == "test"
                and not any((d / "test_caps.txt").is_file() for d in (root, root / "precomp"))
                and any((d / "testall_caps.txt").is_file() for d in (root, root / "precomp"))
            ):
                name = "testall"
            out[s] = CaptionFileDataset(
                root, name, image_root, transform, captions_per_image=captions_per_image, **kw
            )
        elif root.is_file() or fmt == "flickr30k-token":
            # One file, one split: the training split when all are asked for, else the split asked for.
            if not first:
                out[s] = None
                continue
            out[s] = _read_file(
                fmt, root, image_root, transform, captions_per_image, name=f"{root.stem}/{s}", **kw
            )
        else:
            files = _split_files(root, fmt)
            if s not in files:
                if split is not None or s == "train":
                    raise FileNotFoundError(
                        f"{fmt}: no {s} file in {str(root)!r} (found {sorted(p.name for p in files.values())}); "
                        f"names ending in {' or '.join(SPLITS[s])} are read as the {s} split"
                    )
                out[s] = None
                continue
            out[s] = _read_file(
                fmt,
                files[s],
                image_root,
                transform,
                captions_per_image,
                name=f"{files[s].stem}",
                **kw,
            )
    return tuple(out[s] for s in SPLITS) if split is None else out[split]
