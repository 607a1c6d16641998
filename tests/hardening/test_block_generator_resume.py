"""A block with a generator of its own (the DIAS miner with ``random_state``) resumes its stream."""

import pytest
import torch
from toy import Crashing, ToyCosine, ToyImage, ToyText, toy_data

from imtm import Matcher
from imtm.components import DistanceWeightedMiner, TripletLoss
from imtm.data import ImageCaptionDataset
from imtm.engine.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def data():
    return toy_data()


def mined(data, **kw):
    blocks = [
        ToyImage(),
        ToyText(vocab=data.vocab),
        ToyCosine(),
        TripletLoss(margin=0.2, miner=DistanceWeightedMiner(dim=4, random_state=3)),
    ]
    return Matcher(blocks, epochs=2, batch_size=6, checkpoint_every=1, verbose=False, **kw)


def test_miner_generator_is_checkpointed_and_resumed(data, tmp_path):
    full = mined(data, checkpoint_dir=tmp_path / "a").fit(data)
    with pytest.raises(RuntimeError, match="simulated crash"):
        mined(data, checkpoint_dir=tmp_path / "b").fit(Crashing(data, 40))
    resumed = mined(data, checkpoint_dir=tmp_path / "b").fit(data, resume=True)
    a, b = full.components_.state_dict(), resumed.components_.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss/tripletloss"] for h in full.history_] == [
        h["loss/tripletloss"] for h in resumed.history_
    ]


def test_generator_states_round_trip():
    miner = DistanceWeightedMiner(dim=4, random_state=5).train()
    scores, positives = torch.randn(6, 6), torch.eye(6, dtype=torch.bool)
    miner(scores, positives)
    states = miner.generator_states()
    assert list(states) == ["cpu"]
    follow = miner(scores, positives)
    other = DistanceWeightedMiner(dim=4, random_state=5).train()
    other.load_generator_states(states)
    assert all(torch.equal(x, y) for x, y in zip(other(scores, positives), follow))
    assert DistanceWeightedMiner(dim=4).generator_states() == {}


def test_resume_on_other_data_is_refused(data, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        mined(data, checkpoint_dir=tmp_path).fit(Crashing(data, 20))
    # Same vocabulary (so the same configuration), other features; then fewer captions.
    other = ImageCaptionDataset(
        [x + 1 for x in data.images], data.captions, data.caption_to_image, vocab=data.vocab
    )
    with pytest.raises(CheckpointError, match=r"trained on other data \(dataset fingerprint"):
        mined(other, checkpoint_dir=tmp_path).fit(other, resume=True)
    fewer = ImageCaptionDataset(
        data.images, data.captions[:-2], data.caption_to_image[:-2], vocab=data.vocab
    )
    with pytest.raises(CheckpointError, match="trained on other data"):
        mined(fewer, checkpoint_dir=tmp_path).fit(fewer, resume=True)
    assert mined(data, checkpoint_dir=tmp_path).fit(data, resume=True).n_epochs_ == 2
