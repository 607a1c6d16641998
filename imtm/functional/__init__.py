from imtm.functional.losses import info_nce_loss, triplet_loss
from imtm.functional.similarity import cosine_similarity_matrix, global_cosine_scores, masked_mean
