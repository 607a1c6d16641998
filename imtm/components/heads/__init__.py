"""Heads: auxiliary outputs that only losses (or a re-ranker) consume: ELA's lexicon and matching heads."""

from imtm.components.heads.cross_modal import CrossModalEncoder, ImageTextMatchingHead
from imtm.components.heads.lexicon import LexiconLogits, PatchToLexiconHead, WordToLexiconHead
from imtm.components.heads.masking import MaskedImageView, Reuse, WordMasking

__all__ = [
    "CrossModalEncoder",
    "ImageTextMatchingHead",
    "LexiconLogits",
    "MaskedImageView",
    "PatchToLexiconHead",
    "Reuse",
    "WordMasking",
    "WordToLexiconHead",
]
