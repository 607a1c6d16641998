"""ELA picture: the top lexicon words of every patch, including words the caption never says (Fig. 3)."""

from __future__ import annotations

import os

import numpy as np
import torch

from imtm.viz.figure import (
    DPI,
    STYLE,
    as_picture,
    block_of,
    encode_pair,
    finish,
    new_figure,
    patch_grid,
)

__all__ = ["patch_lexicon_words"]


@torch.no_grad()
def patch_lexicon_words(
    matcher,
    image,
    caption: str,
    *,
    top: int = 3,
    head: str | None = None,
    text_block: str | None = None,
    picture=None,
    max_patches: int = 16,
    panel_size: float = 3.0,
    ax=None,
    path: str | os.PathLike | None = None,
    dpi: int = DPI,
):
    r"""The ``top`` vocabulary words of each patch under ELA's patch-to-lexicon head (paper Fig. 3).

    .. math::

        P^{p2l}_i = \mathrm{softmax}\big(W_{we}\,(W v_i + b)\big) \qquad \text{(Eq. 2)}

    Left: the image with its patch grid numbered. Right: for the ``max_patches``
    patches whose best word is most probable, their ``top`` words with probabilities;
    words absent from the caption's word pieces (the lexicon's expansion beyond the
    caption) in red, words of the caption in black. Special tokens ([CLS], [PAD], ...)
    are left out. The head reads the whole image's patch tokens (as at evaluation).

    Args:
        matcher: a fitted Matcher built by :func:`imtm.presets.ela` (``lexicon=True``).
        image: one image ``(3, H, W)``. caption: one caption.
        top: words per patch. head: the patch-to-lexicon block's name (``None``: the Matcher's only one).
        text_block: the text encoder's name (``None``: the block with a tokenizer).
        picture: drawn on the left; default: ``image``.
        max_patches: rows of the table.
        ax: draw into this matplotlib Axes (its place is split into the panels) or list of Axes.
        path: file to write, ``.png``, ``.pdf`` or ``.svg``. dpi: resolution of raster output.

    Returns:
        the Figure drawn in: two panels of ``panel_size`` inches when imtm makes it (probabilities
        are printed as numbers, so there is no colour bar).

    References:
        Yang et al., "Pre-training Cross-Modal Retrieval by Expansive Lexicon-Patch Alignment",
        LREC-COLING 2024, Eq. 2, Fig. 3.
    """
    from imtm.components import PatchToLexiconHead

    what = "patch_lexicon_words"
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"imtm.viz.{what}: top must be a positive int, got {top!r}")
    p2l = block_of(matcher, head, PatchToLexiconHead, what)
    from imtm.viz.figure import text_encoder_of

    text = text_encoder_of(matcher, text_block)
    tokenizer = getattr(text, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "convert_ids_to_tokens"):
        raise ValueError(
            f"imtm.viz.{what}: "
            + (f"block {text_block!r} has" if text_block else "the Matcher has")
            + " no tokenizer to name the lexicon's words (an HFTextEncoder)"
        )
    img, _ = encode_pair(matcher, image, caption, what=what)
    grid = patch_grid(img, what)
    p = img.num_prefix_tokens
    patches = img.feats[0, p:]
    logits = p2l.logits(patches).float()
    special = torch.tensor(
        sorted(set(tokenizer.all_special_ids)), dtype=torch.long, device=logits.device
    )
    logits[:, special] = -torch.inf
    probs = logits.softmax(-1).cpu()
    values, ids = probs.topk(min(top, probs.shape[-1]), dim=-1)
    in_caption = set(text.tokenize([caption]).feats[0].tolist())
    order = torch.argsort(values[:, 0], descending=True, stable=True)[:max_patches].tolist()

    if picture is None and isinstance(image, torch.Tensor) and image.dim() == 3:
        picture = image
    pic = None if picture is None else as_picture(picture)
    fig, axes = new_figure(2, panel_size=panel_size, title=caption, ax=ax)
    h, w = grid
    ax = axes[0]
    H, W = (h, w) if pic is None else pic.shape[:2]
    if pic is not None:
        ax.imshow(pic, interpolation="nearest")
    else:
        ax.imshow(np.ones((h, w, 3)), extent=(-0.5, W - 0.5, H - 0.5, -0.5))
    for i in range(h * w):
        r, c = divmod(i, w)
        ax.text(
            (c + 0.5) * W / w - 0.5,
            (r + 0.5) * H / h - 0.5,
            str(i),
            ha="center",
            va="center",
            fontsize=STYLE["tick"],
            color="yellow" if i in order else "white",
        )
    for r in range(1, h):
        ax.axhline(r * H / h - 0.5, color="white", linewidth=0.4)
    for c in range(1, w):
        ax.axvline(c * W / w - 0.5, color="white", linewidth=0.4)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("patches (yellow: listed)", fontsize=STYLE["title"])
    ax = axes[1]
    ax.axis("off")
    ax.set_title("top words (red: not in the caption)", fontsize=STYLE["title"])
    rows = len(order)
    for row, i in enumerate(order):
        y = 1.0 - (row + 0.5) / max(rows, 1)
        ax.text(0.0, y, f"{i}:", fontsize=STYLE["tick"], va="center", transform=ax.transAxes)
        for j in range(values.shape[1]):
            wid = int(ids[i, j])
            word = tokenizer.convert_ids_to_tokens([wid])[0]
            ax.text(
                0.12 + j * 0.88 / values.shape[1],
                y,
                f"{word} {float(values[i, j]):.2f}",
                fontsize=STYLE["tick"],
                va="center",
                color="black" if wid in in_caption else "red",
                transform=ax.transAxes,
            )
    return finish(fig, path, dpi)
