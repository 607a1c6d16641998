"""Retrieval metrics for image-text matching and the standard evaluation protocols.

Every function here takes a similarity matrix ``sims[i, t]`` (images are rows,
captions columns) as a tensor or a NumPy array, or a pair
``(sims_i2t, sims_t2i)`` of such matrices when a model scores the two
directions differently (DCPA): captions are ranked for an image with the
first, images for a caption with the second. ``caption_to_image[t]`` is the
row index of caption ``t``'s image; an image may have any number of captions,
but at least one.

Ranks are 0-based. The rank of a query is the number of *non-matching*
candidates whose score is greater than or equal to the best matching
candidate's score:

.. math::

    r^{i2t}_i = \\#\\{t : c(t) \\ne i,\\ s_{it} \\ge \\max_{t' : c(t') = i} s_{it'}\\},
    \\qquad
    r^{t2i}_t = \\#\\{i : i \\ne c(t),\\ s_{it} \\ge s_{c(t)t}\\}

So for an image the rank is that of its best-ranked caption (the SCAN / VSE++
rule), and ties are resolved pessimistically: a non-matching candidate with
the same score as the match counts as ranked ahead of it. The rule depends only
on the scores, never on the order of the candidates, so it is deterministic.
Ties among an image's own captions never hurt it.

Recall at ``K`` is the percentage of queries ranked in the top ``K``; the
median and mean rank are reported 1-based, as the papers do:

.. math::

    \\mathrm{R@K} = \\frac{100}{|Q|} \\sum_{q \\in Q} [r_q < K], \\qquad
    \\mathrm{medr} = \\lfloor \\mathrm{median}_q\\, r_q \\rfloor + 1, \\qquad
    \\mathrm{meanr} = \\frac{1}{|Q|}\\sum_q r_q + 1,

and ``rsum`` is the sum of the six recalls (R@1, R@5, R@10 in both directions).

Protocols (the Karpathy test splits):

- ``"f30k_1k"``: Flickr30K test, 1,000 images and their captions, evaluated as given;
- ``"coco_1k_5fold"``: MS-COCO 5K test cut into 5 consecutive folds of 1,000 images
  (and their captions); every metric is the mean over the folds;
- ``"coco_5k"``: MS-COCO 5K test, all 5,000 images at once.

References:
    Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard
    Negatives", BMVC 2018 (metrics and COCO 1K/5K protocols); Lee et al.,
    "Stacked Cross Attention for Image-Text Matching", ECCV 2018; Karpathy and
    Fei-Fei, "Deep Visual-Semantic Alignments for Generating Image
    Descriptions", CVPR 2015 (the splits).

Example:
    >>> import torch
    >>> sims = torch.eye(3).repeat_interleave(2, dim=1)   # 3 images x 6 captions
    >>> c2i = torch.arange(3).repeat_interleave(2)
    >>> m = retrieval_metrics(sims, c2i)
    >>> m["i2t_r1"], m["t2i_r1"], m["rsum"]
    (100.0, 100.0, 600.0)
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from imtm._checks import suggest

__all__ = [
    "METRIC_KEYS",
    "PROTOCOLS",
    "RECALL_KS",
    "RetrievalRanks",
    "SimilarityRecord",
    "average_similarities",
    "chance_metrics",
    "coco_1k_5fold",
    "coco_5k",
    "evaluate_protocol",
    "f30k_1k",
    "format_table",
    "load_similarity",
    "metrics_from_ranks",
    "retrieval_metrics",
    "retrieval_ranks",
    "save_similarity",
]

#: The recall cut-offs reported by every paper of the field.
RECALL_KS: tuple[int, ...] = (1, 5, 10)

#: The keys of the dict that :func:`retrieval_metrics` returns, in table order.
METRIC_KEYS: tuple[str, ...] = (
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "i2t_medr",
    "i2t_meanr",
    "t2i_medr",
    "t2i_meanr",
    "rsum",
)

# Rows of the score matrix are compared in blocks of about this many entries, so
# the temporary boolean block stays near 16 MB whatever the matrix size (a COCO
# 5K matrix is 125 M entries).
_CHUNK_ELEMENTS = 1 << 24

# Size of one fold of the COCO 1K protocol and the number of folds (VSE++).
_COCO_FOLD_SIZE = 1000
_COCO_N_FOLDS = 5

_FORMAT = "imtm.similarity"
_FORMAT_VERSION = "1"

ArrayLike = torch.Tensor | np.ndarray
#: Similarities: one ``(n_images, n_captions)`` matrix, or direction-specific ones as a pair
#: ``(sims_i2t, sims_t2i)`` or stacked ``(2, n_images, n_captions)`` (what ``Matcher.similarity`` returns).
Sims = ArrayLike | tuple


# ---------------------------------------------------------------------------- input checks
def _from_numpy(x: np.ndarray, what: str) -> torch.Tensor:
    try:
        with warnings.catch_warnings():
            # A read-only array (np.load with mmap_mode="r") is shared, never written.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.from_numpy(x)
    except TypeError as e:
        raise TypeError(f"{what}: expected a numeric array, got dtype {x.dtype}") from e


def _as_matrix(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = _from_numpy(x, what)
    elif not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(
                f"{what}: expected a (n_images, n_captions) tensor or array, got {type(x).__name__}"
            ) from e
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{what}: expected real similarity scores, got dtype {x.dtype}")
    if not x.is_floating_point():
        # float64 holds every integer score up to 2**53 exactly, so ranks do not change.
        x = x.to(torch.float64)
    if x.dim() != 2:
        raise ValueError(
            f"{what}: expected a (n_images, n_captions) matrix, got shape {tuple(x.shape)}"
        )
    # A finite sum proves there is no NaN without a matrix-sized temporary; only an
    # infinite or NaN sum needs the element-wise check.
    if not bool(torch.isfinite(x.sum())) and bool(torch.isnan(x).any()):
        raise ValueError(
            f"{what}: the similarity matrix holds {int(torch.isnan(x).sum())} NaN value(s); "
            "NaN scores cannot be ranked"
        )
    return x


def _is_pair(sims) -> bool:
    # A nested list of numbers is a matrix; only a 2-sequence of arrays, or a (2, n_images,
    # n_captions) stack (what Matcher.similarity returns for direction-specific scores), is a pair.
    if isinstance(sims, (torch.Tensor, np.ndarray)):
        return sims.ndim == 3 and sims.shape[0] == 2
    return (
        isinstance(sims, (tuple, list))
        and len(sims) == 2
        and all(isinstance(s, (torch.Tensor, np.ndarray)) for s in sims)
    )


def _as_sims(sims, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sims_i2t, sims_t2i)``, the same tensor twice for a single matrix."""
    if _is_pair(sims):
        s_i2t = _as_matrix(sims[0], f"{what} (sims_i2t)")
        s_t2i = _as_matrix(sims[1], f"{what} (sims_t2i)")
        if s_i2t.shape != s_t2i.shape:
            raise ValueError(
                f"{what}: sims_i2t and sims_t2i must have the same shape, got "
                f"{tuple(s_i2t.shape)} and {tuple(s_t2i.shape)}"
            )
        if s_i2t.device != s_t2i.device:
            raise ValueError(
                f"{what}: sims_i2t is on {s_i2t.device} but sims_t2i on {s_t2i.device}"
            )
        return s_i2t, s_t2i
    s = _as_matrix(sims, what)
    return s, s


