"""What every picture shares: matplotlib on the Agg canvas, the inputs read once, PNG output.

matplotlib is an optional dependency (``pip install "imtm[viz]"``). Figures are built
on ``matplotlib.figure.Figure`` with an Agg canvas attached, never through ``pyplot``,
so drawing changes no global backend or state and works without a display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from imtm.tokens import Tokens

__all__ = ["DPI", "as_picture", "block_of", "caption_words", "draw_boxes", "encode_pair", "finish", "new_figure",
           "patch_grid", "require_matplotlib", "show_grid_values", "synthetic_picture"]

#: Resolution of the saved PNGs: a figure of ``w x h`` inches is ``w * DPI x h * DPI`` pixels.
DPI = 100


def require_matplotlib():
    """Import matplotlib's Figure and Agg canvas, or say how to install them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised by monkeypatching in the tests
        raise ImportError('imtm.viz draws with matplotlib, which is not installed: pip install "imtm[viz]"') from err
    return Figure, FigureCanvasAgg


def new_figure(n_panels: int, *, cols: int | None = None, panel_size: float = 2.0, title: str | None = None):
    """A figure of ``n_panels`` square axes in a grid; returns ``(figure, flat list of axes)``.

    The figure is ``cols * panel_size`` by ``rows * panel_size`` inches (plus ``0.4`` for a title).
    """
    Figure, FigureCanvasAgg = require_matplotlib()
    cols = max(1, min(n_panels, cols or n_panels))
    rows = max(1, math.ceil(n_panels / cols))
    extra = 0.4 if title else 0.0
    fig = Figure(figsize=(cols * panel_size, rows * panel_size + extra))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, k + 1) for k in range(n_panels)]
    if title:
        fig.suptitle(title, fontsize=9)
    return fig, axes


def finish(fig, path: str | os.PathLike | None, dpi: int = DPI):
    """Lay ``fig`` out, save it as a PNG at ``path`` (when given) and return it."""
    fig.tight_layout()
    if path is not None:
        # No bbox_inches="tight": the PNG keeps the figure's size, figsize * dpi pixels.
        fig.savefig(os.fspath(path), dpi=dpi, format="png")
    return fig


def as_picture(picture) -> np.ndarray:
    """An image to draw, as an ``(H, W, 3)`` float array in ``[0, 1]``.

    Accepts ``(3, H, W)`` or ``(H, W, 3)`` tensors or arrays, uint8 (0-255) or float (0-1).
    """
    if isinstance(picture, torch.Tensor):
        picture = picture.detach().cpu().numpy()
    arr = np.asarray(picture)
    if arr.ndim != 3 or 3 not in (arr.shape[0], arr.shape[-1]):
        raise ValueError(f"imtm.viz: expected a picture of shape (3, H, W) or (H, W, 3), got {arr.shape}")
    if arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    arr = arr.astype(np.float64)
    if np.asarray(picture).dtype == np.uint8:
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0)


def block_of(matcher, name: str | None, cls, what: str):
    """The fitted block ``name`` of ``matcher`` (or its only block of class ``cls`` when ``name`` is None)."""
    if not hasattr(matcher, "components_"):
        raise ValueError(f"imtm.viz.{what}: the Matcher is not fitted; call fit() first")
    blocks = dict(matcher.components_.items())
    if name is not None:
        if name not in blocks:
            raise ValueError(f"imtm.viz.{what}: the Matcher has no block named {name!r}; it has {sorted(blocks)}")
        return blocks[name]
    found = [b for b in blocks.values() if isinstance(b, cls)]
    if len(found) != 1:
        raise ValueError(f"imtm.viz.{what}: expected one {cls.__name__} block in the Matcher, found {len(found)}; "
                         f"name the block to use")
    return found[0]


@torch.no_grad()
def encode_pair(matcher, image, caption: str, *, image_value: str = "image_tokens",
                text_value: str = "text_tokens", what: str = "picture") -> tuple[Any, Any]:
    """``matcher``'s encodings of one image and one caption: the values the pairwise blocks read.

    Returns the two values (Tokens of shape ``(1, N, D)`` and ``(1, M, D)`` for the defaults) on the
    Matcher's device, where its blocks can read them.
    """
    if not isinstance(caption, str):
        raise TypeError(f"imtm.viz.{what}: caption must be a string, got {type(caption).__name__}")
    iv = matcher.encode_images([image])
    tv = matcher.encode_texts([caption])
    for name, values, side in ((image_value, iv, "image"), (text_value, tv, "caption")):
        if name not in values:
            raise ValueError(f"imtm.viz.{what}: the Matcher's {side} side gives the pairwise blocks "
                             f"{sorted(values)}, not {name!r}")
    return iv[image_value], tv[text_value]


