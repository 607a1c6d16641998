"""The ALBEF / LAVIS retrieval annotation JSON plus an image folder.

An annotation file is a JSON list of entries. Training files have one entry per
caption, ``{"image": "flickr30k-images/1000092795.jpg", "caption": "...",
"image_id": "1000092795"}``; evaluation files one entry per image with all its
captions, ``{"image": "...", "caption": ["...", "...", ...]}``. Both forms may be
mixed; entries naming the same ``image`` share one image, in order of first
appearance.

References:
    Li et al., "Align before Fuse" (ALBEF), NeurIPS 2021 (``dataset/caption_dataset.py``
    and the ``data/*.json`` files); LAVIS's retrieval datasets use the same entries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from imtm.data.image_files import ImageFileDataset, group_by_image, resolve_under
from imtm.data.karpathy import load_json

__all__ = ["AlbefJsonDataset"]


class AlbefJsonDataset(ImageFileDataset):
    """ALBEF / LAVIS retrieval annotations (one or several JSON files) with their images.

    Args:
        ann_paths: one annotation JSON or a sequence of them (read in order).
        image_root: the folder the ``image`` fields are relative to (ALBEF's ``image_root``);
            ``None``: relative to each JSON file's folder.
        transform: applied to each PIL image (see :func:`imtm.data.transforms.image_transform`).
        augment: caption augmentation in ``dataset[k]`` (see :class:`ImageFileDataset`).
        vocab, build_vocab, check_files, name: see :class:`ImageFileDataset`.

    ALBEF's ``pre_caption`` (lower-casing, stripping punctuation, 30 words at most) is not
    applied: captions stay as written and the text encoder's tokenizer handles them.

    Attributes:
        image_ids_external: each image's ``image_id`` where an entry gives one, else its ``image`` field.

    Raises:
        FileNotFoundError: an annotation file or (``check_files=True``) an image is missing.
        ValueError: a file that is not UTF-8 JSON or not a list, an entry without
            ``image``/``caption`` or whose ``image`` is not a path, an empty caption (each named by
            file and entry index).

    Shape:
        - ``self[k]["images"]``: ``(3, H, W)`` (what ``transform`` returns)

    Example:
        >>> import tempfile, os, json
        >>> from PIL import Image
        >>> d = tempfile.mkdtemp()
        >>> Image.new("RGB", (8, 8)).save(os.path.join(d, "a.jpg"))
        >>> ann = [{"image": "a.jpg", "caption": ["a cat", "the cat"]}]
        >>> _ = open(os.path.join(d, "test.json"), "w").write(json.dumps(ann))
        >>> ds = AlbefJsonDataset(os.path.join(d, "test.json"), d)
        >>> len(ds), ds.n_images, ds[1]["texts"]
        (2, 1, 'the cat')
    """

    def __init__(
        self,
        ann_paths,
        image_root=None,
        transform: Callable | None = None,
        *,
        augment=None,
        vocab=None,
        build_vocab: bool = False,
        check_files: bool = False,
        name: str | None = None,
    ):
        who = "AlbefJsonDataset"
        files = (
            [Path(ann_paths)]
            if isinstance(ann_paths, (str, Path))
            else [Path(p) for p in ann_paths]
        )
        if not files:
            raise ValueError(f"{who}: ann_paths names no annotation file")
        self.ann_paths = [str(p) for p in files]
        self.image_root = None if image_root is None else str(image_root)
        root = None if image_root is None else Path(image_root)
        keys, captions = [], []
        first_source, ext_id = {}, {}
        for path in files:
            data = load_json(path, who)
            if not isinstance(data, list):
                raise ValueError(
                    f"{who}: {path.name} must hold a JSON list of entries {{image, caption}}, got {type(data).__name__}"
                )
            for e, entry in enumerate(data):
                where = f"entry {e} of {path.name}"
                if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
                    got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                    raise ValueError(
                        f"{who}: {where} needs 'image' and 'caption' fields, got {got}"
                    )
                caps = entry["caption"]
                caps = [caps] if isinstance(caps, str) else caps
                if not isinstance(caps, Sequence) or not caps:
                    raise ValueError(f"{who}: {where} has no caption (got {entry['caption']!r})")
                if not isinstance(entry["image"], str) or not entry["image"].strip():
                    raise ValueError(
                        f"{who}: 'image' of {where} is {entry['image']!r}, expected an image file path"
                    )
                key = str(resolve_under(root, entry["image"], path.parent))
                first_source.setdefault(key, where)
                if "image_id" in entry:
                    ext_id.setdefault(key, entry["image_id"])
                for c, cap in enumerate(caps):
                    if not isinstance(cap, str) or not cap.strip():
                        sub = f"caption {c} of " if isinstance(entry["caption"], list) else ""
                        raise ValueError(f"{who}: {sub}{where} is an empty caption ({cap!r})")
                    keys.append(key)
                    captions.append(cap.strip())
        if not captions:
            raise ValueError(f"{who}: no entries in {[p.name for p in files]}")
        paths, c2i = group_by_image(keys)
        super().__init__(
            paths,
            captions,
            c2i,
            transform,
            augment=augment,
            sources=[first_source[p] for p in paths],
            image_ids_external=[ext_id.get(p, Path(p).name) for p in paths],
            vocab=vocab,
            build_vocab=build_vocab,
            check_files=check_files,
            name=name if name is not None else files[0].stem,
        )