def _as_caption_to_image(c2i, n_images: int, n_captions: int, device, what: str) -> torch.Tensor:
    if isinstance(c2i, np.ndarray):
        c2i = _from_numpy(c2i, what)
    elif not isinstance(c2i, torch.Tensor):
        try:
            c2i = torch.as_tensor(c2i)
        except (TypeError, ValueError, RuntimeError) as e:  # strings, None, ragged lists
            raise TypeError(
                f"{what}: caption_to_image must be a sequence of integer image indices, got {c2i!r:.60}"
            ) from e
    if c2i.dtype == torch.bool or c2i.is_floating_point() or c2i.is_complex():
        raise TypeError(
            f"{what}: caption_to_image must hold integer image indices, got dtype {c2i.dtype}"
        )
    if c2i.dim() != 1 or c2i.numel() != n_captions:
        raise ValueError(
            f"{what}: caption_to_image must have shape ({n_captions},) to match sims of shape "
            f"({n_images}, {n_captions}), got shape {tuple(c2i.shape)}"
        )
    c2i = c2i.to(device=device, dtype=torch.long)
    if n_captions == 0:
        raise ValueError(f"{what}: there are no captions (sims has shape ({n_images}, 0))")
    if n_images == 0:
        raise ValueError(f"{what}: there are no images (sims has shape (0, {n_captions}))")
    lo, hi = int(c2i.min()), int(c2i.max())
    if lo < 0 or hi >= n_images:
        raise ValueError(
            f"{what}: caption_to_image holds image indices outside [0, {n_images}): min {lo}, max {hi}"
        )
    counts = torch.bincount(c2i, minlength=n_images)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()
        shown = missing[:5].tolist()
        raise ValueError(
            f"{what}: {missing.numel()} image(s) have no caption (e.g. image index {shown}); "
            "every image row needs at least one caption"
        )
    return c2i


