"""The Flickr30K caption file ``results_20130124.token`` plus the image folder.

One caption per line, ``<file name>#<n>\\t<caption>``::

    1000092795.jpg#0\tTwo young guys with shaggy hair look at their hands while hanging out in the yard .

``n`` numbers the five captions of an image (0-4). Images come in order of first
appearance, each image's captions in file order. The file covers all 31,783 images and
holds no split: the papers' 29,000 / 1,014 / 1,000 split is Karpathy's
(``dataset_flickr30k.json``, :class:`~imtm.data.KarpathyDataset`); pass ``images=`` to
keep a subset.

References:
    Young et al., "From image descriptions to visual denotations", TACL 2014.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from imtm.data.image_files import ImageFileDataset, check_captions_per_image
from imtm.data.precomp import read_lines

__all__ = ["Flickr30kTokenDataset", "parse_token_lines"]


def parse_token_lines(
    lines: list[str], where: str = "the token file"
) -> list[tuple[str, int, str]]:
    """``(file name, caption number, caption)`` of every non-blank line of a ``.token`` file.

    Raises:
        ValueError: a line without a tab, without ``#<number>`` after the file name, or with an
            empty caption (named by its line number in ``where``).

    Example:
        >>> parse_token_lines(["1000092795.jpg#0\\tTwo young guys .", "1000092795.jpg#1\\tA man ."])
        [('1000092795.jpg', 0, 'Two young guys .'), ('1000092795.jpg', 1, 'A man .')]
    """
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        file, hash_, number = key.strip().rpartition("#")
        if not tab or not hash_ or not file or not number.strip().isdigit():
            raise ValueError(
                f"Flickr30kTokenDataset: line {n} of {where} is {line[:80]!r}; expected "
                "'<image file>#<caption number><TAB><caption>' (e.g. '1000092795.jpg#0\\tTwo dogs .')"
            )
        if not caption.strip():
            raise ValueError(
                f"Flickr30kTokenDataset: line {n} of {where} ({key.strip()}) is an empty caption"
            )
        out.append((file, int(number), caption.strip()))
    return out


class Flickr30kTokenDataset(ImageFileDataset):
    """Flickr30K's ``results_20130124.token`` with its image folder; one item per caption.

    Args:
        token_path: the ``.token`` file.
        image_root: the image folder (``flickr30k-images/``); ``None``: ``flickr30k-images/``
            next to the token file if it exists, else the token file's folder.
        transform: applied to each PIL image (see :func:`imtm.data.transforms.image_transform`).
        images: keep only these image file names (e.g. one split's), in this order; ``None``: all.
        captions_per_image: keep the first ``k`` captions of every image; ``None`` keeps all.
        augment, vocab, build_vocab, check_files, name: see :class:`ImageFileDataset`.

    Attributes:
        image_ids_external: the file name of each image.

    Raises:
        FileNotFoundError: the token file or (``check_files=True``) an image is missing.
        ValueError: a file that is not UTF-8, a malformed line or an empty caption (named by line),
            a name of ``images`` that the file does not hold, an image with fewer captions than
            ``captions_per_image``, no captions.

    Shape:
        - ``self[k]["images"]``: ``(3, H, W)`` (what ``transform`` returns)

    Example:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> d = tempfile.mkdtemp()
        >>> Image.new("RGB", (8, 8)).save(os.path.join(d, "1.jpg"))
        >>> _ = open(os.path.join(d, "results_20130124.token"), "w").write("1.jpg#0\\tA dog .\\n1.jpg#1\\tThe dog .\\n")
        >>> ds = Flickr30kTokenDataset(os.path.join(d, "results_20130124.token"))
        >>> len(ds), ds.n_images, ds.captions
        (2, 1, ['A dog .', 'The dog .'])
    """

    def __init__(
        self,
        token_path,
        image_root=None,
        transform: Callable | None = None,
        *,
        images: Iterable[str] | None = None,
        captions_per_image: int | None = None,
        augment=None,
        vocab=None,
        build_vocab: bool = False,
        check_files: bool = False,
        name: str | None = None,
    ):
        who = "Flickr30kTokenDataset"
        path = Path(token_path)
        self.token_path = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"{who}: no token file {str(path)!r}")
        check_captions_per_image(captions_per_image, who)
        if image_root is None:
            image_root = (
                path.parent / "flickr30k-images"
                if (path.parent / "flickr30k-images").is_dir()
                else path.parent
            )
        root = Path(image_root)
        self.image_root = str(root)
        rows = parse_token_lines(read_lines(path, who), repr(str(path)))
        captions_of: dict[str, list[str]] = {}
        for file, _, caption in rows:
            captions_of.setdefault(file, []).append(caption)
        if images is None:
            names = list(captions_of)
        else:
            names = [str(x) for x in images]
            missing = [x for x in names if x not in captions_of]
            if missing:
                raise ValueError(
                    f"{who}: {len(missing)} of the images= names are not in {path.name}, e.g. {missing[:3]}"
                )
        paths, captions, c2i = [], [], []
        for file in names:
            caps = captions_of[file]
            if captions_per_image is not None:
                if len(caps) < captions_per_image:
                    raise ValueError(
                        f"{who}: {file} has {len(caps)} captions in {path.name}, fewer than "
                        f"captions_per_image={captions_per_image}"
                    )
                caps = caps[:captions_per_image]
            c2i += [len(paths)] * len(caps)
            captions += caps
            paths.append(root / file)
        if not captions:
            raise ValueError(f"{who}: {path.name} holds no captions")
        self.captions_per_image = captions_per_image
        super().__init__(
            paths,
            captions,
            torch.tensor(c2i, dtype=torch.long),
            transform,
            augment=augment,
            sources=[f"{f} in {path.name}" for f in names],
            image_ids_external=names,
            vocab=vocab,
            build_vocab=build_vocab,
            check_files=check_files,
            name=name if name is not None else path.stem,
        )
