"""Scorers: (image Tokens, text Tokens) -> score matrices over every image-caption pair."""

from imtm.components.scorers.global_cosine import GlobalCosine

__all__ = ["GlobalCosine"]