# ---------------------------------------------------------------------------- ranks
@dataclass(frozen=True)
class RetrievalRanks:
    """0-based ranks of every query in both directions.

    Attributes:
        i2t: ``(n_images,)`` long, rank of each image's best caption.
        t2i: ``(n_captions,)`` long, rank of each caption's image.
    """

    i2t: torch.Tensor
    t2i: torch.Tensor


def _ranks(s_i2t: torch.Tensor, s_t2i: torch.Tensor, c2i: torch.Tensor) -> RetrievalRanks:
    n_images, n_captions = s_i2t.shape
    cols = torch.arange(n_captions, device=s_i2t.device)
    # Score of every caption with its own image, in each direction.
    own_i2t = s_i2t[c2i, cols]
    own_t2i = s_t2i[c2i, cols]
    # i2t: the best caption of each image (segment max over its captions) ...
    best = torch.full((n_images,), float("-inf"), dtype=s_i2t.dtype, device=s_i2t.device)
    best = best.scatter_reduce(0, c2i, own_i2t, reduce="amax", include_self=True)
    # ... and how many of its own captions reach that score: they are counted by the
    # ">=" below but are matches, not competitors.
    n_own_at_best = torch.zeros(n_images, dtype=torch.long, device=s_i2t.device)
    n_own_at_best.scatter_add_(0, c2i, (own_i2t >= best[c2i]).long())

    i2t_ge = torch.empty(n_images, dtype=torch.long, device=s_i2t.device)
    t2i_ge = torch.zeros(n_captions, dtype=torch.long, device=s_i2t.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, n_captions))
    for r0 in range(0, n_images, rows):
        r1 = min(n_images, r0 + rows)
        i2t_ge[r0:r1] = (s_i2t[r0:r1] >= best[r0:r1, None]).sum(1)
        t2i_ge += (s_t2i[r0:r1] >= own_t2i[None, :]).sum(0)
    # For t2i the own image always satisfies ">=" (no NaN), so drop it once.
    return RetrievalRanks(i2t=i2t_ge - n_own_at_best, t2i=t2i_ge - 1)


def retrieval_ranks(sims: Sims, caption_to_image) -> RetrievalRanks:
    """0-based rank of every image query (i2t) and every caption query (t2i).

    See the module docstring for the rule (best caption per image; ties count
    against the query). Vectorised: the score matrix is compared block by block
    of rows, so memory stays bounded for any size.

    Args:
        sims: ``(n_images, n_captions)`` scores, or a pair ``(sims_i2t, sims_t2i)``.
        caption_to_image: ``(n_captions,)`` integer image index of each caption.

    Returns:
        A :class:`RetrievalRanks` with ``i2t`` ``(n_images,)`` and ``t2i`` ``(n_captions,)``.

    Shape:
        - sims: ``(Bi, Bt)`` (each matrix of a pair)
        - caption_to_image: ``(Bt,)``
        - output: ``i2t`` ``(Bi,)``, ``t2i`` ``(Bt,)``, long, on the device of ``sims``

    .. math::

        r^{i2t}_i = \\#\\{t : c(t) \\ne i,\\ s_{it} \\ge \\max_{c(t') = i} s_{it'}\\},\\quad
        r^{t2i}_t = \\#\\{i \\ne c(t) : s_{it} \\ge s_{c(t)t}\\}

    References:
        Faghri et al., VSE++, BMVC 2018 (the i2t rank is that of the best caption).

    Example:
        >>> # Caption 0 scores 0.9 with both images: the tie counts against it.
        >>> r = retrieval_ranks(torch.tensor([[0.9, 0.1], [0.9, 0.5]]), [0, 1])
        >>> r.i2t.tolist(), r.t2i.tolist()
        ([0, 1], [1, 0])
    """
    s_i2t, s_t2i = _as_sims(sims, "retrieval_ranks")
    c2i = _as_caption_to_image(caption_to_image, *s_i2t.shape, s_i2t.device, "retrieval_ranks")
    return _ranks(s_i2t, s_t2i, c2i)


