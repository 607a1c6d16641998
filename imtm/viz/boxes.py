"""Region boxes for the region pictures, read from the files bottom-up-attention users have.

Precomputed region features (the SCAN ``*_ims.npy`` layout) carry no boxes. Who extracted
them with bottom-up attention (BUTD) has the boxes in the extractor's TSV, or saved them as
a ``.npy``; :func:`read_boxes` reads either, one ``(N_b, 4)`` array of ``(x0, y0, x1, y1)``
pixels per image, in the file's image order. Pass one to ``boxes=`` of
:func:`~imtm.viz.word_alignment_maps` or :func:`~imtm.viz.phrase_topk_regions`.
"""

from __future__ import annotations

import base64
import binascii
import csv
import os
import sys

import numpy as np

__all__ = ["BUTD_FIELDS", "read_boxes"]

#: The columns of bottom-up-attention's TSV (``generate_tsv.py`` of peteanderson80/bottom-up-attention):
#: ``boxes`` and ``features`` are base64 of float32 arrays, ``num_boxes`` rows each.
BUTD_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


def read_boxes(path: str | os.PathLike, *, with_ids: bool = False):
    """One ``(N_b, 4)`` float array of region boxes per image, from a BUTD ``.tsv`` or a ``.npy``.

    Args:
        path: a bottom-up-attention TSV (columns :data:`BUTD_FIELDS`, tab-separated, no header) or a
            ``.npy`` of shape ``(n_images, N, 4)`` (or ``(N, 4)`` for one image); the ``.npy`` is
            read without pickles.
        with_ids: also return the images' ids (the TSV's ``image_id`` column; positions for a ``.npy``).

    Returns:
        a list of ``(N_b, 4)`` float64 arrays ``(x0, y0, x1, y1)`` in pixels, in file order; with
        ``with_ids``, ``(ids, boxes)``.

    Raises:
        ValueError: another suffix, a TSV row without the BUTD columns or with boxes that do not
            decode to ``num_boxes x 4`` floats, an array of another shape.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "boxes.npy"
        >>> np.save(f, np.zeros((2, 3, 4)))
        >>> [b.shape for b in read_boxes(f)]
        [(3, 4), (3, 4)]
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[-1] != 4 or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(
                f"imtm.viz.read_boxes: {path!r} holds an array of shape {arr.shape} ({arr.dtype}); "
                "expected numbers of shape (n_images, N, 4) or (N, 4), boxes as (x0, y0, x1, y1)"
            )
        boxes = [a.astype(np.float64) for a in arr]
        return (list(range(len(boxes))), boxes) if with_ids else boxes
    if suffix != ".tsv":
        raise ValueError(
            f"imtm.viz.read_boxes: {path!r}: expected a bottom-up-attention '.tsv' or a '.npy' of boxes"
        )
    ids, boxes = [], []
    csv.field_size_limit(
        min(sys.maxsize, 2**31 - 1)
    )  # a row holds the base64 features of every box
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(
            csv.DictReader(f, delimiter="\t", fieldnames=BUTD_FIELDS), start=1
        ):
            if any(row.get(k) in (None, "") for k in ("image_id", "num_boxes", "boxes")):
                raise ValueError(
                    f"imtm.viz.read_boxes: {path!r} line {line}: expected the tab-separated "
                    f"bottom-up-attention columns {list(BUTD_FIELDS)}"
                )
            try:
                n = int(row["num_boxes"])
                b = np.frombuffer(base64.b64decode(row["boxes"], validate=True), dtype=np.float32)
            except (ValueError, binascii.Error) as err:
                raise ValueError(
                    f"imtm.viz.read_boxes: {path!r} line {line}: unreadable num_boxes or boxes "
                    f"({err})"
                ) from err
            if n < 0 or b.size != 4 * n:
                raise ValueError(
                    f"imtm.viz.read_boxes: {path!r} line {line}: num_boxes={n} but the boxes "
                    f"field holds {b.size} floats (expected {4 * n})"
                )
            ids.append(row["image_id"])
            boxes.append(b.reshape(n, 4).astype(np.float64))
    return (ids, boxes) if with_ids else boxes
