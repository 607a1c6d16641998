"""Pictures of what a Matcher learned: the figures the five papers explain themselves with.

Every function takes a fitted :class:`~imtm.Matcher` (or several, by label) and raw
inputs, draws on matplotlib's Agg canvas (no display, no ``pyplot`` state), or into your
figure with ``ax=`` (one Axes, whose place is split into the picture's panels, or a list of
Axes), writes ``path=`` in the format its suffix names (``.png``, ``.pdf``, ``.svg``) and
returns the ``Figure`` it drew in. Where colour encodes a value, a colour bar gives the
labelled scale; one style (:data:`~imtm.viz.figure.STYLE`) sets fonts and colour maps.
Region pictures take boxes from :func:`synthetic_picture` or, for bottom-up-attention
features, from the extractor's TSV or a ``.npy`` (:func:`read_boxes`).
matplotlib is optional: ``pip install "imtm[viz]"``.

============================================  =======================================================
function                                      picture
============================================  =======================================================
:func:`word_alignment_maps`                   word-to-patch / word-to-region maps (LAPS Fig. 8, CHAN Fig. 5)
:func:`kept_patches`                          LAPS: patches kept for a caption at several ratios (Fig. 4-5)
:func:`patch_groups`                          LAPS: kept patches by aggregated token (Fig. 6)
:func:`phrase_topk_regions`                   DCPA: top-K regions of the intra and inter branches (Fig. 6)
:func:`patch_lexicon_words`                   ELA: top lexicon words per patch (Fig. 3)
:func:`dimension_correlation_maps`            DIAS: dimension correlation matrix, e.g. before/after (Eq. 4)
:func:`spatial_distance_histograms`           DIAS: histograms of spatial distances (Fig. 4)
:func:`recall_curves`                         recall@K against K for several matchers
:func:`retrieved_examples`                    a query's top-5 captions or images, matches marked
============================================  =======================================================

Example:
    >>> from imtm import viz  # doctest: +SKIP
    >>> picture, boxes = viz.synthetic_picture(test, 0)  # doctest: +SKIP
    >>> viz.word_alignment_maps(chan_matcher, test.images[0], test.captions[0], picture=picture, boxes=boxes,
    ...                         path="chan_words.png")  # doctest: +SKIP
"""

from imtm.viz.alignment import word_alignment, word_alignment_maps
from imtm.viz.boxes import read_boxes
from imtm.viz.dcpa import phrase_topk_regions
from imtm.viz.dias import (
    dimension_correlation_maps,
    matched_embeddings,
    spatial_distance_histograms,
)
from imtm.viz.ela import patch_lexicon_words
from imtm.viz.figure import FORMATS, STYLE, as_picture, synthetic_picture
from imtm.viz.laps import kept_patches, patch_groups, patch_significance
from imtm.viz.retrieval import recall_at_k, recall_curves, retrieved_examples

__all__ = [
    "FORMATS",
    "STYLE",
    "as_picture",
    "dimension_correlation_maps",
    "kept_patches",
    "matched_embeddings",
    "patch_groups",
    "patch_lexicon_words",
    "patch_significance",
    "phrase_topk_regions",
    "read_boxes",
    "recall_at_k",
    "recall_curves",
    "retrieved_examples",
    "spatial_distance_histograms",
    "synthetic_picture",
    "word_alignment",
    "word_alignment_maps",
]
