"""Refiners: Tokens -> Tokens within one modality (projections, phrase encoders, context layers)."""

from imtm.components.refiners.self_attention import SelfAttentionContext
