"""The dataset protocol every imtm image-caption dataset follows.

A dataset holds unique images and all captions separately:

- ``images``: a sequence of image items, one per unique image (``(3, H, W)`` pixels or
  ``(N_b, D)`` region features);
- ``captions``: ``list[str]``, every caption;
- ``caption_to_image``: ``(n_captions,)`` long, index into ``images`` of each caption's image.

Indexing it gives one training item per caption:
``{"images": images[caption_to_image[k]], "texts": captions[k], "image_ids": caption_to_image[k]}``,
so a batch of ``B`` items scores ``B`` images (repeats allowed) against ``B`` captions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["ImageCaptionDataset"]


class ImageCaptionDataset(Dataset):
    """Unique images plus captions; yields one item per caption.

    Args:
        images: sequence of image items (a tensor ``(n_images, ...)`` or any indexable).
        captions: one string per caption.
        caption_to_image: ``(n_captions,)`` index of each caption's image.
        vocab: optional :class:`imtm.data.Vocabulary` built from these captions.
        name: a short name used in logs and fingerprints.

    Example:
        >>> ds = ImageCaptionDataset(torch.zeros(2, 3, 4), ["a cat", "a dog", "two cats"], [0, 1, 1])
        >>> len(ds), ds.n_images, ds[2]["image_ids"]
        (3, 2, 1)
    """

    def __init__(
        self, images, captions: Sequence[str], caption_to_image, vocab=None, name: str = "dataset"
    ):
        c2i = torch.as_tensor(caption_to_image, dtype=torch.long)
        if c2i.dim() != 1 or c2i.numel() != len(captions):
            raise ValueError(
                f"{name}: caption_to_image must have one entry per caption ({len(captions)}), got shape {tuple(c2i.shape)}"
            )
        if len(captions) == 0:
            raise ValueError(f"{name}: the dataset has no captions")
        n_images = len(images)
        if n_images == 0:
            raise ValueError(f"{name}: the dataset has no images")
        if int(c2i.min()) < 0 or int(c2i.max()) >= n_images:
            raise ValueError(
                f"{name}: caption_to_image holds indices outside [0, {n_images}): "
                f"min {int(c2i.min())}, max {int(c2i.max())}"
            )
        self.images = images
        self.captions = list(captions)
        self.caption_to_image = c2i
        self.vocab = vocab
        self.name = name

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, k: int) -> dict:
        i = int(self.caption_to_image[k])
        return {"images": self.images[i], "texts": self.captions[k], "image_ids": i}

    def fingerprint(self) -> str:
        """A short hash of the captions, the caption-to-image map and a sample of the images."""
        h = hashlib.sha256()
        h.update("\n".join(self.captions).encode())
        h.update(self.caption_to_image.numpy().tobytes())
        for i in sorted({0, self.n_images // 2, self.n_images - 1}):
            x = self.images[i]
            h.update(torch.as_tensor(x).detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_images={self.n_images}, n_captions={self.n_captions})"
