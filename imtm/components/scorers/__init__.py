"""Scorers: (image Tokens, text Tokens) -> score matrices over every image-caption pair."""

from imtm.components.scorers.global_cosine import GlobalCosine

__all__ = ["GlobalCosine"]

from imtm.components.scorers.hard_assignment import HardAssignmentCoding
from imtm.components.scorers.local_matching import LocalMatching
from imtm.components.scorers.soft_assignment import SoftAssignmentCoding

__all__ += ["HardAssignmentCoding", "LocalMatching", "SoftAssignmentCoding"]

from imtm.components.scorers.phrase_attention import InterModalPhraseAttention
from imtm.components.scorers.score_fusion import ScoreFusion
from imtm.components.scorers.topk_aggregation import TopKAggregation

__all__ += ["InterModalPhraseAttention", "ScoreFusion", "TopKAggregation"]

from imtm.components.scorers.patch_slimming import (
    DPCKNNAggregation,
    GumbelSelector,
    PatchScorer,
    PatchSlimming,
    RedundantFusion,
    TokenAggregation,
)
from imtm.components.scorers.scan_attention import ScanAttention
from imtm.components.scorers.sparse_alignment import SparsePatchWordAlignment

__all__ += ["ScanAttention"]
__all__ += [
    "DPCKNNAggregation",
    "GumbelSelector",
    "PatchScorer",
    "PatchSlimming",
    "RedundantFusion",
    "SparsePatchWordAlignment",
    "TokenAggregation",
]