def _median_rank(ranks: torch.Tensor) -> float:
    # numpy's median (mean of the two middle values), floored, 1-based: SCAN's
    # ``np.floor(np.median(ranks)) + 1``. torch.median would take the lower middle.
    s = ranks.sort().values
    n = s.numel()
    mid = (s[(n - 1) // 2] + s[n // 2]).double() / 2
    return float(torch.floor(mid)) + 1.0


def metrics_from_ranks(ranks: RetrievalRanks) -> dict[str, float]:
    """The metric dict (recalls in percent, 1-based median/mean ranks, rsum) from ranks.

    Example:
        >>> m = metrics_from_ranks(RetrievalRanks(torch.tensor([0, 7]), torch.tensor([0, 0, 3, 12])))
        >>> m["i2t_r1"], m["i2t_r10"], m["t2i_r5"], m["t2i_medr"]
        (50.0, 100.0, 75.0, 2.0)
    """
    out: dict[str, float] = {}
    for direction, r in (("i2t", ranks.i2t), ("t2i", ranks.t2i)):
        if r.numel() == 0:
            raise ValueError(f"metrics_from_ranks: no {direction} ranks")
        for k in RECALL_KS:
            out[f"{direction}_r{k}"] = 100.0 * float((r < k).double().mean())
    for direction, r in (("i2t", ranks.i2t), ("t2i", ranks.t2i)):
        out[f"{direction}_medr"] = _median_rank(r)
        out[f"{direction}_meanr"] = float(r.double().mean()) + 1.0
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return {k: out[k] for k in METRIC_KEYS}


def chance_metrics(caption_to_image) -> dict[str, float]:
    """The expected recalls and rSum of a model that scores at random, for one test set.

    A reference line for any results table: a recall near it means nothing was learned.
    With uniformly random scores an image query with :math:`c` of the :math:`N_c` captions
    ranks one of them in its top :math:`K` with probability
    :math:`1 - \\binom{N_c - c}{K} / \\binom{N_c}{K}`, and a caption query ranks its one
    image among the :math:`N_i` images in the top :math:`K` with probability
    :math:`\\min(K, N_i) / N_i`; the recalls are the means over the queries.

    Args:
        caption_to_image: ``(n_captions,)`` integer image index of each caption, as for
            :func:`retrieval_metrics` (any number of captions per image, at least one each;
            the number of images is the largest index plus one).

    Returns:
        A dict of Python floats with the six recall keys of :data:`METRIC_KEYS` in percent
        and ``rsum``.

    Raises:
        ValueError: no captions, negative indices, an image without captions.
        TypeError: non-integer ``caption_to_image``.

    Shape:
        - caption_to_image: ``(Bt,)``

    Example:
        >>> m = chance_metrics(torch.arange(100).repeat_interleave(5))  # 100 images x 5 captions
        >>> round(m["t2i_r1"], 2), round(m["i2t_r5"], 2), round(m["rsum"], 1)
        (1.0, 4.92, 31.6)
    """
    import math

    what = "chance_metrics"
    n_captions = len(caption_to_image) if hasattr(caption_to_image, "__len__") else 0
    if n_captions == 0:
        raise ValueError(f"{what}: there are no captions; give the test set's caption_to_image")
    try:
        arr = (
            caption_to_image.cpu()
            if isinstance(caption_to_image, torch.Tensor)
            else caption_to_image
        )
        n_images = int(np.max(np.asarray(arr))) + 1
    except (TypeError, ValueError):  # not integers: _as_caption_to_image names the problem
        n_images = 1
    c2i = _as_caption_to_image(caption_to_image, max(n_images, 1), n_captions, "cpu", what)
    counts = torch.bincount(c2i, minlength=n_images).tolist()
    out: dict[str, float] = {}
    for k in RECALL_KS:
        total = math.comb(n_captions, k)
        # P(none of an image's c captions in the top K) = C(Nc - c, K) / C(Nc, K), exactly in integers.
        miss = sum(math.comb(n_captions - c, k) for c in counts)
        out[f"i2t_r{k}"] = 100.0 * (1.0 - miss / (total * n_images)) if total else 100.0
        out[f"t2i_r{k}"] = 100.0 * min(k, n_images) / n_images
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return {k: out[k] for k in METRIC_KEYS if k in out}


def retrieval_metrics(
    sims: Sims, caption_to_image, *, return_ranks: bool = False
) -> dict[str, Any]:
    """Recall@1/5/10 both ways, median and mean rank, and rSum.

    Args:
        sims: ``(n_images, n_captions)`` scores ``sims[i, t]`` (tensor or NumPy array),
            or a pair ``(sims_i2t, sims_t2i)``: captions are ranked with the first,
            images with the second (DCPA's decoupled directions).
        caption_to_image: ``(n_captions,)`` integer image index of each caption. Any
            number of captions per image; every image needs at least one.
        return_ranks: also put the per-query ranks in the dict, under ``"i2t_ranks"``
            (``(n_images,)`` long) and ``"t2i_ranks"`` (``(n_captions,)`` long), 0-based.
            The return type is a dict either way; :func:`retrieval_ranks` gives the
            ranks alone.

    Returns:
        A dict of Python floats with the keys of :data:`METRIC_KEYS`: ``i2t_r1``,
        ``i2t_r5``, ``i2t_r10``, ``t2i_r1``, ``t2i_r5``, ``t2i_r10`` in percent
        (0-100), ``i2t_medr``, ``i2t_meanr``, ``t2i_medr``, ``t2i_meanr`` (1-based) and
        ``rsum`` (the sum of the six recalls, at most 600).

    Raises:
        ValueError: NaN scores, shapes that disagree, an image without captions,
            image indices out of range.
        TypeError: non-numeric scores or non-integer ``caption_to_image``.

    Shape:
        - sims: ``(Bi, Bt)`` (each matrix of a pair)
        - caption_to_image: ``(Bt,)``

    .. math::

        \\mathrm{R@K} = \\frac{100}{|Q|}\\sum_{q\\in Q}[r_q < K],\\qquad
        \\mathrm{rSum} = \\sum_{d \\in \\{i2t,\\, t2i\\}}\\ \\sum_{K\\in\\{1,5,10\\}} \\mathrm{R@K}_d

    References:
        Faghri et al., VSE++, BMVC 2018; Lee et al., SCAN, ECCV 2018 (rSum).

    Example:
        >>> m = retrieval_metrics(torch.eye(4), torch.arange(4))
        >>> m["rsum"], m["i2t_medr"]
        (600.0, 1.0)
    """
    s_i2t, s_t2i = _as_sims(sims, "retrieval_metrics")
    c2i = _as_caption_to_image(caption_to_image, *s_i2t.shape, s_i2t.device, "retrieval_metrics")
    ranks = _ranks(s_i2t, s_t2i, c2i)
    out: dict[str, Any] = metrics_from_ranks(ranks)
    if return_ranks:
        out["i2t_ranks"] = ranks.i2t
        out["t2i_ranks"] = ranks.t2i
    return out


# ---------------------------------------------------------------------------- protocols
def f30k_1k(sims: Sims, caption_to_image) -> dict[str, float]:
    """Flickr30K 1K test protocol: the whole test set (1,000 images, 5,000 captions) at once.

    The matrix is evaluated as given (no image count is enforced), so the same
    call serves the dev split (1,014 images).

    Example:
        >>> f30k_1k(torch.eye(3), [0, 1, 2])["rsum"]
        600.0
    """
    return retrieval_metrics(sims, caption_to_image)


def coco_5k(sims: Sims, caption_to_image) -> dict[str, float]:
    """MS-COCO 5K test protocol: all 5,000 images against all 25,000 captions at once.

    Like :func:`f30k_1k`, evaluates the matrix as given.

    Example:
        >>> coco_5k(torch.eye(3), [0, 1, 2])["i2t_r1"]
        100.0
    """
    return retrieval_metrics(sims, caption_to_image)


def coco_1k_5fold(sims: Sims, caption_to_image) -> dict[str, float]:
    """MS-COCO 1K protocol: 5 consecutive folds of 1,000 images, metrics averaged over folds.

    Fold ``k`` holds images ``1000k .. 1000k + 999`` and every caption of those
    images (for the usual layout of 5 captions per image in order, captions
    ``5000k .. 5000k + 4999``). Every metric, medians and rSum included, is the
    mean of its five per-fold values, as in VSE++ and SCAN.

    Args:
        sims: ``(5000, n_captions)`` scores or a pair of them.
        caption_to_image: ``(n_captions,)`` integer image index of each caption.

    Shape:
        - sims: ``(5000, Bt)``
        - caption_to_image: ``(Bt,)``

    .. math::

        m_{1K} = \\frac{1}{5}\\sum_{k=0}^{4} m\\big(S[F_k, C_k]\\big),\\quad
        F_k = \\{1000k, \\dots, 1000k + 999\\},\\ C_k = \\{t : c(t) \\in F_k\\}

    References:
        Faghri et al., VSE++, BMVC 2018 (the 1K / 5K split of the 5K test set).

    Example:
        >>> sims = torch.eye(5000, dtype=torch.float16)  # one caption per image
        >>> coco_1k_5fold(sims, torch.arange(5000))["rsum"]
        600.0
    """
    s_i2t, s_t2i = _as_sims(sims, "coco_1k_5fold")
    n_images = s_i2t.shape[0]
    expected = _COCO_FOLD_SIZE * _COCO_N_FOLDS
    if n_images != expected:
        raise ValueError(
            f"coco_1k_5fold: expected {expected} images (the COCO 5K test split), got a "
            f"matrix with {n_images} rows; use 'coco_5k' or 'f30k_1k' to evaluate it as is"
        )
    c2i = _as_caption_to_image(caption_to_image, *s_i2t.shape, s_i2t.device, "coco_1k_5fold")
    folds = []
    for k in range(_COCO_N_FOLDS):
        lo = k * _COCO_FOLD_SIZE
        caps = torch.nonzero((c2i >= lo) & (c2i < lo + _COCO_FOLD_SIZE)).flatten()
        rows = slice(lo, lo + _COCO_FOLD_SIZE)
        block_i2t = s_i2t[rows][:, caps]
        block_t2i = block_i2t if s_t2i is s_i2t else s_t2i[rows][:, caps]
        ranks = _ranks(block_i2t, block_t2i, c2i[caps] - lo)
        folds.append(metrics_from_ranks(ranks))
    return {key: sum(f[key] for f in folds) / len(folds) for key in METRIC_KEYS}


#: Evaluation protocols by name, for :func:`evaluate_protocol`, the Matcher and the CLI.
PROTOCOLS: dict[str, Callable[..., dict[str, float]]] = {
    "f30k_1k": f30k_1k,
    "coco_1k_5fold": coco_1k_5fold,
    "coco_5k": coco_5k,
}


def evaluate_protocol(name: str, sims: Sims, caption_to_image) -> dict[str, float]:
    """Evaluate ``sims`` under the protocol called ``name`` (a key of :data:`PROTOCOLS`).

    Example:
        >>> evaluate_protocol("f30k_1k", torch.eye(2), [0, 1])["t2i_r1"]
        100.0
    """
    if not isinstance(name, str) or name not in PROTOCOLS:
        raise ValueError(
            f"protocol must be one of {sorted(PROTOCOLS)}, got {name!r}." + suggest(name, PROTOCOLS)
        )
    return PROTOCOLS[name](sims, caption_to_image)


# ---------------------------------------------------------------------------- saving and ensembles
class SimilarityRecord(NamedTuple):
    """What :func:`load_similarity` returns.

    Attributes:
        sims: ``(n_images, n_captions)`` tensor, or a pair ``(sims_i2t, sims_t2i)``.
        caption_to_image: ``(n_captions,)`` long.
        meta: the JSON metadata given to :func:`save_similarity` (``{}`` when none).
    """

    sims: Any
    caption_to_image: torch.Tensor
    meta: dict


def save_similarity(path, sims: Sims, caption_to_image, meta: Mapping | None = None) -> None:
    """Save a similarity matrix (or a pair) and its caption-to-image map as safetensors.

    ``meta`` (model name, split, protocol, anything JSON can hold) is stored as
    JSON in the safetensors metadata field; nothing is pickled. The file is
    written to a temporary name and then renamed, so a crash never leaves half
    a file under ``path``.

    Args:
        path: destination file (``.safetensors`` by convention).
        sims: ``(n_images, n_captions)`` scores or a pair ``(sims_i2t, sims_t2i)``.
        caption_to_image: ``(n_captions,)`` integer image index of each caption.
        meta: optional JSON-serialisable mapping.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "s.safetensors")
        >>> save_similarity(p, torch.eye(2), [0, 1], meta={"model": "chan"})
        >>> load_similarity(p).meta
        {'model': 'chan'}
    """
    from safetensors.torch import save_file

    pair = _is_pair(sims)
    s_i2t, s_t2i = _as_sims(sims, "save_similarity")
    c2i = _as_caption_to_image(caption_to_image, *s_i2t.shape, s_i2t.device, "save_similarity")
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise TypeError(
            f"save_similarity: meta must be a mapping (a dict), got {type(meta).__name__}"
        )
    try:
        meta_json = json.dumps(dict(meta), sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_similarity: meta must be JSON-serialisable: {e}") from e

    def cpu(x):
        return x.detach().to("cpu").contiguous()

    tensors = {"caption_to_image": cpu(c2i)}
    if pair:
        tensors["sims_i2t"], tensors["sims_t2i"] = cpu(s_i2t), cpu(s_t2i)
    else:
        tensors["sims"] = cpu(s_i2t)
    metadata = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "pair": str(pair).lower(),
        "meta": meta_json,
    }
    path = Path(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else "."
    )
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_similarity(path) -> SimilarityRecord:
    """Load what :func:`save_similarity` wrote.

    Returns:
        A :class:`SimilarityRecord` ``(sims, caption_to_image, meta)``; ``sims`` is a
        tensor, or a ``(sims_i2t, sims_t2i)`` tuple when a pair was saved.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "s.safetensors")
        >>> save_similarity(p, (torch.eye(2), torch.ones(2, 2)), [0, 1])
        >>> rec = load_similarity(p)
        >>> type(rec.sims).__name__, rec.caption_to_image.tolist()
        ('tuple', [0, 1])
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_similarity: no similarity file at {str(path)!r}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(
                f"load_similarity: {str(path)!r} is a safetensors file but not one written by "
                f"save_similarity (metadata format {metadata.get('format')!r})"
            )
        if metadata.get("version") != _FORMAT_VERSION:
            raise ValueError(
                f"load_similarity: {str(path)!r} has format version {metadata.get('version')!r}; "
                f"this version of imtm reads version {_FORMAT_VERSION!r}"
            )
        c2i = f.get_tensor("caption_to_image")
        if metadata.get("pair") == "true":
            sims: Any = (f.get_tensor("sims_i2t"), f.get_tensor("sims_t2i"))
        else:
            sims = f.get_tensor("sims")
    from imtm._io import loads_json

    meta = loads_json(
        metadata.get("meta", "{}"), f"load_similarity: the 'meta' entry of {str(path)!r}"
    )
    return SimilarityRecord(sims, c2i, meta)


def average_similarities(list_of_sims: Sequence, weights: Sequence[float] | None = None):
    """Weighted mean of the similarity matrices of several models (the papers' ensembles).

    SCAN, CHAN, LAPS and others report a two-model ensemble as the mean of the two
    models' similarity matrices. Each element may be a matrix, a pair
    ``(sims_i2t, sims_t2i)`` or a :class:`SimilarityRecord`. When any element is a
    pair the result is a pair, and a single matrix counts as the same matrix
    for both directions.

    Args:
        list_of_sims: two or more similarity matrices / pairs of equal shape.
        weights: one non-negative weight per element (normalised to sum to 1);
            equal weights when ``None``.

    Returns:
        A tensor ``(n_images, n_captions)``, or a tuple of two when any input is a pair.

    Shape:
        - each element: ``(Bi, Bt)``
        - output: ``(Bi, Bt)`` (or a pair of them)

    .. math::

        \\bar S = \\sum_m \\frac{w_m}{\\sum_{m'} w_{m'}} S_m

    References:
        Lee et al., SCAN, ECCV 2018 (ensemble of two models by averaging similarities).

    Example:
        >>> average_similarities([torch.zeros(2, 3), torch.ones(2, 3)], weights=[1, 3])[0, 0]
        tensor(0.7500)
    """
    if isinstance(list_of_sims, (torch.Tensor, np.ndarray)) or len(list_of_sims) == 0:
        raise ValueError(
            "average_similarities: expected a non-empty list of similarity matrices or pairs"
        )
    items = [s.sims if isinstance(s, SimilarityRecord) else s for s in list_of_sims]
    any_pair = any(_is_pair(s) for s in items)
    pairs = [_as_sims(s, f"average_similarities (element {m})") for m, s in enumerate(items)]
    shape = pairs[0][0].shape
    for m, (a, _) in enumerate(pairs):
        if a.shape != shape:
            raise ValueError(
                f"average_similarities: element {m} has shape {tuple(a.shape)} but element 0 has {tuple(shape)}"
            )
    if weights is None:
        w = torch.full((len(pairs),), 1.0 / len(pairs), dtype=torch.float64)
    else:
        w = torch.as_tensor(weights, dtype=torch.float64)
        if w.dim() != 1 or w.numel() != len(pairs):
            raise ValueError(
                f"average_similarities: expected {len(pairs)} weights (one per element), got shape {tuple(w.shape)}"
            )
        if bool(torch.isnan(w).any()) or bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ValueError(
                f"average_similarities: weights must be non-negative with a positive sum, got {w.tolist()}"
            )
        w = w / w.sum()
    dtype = pairs[0][0].dtype
    for a, b in pairs:
        dtype = torch.promote_types(dtype, torch.promote_types(a.dtype, b.dtype))
    device = pairs[0][0].device
    out_i2t = sum(float(wm) * a.to(device=device, dtype=dtype) for wm, (a, _) in zip(w, pairs))
    if not any_pair:
        return out_i2t
    out_t2i = sum(float(wm) * b.to(device=device, dtype=dtype) for wm, (_, b) in zip(w, pairs))
    return out_i2t, out_t2i


# ---------------------------------------------------------------------------- reporting
_TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("i2t R@1", "i2t_r1"),
    ("i2t R@5", "i2t_r5"),
    ("i2t R@10", "i2t_r10"),
    ("t2i R@1", "t2i_r1"),
    ("t2i R@5", "t2i_r5"),
    ("t2i R@10", "t2i_r10"),
    ("rSum", "rsum"),
)


def format_table(metrics: Mapping) -> str:
    """A Markdown R@K table for one metric dict or a dict of them (one row per name).

    Missing values show as ``-``; extra keys (ranks, medians) are ignored.

    Example:
        >>> print(format_table({"chan": retrieval_metrics(torch.eye(2), [0, 1])}))
        | model | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rSum |
        | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
        | chan | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 600.0 |
    """
    if not isinstance(metrics, Mapping) or len(metrics) == 0:
        raise ValueError(
            "format_table: expected a metric dict (as retrieval_metrics returns) or a dict of them, "
            f"got {type(metrics).__name__ if not isinstance(metrics, Mapping) else 'an empty dict'}"
        )
    nested = [isinstance(v, Mapping) for v in metrics.values()]
    if all(nested):
        rows = {str(k): v for k, v in metrics.items()}
    elif not any(nested):
        rows = {"": metrics}
    else:
        raise ValueError(
            "format_table: mix of metric values and nested dicts; give one dict or a dict of dicts"
        )

    def cell(row: Mapping, key: str) -> str:
        v = row.get(key)
        if v is None:
            return "-"
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                return "-"
            v = float(v)
        return f"{float(v):.1f}"

    header = ["model"] + [name for name, _ in _TABLE_COLUMNS]
    lines = [
        "| " + " | ".join(header) + " |",
        "| --- |" + " ---: |" * len(_TABLE_COLUMNS),
    ]
    for name, row in rows.items():
        lines.append(
            "| " + " | ".join([name] + [cell(row, key) for _, key in _TABLE_COLUMNS]) + " |"
        )
    return "\n".join(lines)
