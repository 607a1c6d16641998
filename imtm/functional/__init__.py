from imtm.functional.blocking import (
    blocked_pair_scores,
    blocked_query_scores,
    normalize_tokens,
    pack_tokens,
)
from imtm.functional.dias import (
    dimension_alignment_loss,
    dimension_correlation,
    sparse_correlation_mask,
    spatial_constraint_loss,
    spatial_differences,
    word_region_pairs,
)
from imtm.functional.hard_assignment import hard_assignment_from_cosines, hard_assignment_scores
from imtm.functional.lexicon import (
    expansive_soft_labels,
    lexicon_kl_loss,
    mask_words,
    sample_hard_negatives,
)
from imtm.functional.local_matching import local_matching_scores, local_weights
from imtm.functional.losses import info_nce_loss, row_multiplicity, triplet_loss
from imtm.functional.masking import num_masked_patches, random_patch_mask
from imtm.functional.mining import distance_weighted_negatives
from imtm.functional.patch_slimming import (
    aggregation_weights,
    dpc_knn_weights,
    fusion_weights,
    gumbel_keep_decisions,
    patch_slimming_scores,
    ratio_loss,
    slimmed_cosines,
    top_keep_decisions,
)
from imtm.functional.phrase_attention import (
    AttentionWeights,
    FeedForwardWeights,
    phrase_attention_scores,
    phrase_attention_token_scores,
)
from imtm.functional.pooling import (
    POOLINGS,
    lse_pool,
    masked_pool,
    max_pool,
    mean_pool,
    resolve_pooling,
    softmax_pool,
    sum_pool,
)
from imtm.functional.scan_attention import scan_t2i_scores
from imtm.functional.similarity import cosine_similarity_matrix, global_cosine_scores, masked_mean
from imtm.functional.soft_assignment import soft_assignment_scores
from imtm.functional.sparse_alignment import sparse_alignment_from_cosines, sparse_alignment_scores
from imtm.functional.topk import topk_mean, topk_mean_scores
from imtm.functional.transport import cosine_cost, transport_cost, transport_plan
