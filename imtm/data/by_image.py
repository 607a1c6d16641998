"""ByImage: an image-caption dataset that scikit-learn indexes and splits by image.

scikit-learn's model selection (``GridSearchCV``, ``RandomizedSearchCV``, ``cross_validate``,
``KFold``...) counts samples with ``len`` / ``shape[0]`` and takes a fold with
``X[indices]``. A caption-level dataset split that way would put captions of one image on
both sides of a fold (and a list of items has no ``images`` to score). :class:`ByImage`
makes the *image* the sample: ``len`` is the number of images and ``X[indices]`` is the
sub-dataset of those images with all their captions, so captions of one image never
straddle folds. :class:`~imtm.Matcher` fits on it and scores it (rSum) directly.

Example:
    >>> import torch
    >>> from imtm.data import ImageCaptionDataset
    >>> ds = ImageCaptionDataset(torch.zeros(3, 2, 4), ["a", "b", "c", "d"], [0, 1, 1, 2])
    >>> X = ByImage(ds)
    >>> len(X), X[[1, 2]].captions, X[[1, 2]].caption_to_image.tolist()
    (3, ['b', 'c', 'd'], [0, 0, 1])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from imtm.data.base import ImageCaptionDataset

__all__ = ["ByImage"]


class _ImageView(Sequence):
    """``images[index[k]]`` for ``k < len(index)``, without copying the images."""

    def __init__(self, images, index: torch.Tensor):
        self.images, self.index = images, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self.images[int(i)] for i in self.index[k]]
        return self.images[int(self.index[k])]


class ByImage:
    """A dataset scikit-learn indexes by image: one sample per image, all its captions with it.

    Args:
        dataset: an image-caption dataset (``images``, ``captions``, ``caption_to_image``; e.g. any
            :mod:`imtm.data` dataset or a synthetic split).

    Attributes:
        dataset: the image-caption dataset these images and captions form (``dataset`` itself for
            the whole set); what :meth:`imtm.Matcher.fit` trains on.
        shape: ``(n_images,)``, how scikit-learn counts samples.

    ``X[indices]`` (integers, a boolean mask or a slice, as scikit-learn's splitters give) is a
    ``ByImage`` of those images in that order, each with all its captions (in their order), and
    ``caption_to_image`` renumbered; a repeated image is repeated with its captions. The
    vocabulary and name carry over.

    Example:
        >>> from sklearn.model_selection import KFold
        >>> from imtm.data import synthetic
        >>> train, _, _ = synthetic.load(view="regions", seed=0, n_train=10, n_dev=2, n_test=2)
        >>> X = ByImage(train)
        >>> fold, held_out = next(KFold(n_splits=5).split(X))
        >>> len(X[fold]), len(X[held_out]), len(X[held_out].captions)
        (8, 2, 10)
    """

    def __init__(self, dataset):
        for attr in ("images", "captions", "caption_to_image"):
            if not hasattr(dataset, attr):
                raise TypeError(
                    f"ByImage: expected an image-caption dataset with 'images', 'captions' and "
                    f"'caption_to_image' (an imtm.data dataset); {type(dataset).__name__} has no {attr!r}"
                )
        self.dataset = dataset

    # ------------------------------------------------------------------ the dataset protocol
    @property
    def images(self):
        return self.dataset.images

    @property
    def captions(self):
        return self.dataset.captions

    @property
    def caption_to_image(self) -> torch.Tensor:
        return torch.as_tensor(self.dataset.caption_to_image, dtype=torch.long)

    @property
    def vocab(self):
        return getattr(self.dataset, "vocab", None)

    @property
    def name(self) -> str:
        return getattr(self.dataset, "name", "dataset")

    # ------------------------------------------------------------------ scikit-learn's view
    @property
    def shape(self) -> tuple[int]:
        return (len(self.dataset.images),)

    def __len__(self) -> int:
        return len(self.dataset.images)

    def __getitem__(self, key) -> ByImage:
        if isinstance(key, tuple):  # scikit-learn's array indexing: X[indices, ...]
            if len(key) != 2 or key[1] is not Ellipsis:
                raise IndexError(f"ByImage: index images with one index array, got {key!r}")
            key = key[0]
        index = self._image_index(key)
        c2i = self.caption_to_image
        n = len(self)
        counts = torch.bincount(c2i, minlength=n)
        order = torch.argsort(c2i, stable=True)  # captions grouped by image, in their order
        starts = torch.cumsum(counts, 0) - counts
        take = counts[index]
        # for image index[j]: the captions order[starts[i] : starts[i] + counts[i]]
        first = torch.repeat_interleave(starts[index], take)
        within = torch.arange(int(take.sum())) - torch.repeat_interleave(
            torch.cumsum(take, 0) - take, take
        )
        captions_idx = order[first + within]
        images = self.dataset.images
        sub_images = (
            images[index] if isinstance(images, torch.Tensor) else _ImageView(images, index)
        )
        captions = self.dataset.captions
        sub = ImageCaptionDataset(
            sub_images,
            [captions[int(k)] for k in captions_idx],
            torch.repeat_interleave(torch.arange(len(index)), take),
            vocab=self.vocab,
            name=f"{self.name}[{len(index)} images]",
        )
        return ByImage(sub)

    def _image_index(self, key) -> torch.Tensor:
        n = len(self)
        if isinstance(key, slice):
            return torch.arange(n)[key]
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            key = [key]
        arr = np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key)
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise IndexError(
                    f"ByImage: a boolean mask needs one entry per image ({n}), got shape {arr.shape}"
                )
            arr = np.flatnonzero(arr)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise IndexError(
                f"ByImage: index images with integers, a boolean mask or a slice, got {key!r}"
            )
        if arr.size == 0:
            raise IndexError("ByImage: an empty selection of images (a dataset needs at least one)")
        if arr.min() < -n or arr.max() >= n:
            raise IndexError(
                f"ByImage: image index out of range [0, {n}): min {arr.min()}, max {arr.max()}"
            )
        return torch.as_tensor(arr % n, dtype=torch.long)

    def __repr__(self) -> str:
        return f"ByImage(n_images={len(self)}, n_captions={len(self.dataset.captions)}, name={self.name!r})"
