"""The official MS-COCO caption annotations (``captions_train2014.json``, ``captions_val2017.json``, ...).

The file is the COCO object ``{"images": [...], "annotations": [...], ...}``:

- ``images``: ``{"id": int, "file_name": "COCO_val2014_000000391895.jpg", ...}``, one per image;
- ``annotations``: ``{"id": int, "image_id": int, "caption": str}``, one per caption (about
  five per image, some images have six or seven).

Images come in the order of ``images``, each image's captions in the order of
``annotations``. The image file is ``image_root / file_name`` (``image_root`` is the
``train2014/`` or ``val2014/`` folder). The official files have no test captions and no
Karpathy split: ``val2014`` is 40,504 images; the 5K test split of the papers is in
Karpathy's ``dataset_coco.json`` (:class:`~imtm.data.KarpathyDataset`).

References:
    Chen et al., "Microsoft COCO Captions: Data Collection and Evaluation Server", 2015.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral
from pathlib import Path

import torch

from imtm.data.image_files import ImageFileDataset, check_captions_per_image, resolve_under
from imtm.data.karpathy import load_json

__all__ = ["CocoCaptionsDataset"]


class CocoCaptionsDataset(ImageFileDataset):
    """An official COCO ``captions_*.json`` file with its image folder; one item per caption.

    Args:
        json_path: ``captions_train2014.json``, ``captions_val2014.json``, ``captions_val2017.json``, ...
        image_root: the folder of the ``file_name`` entries (``val2014/``); ``None``: the JSON's folder.
        transform: applied to each PIL image (see :func:`imtm.data.transforms.image_transform`).
        captions_per_image: keep the first ``k`` captions of every image (the protocols use 5);
            ``None`` keeps all. An image with fewer than ``k`` raises.
        skip_uncaptioned: leave out images no annotation names (``False``: such an image raises).
        augment, vocab, build_vocab, check_files, name: see :class:`ImageFileDataset`.

    Attributes:
        image_ids_external: the COCO ``id`` of each image.

    Raises:
        FileNotFoundError: the JSON file or (``check_files=True``) an image is missing.
        ValueError: a file that is not UTF-8 JSON or not a COCO caption object, an image entry
            without an integer ``id`` or a ``file_name``, two images with one id, an annotation
            without ``image_id``/``caption``, naming an unknown image or with an empty caption
            (each named by its index in the file), no captions at all.

    Shape:
        - ``self[k]["images"]``: ``(3, H, W)`` (what ``transform`` returns)

    Example:
        >>> import tempfile, os, json
        >>> from PIL import Image
        >>> d = tempfile.mkdtemp()
        >>> Image.new("RGB", (8, 8)).save(os.path.join(d, "COCO_val2014_000000000042.jpg"))
        >>> ann = {"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}],
        ...        "annotations": [{"id": 1, "image_id": 42, "caption": "A dog."},
        ...                        {"id": 2, "image_id": 42, "caption": "A brown dog. "}]}
        >>> _ = open(os.path.join(d, "captions_val2014.json"), "w").write(json.dumps(ann))
        >>> ds = CocoCaptionsDataset(os.path.join(d, "captions_val2014.json"))
        >>> len(ds), ds.n_images, ds.captions, ds.image_ids_external
        (2, 1, ['A dog.', 'A brown dog.'], [42])
    """

    def __init__(
        self,
        json_path,
        image_root=None,
        transform: Callable | None = None,
        *,
        captions_per_image: int | None = None,
        skip_uncaptioned: bool = True,
        augment=None,
        vocab=None,
        build_vocab: bool = False,
        check_files: bool = False,
        name: str | None = None,
    ):
        who = "CocoCaptionsDataset"
        path = Path(json_path)
        self.json_path = str(path)
        self.image_root = None if image_root is None else str(image_root)
        check_captions_per_image(captions_per_image, who)
        data = load_json(path, who)
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("images"), list)
            or not isinstance(data.get("annotations"), list)
        ):
            keys = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"{who}: {path.name} must be a COCO caption file, a JSON object with 'images' and 'annotations' "
                f"lists, got {keys}. A Karpathy split file (dataset_coco.json) is --format karpathy"
            )
        root = None if image_root is None else Path(image_root)
        files: dict[int, str] = {}
        order: list[int] = []
        for e, entry in enumerate(data["images"]):
            where = f"images[{e}] of {path.name}"
            if not isinstance(entry, dict):
                raise ValueError(f"{who}: {where} is {type(entry).__name__}, expected an object")
            i, file = entry.get("id"), entry.get("file_name")
            if isinstance(i, bool) or not isinstance(i, Integral):
                raise ValueError(f"{who}: {where} has id {i!r}, expected an integer")
            if not isinstance(file, str) or not file.strip():
                raise ValueError(
                    f"{who}: {where} has file_name {file!r}, expected an image file name"
                )
            if i in files:
                raise ValueError(
                    f"{who}: {where} repeats image id {i}; every image must appear once"
                )
            files[int(i)] = file.strip()
            order.append(int(i))
        captions_of: dict[int, list[str]] = {i: [] for i in order}
        for a, ann in enumerate(data["annotations"]):
            where = f"annotations[{a}] of {path.name}"
            if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
                got = sorted(ann) if isinstance(ann, dict) else type(ann).__name__
                raise ValueError(f"{who}: {where} needs 'image_id' and 'caption', got {got}")
            i, cap = ann["image_id"], ann["caption"]
            if isinstance(i, bool) or not isinstance(i, Integral) or int(i) not in captions_of:
                raise ValueError(
                    f"{who}: {where} names image_id {i!r}, which no entry of 'images' has"
                )
            if not isinstance(cap, str) or not cap.strip():
                raise ValueError(f"{who}: {where} is an empty caption ({cap!r})")
            captions_of[int(i)].append(cap.strip())
        paths, captions, c2i, ids, sources = [], [], [], [], []
        for e, i in enumerate(order):
            caps = captions_of[i]
            if not caps:
                if skip_uncaptioned:
                    continue
                raise ValueError(f"{who}: image id {i} (images[{e}] of {path.name}) has no caption")
            if captions_per_image is not None:
                if len(caps) < captions_per_image:
                    raise ValueError(
                        f"{who}: image id {i} (images[{e}] of {path.name}) has {len(caps)} captions, fewer than "
                        f"captions_per_image={captions_per_image}"
                    )
                caps = caps[:captions_per_image]
            c2i += [len(paths)] * len(caps)
            captions += caps
            paths.append(resolve_under(root, files[i], path.parent))
            ids.append(i)
            sources.append(f"image id {i} (images[{e}] of {path.name})")
        if not captions:
            raise ValueError(f"{who}: {path.name} holds no captions")
        self.captions_per_image = captions_per_image
        super().__init__(
            paths,
            captions,
            torch.tensor(c2i, dtype=torch.long),
            transform,
            augment=augment,
            sources=sources,
            image_ids_external=ids,
            vocab=vocab,
            build_vocab=build_vocab,
            check_files=check_files,
            name=name if name is not None else path.stem,
        )
