"""CHAN's margin across the two score scales (docs/chan.md, "The margin").

The authors' LSEPooling (ppanzx/CHAN, lib/coding.py, ``LSEPooling.forward``) returns
``logsumexp(s / T)``; imtm's :func:`lse_pool` returns the paper's ``T logsumexp(s / T)``. The
hinge of the authors' ContrastiveLoss (lib/loss.py, ``ContrastiveLoss.forward``) with margin ``a`` on
their scores is ``1 / T`` times imtm's hinge with margin ``a T``.
"""

import math

import pytest
import torch

from imtm import presets
from imtm.data import synthetic
from imtm.functional import lse_pool, triplet_loss


def authors_lse(word_scores, temperature):
    """logsumexp(s / T) of each row, written out (no 1 / lambda factor)."""
    return torch.tensor(
        [
            [math.log(sum(math.exp(float(x) / temperature) for x in row)) for row in pair]
            for pair in word_scores
        ],
        dtype=torch.float64,
    )


@pytest.mark.parametrize("hardest", [True, False])
def test_authors_margin_equals_a_tenth_on_imtm_scale(hardest):
    g = torch.Generator().manual_seed(0)
    word_scores = (
        torch.rand(4, 4, 7, generator=g, dtype=torch.float64) * 2 - 1
    )  # per-word cosines of each pair
    T = 0.1
    ours = lse_pool(word_scores, temperature=T)
    theirs = authors_lse(word_scores, T)
    torch.testing.assert_close(theirs, ours / T)
    pos = torch.eye(4, dtype=torch.bool)
    torch.testing.assert_close(
        triplet_loss(theirs, pos, margin=0.05, hardest=hardest),
        triplet_loss(ours, pos, margin=0.05 * T, hardest=hardest) / T,
    )
    # The same margin on both scales is a different loss: 0.05 on imtm's scale is 0.5 on the authors'.
    assert not torch.allclose(
        triplet_loss(theirs, pos, margin=0.05, hardest=hardest),
        triplet_loss(ours, pos, margin=0.05, hardest=hardest) / T,
    )


def test_chan_preset_margin_is_the_chosen_default():
    train = synthetic.load(view="regions", seed=0, n_train=8, n_dev=2, n_test=2)[0]
    blocks = dict(presets.build("chan", train, embed_dim=8, word_dim=8))
    assert blocks["loss"].margin == presets.CHAN_MARGIN
    assert blocks["coding"].temperature == 0.1


def test_chan_preset_warms_up_for_two_epochs_and_its_recipes_for_the_authors_one():
    from imtm import presets
    from imtm.data import synthetic

    train = synthetic.load(view="regions", seed=0, n_train=4, n_dev=1, n_test=1)[0]
    loss = dict(presets.build("chan", train, embed_dim=8, word_dim=8))["loss"]
    assert loss.warmup_epochs == presets.CHAN_WARMUP_EPOCHS == 2
    from imtm.recipes import recipe, recipe_names

    chan_recipes = [n for n in recipe_names() if recipe(n).preset == "chan"]
    assert chan_recipes
    for name in chan_recipes:
        assert recipe(name).preset_kwargs["warmup_epochs"] == 1, name
