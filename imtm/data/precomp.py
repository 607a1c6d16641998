"""Precomputed region features in the SCAN / VSE++ / CHAN release layout.

A split ``S`` of a dataset directory holds

- ``S_ims.npy``: ``(n_images, R, D)`` bottom-up-attention region features (``R`` = 36
  and ``D`` = 2048 in the public releases, any ``R`` and ``D`` work; a 2-D
  ``(n_images, D)`` file of global features is read as ``R`` = 1);
- ``S_caps.txt``: one caption per line, grouped by image in order: captions
  ``k * cpi .. (k + 1) * cpi - 1`` belong to image ``k``, with
  ``cpi = n_captions / n_images`` (5 for Flickr30K and COCO);
- optionally ``S_ids.txt``: integer ids, either one line per image or one line per
  caption (the line count tells which).

Some releases store one feature row per *caption* (each image repeated ``cpi``
times; SCAN's ``im_div``). Such a file has as many rows as captions. Pass
``captions_per_image=5`` to read it as 5 captions per image (image ``k`` is row
``5k``); without it, a per-caption ids file whose ids come in equal runs of
``c`` lines is taken as proof of ``c`` captions per image; otherwise each row is
its own image (one caption per image).

References:
    Lee et al., "Stacked Cross Attention for Image-Text Matching", ECCV 2018 (the
    ``*_precomp`` layout); Anderson et al., "Bottom-Up and Top-Down Attention for
    Image Captioning and Visual Question Answering", CVPR 2018 (the features).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from imtm._checks import suggest
from imtm._io import check_npy_size
from imtm.data.base import ImageCaptionDataset
from imtm.data.vocabulary import Vocabulary

__all__ = ["PrecompDataset", "PrecompImages"]


class PrecompImages:
    """A lazy sequence of region-feature arrays read from a ``.npy`` file.

    ``images[k]`` copies only row ``k * step`` of the file into a new float32
    tensor ``(R, D)``; with ``mmap=True`` the file is memory-mapped, so a 33 GB
    COCO training file is never read whole. Pickling (DataLoader workers under
    the ``spawn`` start method) sends the path, not the data.

    Args:
        path: the ``.npy`` file, ``(n_rows, R, D)`` or ``(n_rows, D)``.
        mmap: memory-map the file (``True``) or load it into memory.
        step: row stride: image ``k`` is row ``k * step`` (``step`` > 1 for files
            with one row per caption).

    Raises:
        ValueError: the file is not a plain numeric ``.npy`` array (truncated, empty, an
            object array, which is refused without unpickling, an ``.npz``), is not 2-D or
            3-D, is empty, or holds a non-numeric dtype; an item holds NaN or inf.

    Shape:
        - item: ``(R, D)`` float32 (``(1, D)`` for a 2-D file)

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "test_ims.npy")
        >>> np.save(p, np.arange(24, dtype=np.float64).reshape(4, 3, 2))
        >>> ims = PrecompImages(p, step=2)
        >>> len(ims), ims.shape, ims[1].dtype, ims[1][0].tolist()
        (2, (2, 3, 2), torch.float32, [12.0, 13.0])
    """

    def __init__(self, path, *, mmap: bool = True, step: int = 1):
        self.path = str(path)
        self.mmap = mmap
        self.step = step
        self._open()

    def _open(self) -> None:
        try:
            check_npy_size(
                self.path, "PrecompImages"
            )  # before np.load allocates the declared shape
            arr = np.load(self.path, mmap_mode="r" if self.mmap else None, allow_pickle=False)
        except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
            # allow_pickle=False: an object array is refused here, never unpickled.
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(
                f"PrecompImages: {self.path!r} is not a plain numeric .npy array ({type(e).__name__}: {e})"
            ) from e
        if not isinstance(arr, np.ndarray) or arr.ndim not in (2, 3) or 0 in arr.shape:
            got = arr.shape if isinstance(arr, np.ndarray) else type(arr).__name__
            raise ValueError(
                f"PrecompImages: {self.path!r} must hold features of shape (n_images, R, D) "
                f"(or (n_images, D)), got {got}"
            )
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(
                f"PrecompImages: {self.path!r} holds dtype {arr.dtype}, expected floating-point features"
            )
        if (
            not isinstance(self.step, (int, np.integer))
            or isinstance(self.step, bool)
            or self.step < 1
        ):
            raise ValueError(f"PrecompImages: step must be a positive integer, got {self.step!r}")
        self._rows = arr
        self._n = -(-arr.shape[0] // self.step)

    @property
    def n_rows(self) -> int:
        """Rows in the file (``len(self) * step`` when rows are per caption)."""
        return int(self._rows.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n_images, R, D)``."""
        tail = tuple(self._rows.shape[1:])
        return (self._n,) + (tail if len(tail) == 2 else (1,) + tail)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, k) -> torch.Tensor:
        try:
            k = int(k.__index__()) if not isinstance(k, torch.Tensor) else int(k)
        except (AttributeError, TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"PrecompImages: index must be an integer, got {type(k).__name__}"
            ) from None
        if not -self._n <= k < self._n:
            raise IndexError(f"PrecompImages: image index {k} out of range for {self._n} images")
        k %= self._n
        # np.array copies just this row out of the memory map.
        row = np.array(self._rows[k * self.step], dtype=np.float32)
        if row.ndim == 1:
            row = row[None, :]
        if not np.isfinite(row).all():
            raise ValueError(
                f"PrecompImages: image {k} (row {k * self.step} of {self.path!r}) holds NaN or inf features"
            )
        return torch.from_numpy(row)

    def __iter__(self):
        for k in range(self._n):
            yield self[k]

    def __getstate__(self) -> dict:
        state = {"path": self.path, "mmap": self.mmap, "step": self.step}
        if not self.mmap:
            state["rows"] = self._rows
        return state

    def __setstate__(self, state: dict) -> None:
        self.path, self.mmap, self.step = state["path"], state["mmap"], state["step"]
        if "rows" in state:
            self._rows = state["rows"]
            self._n = -(-self._rows.shape[0] // self.step)
        else:
            self._open()

    def __repr__(self) -> str:
        return (
            f"PrecompImages({self.path!r}, shape={self.shape}, mmap={self.mmap}, step={self.step})"
        )


def read_lines(path: Path, who: str = "PrecompDataset") -> list[str]:
    try:
        # utf-8-sig: a byte-order mark is not glued to the first caption or id.
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{who}: line {line} of {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason})"
        ) from e
    # A final newline leaves one empty string after it; it is not a line.
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def parse_ids(
    lines: list[str], path: Path, who: str = "PrecompDataset", what: str = "id"
) -> torch.Tensor:
    """``(L,)`` long ids, one per line; a line that is not an integer is a ValueError naming it."""
    ids = []
    for n, line in enumerate(lines, start=1):
        text = line.strip()
        try:
            ids.append(int(text))
        except ValueError:
            raise ValueError(
                f"{who}: line {n} of {str(path)!r} is {text!r}, expected an integer {what}"
            ) from None
    return torch.tensor(ids, dtype=torch.long)


