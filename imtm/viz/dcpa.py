"""DCPA picture: the top-K regions chosen by the intra-modal and the inter-modal branches (Fig. 6)."""

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
    block_of,
    caption_words,
    draw_boxes,
    encode_pair,
    finish,
    new_figure,
    region_canvas,
)

__all__ = ["phrase_topk_regions"]


@torch.no_grad()
def phrase_topk_regions(
    matcher,
    image,
    caption: str,
    *,
    boxes,
    picture=None,
    intra: str = "intra",
    inter_i2t: str = "inter_i2t",
    inter_t2i: str | None = "inter_t2i",
    text_block: str | None = None,
    panel_size: float = 2.6,
    ax=None,
    path: str | os.PathLike | None = None,
    dpi: int = DPI,
):
    r"""The K regions each DCPA branch relies on for one image-caption pair (paper Fig. 6).

    - intra-modal (Eq. 10): the visual phrases with the K largest cosines
      :math:`\cos(r^V_k, c^T)` with the sentence vector, what
      :class:`~imtm.components.TopKAggregation` averages;
    - inter-modal image-to-text (Eq. 11-14): the K regions whose decoder outputs best match a
      word, :math:`s_k = \max_m \cos(vp^T_k, w_m)`
      (:func:`~imtm.functional.phrase_attention_token_scores`);
    - with ``inter_t2i``: a third panel, the text-to-image branch's score of every word, its
      top K in red.

    Args:
        matcher: a fitted Matcher built by :func:`imtm.presets.dcpa`.
        image: one image's region features ``(N, D)``. caption: one caption.
        boxes: ``(N, 4)`` pixel boxes of the regions in region order (:func:`~imtm.viz.synthetic_picture`,
            or :func:`~imtm.viz.read_boxes` for bottom-up-attention TSV / ``.npy`` boxes).
        picture: drawn under the boxes (optional).
        intra, inter_i2t, inter_t2i: the blocks' names (``inter_t2i=None``: no third panel).
        ax: draw into this matplotlib Axes (its place is split into the panels) or list of Axes.
        path: file to write, ``.png``, ``.pdf`` or ``.svg``. dpi: resolution of raster output.

    Returns:
        the Figure drawn in: two or three panels of ``panel_size`` inches when imtm makes it; each
        region panel has a colour bar of its scores.

    References:
        Shi et al., "Decoupled Cross-modal Phrase-Attention Network for Image-Sentence Matching",
        IEEE TIP 2022, Eq. 10-14, Fig. 6.
    """
    from imtm.components import InterModalPhraseAttention, TopKAggregation
    from imtm.functional.phrase_attention import AttentionWeights, phrase_attention_token_scores

    what = "phrase_topk_regions"
    intra_block = block_of(matcher, intra, TopKAggregation, what)
    i2t_block = block_of(matcher, inter_i2t, InterModalPhraseAttention, what)
    t2i_block = (
        None if inter_t2i is None else block_of(matcher, inter_t2i, InterModalPhraseAttention, what)
    )
    phrases, sentence = encode_pair(
        matcher,
        image,
        caption,
        image_value=intra_block.requires[0],
        text_value=intra_block.requires[1],
        what=what,
    )
    regions, words = encode_pair(
        matcher,
        image,
        caption,
        image_value=i2t_block.requires[0],
        text_value=i2t_block.requires[1],
        what=what,
    )
    boxes = np.asarray(boxes, dtype=np.float64)
    n = int(regions.mask[0].sum())
    if boxes.shape != (n, 4):
        raise ValueError(
            f"imtm.viz.{what}: expected boxes of shape ({n}, 4), one per real region, got {boxes.shape}"
        )
    pf = phrases.feats[0][phrases.mask[0]].float()
    intra_scores = (
        (F.normalize(pf, dim=-1) @ F.normalize(sentence.reshape(-1).float(), dim=0)).cpu().numpy()
    )

    def branch_scores(block, queries, keys):
        return (
            phrase_attention_token_scores(
                queries.feats.float(),
                keys.feats.float(),
                queries.mask,
                keys.mask,
                self_attn=AttentionWeights.from_modules(block.self_attn, block.norm1),
                cross_attn=AttentionWeights.from_modules(block.cross_attn, block.norm2),
                heads=block.heads,
                feed_forward=block.feed_forward_weights(),
            )[0][queries.mask[0]]
            .cpu()
            .numpy()
        )

    inter_scores = branch_scores(i2t_block, regions, words)
    pic = None if picture is None else as_picture(picture)
    panels = [
        ("intra (Eq. 10)", intra_scores, intra_block.k, "cosine with the sentence c^T"),
        ("inter i2t (Eq. 11-14)", inter_scores, i2t_block.k, "region score s_k"),
    ]
    fig, axes = new_figure(
        len(panels) + (t2i_block is not None), panel_size=panel_size, title=caption, ax=ax
    )
    for panel, (title, scores, k, label) in zip(axes, panels):
        k = len(scores) if k is None else min(int(k), len(scores))
        top = np.argsort(-scores, kind="stable")[:k]
        region_canvas(panel, pic, boxes)
        lo, hi = float(scores.min()), float(scores.max()) + 1e-6
        draw_boxes(panel, boxes, scores, highlight=top, vmin=lo, vmax=hi)
        add_colorbar(fig, (STYLE["sequential"], lo, hi), panel, label)
        panel.set_title(f"{title}: top {k} of {len(scores)}", fontsize=STYLE["title"])
    if t2i_block is not None:
        ax = axes[-1]
        t2i = branch_scores(t2i_block, words, regions)
        labels = caption_words(matcher, caption, words, text_block=text_block)
        k = len(t2i) if t2i_block.k is None else min(int(t2i_block.k), len(t2i))
        top = set(np.argsort(-t2i, kind="stable")[:k].tolist())
        ax.barh(
            range(len(t2i)), t2i, color=["red" if j in top else "grey" for j in range(len(t2i))]
        )
        ax.set_yticks(range(len(t2i)))
        ax.set_yticklabels(labels, fontsize=STYLE["tick"])
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=STYLE["tick"])
        ax.set_xlabel("word score", fontsize=STYLE["label"])
        ax.set_title(f"inter t2i: words, top {k} red", fontsize=STYLE["title"])
    return finish(fig, path, dpi)