def caption_words(matcher, caption: str, text_tokens: Tokens, *, text_block: str = "text") -> list[str]:
    """A label for every real token of ``text_tokens`` (one caption): its word or word piece.

    Read from the text encoder: a vocabulary (:class:`~imtm.components.GRUTextEncoder`) splits the caption
    with :func:`imtm.data.vocabulary.tokenize`; a tokenizer (:class:`~imtm.components.HFTextEncoder`)
    gives word pieces at the encoder's output positions. Otherwise ``#0, #1, ...``.
    """
    from imtm.data.vocabulary import tokenize

    mask = text_tokens.mask[0]
    n = int(mask.sum())
    block = dict(matcher.components_.items()).get(text_block)
    labels: list[str] | None = None
    if block is not None and getattr(block, "vocab", None) is not None:
        labels = tokenize(caption)
        labels = labels if len(labels) == n else None
    elif block is not None and hasattr(block, "tokenize") and hasattr(block, "tokenizer"):
        ids = block.tokenize([caption])
        pieces = block.tokenizer.convert_ids_to_tokens(ids.feats[0].tolist())
        if len(pieces) == mask.shape[0]:
            labels = [p for p, real in zip(pieces, mask.tolist()) if real]
    return labels if labels is not None else [f"#{k}" for k in range(n)]


def synthetic_picture(data, index: int, *, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The picture of image ``index`` of a synthetic split and its boxes, ready for the other functions.

    In the pixels view the picture is the image itself; in the regions view the same scene is
    rendered (the regions view stores features only). Boxes are ``(x0, y0, x1, y1)`` pixels: per
    region (regions view) or per object (pixels view).

    Returns:
        ``(picture (S, S, 3) float in [0, 1], boxes (n, 4) float)``.
    """
    from imtm.data.synthetic import render_scene

    if not hasattr(data, "scenes") or not hasattr(data, "boxes"):
        raise TypeError(f"imtm.viz.synthetic_picture: expected a synthetic split (SyntheticDataset), "
                        f"got {type(data).__name__}")
    boxes = np.asarray(data.boxes[index], dtype=np.float64)
    if data.view == "pixels":
        return as_picture(data.images[index]), boxes
    size = int(data.config.image_size)
    return as_picture(render_scene(data.scenes[index], np.random.default_rng(0), size, noise)), boxes


def patch_grid(tokens: Tokens, what: str) -> tuple[int, int]:
    """The ``(h, w)`` patch grid of one image's tokens, or an error saying the picture needs one."""
    if tokens.grid is None:
        raise ValueError(f"imtm.viz.{what}: the image tokens carry no patch grid (a ViT/Swin encoder sets one); "
                         f"for region features pass boxes=")
    return int(tokens.grid[0]), int(tokens.grid[1])


def show_grid_values(ax, picture: np.ndarray | None, values: np.ndarray, grid: tuple[int, int], *,
                     cmap: str = "viridis", alpha: float = 0.55, vmin=None, vmax=None):
    """Draw ``values`` (one per patch, row-major over ``grid``) over ``picture`` (or alone)."""
    h, w = grid
    extent = None
    if picture is not None:
        ax.imshow(picture, interpolation="nearest")
        extent = (-0.5, picture.shape[1] - 0.5, picture.shape[0] - 0.5, -0.5)
    ax.imshow(np.asarray(values, dtype=np.float64).reshape(h, w), cmap=cmap, alpha=alpha if picture is not None else 1.0,
              extent=extent, interpolation="nearest", vmin=vmin, vmax=vmax)
    ax.set_xticks([])
    ax.set_yticks([])


def region_canvas(ax, picture: np.ndarray | None, boxes) -> None:
    """Show ``picture``; without one, size the axes to the boxes ``(x0, y0, x1, y1)`` (y down)."""
    if picture is not None:
        ax.imshow(picture, interpolation="nearest")
        return
    boxes = np.asarray(boxes, dtype=np.float64)
    ax.set_xlim(0, float(boxes[:, 2].max()))
    ax.set_ylim(float(boxes[:, 3].max()), 0)
    ax.set_aspect("equal")


def draw_boxes(ax, boxes: Sequence, values: Sequence[float] | None = None, *, highlight: Sequence[int] = (),
               cmap: str = "viridis", vmin: float = -1.0, vmax: float = 1.0, label_top: bool = False):
    """Boxes ``(x0, y0, x1, y1)``, filled by ``values`` through ``cmap``; ``highlight`` outlined in red."""
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    cm = colormaps[cmap]
    highlight = {int(h) for h in highlight}
    for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=np.float64)):
        if values is not None:
            t = (float(values[k]) - vmin) / max(vmax - vmin, 1e-12)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=cm(min(max(t, 0.0), 1.0)), alpha=0.45,
                                   edgecolor="none"))
        red = k in highlight
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red" if red else "white",
                               linewidth=2.0 if red else 0.6))
    ax.set_xticks([])
    ax.set_yticks([])