def _runs_of_equal_ids(ids: torch.Tensor) -> int:
    """Length ``c`` when ``ids`` is made of consecutive runs of ``c`` equal values, else 1."""
    n = ids.numel()
    changes = torch.nonzero(ids[1:] != ids[:-1]).flatten()
    c = int(changes[0]) + 1 if changes.numel() else n
    if c > 1 and n % c == 0 and bool((ids.view(-1, c) == ids.view(-1, c)[:, :1]).all()):
        return c
    return 1


class PrecompDataset(ImageCaptionDataset):
    """A split of precomputed region features and captions (SCAN's ``*_precomp`` format).

    Reads ``{data_path}/{split}_ims.npy``, ``{split}_caps.txt`` and, if present,
    ``{split}_ids.txt`` (see the module docstring for the layout). Images are a
    lazy :class:`PrecompImages` sequence: each access copies one ``(R, D)`` row of
    the memory-mapped file into a float32 tensor. Every one of the ``R`` regions is
    real (the bottom-up-attention releases always keep 36), so collating gives
    full masks.

    Args:
        data_path: the directory of the split files.
        split: the split name, e.g. ``"train"``, ``"dev"``, ``"test"``, ``"testall"``.
        mmap: memory-map the feature file (default) or load it into memory.
        captions_per_image: how many consecutive captions share an image. ``None``:
            ``n_captions / n_rows`` (must divide exactly), except that a per-caption
            ids file made of equal runs of ``c`` ids sets it to ``c`` when the file has
            one row per caption. When given and the file has as many rows as there are
            captions, the rows are taken as one per caption (images repeated ``c``
            times; SCAN's ``im_div``) and image ``k`` is row ``k * c`` (the repeats are
            not compared, which would read the whole file).
        vocab: a :class:`imtm.data.Vocabulary` to attach (build it on the training split
            and pass it to the others).
        build_vocab: with ``vocab=None``, build a vocabulary from this split's captions.
        name: a short name for logs; ``"{directory}/{split}"`` by default.

    Attributes:
        images: :class:`PrecompImages`, one item ``(R, D)`` per unique image.
        captions: the captions, stripped of surrounding whitespace.
        caption_to_image: ``(n_captions,)`` long, 0-based image index of each caption.
        captions_per_image: the resolved ``cpi``.
        image_ids_external: ``(n_images,)`` long ids from ``{split}_ids.txt``, or ``None``
            when the split has no ids file.

    Raises:
        FileNotFoundError: the directory, the feature file or the caption file is missing.
        ValueError: a feature file that is not a numeric ``.npy`` array of 2 or 3 dimensions
            (truncated, an object array, which is refused without unpickling, the wrong shape or
            dtype), a caption or ids file that is not UTF-8 (named by line), an empty caption line
            (named by its line number), a caption count
            that is not a multiple of the image count, an ids file of the wrong length or
            with different ids among one image's captions.

    Shape:
        - ``self[k]["images"]``: ``(R, D)`` float32
        - ``caption_to_image``: ``(n_captions,)``

    References:
        Lee et al., SCAN, ECCV 2018 (``data.py``'s ``PrecompDataset`` and its layout).

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> np.save(os.path.join(d, "test_ims.npy"), np.zeros((2, 36, 8), dtype=np.float32))
        >>> _ = open(os.path.join(d, "test_caps.txt"), "w").write("a dog .\\nthe dog\\na cat\\none cat\\n")
        >>> ds = PrecompDataset(d, "test")
        >>> len(ds), ds.n_images, ds.captions_per_image, ds[3]["images"].shape, ds[3]["image_ids"]
        (4, 2, 2, torch.Size([36, 8]), 1)
    """

    def __init__(
        self,
        data_path,
        split: str,
        *,
        mmap: bool = True,
        captions_per_image: int | None = None,
        vocab: Vocabulary | None = None,
        build_vocab: bool = False,
        name: str | None = None,
    ):
        root = Path(data_path)
        self.data_path = str(data_path)
        self.split = split
        self.mmap = mmap
        ims_path = root / f"{split}_ims.npy"
        caps_path = root / f"{split}_caps.txt"
        ids_path = root / f"{split}_ids.txt"
        self._check_files(root, split, ims_path, caps_path)

        if captions_per_image is not None and (
            not isinstance(captions_per_image, (int, np.integer))
            or isinstance(captions_per_image, bool)
            or captions_per_image < 1
        ):
            raise ValueError(
                f"PrecompDataset: captions_per_image must be a positive integer or None, got {captions_per_image!r}"
            )
        if vocab is not None and not isinstance(vocab, Vocabulary):
            raise TypeError(
                f"PrecompDataset: vocab must be an imtm.data.Vocabulary or None, got {type(vocab).__name__}"
            )
        if vocab is not None and build_vocab:
            raise ValueError("PrecompDataset: give either vocab= or build_vocab=True, not both")

        captions = self._read_captions(caps_path)
        n_caps = len(captions)
        rows = PrecompImages(ims_path, mmap=mmap)
        n_rows = rows.n_rows
        id_lines = read_lines(ids_path) if ids_path.is_file() else None
        ids = parse_ids(id_lines, ids_path) if id_lines is not None else None

        cpi, step = (
            int(v)
            for v in self._resolve_layout(
                n_rows, n_caps, captions_per_image, ids, ims_path, caps_path
            )
        )
        images = PrecompImages(ims_path, mmap=mmap, step=step) if step > 1 else rows
        n_images = len(images)

        self.captions_per_image = cpi
        self.image_ids_external = (
            None if ids is None else self._image_ids(ids, n_images, n_caps, cpi, ids_path)
        )
        if build_vocab:
            vocab = Vocabulary.build(captions)
        super().__init__(
            images,
            captions,
            torch.arange(n_caps) // cpi,
            vocab=vocab,
            name=name if name is not None else f"{root.name}/{split}",
        )

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _check_files(root: Path, split: str, ims_path: Path, caps_path: Path) -> None:
        missing = [p.name for p in (ims_path, caps_path) if not p.is_file()]
        if not missing:
            return
        expected = (
            f"expected {ims_path.name} (features, (n_images, R, D)) and {caps_path.name} "
            "(one caption per line), optionally " + f"{split}_ids.txt"
        )
        if not root.is_dir():
            raise FileNotFoundError(f"PrecompDataset: no directory {str(root)!r}; {expected}")
        splits = sorted(p.name[: -len("_caps.txt")] for p in root.glob("*_caps.txt"))
        hint = f" Splits found there: {splits}." + suggest(split, splits) if splits else ""
        raise FileNotFoundError(
            f"PrecompDataset: missing {missing} in {str(root)!r} for split {split!r}; {expected}.{hint}"
        )

    @staticmethod
    def _read_captions(caps_path: Path) -> list[str]:
        lines = read_lines(caps_path)
        captions = []
        for n, line in enumerate(lines, start=1):
            text = line.strip()
            if not text:
                raise ValueError(
                    f"PrecompDataset: line {n} of {str(caps_path)!r} is an empty caption; "
                    "every line must hold one caption"
                )
            captions.append(text)
        if not captions:
            raise ValueError(f"PrecompDataset: {str(caps_path)!r} holds no captions")
        return captions

    @staticmethod
    def _resolve_layout(n_rows, n_caps, cpi, ids, ims_path, caps_path) -> tuple[int, int]:
        """``(captions_per_image, row step)`` of the files."""
        if cpi is None and n_rows == n_caps and ids is not None and ids.numel() == n_caps:
            # One row per caption and per-caption ids that come in runs: the runs are the images.
            cpi = _runs_of_equal_ids(ids)
            return cpi, cpi
        if cpi is None:
            if n_caps % n_rows != 0:
                raise ValueError(
                    f"PrecompDataset: {n_caps} captions in {caps_path.name} is not a multiple of the "
                    f"{n_rows} images in {ims_path.name}; captions must come in equal groups per image "
                    "(pass captions_per_image= if the feature file has one row per caption)"
                )
            return n_caps // n_rows, 1
        if n_rows * cpi == n_caps:
            return cpi, 1
        if n_rows == n_caps and n_caps % cpi == 0:
            # SCAN's im_div layout: each image row repeated once per caption.
            return cpi, cpi
        raise ValueError(
            f"PrecompDataset: captions_per_image={cpi} does not fit {n_caps} captions in {caps_path.name} "
            f"and {n_rows} feature rows in {ims_path.name} (expected {n_caps} = rows x {cpi}, or one row per caption)"
        )

    @staticmethod
    def _image_ids(
        ids: torch.Tensor, n_images: int, n_caps: int, cpi: int, ids_path: Path
    ) -> torch.Tensor:
        if ids.numel() == n_images:
            return ids
        if ids.numel() != n_caps:
            raise ValueError(
                f"PrecompDataset: {ids_path.name} has {ids.numel()} lines; expected one per image "
                f"({n_images}) or one per caption ({n_caps})"
            )
        groups = ids.view(n_images, cpi)
        bad = groups != groups[:, :1]
        if bool(bad.any()):
            first = torch.nonzero(bad.flatten()).flatten()[:1].tolist()[0]
            image = first // cpi
            raise ValueError(
                f"PrecompDataset: line {first + 1} of {ids_path.name} has id {int(ids[first])} but the other "
                f"captions of image {image} (lines {image * cpi + 1}-{(image + 1) * cpi}) have id "
                f"{int(groups[image, 0])}; captions of one image must share its id"
            )
        return groups[:, 0].clone()

    def __repr__(self) -> str:
        return (
            f"PrecompDataset(data_path={self.data_path!r}, split={self.split!r}, n_images={self.n_images}, "
            f"n_captions={self.n_captions}, regions={self.images.shape[1]}, dim={self.images.shape[2]})"
        )
