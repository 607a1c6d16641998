"""What every picture shares: matplotlib on the Agg canvas, one style, output in the path's format.

matplotlib is an optional dependency (``pip install "imtm[viz]"``). Figures are built
on ``matplotlib.figure.Figure`` with an Agg canvas attached, never through ``pyplot``,
so drawing changes no global backend or state and works without a display.

Every figure function:

- writes ``path=`` in the format its suffix names (:data:`FORMATS`: ``.png``, ``.pdf``, ``.svg``);
- draws into a figure of its own, or into the caller's with ``ax=``: one ``Axes`` (from
  ``plt.subplots``/``add_subplot``; a picture of several panels splits its place into a grid)
  or a list with one ``Axes`` per panel;
- returns the ``Figure`` it drew in (the caller's figure with ``ax=``);
- gives every colour that encodes a value a colour bar with a labelled scale;
- uses :data:`STYLE` for font sizes and colour maps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from einops import rearrange

from imtm.tokens import Tokens

__all__ = [
    "DPI",
    "FORMATS",
    "STYLE",
    "BlockChoiceError",
    "add_colorbar",
    "as_picture",
    "block_of",
    "caption_words",
    "draw_boxes",
    "encode_pair",
    "finish",
    "format_of",
    "model_title",
    "new_figure",
    "patch_grid",
    "require_matplotlib",
    "show_grid_values",
    "synthetic_picture",
    "text_encoder_of",
]

#: Resolution of raster output: a figure of ``w x h`` inches is ``w * DPI x h * DPI`` pixels in a PNG.
DPI = 100

#: The file formats a figure is written in, by the path's suffix (PDF and SVG are vector formats).
FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}

#: One style for every figure: font sizes in points, and the colour maps for values that run from
#: low to high (``sequential``) or around zero (``diverging``).
STYLE = {
    "suptitle": 9,
    "title": 8,
    "label": 7,
    "tick": 6,
    "legend": 6,
    "sequential": "viridis",
    "diverging": "coolwarm",
}


def require_matplotlib():
    """Import matplotlib's Figure and Agg canvas, or say how to install them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised by monkeypatching in the tests
        raise ImportError(
            'imtm.viz draws with matplotlib, which is not installed: pip install "imtm[viz]"'
        ) from err
    return Figure, FigureCanvasAgg


def format_of(path: str | os.PathLike) -> str:
    """The output format named by ``path``'s suffix (``"png"``, ``"pdf"`` or ``"svg"``).

    Example:
        >>> format_of("figures/fig3.PDF")
        'pdf'
    """
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"imtm.viz: cannot write {os.fspath(path)!r}: the file name must end in one of "
            f"{sorted(FORMATS)} (the suffix chooses the format)"
        )
    return FORMATS[suffix]


