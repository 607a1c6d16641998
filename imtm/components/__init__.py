from imtm.components.encoders import (
    GRUTextEncoder,
    HFTextEncoder,
    PrecomputedEncoder,
    TimmVisionEncoder,
)
from imtm.components.heads import (
    CrossModalEncoder,
    ImageTextMatchingHead,
    MaskedImageView,
    PatchToLexiconHead,
    Reuse,
    WordMasking,
    WordToLexiconHead,
)
from imtm.components.losses import (
    DimensionAlignmentLoss,
    InfoNCELoss,
    RatioLoss,
    SpatialConstraintLoss,
    TripletLoss,
)
from imtm.components.losses.lexicon import ExpansiveLexiconLoss, LexiconDistillationLoss
from imtm.components.losses.matching import ImageTextMatchingLoss, MaskedLanguageModelingLoss
from imtm.components.mean_embedding import MeanEmbedding
from imtm.components.mining import DistanceWeightedMiner
from imtm.components.pooling import LSEPooling, MaxPooling, MeanPooling, SoftmaxPooling, SumPooling
from imtm.components.refiners.self_attention import SelfAttentionContext
from imtm.components.refiners.textual_phrase import TextualPhraseEncoder
from imtm.components.refiners.visual_phrase import VisualPhraseEncoder
from imtm.components.refiners.word_slimming import WordAggregation, WordSelection
from imtm.components.scorers import (
    DPCKNNAggregation,
    GlobalCosine,
    GumbelSelector,
    HardAssignmentCoding,
    InterModalPhraseAttention,
    LocalMatching,
    PatchScorer,
    PatchSlimming,
    RedundantFusion,
    ScanAttention,
    ScoreFusion,
    SoftAssignmentCoding,
    SparsePatchWordAlignment,
    TokenAggregation,
    TopKAggregation,
)
from imtm.components.scorers.matching_rerank import MatchingReranker
from imtm.components.sparse_correlation import SparseCorrelation
