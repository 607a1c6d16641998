from imtm.components.encoders import GRUTextEncoder, PrecomputedEncoder
from imtm.components.encoders import HFTextEncoder, TimmVisionEncoder
from imtm.components.losses import InfoNCELoss, TripletLoss
from imtm.components.scorers import GlobalCosine
from imtm.components.scorers import HardAssignmentCoding, LocalMatching, SoftAssignmentCoding
from imtm.components.scorers import ScanAttention
from imtm.components.scorers import DPCKNNAggregation, GumbelSelector, PatchScorer, PatchSlimming, RedundantFusion, SparsePatchWordAlignment, TokenAggregation
from imtm.components.losses import RatioLoss
from imtm.components.refiners.self_attention import SelfAttentionContext
from imtm.components.refiners.textual_phrase import TextualPhraseEncoder
from imtm.components.refiners.visual_phrase import VisualPhraseEncoder
from imtm.components.refiners.word_slimming import WordAggregation, WordSelection
from imtm.components.scorers import InterModalPhraseAttention, ScoreFusion, TopKAggregation
from imtm.components.pooling import LSEPooling, MaxPooling, MeanPooling, SoftmaxPooling, SumPooling
from imtm.components.losses import DimensionAlignmentLoss, SpatialConstraintLoss
from imtm.components.mean_embedding import MeanEmbedding
from imtm.components.mining import DistanceWeightedMiner
from imtm.components.sparse_correlation import SparseCorrelation
from imtm.components.heads import (
    CrossModalEncoder,
    ImageTextMatchingHead,
    MaskedImageView,
    PatchToLexiconHead,
    Reuse,
    WordMasking,
    WordToLexiconHead,
)
from imtm.components.losses.lexicon import ExpansiveLexiconLoss, LexiconDistillationLoss
from imtm.components.losses.matching import ImageTextMatchingLoss, MaskedLanguageModelingLoss
from imtm.components.scorers.matching_rerank import MatchingReranker
