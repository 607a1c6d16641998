"""Scorers: (image Tokens, text Tokens) -> score matrices over every image-caption pair."""

from imtm.components.scorers.global_cosine import GlobalCosine

__all__ = ["GlobalCosine"]

from imtm.components.scorers.hard_assignment import HardAssignmentCoding
from imtm.components.scorers.soft_assignment import SoftAssignmentCoding

__all__ += ["HardAssignmentCoding", "SoftAssignmentCoding"]
