"""Hugging Face ``datasets`` as imtm training and evaluation data (the package itself is optional).

:func:`from_hf_dataset` reads a dataset with an image column and a caption column:

- a map-style ``datasets.Dataset`` becomes an :class:`~imtm.data.ImageCaptionDataset`: the
  captions are read at once, the images lazily (one row when the item is asked for), so it
  trains, evaluates and resumes like any imtm dataset;
- a streaming ``datasets.IterableDataset`` (``load_dataset(..., streaming=True)``) becomes a
  :class:`torch.utils.data.IterableDataset` of imtm items; train on it with
  ``Matcher(steps_per_epoch=...)``. Its ``set_epoch`` reaches the Hugging Face stream, which
  reshuffles its buffer by epoch.

A caption cell may hold one string or a list of strings (several captions of one image). With
``image_id_column``, rows of the same id are one image (datasets with a row per caption).
Images are returned as they are stored unless ``transform`` is given; a PIL image becomes a
``uint8`` tensor ``(3, H, W)`` (what :class:`~imtm.components.TimmVisionEncoder` takes).

Example:
    >>> rows = {"image": [torch.zeros(3, 4, 4), torch.ones(3, 4, 4)], "caption": [["a", "b"], "c"]}
    >>> ds = from_hf_dataset(InMemory(rows))
    >>> ds.n_images, ds.captions, ds.caption_to_image.tolist()
    (2, ['a', 'b', 'c'], [0, 0, 1])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from imtm.data.base import ImageCaptionDataset

__all__ = ["from_hf_dataset", "HFImages", "HFStream", "InMemory", "to_tensor"]


def to_tensor(image: Any) -> Any:
    """A PIL image as a ``uint8`` tensor ``(3, H, W)``; anything else unchanged."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return (
            torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
        )
    return image


class InMemory:
    """A dict of columns as a tiny stand-in for ``datasets.Dataset`` (``column_names``, rows by index, columns by name)."""

    def __init__(self, columns: dict[str, Sequence[Any]]):
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"InMemory: every column needs the same length, got {sorted(lengths)}")
        self.columns = {k: list(v) for k, v in columns.items()}
        self.column_names = list(columns)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.columns[key]
        return {k: v[key] for k, v in self.columns.items()}


class HFImages:
    """The image column of a map-style dataset, read one row at a time (``rows[i]``: the row of image ``i``)."""

    def __init__(
        self, data, column: str, rows: Sequence[int], transform: Callable[[Any], Any] | None = None
    ):
        self.data, self.column, self.rows, self.transform = data, column, list(rows), transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        image = to_tensor(self.data[int(self.rows[i])][self.column])
        return self.transform(image) if self.transform is not None else image


def _captions(cell: Any, where: str) -> list[str]:
    found = (
        [cell] if isinstance(cell, str) else list(cell) if isinstance(cell, (list, tuple)) else None
    )
    if not found or not all(isinstance(c, str) for c in found):
        raise TypeError(
            f"from_hf_dataset: {where} holds {cell!r}; a caption cell is a string or a list of strings"
        )
    return found


def _check_columns(
    data, image_column: str, caption_column: str, image_id_column: str | None
) -> None:
    names = getattr(data, "column_names", None)
    if names is None:
        return  # a stream that does not know its columns before reading
    for col in (image_column, caption_column) + ((image_id_column,) if image_id_column else ()):
        if col not in names:
            raise ValueError(f"from_hf_dataset: no column {col!r}; the dataset has {list(names)}")


class HFStream(IterableDataset):
    """A stream of rows as imtm training items (``{"images", "texts", "image_ids"}``), one per caption."""

    def __init__(
        self,
        data,
        image_column: str = "image",
        caption_column: str = "caption",
        image_id_column: str | None = None,
        transform: Callable[[Any], Any] | None = None,
    ):
        self.data, self.image_column, self.caption_column = data, image_column, caption_column
        self.image_id_column, self.transform = image_id_column, transform

    def set_epoch(self, epoch: int) -> None:
        hook = getattr(self.data, "set_epoch", None)
        if callable(hook):
            hook(epoch)

    def __iter__(self) -> Iterator[dict]:
        ids: dict[Any, int] = {}
        for n, row in enumerate(self.data):
            key = row[self.image_id_column] if self.image_id_column else n
            image_id = ids.setdefault(key, len(ids))
            image = to_tensor(row[self.image_column])
            image = self.transform(image) if self.transform is not None else image
            for caption in _captions(
                row[self.caption_column], f"row {n}, column {self.caption_column!r}"
            ):
                yield {"images": image, "texts": caption, "image_ids": image_id}


def from_hf_dataset(
    data,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    image_id_column: str | None = None,
    transform: Callable[[Any], Any] | None = None,
    vocab=None,
    name: str = "hf",
):
    """imtm data from a Hugging Face dataset with an image and a caption column (see the module docstring).

    Args:
        data: a ``datasets.Dataset`` (or anything with ``column_names``, ``len`` and rows by index),
            or a streaming ``datasets.IterableDataset`` (anything iterable of row dicts without ``len``).
        image_column, caption_column: the columns' names.
        image_id_column: rows with the same value there show one image (a row per caption).
        transform: applied to each image when it is read (after PIL -> tensor).
        vocab: a :class:`~imtm.data.Vocabulary` for the captions (map-style only).
        name: the dataset's name in messages.

    Returns:
        an :class:`~imtm.data.ImageCaptionDataset` (map-style) or an :class:`HFStream`.

    Raises:
        ValueError: a column is missing, or the dataset holds no caption.
        TypeError: a caption cell is neither a string nor a list of strings.
    """
    _check_columns(data, image_column, caption_column, image_id_column)
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        return HFStream(data, image_column, caption_column, image_id_column, transform)
    cells = data[caption_column]
    keys = data[image_id_column] if image_id_column else range(len(cells))
    index: dict[Any, int] = {}  # image key -> image number
    rows: list[int] = []  # image number -> its first row
    captions: list[str] = []
    c2i: list[int] = []
    for n, (key, cell) in enumerate(zip(keys, cells)):
        if key not in index:
            index[key] = len(rows)
            rows.append(n)
        found = _captions(cell, f"row {n}, column {caption_column!r}")
        captions += found
        c2i += [index[key]] * len(found)
    images = HFImages(data, image_column, rows, transform)
    return ImageCaptionDataset(images, captions, c2i, vocab=vocab, name=name)