def new_figure(
    n_panels: int,
    *,
    cols: int | None = None,
    panel_size: float = 2.0,
    title: str | None = None,
    ax=None,
    width_ratios=None,
):
    """A grid of ``n_panels`` axes; returns ``(figure, flat list of axes)``.

    Without ``ax`` a new figure of ``cols * panel_size`` by ``rows * panel_size`` inches
    (plus ``0.4`` for a title), laid out by matplotlib's constrained layout. With ``ax``:
    a list of ``n_panels`` axes is used as it is; one axes from a grid (``add_subplot``,
    ``plt.subplots``) is replaced by a sub-figure in its place holding the panels (a single
    panel is drawn in ``ax`` itself). The figure returned is then the caller's (or the
    sub-figure, for a split ``ax``); :func:`finish` saves the whole figure.
    """
    Figure, FigureCanvasAgg = require_matplotlib()
    cols = max(1, min(n_panels, cols or n_panels))
    rows = max(1, math.ceil(n_panels / cols))
    if ax is not None:
        return _panels_in(ax, n_panels, rows, cols, title, width_ratios)
    extra = 0.4 if title else 0.0
    fig = Figure(figsize=(cols * panel_size, rows * panel_size + extra), layout="constrained")
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(rows, cols, width_ratios=width_ratios)
    axes = [fig.add_subplot(gs[k // cols, k % cols]) for k in range(n_panels)]
    if title:
        fig.suptitle(title, fontsize=STYLE["suptitle"])
    return fig, axes


def _panels_in(ax, n_panels: int, rows: int, cols: int, title, width_ratios):
    from matplotlib.axes import Axes

    if isinstance(ax, Axes):
        if n_panels == 1:
            if title:
                ax.set_title(title, fontsize=STYLE["title"])
            return ax.figure, [ax]
        spec = ax.get_subplotspec()
        if spec is None:
            raise ValueError(
                f"imtm.viz: this picture has {n_panels} panels; pass ax= as an axes from a grid "
                f"(fig.add_subplot, plt.subplots), whose place is split, or a list of {n_panels} axes"
            )
        parent = ax.figure
        ax.remove()
        sub = parent.add_subfigure(spec)
        gs = sub.add_gridspec(rows, cols, width_ratios=width_ratios)
        axes = [sub.add_subplot(gs[k // cols, k % cols]) for k in range(n_panels)]
        if title:
            sub.suptitle(title, fontsize=STYLE["suptitle"])
        return sub, axes
    axes = list(ax) if not isinstance(ax, str) and hasattr(ax, "__iter__") else None
    if axes is None or len(axes) != n_panels or not all(isinstance(a, Axes) for a in axes):
        raise TypeError(
            f"imtm.viz: ax must be a matplotlib Axes or a list of {n_panels} Axes (one per panel), "
            f"got {type(ax).__name__}" + (f" of length {len(axes)}" if axes is not None else "")
        )
    if title:
        axes[0].set_title(title, fontsize=STYLE["title"])
    return axes[0].figure, axes


def finish(fig, path: str | os.PathLike | None, dpi: int = DPI):
    """Save the figure holding ``fig`` at ``path`` (when given) in the format of its suffix; return that figure.

    No ``bbox_inches="tight"``: a PNG keeps the figure's size, ``figsize * dpi`` pixels.
    """
    root = fig.figure  # a sub-figure's figure is the whole figure; a Figure's is itself
    if path is not None:
        root.savefig(os.fspath(path), dpi=dpi, format=format_of(path))
    return root


def add_colorbar(fig, mappable, axes, label: str):
    """A colour bar for ``mappable`` beside ``axes``, its scale labelled ``label``; returns it.

    ``mappable`` is what ``imshow`` returns, or ``(cmap, vmin, vmax)`` for colours drawn by hand
    (boxes filled through a colour map).
    """
    if isinstance(mappable, tuple):
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        cmap, vmin, vmax = mappable
        mappable = ScalarMappable(norm=Normalize(vmin=vmin, vmax=vmax), cmap=cmap)
    bar = fig.colorbar(mappable, ax=axes, shrink=0.8)
    bar.set_label(label, fontsize=STYLE["label"])
    bar.ax.tick_params(labelsize=STYLE["tick"])
    return bar


def as_picture(picture) -> np.ndarray:
    """An image to draw, as an ``(H, W, 3)`` float array in ``[0, 1]``.

    Accepts ``(3, H, W)`` or ``(H, W, 3)`` tensors or arrays, uint8 (0-255) or float (0-1).
    """
    if isinstance(picture, torch.Tensor):
        picture = picture.detach().cpu().numpy()
    arr = np.asarray(picture)
    if arr.ndim != 3 or 3 not in (arr.shape[0], arr.shape[-1]):
        raise ValueError(
            f"imtm.viz: expected a picture of shape (3, H, W) or (H, W, 3), got {arr.shape}"
        )
    if arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    arr = arr.astype(np.float64)
    if np.asarray(picture).dtype == np.uint8:
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0)


class BlockChoiceError(ValueError):
    """A picture needs one block of a kind and the Matcher has none, several, or no block of that name.

    Attributes:
        kind: the class name the picture needs. names: the Matcher's blocks of that kind.
        blocks: all the Matcher's block names. name: the name asked for (``None``: none).
    """

    def __init__(
        self, message: str, *, kind: str, names: list[str], blocks: list[str], name: str | None
    ):
        super().__init__(message)
        self.kind, self.names, self.blocks, self.name = kind, names, blocks, name


def block_of(matcher, name: str | None, cls, what: str, *, param: str = "block"):
    """The fitted block ``name`` of ``matcher`` (or its only block of class ``cls`` when ``name`` is None).

    Raises:
        BlockChoiceError: (a ValueError) no block ``name``, or not exactly one ``cls`` block; the
            message names the argument to pass (``param``) and the candidates.
    """
    if not hasattr(matcher, "components_"):
        raise ValueError(f"imtm.viz.{what}: the Matcher is not fitted; call fit() first")
    blocks = dict(matcher.components_.items())
    of_kind = [n for n, b in blocks.items() if isinstance(b, cls)]
    info = {"kind": cls.__name__, "names": of_kind, "blocks": sorted(blocks), "name": name}
    if name is not None:
        if name not in blocks:
            raise BlockChoiceError(
                f"imtm.viz.{what}: the Matcher has no block named {name!r}; it has {sorted(blocks)}",
                **info,
            )
        return blocks[name]
    if len(of_kind) != 1:
        which = (
            f"its {cls.__name__} blocks are {of_kind}"
            if of_kind
            else f"its blocks are {sorted(blocks)}"
        )
        raise BlockChoiceError(
            f"imtm.viz.{what}: expected one {cls.__name__} block in the Matcher, found "
            f"{len(of_kind)}; pass {param}=NAME ({which})",
            **info,
        )
    return blocks[of_kind[0]]


def text_encoder_of(matcher, name: str | None = None):
    """The Matcher's text encoder: block ``name``, or the block with a vocabulary or tokenizer.

    Among several, the one that provides ``text_tokens`` (else the first). ``None`` when there is none.
    """
    from imtm.data.vocabulary import Vocabulary

    blocks = dict(matcher.components_.items())
    if name is not None:
        return blocks.get(name)

    def reads_text(b):
        return isinstance(getattr(b, "vocab", None), Vocabulary) or (
            callable(getattr(b, "tokenize", None))
            and hasattr(getattr(b, "tokenizer", None), "convert_ids_to_tokens")
        )

    found = [b for b in blocks.values() if reads_text(b)]
    main = [b for b in found if "text_tokens" in tuple(b.provides)]
    return (main or found or [None])[0]


def model_title(matcher, fallback: str = "model") -> str:
    """A short title of a (loaded) Matcher from its record: the preset or name it records, else its scorers.

    ``"HardAssignmentCoding, 3 epochs"``; a record's ``"preset"`` or ``"name"`` comes first when saved.
    """
    record = getattr(matcher, "record_", None) or {}
    for key in ("preset", "name", "title"):
        if isinstance(record.get(key), str) and record[key]:
            return record[key]
    plan = getattr(matcher, "plan_", None)
    scorers = []
    if plan is not None:
        wanted = set(plan.score_values)
        for b in plan.blocks:
            if wanted & set(b.provides) and type(b).__name__ not in scorers:
                scorers.append(type(b).__name__)
    epochs = record.get("n_epochs", getattr(matcher, "n_epochs_", None))
    bits = [" + ".join(scorers) if scorers else fallback]
    if isinstance(epochs, int):
        bits.append(f"{epochs} epoch{'s' if epochs != 1 else ''}")
    return ", ".join(bits)


@torch.no_grad()
def encode_pair(
    matcher,
    image,
    caption: str,
    *,
    image_value: str = "image_tokens",
    text_value: str = "text_tokens",
    what: str = "picture",
) -> tuple[Any, Any]:
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
            raise ValueError(
                f"imtm.viz.{what}: the Matcher's {side} side gives the pairwise blocks "
                f"{sorted(values)}, not {name!r}"
            )
    return iv[image_value], tv[text_value]


def caption_words(
    matcher, caption: str, text_tokens: Tokens, *, text_block: str | None = None
) -> list[str]:
    """A label for every real token of ``text_tokens`` (one caption): the word or word piece the model reads.

    From the Matcher's text encoder (``text_block``, or found by :func:`text_encoder_of`): a
    vocabulary (:class:`~imtm.components.GRUTextEncoder`) gives its own words for the caption
    (``<unk>`` for a word it does not know); a tokenizer (:class:`~imtm.components.HFTextEncoder`)
    gives the word pieces at the encoder's output positions ([CLS]/[SEP] kept or dropped as the
    encoder does). ``#0, #1, ...`` only when neither lines up with the tokens.
    """
    mask = text_tokens.mask[0]
    n = int(mask.sum())
    block = text_encoder_of(matcher, text_block)
    labels: list[str] | None = None
    vocab = getattr(block, "vocab", None)
    if vocab is not None and hasattr(vocab, "encode") and hasattr(vocab, "itos"):
        labels = [vocab.itos[i] for i in vocab.encode(caption)]
    elif (
        block is not None
        and callable(getattr(block, "tokenize", None))
        and hasattr(block, "tokenizer")
    ):
        ids = block.tokenize([caption])
        pieces = block.tokenizer.convert_ids_to_tokens(ids.feats[0][ids.mask[0]].tolist())
        special = set(getattr(block.tokenizer, "all_special_tokens", ()))
        # the encoder may drop [CLS] and/or [SEP]: try what it keeps
        options = [
            pieces,
            pieces[1:],
            pieces[:-1],
            pieces[1:-1],
            [p for p in pieces if p not in special],
        ]
        labels = next((o for o in options if len(o) == n), None)
    if labels is not None and len(labels) == n:
        return labels
    return [f"#{k}" for k in range(n)]


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
        raise TypeError(
            f"imtm.viz.synthetic_picture: expected a synthetic split (SyntheticDataset), "
            f"got {type(data).__name__}"
        )
    boxes = np.asarray(data.boxes[index], dtype=np.float64)
    if data.view == "pixels":
        return as_picture(data.images[index]), boxes
    size = int(data.config.image_size)
    return as_picture(
        render_scene(data.scenes[index], np.random.default_rng(0), size, noise)
    ), boxes


def patch_grid(tokens: Tokens, what: str) -> tuple[int, int]:
    """The ``(h, w)`` patch grid of one image's tokens, or an error saying the picture needs one."""
    if tokens.grid is None:
        raise ValueError(
            f"imtm.viz.{what}: the image tokens carry no patch grid (a ViT/Swin encoder sets one); "
            f"for region features pass boxes="
        )
    return int(tokens.grid[0]), int(tokens.grid[1])


def show_grid_values(
    ax,
    picture: np.ndarray | None,
    values: np.ndarray,
    grid: tuple[int, int],
    *,
    cmap: str = STYLE["sequential"],
    alpha: float = 0.55,
    vmin=None,
    vmax=None,
):
    """Draw ``values`` (one per patch, row-major over ``grid``) over ``picture`` (or alone); return the image."""
    h, w = grid
    extent = None
    if picture is not None:
        ax.imshow(picture, interpolation="nearest")
        extent = (-0.5, picture.shape[1] - 0.5, picture.shape[0] - 0.5, -0.5)
    im = ax.imshow(
        rearrange(np.asarray(values, dtype=np.float64), "(h w) -> h w", h=h, w=w),
        cmap=cmap,
        alpha=alpha if picture is not None else 1.0,
        extent=extent,
        interpolation="nearest",
        vmin=vmin,
        vmax=vmax,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def region_canvas(ax, picture: np.ndarray | None, boxes) -> None:
    """Show ``picture``; without one, size the axes to the boxes ``(x0, y0, x1, y1)`` (y down)."""
    if picture is not None:
        ax.imshow(picture, interpolation="nearest")
        return
    boxes = np.asarray(boxes, dtype=np.float64)
    ax.set_xlim(0, float(boxes[:, 2].max()))
    ax.set_ylim(float(boxes[:, 3].max()), 0)
    ax.set_aspect("equal")


def draw_boxes(
    ax,
    boxes: Sequence,
    values: Sequence[float] | None = None,
    *,
    highlight: Sequence[int] = (),
    cmap: str = STYLE["sequential"],
    vmin: float = -1.0,
    vmax: float = 1.0,
    label_top: bool = False,
):
    """Boxes ``(x0, y0, x1, y1)``, filled by ``values`` through ``cmap``; ``highlight`` outlined in red."""
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    cm = colormaps[cmap]
    highlight = {int(h) for h in highlight}
    for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=np.float64)):
        if values is not None:
            t = (float(values[k]) - vmin) / max(vmax - vmin, 1e-12)
            ax.add_patch(
                Rectangle(
                    (x0, y0),
                    x1 - x0,
                    y1 - y0,
                    facecolor=cm(min(max(t, 0.0), 1.0)),
                    alpha=0.45,
                    edgecolor="none",
                )
            )
        red = k in highlight
        ax.add_patch(
            Rectangle(
                (x0, y0),
                x1 - x0,
                y1 - y0,
                fill=False,
                edgecolor="red" if red else "white",
                linewidth=2.0 if red else 0.6,
            )
        )
    ax.set_xticks([])
    ax.set_yticks([])
