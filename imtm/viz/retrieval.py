"""Retrieval pictures: recall@K curves of several matchers; a query's top retrieved items, matches marked."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from imtm.viz.figure import DPI, STYLE, as_picture, finish, new_figure, synthetic_picture

__all__ = ["recall_at_k", "recall_curves", "retrieved_examples"]


def recall_at_k(sims, caption_to_image, ks: Sequence[int]) -> dict[str, list[float]]:
    """Recall@K in percent for every K, both directions, from a score matrix (or an ``(i2t, t2i)`` pair).

    Uses :func:`imtm.metrics.retrieval_ranks` (the protocol of :func:`imtm.metrics.retrieval_metrics`).

    Example:
        >>> recall_at_k(torch.eye(3), [0, 1, 2], [1, 2])
        {'i2t': [100.0, 100.0], 't2i': [100.0, 100.0]}
    """
    from imtm.metrics import retrieval_ranks

    ranks = retrieval_ranks(sims, caption_to_image)
    return {
        d: [100.0 * float((r < k).float().mean()) for k in ks]
        for d, r in (("i2t", ranks.i2t), ("t2i", ranks.t2i))
    }


def _data_parts(data, what):
    for attr in ("images", "captions", "caption_to_image"):
        if not hasattr(data, attr):
            raise TypeError(
                f"imtm.viz.{what}: data must have images, captions and caption_to_image "
                f"(an ImageCaptionDataset); {type(data).__name__} has no {attr!r}"
            )
    return data.images, data.captions, torch.as_tensor(data.caption_to_image)


def recall_curves(
    matchers: Mapping[str, object],
    data,
    *,
    ks: Sequence[int] = (1, 2, 5, 10, 20, 50),
    panel_size: float = 3.0,
    ax=None,
    path: str | os.PathLike | None = None,
    dpi: int = DPI,
):
    """Recall@K against K of several matchers on one evaluation set: image-to-text and text-to-image.

    Args:
        matchers: ``{label: fitted Matcher}``.
        data: an evaluation set with ``images``, ``captions`` and ``caption_to_image``.
        ks: the K values (positive ints), drawn on a log axis.
        ax: draw into this matplotlib Axes (its place is split into the panels) or list of Axes.
        path: file to write, ``.png``, ``.pdf`` or ``.svg``. dpi: resolution of raster output.

    Returns:
        the Figure drawn in: two panels of ``panel_size`` inches when imtm makes it.
    """
    what = "recall_curves"
    if not matchers:
        raise ValueError(f"imtm.viz.{what}: give at least one matcher, as {{label: matcher}}")
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"imtm.viz.{what}: ks must be positive ints, got {list(ks)!r}")
    images, captions, c2i = _data_parts(data, what)
    fig, axes = new_figure(2, panel_size=panel_size, ax=ax)
    for label, m in matchers.items():
        rec = recall_at_k(m.similarity(images, captions), c2i, ks)
        for panel, d in zip(axes, ("i2t", "t2i")):
            panel.plot(list(ks), rec[d], marker="o", markersize=3, label=label)
    for panel, title in zip(axes, ("image -> text", "text -> image")):
        panel.set_xscale("log")
        panel.set_xticks(list(ks))
        panel.set_xticklabels([str(k) for k in ks])
        panel.set_ylim(0, 101)
        panel.set_xlabel("K", fontsize=STYLE["label"])
        panel.set_ylabel("recall@K (%)", fontsize=STYLE["label"])
        panel.set_title(title, fontsize=STYLE["title"])
        panel.tick_params(labelsize=STYLE["tick"])
        panel.grid(alpha=0.3)
        panel.legend(fontsize=STYLE["legend"])
    return finish(fig, path, dpi)


def _picture(data, pictures, index):
    if pictures is not None:
        return as_picture(pictures[index])
    if hasattr(data, "scenes"):
        return synthetic_picture(data, index)[0]
    item = data.images[index]
    if isinstance(item, torch.Tensor) and item.dim() == 3:
        return as_picture(item)
    return None


def retrieved_examples(
    matcher,
    data,
    query: int,
    *,
    direction: str = "i2t",
    top: int = 5,
    pictures=None,
    panel_size: float = 2.0,
    ax=None,
    path: str | os.PathLike | None = None,
    dpi: int = DPI,
):
    """A query and its ``top`` retrieved items, matches marked (green, with a tick) and misses (red).

    ``direction="i2t"``: image ``query`` and its top captions; ``"t2i"``: caption ``query`` and
    its top images. Scores come from ``matcher.similarity`` on the whole set (the i2t scores to
    rank captions, the t2i scores to rank images).

    Args:
        matcher: a fitted Matcher. data: an evaluation set (``images``, ``captions``, ``caption_to_image``).
        query: index of the query image (i2t) or caption (t2i).
        pictures: what to draw for image ``k`` (``pictures[k]``); default: a synthetic split's
            rendering (:func:`~imtm.viz.synthetic_picture`) or the image itself when it is pixels.
        ax: draw into this matplotlib Axes (its place is split into the panels) or list of Axes
            (``top`` for t2i, two for i2t).
        path: file to write, ``.png``, ``.pdf`` or ``.svg``. dpi: resolution of raster output.

    Returns:
        the Figure drawn in; when imtm makes it: ``top + 1`` panels of ``panel_size`` inches in one row (i2t: two panels,
        the query image and the ranked captions, ``2 * panel_size`` and ``3 * panel_size`` wide).
    """
    what = "retrieved_examples"
    if direction not in ("i2t", "t2i"):
        raise ValueError(f"imtm.viz.{what}: direction must be 'i2t' or 't2i', got {direction!r}")
    images, captions, c2i = _data_parts(data, what)
    n = len(images) if direction == "i2t" else len(captions)
    if isinstance(query, bool) or not isinstance(query, int) or not 0 <= query < n:
        raise ValueError(f"imtm.viz.{what}: query must be an index in [0, {n}), got {query!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"imtm.viz.{what}: top must be a positive int, got {top!r}")
    sims = matcher.similarity(images, captions)
    s_i2t, s_t2i = (
        sims if sims.dim() == 3 else (sims, sims)
    )  # (2, Bi, Bt): direction-specific scores
    if direction == "i2t":
        order = torch.argsort(s_i2t[query], descending=True, stable=True)[:top].tolist()
        n_hits = sum(int(c2i[t]) == query for t in order)
        fig, axes = new_figure(
            2,
            panel_size=panel_size,
            title=f"top {top} captions ({n_hits} correct)",
            ax=ax,
            width_ratios=(2, 3) if ax is None or not isinstance(ax, (list, tuple)) else None,
        )
        if ax is None:
            fig.set_size_inches(5 * panel_size, panel_size + 0.4)
        pic = _picture(data, pictures, query)
        if pic is not None:
            axes[0].imshow(pic, interpolation="nearest")
        axes[0].set_xticks([])
        axes[0].set_yticks([])
        axes[0].set_title(f"query image {query}", fontsize=STYLE["title"])
        text_ax = axes[1]
        text_ax.axis("off")
        for r, t in enumerate(order):
            hit = int(c2i[t]) == query
            text_ax.text(
                0.0,
                1 - (r + 0.5) / top,
                f"{r + 1}. {'✓' if hit else '✗'} {captions[t]}",
                color="green" if hit else "red",
                fontsize=STYLE["label"],
                va="center",
                transform=text_ax.transAxes,
                wrap=True,
            )
        return finish(fig, path, dpi)
    order = torch.argsort(s_t2i[:, query], descending=True, stable=True)[:top].tolist()
    fig, axes = new_figure(top, panel_size=panel_size, title=f"query: {captions[query]}", ax=ax)
    for r, (panel, i) in enumerate(zip(axes, order)):
        hit = int(c2i[query]) == i
        pic = _picture(data, pictures, i)
        if pic is not None:
            panel.imshow(pic, interpolation="nearest")
        else:
            panel.imshow(np.ones((2, 2, 3)))
        for side in panel.spines.values():
            side.set_edgecolor("green" if hit else "red")
            side.set_linewidth(4)
        panel.set_xticks([])
        panel.set_yticks([])
        panel.set_title(
            f"{r + 1}. image {i} {'✓' if hit else '✗'}",
            fontsize=STYLE["title"],
            color="green" if hit else "red",
        )
    return finish(fig, path, dpi)
