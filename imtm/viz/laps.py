"""LAPS pictures: the patches kept for a caption at several ratios (Fig. 4-5) and the aggregated groups (Fig. 6)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from einops import rearrange

from imtm.viz.figure import (
    DPI,
    STYLE,
    add_colorbar,
    as_picture,
    block_of,
    encode_pair,
    finish,
    new_figure,
    patch_grid,
    show_grid_values,
)

__all__ = ["kept_patches", "patch_groups", "patch_significance"]


@torch.no_grad()
def patch_significance(slimming, image_tokens, text_tokens) -> torch.Tensor:
    r"""LAPS Eq. 1's significance :math:`a_i` of every patch of one image for one caption.

    .. math::

        a_i = (1 - \beta)\, a^p_i + \frac{\beta}{2} (a^s_i + a^r_i) \qquad \text{(Eq. 1)}

    Read from the :class:`~imtm.components.PatchSlimming` block's own
    :class:`~imtm.components.PatchScorer`, so the picture shows what the model ranks.

    Shape:
        - image_tokens: Tokens ``(1, N, D)``, text_tokens: Tokens ``(1, M, D)``
        - output: ``(N - num_prefix_tokens,)`` in ``[0, 1]``
    """
    p = image_tokens.num_prefix_tokens
    return slimming.scorer(image_tokens, text_tokens)[0, 0, p:].float().cpu()


def _prepare(matcher, image, caption, block, picture, what):
    from imtm.components import PatchSlimming

    slim = block_of(matcher, block, PatchSlimming, what)
    img, txt = encode_pair(matcher, image, caption, what=what)
    grid = patch_grid(img, what)
    if picture is None and isinstance(image, torch.Tensor) and image.dim() == 3:
        picture = image
    pic = None if picture is None else as_picture(picture)
    return slim, img, txt, grid, pic


def kept_patches(
    matcher,
    image,
    caption: str,
    *,
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    block: str | None = None,
    picture=None,
    panel_size: float = 2.2,
    ax=None,
    path: str | os.PathLike | None = None,
    dpi: int = DPI,
):
    r"""The patches LAPS keeps for ``caption`` at several ratios :math:`\rho` (paper Fig. 4-5).

    The first panel is the significance :math:`a` (Eq. 1) over the patch grid; then, for each
    ratio, the :math:`N_s = \lceil \rho N \rceil` most significant patches (the inference
    decisions of Eq. 4-5, :func:`~imtm.functional.top_keep_decisions`) with the dropped ones dimmed.

    Args:
        matcher: a fitted Matcher with a :class:`~imtm.components.PatchSlimming` block (e.g. ``presets.laps``).
        image: one image ``(3, H, W)``, as the Matcher takes it. caption: one caption.
        ratios: the :math:`\rho` values to draw, each in ``(0, 1]``.
        block: the slimming block's name; ``None``: the Matcher's only PatchSlimming.
        picture: what to draw under the patches; default: ``image``.
        ax: draw into this matplotlib Axes (its place is split into the panels) or list of Axes.
        path: file to write, ``.png``, ``.pdf`` or ``.svg``. dpi: resolution of raster output.

    Returns:
        the Figure drawn in (``(len(ratios) + 1) * panel_size`` inches wide when imtm makes it);
        the significance has a colour bar.

    References:
        Fu et al., "Linguistic-Aware Patch Slimming Framework for Fine-grained Cross-Modal Alignment", CVPR 2024.
    """
    from imtm.functional import top_keep_decisions

    what = "kept_patches"
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise ValueError(f"imtm.viz.{what}: every ratio must be a number in (0, 1], got {r!r}")
    slim, img, txt, grid, pic = _prepare(matcher, image, caption, block, picture, what)
    a = patch_significance(slim, img, txt)
    fig, axes = new_figure(len(ratios) + 1, panel_size=panel_size, title=caption, ax=ax)
    im = show_grid_values(axes[0], pic, a.numpy(), grid, vmin=0.0, vmax=1.0)
    axes[0].set_title("significance a", fontsize=STYLE["title"])
    add_colorbar(fig, im, axes[0], "significance a (Eq. 1)")
    for panel, r in zip(axes[1:], ratios):
        keep = top_keep_decisions(a, float(r)).numpy()
        # Dropped patches under a dark veil: a grey map, transparent where kept (a category, no scale).
        veil = np.where(keep > 0, np.nan, 0.0)
        show_grid_values(panel, pic, veil, grid, cmap="gray", alpha=0.8, vmin=0.0, vmax=1.0)
        panel.set_title(f"rho={r:g}: {int(keep.sum())}/{keep.size} kept", fontsize=STYLE["title"])
    return finish(fig, path, dpi)


def patch_groups(
    matcher,
    image,
    caption: str,
    *,
    ratio: float | None = None,
    block: str | None = None,
    picture=None,
    panel_size: float = 2.6,
    ax=None,
    path: str | os.PathLike | None = None,
    dpi: int = DPI,
):
    r"""Which aggregated token each kept patch mostly feeds (LAPS Fig. 6).

    Kept patches are coloured by :math:`\arg\max_j W_{ij}`, the aggregated token
    :math:`\hat v_j` that takes the largest share of patch ``i`` (Eq. 6,
    :func:`~imtm.functional.aggregation_weights`); dropped patches, which the redundant
    fusion (Eq. 7) merges into one token, are grey.

    Args:
        ratio: :math:`\rho`; ``None``: the block's selector ratio.
        Others: as :func:`kept_patches`.

    Returns:
        the Figure drawn in: two panels (the picture, the groups), ``2 * panel_size`` inches wide when
        imtm makes it. Colours name groups (categories), so there is no colour bar.
    """
    from matplotlib import colormaps

    from imtm.functional import aggregation_weights, top_keep_decisions

    what = "patch_groups"
    slim, img, txt, grid, pic = _prepare(matcher, image, caption, block, picture, what)
    rho = slim.selector.ratio if ratio is None else ratio
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho <= 1:
        raise ValueError(f"imtm.viz.{what}: ratio must be a number in (0, 1], got {rho!r}")
    a = patch_significance(slim, img, txt)
    keep = top_keep_decisions(a, float(rho))
    p = img.num_prefix_tokens
    with torch.no_grad():
        logits = slim.aggregation.logits(img.feats[:, p:]).float().cpu()  # (1, Np, Nc)
    weights = aggregation_weights(logits, keep[None, None])[0, 0]  # (Np, Nc)
    group = torch.where(
        keep > 0, weights.argmax(-1), torch.full_like(keep, -1, dtype=torch.long)
    ).numpy()
    n_groups = int(weights.shape[-1])
    cm = colormaps["tab20" if n_groups > 10 else "tab10"]
    h, w = grid
    colours = rearrange(
        np.array([(0.5, 0.5, 0.5, 1.0) if g < 0 else cm(int(g) % cm.N) for g in group]),
        "(h w) rgba -> h w rgba",
        h=h,
        w=w,
    )
    fig, axes = new_figure(2, panel_size=panel_size, title=caption, ax=ax)
    extent = None
    if pic is not None:
        axes[0].imshow(pic, interpolation="nearest")
        axes[1].imshow(pic, interpolation="nearest")
        extent = (-0.5, pic.shape[1] - 0.5, pic.shape[0] - 0.5, -0.5)
    axes[1].imshow(
        colours, alpha=0.6 if pic is not None else 1.0, extent=extent, interpolation="nearest"
    )
    axes[0].set_title("image", fontsize=STYLE["title"])
    axes[1].set_title(
        f"{int(keep.sum())} kept -> {n_groups} tokens; grey: fused", fontsize=STYLE["title"]
    )
    for panel in axes:
        panel.set_xticks([])
        panel.set_yticks([])
    return finish(fig, path, dpi)
