"""A plain CSV (or TSV) of image files and captions: one row per caption.

The header names the columns; by default ``filepath`` and ``caption`` (open_clip's
``CsvDataset`` reads the same layout with ``title`` for the caption and a tab
separator: pass ``caption_key="title"``, and ``.tsv`` files are read tab-separated).
Rows naming the same file share one image, in order of first appearance.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from imtm._checks import suggest
from imtm.data.image_files import ImageFileDataset, group_by_image, resolve_under

__all__ = ["CsvDataset"]


class CsvDataset(ImageFileDataset):
    """Image-caption pairs from a CSV file; one item per row.

    Args:
        csv_path: the CSV file (a header row, then one row per caption).
        image_root: the folder relative file paths are under; ``None``: the CSV's folder.
        transform: applied to each PIL image (see :func:`imtm.data.transforms.image_transform`).
        image_key: the column of image file paths.
        caption_key: the column of captions.
        sep: the field separator; ``None``: tab for ``.tsv`` files, comma otherwise.
        augment: caption augmentation in ``dataset[k]`` (see :class:`ImageFileDataset`).
        vocab, build_vocab, check_files, name: see :class:`ImageFileDataset`.

    Attributes:
        image_ids_external: the ``image_key`` value of each unique image.

    Raises:
        FileNotFoundError: the CSV or (``check_files=True``) an image is missing.
        ValueError: a file that is not UTF-8 or not valid CSV (an unclosed quote), a missing or
            repeated column (with the columns found), a row with more or fewer fields than the
            header, an empty caption or file path (each named by line number), no rows.

    Shape:
        - ``self[k]["images"]``: ``(3, H, W)`` (what ``transform`` returns)

    Example:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> d = tempfile.mkdtemp()
        >>> Image.new("RGB", (8, 8)).save(os.path.join(d, "a.png"))
        >>> _ = open(os.path.join(d, "t.csv"), "w").write("filepath,caption\\na.png,a cat\\na.png,\\"a cat, asleep\\"\\n")
        >>> ds = CsvDataset(os.path.join(d, "t.csv"))
        >>> len(ds), ds.n_images, ds[1]["texts"]
        (2, 1, 'a cat, asleep')
    """

    def __init__(
        self,
        csv_path,
        image_root=None,
        transform: Callable | None = None,
        *,
        image_key: str = "filepath",
        caption_key: str = "caption",
        sep: str | None = None,
        augment=None,
        vocab=None,
        build_vocab: bool = False,
        check_files: bool = False,
        name: str | None = None,
    ):
        who = "CsvDataset"
        path = Path(csv_path)
        self.csv_path = str(path)
        self.image_root = None if image_root is None else str(image_root)
        if not path.is_file():
            raise FileNotFoundError(f"{who}: no CSV file {str(path)!r}")
        if sep is None:
            sep = "\t" if path.suffix.lower() == ".tsv" else ","
        root = None if image_root is None else Path(image_root)
        keys, captions, first_line = [], [], {}
        try:
            # utf-8-sig: a byte-order mark (Excel writes one) is not glued to the first column's name.
            with open(path, encoding="utf-8-sig", newline="") as f:
                # strict: an unclosed quote is an error, not one caption swallowing the rest of the file.
                reader = csv.DictReader(f, delimiter=sep, strict=True)
                columns = reader.fieldnames or []
                for key in (image_key, caption_key):
                    if key not in columns:
                        raise ValueError(
                            f"{who}: {path.name} has no column {key!r}; its header is {columns} "
                            f"(separator {sep!r}).{suggest(key, columns)} Pass image_key= / caption_key= / sep="
                        )
                    if columns.count(key) > 1:
                        raise ValueError(
                            f"{who}: {path.name} has the column {key!r} twice in its header {columns}"
                        )
                rows = [(reader.line_num, row) for row in reader]
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{who}: {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason})"
            ) from e
        except csv.Error as e:
            raise ValueError(
                f"{who}: {str(path)!r} is not a valid CSV file (near line {reader.line_num}: {e})"
            ) from e
        for line, row in rows:
            if None in row or None in row.values():
                # More fields than the header is most often a caption with an unquoted separator.
                n_fields = sum(v is not None for k, v in row.items() if k is not None) + len(
                    row.get(None) or ()
                )
                raise ValueError(
                    f"{who}: line {line} of {path.name} has {n_fields} fields but the header has {len(columns)}; "
                    f"quote fields that contain the separator {sep!r}"
                )
            file, cap = row.get(image_key), row.get(caption_key)
            if not file or not file.strip():
                raise ValueError(f"{who}: line {line} of {path.name} has an empty {image_key!r}")
            if not cap or not cap.strip():
                raise ValueError(
                    f"{who}: line {line} of {path.name} has an empty caption ({caption_key!r})"
                )
            full = str(resolve_under(root, file.strip(), path.parent))
            first_line.setdefault(full, (line, file.strip()))
            keys.append(full)
            captions.append(cap.strip())
        if not captions:
            raise ValueError(f"{who}: {path.name} has a header but no rows")
        paths, c2i = group_by_image(keys)
        super().__init__(
            paths,
            captions,
            c2i,
            transform,
            augment=augment,
            sources=[f"line {first_line[p][0]} of {path.name}" for p in paths],
            image_ids_external=[first_line[p][1] for p in paths],
            vocab=vocab,
            build_vocab=build_vocab,
            check_files=check_files,
            name=name if name is not None else path.stem,
        )
