"""Images on disk: a lazy sequence of image files and the dataset base built on it.

Every raw-image loader of :mod:`imtm.data` (:class:`~imtm.data.KarpathyDataset`,
:class:`~imtm.data.CaptionFileDataset`, :class:`~imtm.data.AlbefJsonDataset`,
:class:`~imtm.data.CsvDataset`) parses its annotation format into three lists, the
image files, the captions and each caption's image, and hands them to
:class:`ImageFileDataset`. Images are opened with PIL only when an item is read,
converted to RGB and passed through the transform, so a dataset of 120k COCO
images costs a list of paths until it is iterated.

Errors name the file and the annotation that named it: a missing file raises
``FileNotFoundError``, a file PIL cannot decode (truncated, corrupt, not an image)
raises :class:`ImageReadError`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from imtm.data.base import ImageCaptionDataset

__all__ = ["ImageFileDataset", "ImageFiles", "ImageReadError", "read_image"]

# How many missing files a check_files error lists before "and N more".
_MAX_LISTED = 5


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded (truncated, corrupt or not an image)."""


def read_image(path, source: str | None = None):
    """Open ``path`` with PIL, decode it fully and convert it to RGB.

    Args:
        path: the image file.
        source: where the file was named (e.g. ``"entry 3 of dataset_coco.json"``), put
            into error messages.

    Returns:
        a ``PIL.Image.Image`` in mode ``"RGB"``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ImageReadError: PIL cannot decode the file (empty, truncated, corrupt, not an
            image), or it declares a size over PIL's decompression-bomb limit.
    """
    from PIL import Image, UnidentifiedImageError

    where = f" (named by {source})" if source else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"image file {str(path)!r}{where} does not exist; check the image root folder"
        )
    try:
        with Image.open(path) as im:
            # load() decodes the pixels now: a truncated file fails here, not later inside a transform.
            im.load()
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        # PIL refuses a declared size over twice Image.MAX_IMAGE_PIXELS before decoding anything.
        raise ImageReadError(
            f"image file {str(path)!r}{where} declares a size too large to decode safely ({e}); it is damaged "
            "or a decompression bomb. Raise PIL.Image.MAX_IMAGE_PIXELS only for files you trust"
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(
            f"image file {str(path)!r}{where} cannot be read as an image ({type(e).__name__}: {e}); "
            "the file is corrupt or truncated: re-download or remove it"
        ) from e


def _to_tensor(im) -> torch.Tensor:
    """A PIL RGB image as a ``(3, H, W)`` float32 tensor in ``[0, 1]`` (the default transform)."""
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(im).float().div_(255.0)


class ImageFiles:
    """A lazy sequence of image files: ``files[k]`` reads file ``k`` and transforms it.

    Args:
        paths: one path per image.
        transform: a callable ``PIL.Image -> tensor`` (see
            :func:`imtm.data.transforms.image_transform`); ``None`` gives the image as a
            ``(3, H, W)`` float tensor in ``[0, 1]`` at its own size (collating a batch
            then needs images of one size).
        sources: for each image, where the annotation named it (put into errors).
        name: the owner's name, put into errors.

    Shape:
        - item: what ``transform`` returns, ``(3, H, W)`` for the transforms of imtm

    Example:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> p = os.path.join(tempfile.mkdtemp(), "a.png")
        >>> Image.new("RGB", (5, 4), (255, 0, 0)).save(p)
        >>> files = ImageFiles([p])
        >>> files[0].shape, files[0][0, 0, 0].item()
        (torch.Size([3, 4, 5]), 1.0)
    """

    def __init__(
        self,
        paths: Sequence,
        transform: Callable | None = None,
        sources: Sequence[str] | None = None,
        name: str = "images",
    ):
        self.paths = [str(p) for p in paths]
        if sources is not None and len(sources) != len(self.paths):
            raise ValueError(
                f"{name}: got {len(sources)} sources for {len(self.paths)} image paths"
            )
        self.sources = None if sources is None else list(sources)
        self.transform = transform
        self.name = name

    def __len__(self) -> int:
        return len(self.paths)

    def source(self, k: int) -> str:
        """Where image ``k`` was named (its annotation), or its index."""
        return self.sources[k] if self.sources is not None else f"image {k}"

    def read(self, k: int):
        """Image ``k`` as an RGB ``PIL.Image``, before the transform."""
        try:
            k = int(k.__index__()) if not isinstance(k, torch.Tensor) else int(k)
        except (AttributeError, TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{self.name}: image index must be an integer, got {type(k).__name__}"
            ) from None
        n = len(self.paths)
        if not -n <= k < n:
            raise IndexError(f"{self.name}: image index {k} out of range for {n} images")
        k %= n
        return read_image(self.paths[k], f"{self.source(k)}, image {k} of {self.name}")

    def __getitem__(self, k):
        im = self.read(k)
        return _to_tensor(im) if self.transform is None else self.transform(im)

    def __iter__(self):
        for k in range(len(self)):
            yield self[k]

    def missing(self) -> list[int]:
        """Indices of images whose file does not exist (one ``stat`` per file)."""
        return [k for k, p in enumerate(self.paths) if not os.path.isfile(p)]

    def check(self) -> None:
        """Raise ``FileNotFoundError`` listing the missing files, with their annotations."""
        bad = self.missing()
        if not bad:
            return
        listed = "; ".join(f"{self.paths[k]!r} ({self.source(k)})" for k in bad[:_MAX_LISTED])
        more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise FileNotFoundError(
            f"{self.name}: {len(bad)} of {len(self)} image files do not exist: {listed}{more}; "
            "check the image root folder"
        )

    def __repr__(self) -> str:
        return f"ImageFiles(n={len(self)}, transform={self.transform!r})"


def _resolve_augment(augment, captions: Sequence[str], vocab):
    """``augment=`` of a dataset: ``None``/``False`` (off), ``True`` (the VSE-infinity default) or a callable."""
    if augment is None or augment is False:
        return None
    if augment is True:
        from imtm.data.augment import CaptionAugment

        if vocab is not None:
            return CaptionAugment.from_vocabulary(vocab)
        return CaptionAugment.from_captions(captions)
    if not callable(augment):
        raise TypeError(
            f"augment must be None, True or a callable caption -> caption (e.g. imtm.data.CaptionAugment), "
            f"got {type(augment).__name__}"
        )
    return augment


class ImageFileDataset(ImageCaptionDataset):
    """Image files plus captions; one item per caption, the image read lazily.

    The base of the raw-image loaders; usable directly with lists of paths.
    ``images`` is an :class:`ImageFiles` (what ``Matcher.evaluate`` and
    ``imtm extract`` read, one item per unique image); ``captions`` are the captions
    as written. Training-time caption augmentation (``augment=``) is applied only in
    ``dataset[k]``, the training path: evaluation reads ``captions`` and never sees it.

    Args:
        paths: one file per unique image.
        captions: every caption.
        caption_to_image: ``(n_captions,)`` index into ``paths`` of each caption's image.
        transform: applied to each PIL image (see :func:`imtm.data.transforms.image_transform`).
        augment: ``None`` (default, off), ``True`` (:class:`imtm.data.CaptionAugment` with
            the VSE-infinity rates, replacement words from ``vocab`` or from these
            captions) or any callable ``str -> str``.
        sources: for each image, the annotation that named it (put into errors).
        image_ids_external: the dataset's own id of each image (COCO ids, file names), kept
            for reference; items carry the 0-based index.
        vocab: a :class:`imtm.data.Vocabulary` to attach.
        build_vocab: with ``vocab=None``, build one from these captions.
        check_files: ``stat`` every image file now and raise on the missing ones, instead
            of when an item is read.
        name: a short name for logs and errors.

    Shape:
        - ``self[k]["images"]``: what ``transform`` returns (``(3, H, W)``)
        - ``caption_to_image``: ``(n_captions,)``

    Example:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> d = tempfile.mkdtemp()
        >>> for n in ("a", "b"):
        ...     Image.new("RGB", (4, 4)).save(os.path.join(d, n + ".png"))
        >>> ds = ImageFileDataset([os.path.join(d, "a.png"), os.path.join(d, "b.png")],
        ...                       ["a cat", "a dog", "two dogs"], [0, 1, 1])
        >>> len(ds), ds.n_images, ds[2]["images"].shape, ds[2]["image_ids"]
        (3, 2, torch.Size([3, 4, 4]), 1)
    """

    def __init__(
        self,
        paths: Sequence,
        captions: Sequence[str],
        caption_to_image,
        transform: Callable | None = None,
        *,
        augment=None,
        sources: Sequence[str] | None = None,
        image_ids_external: Sequence | None = None,
        vocab=None,
        build_vocab: bool = False,
        check_files: bool = False,
        name: str = "images",
    ):
        from imtm.data.vocabulary import Vocabulary

        if vocab is not None and not isinstance(vocab, Vocabulary):
            raise TypeError(
                f"{name}: vocab must be an imtm.data.Vocabulary or None, got {type(vocab).__name__}"
            )
        if vocab is not None and build_vocab:
            raise ValueError(f"{name}: give either vocab= or build_vocab=True, not both")
        if transform is not None and not callable(transform):
            raise TypeError(
                f"{name}: transform must be a callable PIL.Image -> tensor, got {type(transform).__name__}"
            )
        files = ImageFiles(paths, transform, sources, name=name)
        if build_vocab:
            vocab = Vocabulary.build(captions)
        super().__init__(files, captions, caption_to_image, vocab=vocab, name=name)
        if image_ids_external is not None and len(image_ids_external) != len(files):
            raise ValueError(
                f"{name}: got {len(image_ids_external)} external ids for {len(files)} images"
            )
        self.image_ids_external = None if image_ids_external is None else list(image_ids_external)
        self.transform = transform
        self.augment = _resolve_augment(augment, self.captions, vocab)
        if check_files:
            files.check()

    @property
    def image_paths(self) -> list[str]:
        """The image file of each unique image."""
        return self.images.paths

    def __getitem__(self, k: int) -> dict:
        i = int(self.caption_to_image[k])
        caption = self.captions[k]
        if self.augment is not None:
            caption = self.augment(caption)
        return {"images": self.images[i], "texts": caption, "image_ids": i}

    def fingerprint(self) -> str:
        """A short hash of the image paths, the captions and the caption-to-image map (reads no pixels)."""
        h = hashlib.sha256()
        h.update("\n".join(self.images.paths).encode())
        h.update(b"\0")
        h.update("\n".join(self.captions).encode())
        h.update(self.caption_to_image.numpy().tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_images={self.n_images}, n_captions={self.n_captions})"


def check_captions_per_image(value, who: str) -> None:
    """Refuse a ``captions_per_image`` that is not a positive integer or None, naming ``who``."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(
            f"{who}: captions_per_image must be a positive integer or None, got {value!r}"
        )


def group_by_image(keys: Sequence, what: str = "image") -> tuple[list, torch.Tensor]:
    """Unique ``keys`` in order of first appearance, and each position's index into them.

    Example:
        >>> group_by_image(["b.jpg", "a.jpg", "b.jpg"])
        (['b.jpg', 'a.jpg'], tensor([0, 1, 0]))
    """
    index: dict = {}
    c2i = [index.setdefault(k, len(index)) for k in keys]
    return list(index), torch.tensor(c2i, dtype=torch.long)


def resolve_under(root: Path | None, rel: str, base: Path) -> Path:
    """``rel`` under ``root`` (or under ``base`` when no root is given); absolute paths stay."""
    p = Path(rel)
    if p.is_absolute():
        return p
    return (root if root is not None else base) / p
