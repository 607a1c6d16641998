"""Matcher.similarity returns one type: a tensor, (n_images, n_captions) or stacked (2, ...) per direction."""

import torch

from imtm.components import GlobalCosine, GRUTextEncoder, PrecomputedEncoder
from imtm.data import synthetic
from imtm.matcher import Matcher
from imtm.metrics import retrieval_metrics


def _fitted(scorers, data):
    train = data[0]
    blocks = [
        PrecomputedEncoder(in_dim=train.region_dim, out_dim=8),
        GRUTextEncoder(vocab=train.vocab, out_dim=8),
        *scorers,
    ]
    return Matcher(components=blocks, epochs=0, random_state=0, verbose=False).fit(train)


def test_one_score_is_a_matrix_and_direction_specific_scores_are_a_stack():
    data = synthetic.load(view="regions", seed=0, n_train=6, n_dev=2, n_test=3)
    test = data[2]
    single = _fitted([GlobalCosine()], data).similarity(test.images, test.captions)
    both = _fitted(
        [GlobalCosine(provides=("scores_i2t",)), GlobalCosine(provides=("scores_t2i",))], data
    )
    stacked = both.similarity(test.images, test.captions)
    assert isinstance(single, torch.Tensor) and single.shape == (
        len(test.images),
        len(test.captions),
    )
    assert isinstance(stacked, torch.Tensor) and stacked.shape == (2, *single.shape)
    # Same seed, same blocks: each direction's matrix is the single pipeline's.
    s_i2t, s_t2i = stacked  # unpacks as the pair it replaces
    torch.testing.assert_close(s_i2t, single)
    torch.testing.assert_close(s_t2i, single)
    # The metrics read the stack as the pair (i2t ranks captions, t2i ranks images).
    assert retrieval_metrics(stacked, test.caption_to_image) == retrieval_metrics(
        (s_i2t, s_t2i), test.caption_to_image
    )
    flipped = torch.stack([s_i2t, -s_t2i])  # slot 0 ranks captions, slot 1 ranks images
    c2i = test.caption_to_image
    assert retrieval_metrics(flipped, c2i)["i2t_r1"] == retrieval_metrics(single, c2i)["i2t_r1"]
    assert retrieval_metrics(flipped, c2i)["t2i_r1"] == retrieval_metrics(-single, c2i)["t2i_r1"]
