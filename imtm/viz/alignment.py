"""Word-to-patch and word-to-region alignment maps (LAPS Fig. 8, CHAN Fig. 5)."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from imtm.viz.figure import (
    DPI,
    STYLE,
    add_colorbar,
    as_picture,
    caption_words,
    draw_boxes,
    encode_pair,
    finish,
    new_figure,
    patch_grid,
    region_canvas,
    show_grid_values,
)

__all__ = ["word_alignment", "word_alignment_maps"]


def word_alignment(image_tokens, text_tokens) -> torch.Tensor:
    r"""Cosines of every real word with every real image token of one pair: CHAN's :math:`\cos(t_i, v_j)`.

    .. math::

        A_{ij} = \cos(t_i, v_j) \qquad \text{(CHAN Eq. 3; LAPS Eq. 8 before the max)}

    Shape:
        - image_tokens: Tokens ``(1, N, D)`` (prefix tokens are left out),
          text_tokens: Tokens ``(1, M, D)``
        - output: ``(M', N')``: real words by real non-prefix image tokens

    Example:
        >>> from imtm import Tokens
        >>> word_alignment(Tokens(torch.randn(1, 5, 8)), Tokens.from_lengths(torch.randn(1, 4, 8), [3])).shape
        torch.Size([3, 5])
    """
    p = image_tokens.num_prefix_tokens
    regions = image_tokens.feats[0, p:][image_tokens.mask[0, p:]]
    words = text_tokens.feats[0][text_tokens.mask[0]]
    return F.normalize(words.float(), dim=-1) @ F.normalize(regions.float(), dim=-1).t()


def word_alignment_maps(
    matcher,
    image,
    caption: str,
    *,
    picture=None,
    boxes=None,
    image_value: str = "image_tokens",
    text_value: str = "text_tokens",
    text_block: str | None = None,
    cols: int = 4,
    panel_size: float = 2.0,
    ax=None,
    path: str | os.PathLike | None = None,
    dpi: int = DPI,
):
    r"""One panel per word of ``caption``: how strongly it aligns with each patch or region of ``image``.

    Patch tokens (a ViT/Swin encoder, LAPS Fig. 8) are drawn as a heat map over the
    patch grid; region features (CHAN Fig. 5) as boxes filled by the cosine. The
    best patch or region of each word (the one CHAN's hard assignment keeps,
    :math:`\arg\max_j \cos(t_i, v_j)`, Eq. 5) is outlined in red. One colour scale serves
    every panel (the caption's lowest to highest cosine), shown by a labelled colour bar.
    Region features without ``boxes`` are drawn as one words-by-regions matrix instead.

    The maps show the encoders' tokens before any pairwise block (LAPS aligns
    slimmed tokens; its Fig. 8 also shows the patches, which is what is drawn here).

    Args:
        matcher: a fitted :class:`~imtm.Matcher` whose pairwise blocks read ``image_value``
            and ``text_value``.
        image: one raw image, as the Matcher takes it (pixels ``(3, H, W)`` or regions ``(N, D)``).
        caption: one caption string.
        picture: what to draw under the maps (``(3, H, W)`` or ``(H, W, 3)``); default: ``image``
            itself when it is pixels (see :func:`~imtm.viz.synthetic_picture` for region features).
        boxes: ``(N, 4)`` ``(x0, y0, x1, y1)`` pixel boxes of the regions, in region order
            (:func:`~imtm.viz.synthetic_picture`, or :func:`~imtm.viz.read_boxes` for bottom-up-attention
            TSV / ``.npy`` boxes); without them, region features give a words-by-regions matrix.
        cols: panels per row. panel_size: inches per panel.
        ax: draw into this matplotlib Axes (its place is split into the panels) or list of Axes.
        path: file to write, ``.png``, ``.pdf`` or ``.svg``. dpi: resolution of raster output.

    Returns:
        the matplotlib ``Figure`` drawn in (``cols * panel_size`` inches wide when imtm makes it).

    Example:
        >>> from imtm.viz import word_alignment_maps  # doctest: +SKIP
        >>> word_alignment_maps(m, test.images[0], test.captions[0], path="align.png")  # doctest: +SKIP
    """
    what = "word_alignment_maps"
    img, txt = encode_pair(
        matcher, image, caption, image_value=image_value, text_value=text_value, what=what
    )
    cos = word_alignment(img, txt).cpu().numpy()
    words = caption_words(matcher, caption, txt, text_block=text_block)
    if picture is None and isinstance(image, torch.Tensor) and image.dim() == 3:
        picture = image
    pic = None if picture is None else as_picture(picture)
    if img.grid is None and boxes is not None:
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.shape != (cos.shape[1], 4):
            raise ValueError(
                f"imtm.viz.{what}: expected boxes of shape ({cos.shape[1]}, 4), one per real region, "
                f"got {boxes.shape}"
            )
    # One colour scale for the whole caption (its lowest to highest cosine), so panels compare.
    lo, hi = float(cos.min()), float(cos.max())
    hi = hi if hi > lo else lo + 1e-6
    label = "cosine of word and " + ("patch" if img.grid is not None else "region")
    cmap = STYLE["sequential"]
    if img.grid is None and boxes is None:  # nowhere to place the regions: the matrix itself
        fig, axes = new_figure(
            1, panel_size=max(panel_size, 0.35 * len(words)), title=caption, ax=ax
        )
        im = axes[0].imshow(
            cos, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest", aspect="auto"
        )
        axes[0].set_yticks(range(len(words)), words, fontsize=STYLE["tick"])
        axes[0].set_xlabel("region", fontsize=STYLE["label"])
        axes[0].tick_params(axis="x", labelsize=STYLE["tick"])
        axes[0].plot(
            cos.argmax(1), range(len(words)), "s", markerfacecolor="none", markeredgecolor="red"
        )
        add_colorbar(fig, im, axes, label)
        return finish(fig, path, dpi)
    fig, axes = new_figure(len(words), cols=cols, panel_size=panel_size, title=caption, ax=ax)
    for k, (panel, word) in enumerate(zip(axes, words)):
        best = int(cos[k].argmax())
        if img.grid is not None:
            h, w = patch_grid(img, what)
            show_grid_values(panel, pic, cos[k], (h, w), vmin=lo, vmax=hi)
            _outline_cell(panel, best, (h, w), pic)
        else:
            region_canvas(panel, pic, boxes)
            draw_boxes(panel, boxes, cos[k], highlight=[best], vmin=lo, vmax=hi)
        panel.set_title(f"{word}  ({cos[k, best]:.2f})", fontsize=STYLE["title"])
    add_colorbar(fig, (cmap, lo, hi), axes, label)
    return finish(fig, path, dpi)


def _outline_cell(ax, index: int, grid: tuple[int, int], pic) -> None:
    """Outline patch ``index`` of a row-major ``grid`` in red, in the picture's pixel units."""
    from matplotlib.patches import Rectangle

    h, w = grid
    ch, cw = (1.0, 1.0) if pic is None else (pic.shape[0] / h, pic.shape[1] / w)
    r, c = divmod(index, w)
    ax.add_patch(
        Rectangle((c * cw - 0.5, r * ch - 0.5), cw, ch, fill=False, edgecolor="red", linewidth=2.0)
    )
