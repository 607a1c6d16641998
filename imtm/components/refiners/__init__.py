"""Refiners: Tokens -> Tokens within one modality (projections, phrase encoders, context layers)."""

from imtm.components.refiners.self_attention import SelfAttentionContext
from imtm.components.refiners.textual_phrase import TextualPhraseEncoder
from imtm.components.refiners.visual_phrase import VisualPhraseEncoder
from imtm.components.refiners.word_slimming import WordAggregation, WordSelection
