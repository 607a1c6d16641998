"""DIAS pictures: the dimension correlation matrix (Eq. 4) and histograms of spatial distances (Fig. 4)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from imtm.viz.figure import DPI, STYLE, add_colorbar, finish, new_figure

__all__ = ["dimension_correlation_maps", "matched_embeddings", "spatial_distance_histograms"]


@torch.no_grad()
def matched_embeddings(
    matcher,
    images: Sequence,
    captions: Sequence[str],
    *,
    image_value: str = "image_tokens",
    text_value: str = "text_tokens",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global embeddings of matched pairs: row ``b`` of each output is image ``b`` and caption ``b``.

    Each side's tokens (``image_value``, ``text_value``, as the Matcher's pairwise blocks read them)
    are mean-pooled over their real tokens, prefix tokens left out: what
    :class:`~imtm.components.MeanEmbedding` gives DIAS's losses in training.

    Shape:
        - output: ``(B, D)`` and ``(B, D)`` on the CPU, float32
    """
    from imtm.tokens import Tokens

    if len(images) != len(captions):
        raise ValueError(
            f"imtm.viz.matched_embeddings: images and captions pair up one to one; got {len(images)} "
            f"images and {len(captions)} captions"
        )
    out = []
    for values, name, side in (
        (matcher.encode_images(images), image_value, "image"),
        (matcher.encode_texts(list(captions)), text_value, "caption"),
    ):
        if name not in values:
            raise ValueError(
                f"imtm.viz.matched_embeddings: the Matcher's {side} side gives no Tokens named "
                f"{name!r}; it gives {sorted(values)}"
            )
        v = values[name]
        if not isinstance(v, Tokens):
            raise TypeError(
                f"imtm.viz.matched_embeddings: {name!r} is a {type(v).__name__}, not Tokens"
            )
        out.append(v.masked_mean(skip_prefix=True).float().cpu())
    return out[0], out[1]


def dimension_correlation_maps(
    matchers: Mapping[str, object],
    images: Sequence,
    captions: Sequence[str],
    *,
    max_dims: int = 64,
    panel_size: float = 3.0,
    ax=None,
    path: str | os.PathLike | None = None,
    dpi: int = DPI,
    **values,
):
    r"""DIAS's dimension correlation matrix :math:`C` of each matcher, side by side (e.g. before and after training).

    .. math::

        C_{kl} = \frac{1}{B} \sum_b \hat v_{bk}\, \hat t_{bl} \qquad (4)

    (:func:`~imtm.functional.dimension_correlation`) over the matched pairs
    ``(images[b], captions[b])``. The dimension alignment loss pulls the diagonal towards 1
    and the rest towards 0; each panel's title gives the mean diagonal and the mean absolute
    off-diagonal entry. The first ``max_dims`` dimensions are drawn.

    Args:
        matchers: ``{label: fitted Matcher}``, e.g. ``{"before": m0, "after": m1}``
            (``Matcher(..., epochs=0).fit(train)`` is an untrained one).
        images, captions: matched pairs, one caption per image.
        max_dims: dimensions drawn.
        ax: draw into this matplotlib Axes (its place is split into the panels) or list of Axes.
        path: file to write, ``.png``, ``.pdf`` or ``.svg``. dpi: resolution of raster output.
        values: ``image_value=``, ``text_value=`` for :func:`matched_embeddings`.

    Returns:
        the Figure drawn in: one panel of ``panel_size`` inches per matcher when imtm makes it, and one
        colour bar of the correlation (-1 to 1) shared by the panels.

    References:
        Ma et al., "Bridging the Modality Gap: Dimension Information Alignment and Sparse Spatial
        Constraint for Image-Text Matching", ACM MM 2024, Eq. 4.
    """
    from imtm.functional import dimension_correlation

    if not matchers:
        raise ValueError(
            "imtm.viz.dimension_correlation_maps: give at least one matcher, as {label: matcher}"
        )
    if len(images) < 2:
        raise ValueError(
            "imtm.viz.dimension_correlation_maps: correlations need at least 2 matched pairs"
        )
    fig, axes = new_figure(len(matchers), panel_size=panel_size, ax=ax)
    im = None
    for panel, (label, m) in zip(axes, matchers.items()):
        v, t = matched_embeddings(m, images, captions, **values)
        c = dimension_correlation(v, t).numpy()
        diag = float(np.mean(np.diag(c)))
        off = float(np.abs(c - np.diag(np.diag(c))).sum() / max(c.size - len(c), 1))
        d = min(max_dims, len(c))
        im = panel.imshow(
            c[:d, :d], cmap=STYLE["diverging"], vmin=-1.0, vmax=1.0, interpolation="nearest"
        )
        panel.set_title(f"{label}: diag {diag:.2f}, |off| {off:.2f}", fontsize=STYLE["title"])
        panel.set_xlabel("text dimension l", fontsize=STYLE["label"])
        if panel is axes[0]:
            panel.set_ylabel("image dimension k", fontsize=STYLE["label"])
        panel.tick_params(labelsize=STYLE["tick"])
    add_colorbar(fig, im, axes, "correlation C_kl (Eq. 4)")
    return finish(fig, path, dpi)


