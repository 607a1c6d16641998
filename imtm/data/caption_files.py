"""The SCAN / VSE-infinity / LAPS caption-file layout with raw images.

A dataset folder ``root`` holds

- ``{split}_caps.txt``: one caption per line (in ``root`` or in ``root/precomp/``, the
  VSE-infinity layout);
- ``{split}_ids.txt``: the image id of each caption, one line per caption (the
  released files: ids repeat in runs of 5), or one line per image when
  ``captions_per_image`` says how many consecutive captions share it;
- ``id_mapping.json``: ``{"<id>": "<file name relative to the image folder>"}``
  (in ``root``, next to the caption files, or in their parent);
- the image folder: ``images/`` (COCO) or ``flickr30k-images/`` (Flickr30K), or any
  folder passed as ``image_root``.

The ids are whatever the release uses: Flickr30K's are indices into the Karpathy
image list, COCO's are COCO image ids; the mapping turns them into files.

References:
    Lee et al., SCAN, ECCV 2018 (the caption files); Chen et al., VSE-infinity,
    CVPR 2021 (``id_mapping.json`` and raw images, ``lib/datasets/image_caption.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from imtm._checks import suggest
from imtm.data.image_files import ImageFileDataset, check_captions_per_image, group_by_image
from imtm.data.karpathy import load_json
from imtm.data.precomp import parse_ids, read_lines

__all__ = ["CaptionFileDataset"]

# Image folders looked for under the dataset folder when image_root is not given (VSE-infinity's names first).
IMAGE_DIRS = ("images", "flickr30k-images", "flickr30k_images", "flickr30k-images/flickr30k-images")


class CaptionFileDataset(ImageFileDataset):
    """A split of the SCAN / VSE-infinity caption files with its raw images; one item per caption.

    Args:
        root: the dataset folder (see the module docstring for what it holds).
        split: ``"train"``, ``"dev"``, ``"test"``, ``"testall"``, ... (the file prefix).
        image_root: the image folder; ``None`` looks for ``images/`` or
            ``flickr30k-images/`` under ``root`` and its parent.
        transform: applied to each PIL image (see :func:`imtm.data.transforms.image_transform`).
        id_mapping: where image files come from: a path to a JSON ``{id: file}``, a dict, or a
            callable ``id -> file name``; ``None`` finds ``id_mapping.json`` (see above).
        captions_per_image: ``None`` (default): the ids file has one line per caption and
            must have as many lines as the caption file. ``k``: the ids file may instead
            have one line per image, each image owning ``k`` consecutive captions
            (VSE-infinity's ``im_div``).
        augment: caption augmentation in ``dataset[k]`` (see :class:`ImageFileDataset`).
        vocab, build_vocab, check_files, name: see :class:`ImageFileDataset`.

    Attributes:
        image_ids_external: the id of each unique image (ints), in order of first appearance.
        caps_path, ids_path: the files read.

    Raises:
        FileNotFoundError: a missing caption or ids file, no id mapping, no image folder.
        ValueError: a caption, ids or mapping file that is not UTF-8 (or not JSON), caption and
            ids files of different lengths (naming both files and their line counts), an empty
            caption or a non-integer id (naming file and line), an id absent from the mapping or
            mapped to something that is not a file name (naming the ids-file line).

    Shape:
        - ``self[k]["images"]``: ``(3, H, W)`` (what ``transform`` returns)

    Example:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> d = tempfile.mkdtemp(); os.makedirs(os.path.join(d, "images"))
        >>> Image.new("RGB", (8, 8)).save(os.path.join(d, "images", "x.png"))
        >>> _ = open(os.path.join(d, "test_caps.txt"), "w").write("a dog .\\nthe dog\\n")
        >>> _ = open(os.path.join(d, "test_ids.txt"), "w").write("7\\n7\\n")
        >>> ds = CaptionFileDataset(d, "test", id_mapping={"7": "x.png"})
        >>> len(ds), ds.n_images, ds.image_ids_external, ds[1]["images"].shape
        (2, 1, [7], torch.Size([3, 8, 8]))
    """

    def __init__(
        self,
        root,
        split: str,
        image_root=None,
        transform: Callable | None = None,
        *,
        id_mapping=None,
        captions_per_image: int | None = None,
        augment=None,
        vocab=None,
        build_vocab: bool = False,
        check_files: bool = False,
        name: str | None = None,
    ):
        who = "CaptionFileDataset"
        root = Path(root)
        self.root = str(root)
        self.split = split
        check_captions_per_image(captions_per_image, who)
        cap_dir = self._find_caption_dir(root, split)
        caps_path, ids_path = cap_dir / f"{split}_caps.txt", cap_dir / f"{split}_ids.txt"
        if not ids_path.is_file():
            raise FileNotFoundError(
                f"{who}: {caps_path.name} has no ids file {str(ids_path)!r}; the raw-image layout needs "
                f"{split}_ids.txt (the image id of each caption) to find the images"
            )
        self.caps_path, self.ids_path = str(caps_path), str(ids_path)
        captions = self._read_captions(caps_path)
        id_lines = read_lines(ids_path, who)
        ids = parse_ids(id_lines, ids_path, who, "image id").tolist()
        n_caps, n_ids = len(captions), len(ids)
        if n_ids == n_caps:
            line_of_caption = list(range(n_caps))
            caption_ids = ids
        elif captions_per_image is not None and n_ids * captions_per_image == n_caps:
            line_of_caption = [k // captions_per_image for k in range(n_caps)]
            caption_ids = [ids[j] for j in line_of_caption]
        else:
            per_image = (
                f" or {n_caps // captions_per_image} lines (one per image, captions_per_image={captions_per_image})"
                if captions_per_image is not None and n_caps % captions_per_image == 0
                else ""
            )
            raise ValueError(
                f"{who}: {str(caps_path)!r} has {n_caps} lines but {str(ids_path)!r} has {n_ids}; the ids file "
                f"needs one line per caption ({n_caps}){per_image}"
                + (
                    ""
                    if captions_per_image is not None
                    else "; pass captions_per_image=k if it has one line per image of k captions"
                )
            )
        unique_ids, c2i = group_by_image(caption_ids)
        first_line = {}
        for k, j in enumerate(line_of_caption):
            first_line.setdefault(caption_ids[k], j + 1)

        mapping, mapping_name = self._resolve_mapping(id_mapping, root, cap_dir)
        img_root = self._resolve_image_root(image_root, root, cap_dir)
        self.image_root = str(img_root)
        paths, sources = [], []
        for i in unique_ids:
            where = f"line {first_line[i]} of {ids_path.name}"
            try:
                rel = mapping(i)
            except KeyError:
                keys = list(mapping.table) if isinstance(mapping, _Lookup) else []
                raise ValueError(
                    f"{who}: image id {i} ({where}) is not in {mapping_name}.{suggest(str(i), keys)} "
                    "Check that the mapping belongs to this dataset"
                ) from None
            if not isinstance(rel, (str, os.PathLike)) or not str(rel).strip():
                raise ValueError(
                    f"{who}: {mapping_name} maps image id {i} ({where}) to {rel!r}, expected an image file name"
                )
            paths.append(img_root / rel)
            sources.append(f"id {i}, {where}")
        self.captions_per_image = captions_per_image
        super().__init__(
            paths,
            captions,
            c2i,
            transform,
            augment=augment,
            sources=sources,
            image_ids_external=unique_ids,
            vocab=vocab,
            build_vocab=build_vocab,
            check_files=check_files,
            name=name if name is not None else f"{root.name}/{split}",
        )

    # ------------------------------------------------------------------ locating files
    @staticmethod
    def _find_caption_dir(root: Path, split: str) -> Path:
        for d in (root, root / "precomp"):
            if (d / f"{split}_caps.txt").is_file():
                return d
        if not root.is_dir():
            raise FileNotFoundError(f"CaptionFileDataset: no directory {str(root)!r}")
        splits = sorted(
            {
                p.name[: -len("_caps.txt")]
                for d in (root, root / "precomp")
                for p in d.glob("*_caps.txt")
            }
        )
        hint = f" Splits found: {splits}." + suggest(split, splits) if splits else ""
        raise FileNotFoundError(
            f"CaptionFileDataset: no {split}_caps.txt in {str(root)!r} or {str(root / 'precomp')!r}.{hint}"
        )

    @staticmethod
    def _resolve_mapping(id_mapping, root: Path, cap_dir: Path):
        """``(callable id -> file, description for errors)``."""
        if callable(id_mapping) and not isinstance(id_mapping, Mapping):
            return id_mapping, "the id_mapping callable"
        if isinstance(id_mapping, Mapping):
            table = {str(k): v for k, v in id_mapping.items()}
            return _Lookup(table), "the id_mapping dict"
        if id_mapping is None:
            candidates = [
                root / "id_mapping.json",
                cap_dir / "id_mapping.json",
                cap_dir.parent / "id_mapping.json",
            ]
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:
                raise FileNotFoundError(
                    "CaptionFileDataset: no id_mapping.json in "
                    + ", ".join(repr(str(p.parent)) for p in candidates)
                    + "; pass id_mapping= (a JSON file {id: image file}, a dict, or a callable id -> file name)"
                )
            id_mapping = found
        path = Path(id_mapping)
        table = load_json(path, "CaptionFileDataset", "id mapping file")
        if not isinstance(table, dict):
            raise ValueError(
                f"CaptionFileDataset: {str(path)!r} must hold a JSON object {{id: file}}, got {type(table).__name__}"
            )
        return _Lookup({str(k): v for k, v in table.items()}), repr(str(path))

    @staticmethod
    def _resolve_image_root(image_root, root: Path, cap_dir: Path) -> Path:
        if image_root is not None:
            p = Path(image_root)
            if not p.is_dir():
                raise FileNotFoundError(
                    f"CaptionFileDataset: image_root {str(p)!r} is not a directory"
                )
            return p
        tried = []
        for base in dict.fromkeys((root, cap_dir.parent)):
            for d in IMAGE_DIRS:
                tried.append(base / d)
                if (base / d).is_dir():
                    return base / d
        raise FileNotFoundError(
            "CaptionFileDataset: no image folder found (tried "
            + ", ".join(repr(str(t)) for t in tried)
            + "); pass image_root="
        )

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _read_captions(path: Path) -> list[str]:
        captions = []
        for n, line in enumerate(read_lines(path, "CaptionFileDataset"), start=1):
            text = line.strip()
            if not text:
                raise ValueError(
                    f"CaptionFileDataset: line {n} of {str(path)!r} is an empty caption; every line must hold one caption"
                )
            captions.append(text)
        if not captions:
            raise ValueError(f"CaptionFileDataset: {str(path)!r} holds no captions")
        return captions

    def __repr__(self) -> str:
        return (
            f"CaptionFileDataset(root={self.root!r}, split={self.split!r}, n_images={self.n_images}, "
            f"n_captions={self.n_captions})"
        )


class _Lookup:
    """``id -> file`` through a table keyed by ``str(id)`` (picklable, unlike a lambda)."""

    def __init__(self, table: dict):
        self.table = table

    def __call__(self, i):
        return self.table[str(i)]
