"""The Karpathy split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``) plus an image folder.

The file is ``{"images": [entry, ...], "dataset": ...}``; each entry holds

- ``filename`` (and, for COCO, ``filepath``: ``"train2014"`` / ``"val2014"``): the image
  is ``image_root / filepath / filename``;
- ``split``: ``"train"``, ``"val"``, ``"test"``, or COCO's ``"restval"`` (the 30k
  validation images not in the 5k val/test splits, trained on by SCAN, VSE-infinity
  and their successors);
- ``sentences``: ``[{"raw": str, "tokens": [str], ...}]``;
- ``imgid`` (index in the file) and, for COCO, ``cocoid``.

References:
    Karpathy and Fei-Fei, "Deep Visual-Semantic Alignments for Generating Image
    Descriptions", CVPR 2015 (the splits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from imtm._checks import suggest
from imtm._io import read_json
from imtm.data.image_files import ImageFileDataset, check_captions_per_image

__all__ = ["KarpathyDataset"]

# The split names of the Karpathy files; "dev" (SCAN's name) is read as "val".
SPLITS = ("train", "val", "test", "restval")
_ALIASES = {"dev": "val"}


def load_json(path: Path, who: str, what: str = "annotation file"):
    """Read a UTF-8 JSON file (a byte-order mark allowed); errors name ``who`` and the file.

    Through :func:`imtm._io.read_json`: a regular file only (a FIFO or device is refused, not
    waited on), at most ``MAX_JSON_BYTES``, nested at most ``MAX_JSON_DEPTH`` deep.
    """
    if not path.is_file() and not path.exists():
        raise FileNotFoundError(f"{who}: no {what} {str(path)!r}")
    try:
        return read_json(path, who=who)
    except FileNotFoundError:
        raise FileNotFoundError(f"{who}: no {what} {str(path)!r}") from None


class KarpathyDataset(ImageFileDataset):
    """One split of a Karpathy split JSON with its images; one item per caption.

    Args:
        json_path: ``dataset_flickr30k.json`` or ``dataset_coco.json``.
        image_root: the image folder (``flickr30k-images/``; for COCO the folder holding
            ``train2014/`` and ``val2014/``).
        split: ``"train"``, ``"val"`` (or ``"dev"``), ``"test"``, ``"restval"``, or a
            sequence of them.
        transform: applied to each PIL image (see :func:`imtm.data.transforms.image_transform`).
        restval: with ``split="train"``, also take COCO's ``"restval"`` images (113,287
            training images instead of 82,783; the standard COCO training set).
        captions_per_image: keep the first ``k`` sentences of every image (COCO has images
            with 6 or 7; the 1K/5K protocols use 5); ``None`` keeps all. An image with fewer
            than ``k`` raises.
        augment: caption augmentation in ``dataset[k]`` (see :class:`ImageFileDataset`).
        vocab, build_vocab, check_files, name: see :class:`ImageFileDataset`.

    Attributes:
        image_ids_external: ``cocoid`` of each image when the file has them, else ``imgid``.

    Raises:
        FileNotFoundError: the JSON file or (with ``check_files=True``) an image is missing.
        ValueError: malformed JSON or not UTF-8, an entry without ``filename``/``split``/``sentences``
            or with a value of the wrong type, an empty caption (named by entry and sentence), an
            image file named by two entries, an unknown split.

    Shape:
        - ``self[k]["images"]``: ``(3, H, W)`` (what ``transform`` returns)

    Example:
        >>> import tempfile, os, json
        >>> from PIL import Image
        >>> d = tempfile.mkdtemp()
        >>> Image.new("RGB", (8, 8)).save(os.path.join(d, "1.jpg"))
        >>> ann = {"images": [{"filename": "1.jpg", "split": "test", "imgid": 0,
        ...        "sentences": [{"raw": "A dog."}, {"raw": "A brown dog."}]}]}
        >>> _ = open(os.path.join(d, "k.json"), "w").write(json.dumps(ann))
        >>> ds = KarpathyDataset(os.path.join(d, "k.json"), d, "test")
        >>> len(ds), ds.n_images, ds.captions, ds[1]["images"].shape
        (2, 1, ['A dog.', 'A brown dog.'], torch.Size([3, 8, 8]))
    """

    def __init__(
        self,
        json_path,
        image_root,
        split: str | Sequence[str],
        transform: Callable | None = None,
        *,
        restval: bool = True,
        captions_per_image: int | None = None,
        augment=None,
        vocab=None,
        build_vocab: bool = False,
        check_files: bool = False,
        name: str | None = None,
    ):
        who = "KarpathyDataset"
        json_path = Path(json_path)
        self.json_path = str(json_path)
        self.image_root = str(image_root)
        self.split = split
        self.restval = restval
        check_captions_per_image(captions_per_image, who)
        wanted = self._resolve_splits(split, restval)
        data = load_json(json_path, who)
        entries = data.get("images") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ValueError(
                f"{who}: {json_path.name} must be a JSON object with an 'images' list (Karpathy's split format), "
                f"got {type(data).__name__}"
                + (f" with keys {sorted(data)[:8]}" if isinstance(data, dict) else "")
            )
        root = Path(image_root)
        paths, sources, captions, c2i, ext_ids = [], [], [], [], []
        found_splits, first_entry = set(), {}
        for e, entry in enumerate(entries):
            where = f"images[{e}] of {json_path.name}"
            if not isinstance(entry, dict):
                raise ValueError(f"{who}: {where} is {type(entry).__name__}, expected an object")
            for key in ("filename", "split", "sentences"):
                if key not in entry:
                    raise ValueError(f"{who}: {where} has no {key!r} (keys: {sorted(entry)})")
            for key, kind, expected in (
                ("filename", str, "a file name"),
                ("split", str, "a split name"),
                ("filepath", str, "a folder name"),
                ("sentences", list, "a list"),
            ):
                if key in entry and (
                    not isinstance(entry[key], kind)
                    or (kind is str and key != "filepath" and not entry[key].strip())
                ):
                    raise ValueError(
                        f"{who}: {key!r} of {where} is {entry[key]!r}, expected {expected}"
                    )
            found_splits.add(entry["split"])
            if entry["split"] not in wanted:
                continue
            sents = entry["sentences"]
            if captions_per_image is not None:
                if len(sents) < captions_per_image:
                    raise ValueError(
                        f"{who}: {where} ({entry['filename']}) has {len(sents)} sentences, fewer than "
                        f"captions_per_image={captions_per_image}"
                    )
                sents = sents[:captions_per_image]
            k_img = len(paths)
            for s, sent in enumerate(sents):
                text = sent.get("raw") if isinstance(sent, dict) else None
                if text is None and isinstance(sent, dict) and "tokens" in sent:
                    tokens = sent["tokens"]
                    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                        raise ValueError(
                            f"{who}: 'tokens' of sentence {s} of {where} is {tokens!r}, expected a list of words"
                        )
                    text = " ".join(tokens)
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(
                        f"{who}: sentence {s} of {where} ({entry['filename']}) is an empty caption ({sent!r}); "
                        "every sentence needs a non-empty 'raw' text"
                    )
                captions.append(text.strip())
                c2i.append(k_img)
            if not sents:
                raise ValueError(f"{who}: {where} ({entry['filename']}) has no sentences")
            path = root / entry.get("filepath", "") / entry["filename"]
            if path in first_entry:
                # The same image twice would count as two images in retrieval (a silent wrong benchmark).
                raise ValueError(
                    f"{who}: {where} names the same image file {entry['filename']!r} as {first_entry[path]}; "
                    "each image must appear once (merge their sentences)"
                )
            first_entry[path] = where
            paths.append(path)
            sources.append(where)
            ext_ids.append(entry.get("cocoid", entry.get("imgid", e)))
        if not paths:
            hint = suggest(split, found_splits) if isinstance(split, str) else ""
            raise ValueError(
                f"{who}: no images of split {split!r} in {json_path.name}; its splits are {sorted(found_splits)}.{hint}"
            )
        self.captions_per_image = captions_per_image
        super().__init__(
            paths,
            captions,
            torch.tensor(c2i, dtype=torch.long),
            transform,
            augment=augment,
            sources=sources,
            image_ids_external=ext_ids,
            vocab=vocab,
            build_vocab=build_vocab,
            check_files=check_files,
            name=name
            if name is not None
            else f"{json_path.stem}/{split if isinstance(split, str) else '+'.join(split)}",
        )

    @staticmethod
    def _resolve_splits(split, restval: bool) -> set:
        names = [split] if isinstance(split, str) else list(split)
        if not names:
            raise ValueError("KarpathyDataset: split must name at least one split")
        out = set()
        for s in names:
            s = _ALIASES.get(s, s)
            if s not in SPLITS:
                raise ValueError(
                    f"KarpathyDataset: split must be one of {list(SPLITS)} (or 'dev' for 'val'), got {s!r}."
                    + suggest(s, SPLITS + tuple(_ALIASES))
                )
            out.add(s)
        if restval and "train" in out:
            out.add("restval")
        return out

    def __repr__(self) -> str:
        return (
            f"KarpathyDataset(json_path={self.json_path!r}, split={self.split!r}, n_images={self.n_images}, "
            f"n_captions={self.n_captions})"
        )