def spatial_distance_histograms(
    matchers: Mapping[str, object],
    images: Sequence,
    captions: Sequence[str],
    *,
    bins: int = 30,
    panel_size: float = 2.6,
    ax=None,
    path: str | os.PathLike | None = None,
    dpi: int = DPI,
    **values,
):
    r"""Histograms of the cosine distances DIAS's spatial constraints act on (paper Fig. 4), per matcher.

    Three panels over the matched pairs ``(images[b], captions[b])``, with
    :math:`\sigma` the cosine distance of the mean-pooled embeddings:

    - cross-modal distances :math:`\sigma(V_i, T_j)`, matched pairs (``i = j``) and unmatched ones;
    - the inter-modality asymmetry :math:`|x_{ij} - x_{ji}|`, :math:`x_{ij} = \sigma(V_i, T_j)` (Eq. 7);
    - the intra-modality gap :math:`|\sigma(V_i, V_j) - \sigma(T_i, T_j)|` (Eq. 9),

    both from :func:`~imtm.functional.spatial_differences`, over ``i != j``. The constraints
    shrink the last two.

    Args:
        matchers: ``{label: fitted Matcher}``. images, captions: matched pairs.
        bins: histogram bins.
        ax: draw into this matplotlib Axes (its place is split into the panels) or list of Axes.
        path: file to write, ``.png``, ``.pdf`` or ``.svg``. dpi: resolution of raster output.
        values: ``image_value=``, ``text_value=`` for :func:`matched_embeddings`.

    Returns:
        the Figure drawn in: three panels of ``panel_size`` inches when imtm makes it.

    References:
        Ma et al., ACM MM 2024, Eq. 7, 9, Fig. 4.
    """
    from imtm.functional import spatial_differences

    if not matchers:
        raise ValueError(
            "imtm.viz.spatial_distance_histograms: give at least one matcher, as {label: matcher}"
        )
    if len(images) < 2:
        raise ValueError(
            "imtm.viz.spatial_distance_histograms: distances need at least 2 matched pairs"
        )
    fig, axes = new_figure(3, panel_size=panel_size, ax=ax)
    off = ~torch.eye(len(images), dtype=torch.bool)
    colours = ["C0", "C1", "C2", "C3", "C4", "C5"]
    for n, (label, m) in enumerate(matchers.items()):
        v, t = matched_embeddings(m, images, captions, **values)
        cross = (
            1
            - torch.nn.functional.normalize(v, dim=-1)
            @ torch.nn.functional.normalize(t, dim=-1).t()
        )
        inter = spatial_differences(v, t, kind="inter", distance="cosine")[off].abs().numpy()
        intra = spatial_differences(v, t, kind="intra", distance="cosine")[off].abs().numpy()
        col = colours[n % len(colours)]
        edges = np.histogram_bin_edges(
            cross.numpy(), bins=bins
        )  # one binning for matched and unmatched
        axes[0].hist(
            cross.diagonal().numpy(),
            bins=edges,
            histtype="step",
            color=col,
            linestyle="-",
            density=True,
            label=f"{label} matched",
        )
        axes[0].hist(
            cross[off].numpy(),
            bins=edges,
            histtype="step",
            color=col,
            linestyle=":",
            density=True,
            label=f"{label} unmatched",
        )
        axes[1].hist(inter, bins=bins, histtype="step", color=col, density=True, label=label)
        axes[2].hist(intra, bins=bins, histtype="step", color=col, density=True, label=label)
    for panel, title in zip(
        axes, ("cross-modal distance", "inter |x_ij - x_ji| (Eq. 7)", "intra gap (Eq. 9)")
    ):
        panel.set_title(title, fontsize=STYLE["title"])
        panel.set_xlabel("cosine distance", fontsize=STYLE["label"])
        panel.tick_params(labelsize=STYLE["tick"])
        panel.legend(fontsize=STYLE["legend"] - 1)
    axes[0].set_ylabel("density", fontsize=STYLE["label"])
    return finish(fig, path, dpi)
