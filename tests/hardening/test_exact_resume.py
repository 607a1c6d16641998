"""Resume is bit-exact, or refused with a clear error, under every documented condition.

- Ctrl-C (SIGINT) in the middle of a step, with dropout: the checkpoint holds the state of the
  last completed step, so the resumed run ends with the uninterrupted run's weights.
- Mid-epoch, with a user ``DataLoader(shuffle=True)``, with caption augmentation drawn in two
  worker processes, with ``CaptionAugment(seed=0)``; and ``num_workers`` changed on resume.
- Two fits in one process agree, whatever was drawn before.
- A DataLoader imtm iterates as given (a subclass, a stream with ``steps_per_epoch``, in worker
  processes too) resumes mid-epoch by reading the consumed batches again.
- What cannot be replayed (a checkpoint of an earlier data seeding) is refused with a
  ``CheckpointError`` that says why.
"""

import json
import os
import signal

import pytest
import torch
from torch.utils.data import DataLoader
from toy import ToyCosine, ToyHinge, ToyImage, ToyText, toy_data

from imtm import Matcher
from imtm.data import CaptionAugment, ImageCaptionDataset, collate
from imtm.engine.checkpoint import CheckpointError, latest_checkpoint
from imtm.engine.serialization import file_sha256


class SigintImage(ToyImage):
    """ToyImage (with dropout) that sends this process SIGINT inside its forward, after the dropout drew."""

    calls = 0
    at: int | None = None

    def forward(self, images):
        out = super().forward(images)
        type(self).calls += 1
        if type(self).calls == type(self).at:
            os.kill(os.getpid(), signal.SIGINT)  # the dropout above drew: the state is mid-step
        return out


class Augmented(ImageCaptionDataset):
    """The toy data with caption augmentation in ``__getitem__``, raising after ``crash_after`` items."""

    def __init__(self, base, augment, crash_after=None):
        super().__init__(
            base.images, base.captions, base.caption_to_image, vocab=base.vocab, name="toy"
        )
        self.augment, self.crash_after, self.seen = augment, crash_after, 0

    def __getitem__(self, k):
        self.seen += 1
        if self.crash_after is not None and self.seen > self.crash_after:
            raise RuntimeError("simulated crash")
        item = super().__getitem__(k)
        return {**item, "texts": self.augment(item["texts"])}


@pytest.fixture(scope="module")
def data():
    return toy_data(n_images=12)  # 24 captions: 4 batches of 6 per epoch


def blocks(data, image=ToyImage):
    return [image(), ToyText(vocab=data.vocab), ToyCosine(), ToyHinge()]


def matcher(data, run=None, image=ToyImage, **kw):
    kw = {
        "epochs": 2,
        "batch_size": 6,
        "verbose": False,
        "device": "cpu",
        "random_state": 0,
        "lr": 5e-2,
        **kw,
    }
    return Matcher(blocks(data, image), checkpoint_dir=None if run is None else str(run), **kw)


def weights(m):
    return {k: v.detach().clone() for k, v in m.components_.state_dict().items()}


def assert_same(a, b, msg=""):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run {msg}"


def disturb():
    torch.rand(11)
    import random

    import numpy as np

    np.random.rand(3)
    random.random()


def loader(dataset, **kw):
    return DataLoader(dataset, batch_size=6, shuffle=True, collate_fn=collate, **kw)


# ---------------------------------------------------------------- item 2: Ctrl-C mid-step
@pytest.mark.parametrize("at", [2, 3, 6])
def test_sigint_mid_step_then_resume_is_bit_exact_with_dropout(data, tmp_path, at):
    SigintImage.calls, SigintImage.at = 0, None
    reference = weights(matcher(data, image=SigintImage).fit(data))
    SigintImage.calls, SigintImage.at = 0, at
    with pytest.raises(KeyboardInterrupt):
        matcher(data, tmp_path, image=SigintImage).fit(data)
    SigintImage.at = None
    state = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())
    assert (
        state["__dict__"]["position"]["__dict__"]["global_step"] == at
    )  # the interrupted step completed
    disturb()
    resumed = matcher(data, tmp_path, image=SigintImage).fit(data, resume=True)
    assert_same(reference, weights(resumed), f"(SIGINT in step {at})")


# ---------------------------------------------------------------- item 3: mid-epoch resume
def crash_then_resume(data, tmp_path, make_train, crash_after, **kw):
    """Fit until the data raise, then resume from the last checkpoint (every step writes one)."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        matcher(data, tmp_path, checkpoint_every=1, **kw).fit(make_train(crash_after))
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and int(ckpt.name.split("-")[1]) % 4 != 0, ckpt  # resumed mid-epoch
    disturb()
    return matcher(data, tmp_path, checkpoint_every=1, **kw).fit(make_train(None), resume=True)


def test_user_dataloader_shuffled_resumes_mid_epoch_bit_exact(data, tmp_path):
    aug = CaptionAugment.from_vocabulary(data.vocab)
    reference = weights(matcher(data).fit(loader(Augmented(data, aug))))
    resumed = crash_then_resume(
        data, tmp_path, lambda c: loader(Augmented(data, aug, c)), crash_after=15
    )
    assert_same(reference, weights(resumed))


def test_user_dataloader_with_two_workers_and_augmentation_resumes_bit_exact(data, tmp_path):
    aug = CaptionAugment.from_vocabulary(data.vocab, seed=0)
    reference = weights(matcher(data).fit(loader(Augmented(data, aug), num_workers=2)))
    resumed = crash_then_resume(
        data, tmp_path, lambda c: loader(Augmented(data, aug, c), num_workers=2), crash_after=9
    )
    assert_same(reference, weights(resumed))


@pytest.mark.parametrize("seed", [None, 0])
def test_augmentation_in_two_workers_resumes_bit_exact_and_num_workers_may_change(
    data, tmp_path, seed
):
    aug = CaptionAugment.from_vocabulary(data.vocab, seed=seed)
    reference = weights(matcher(data, num_workers=2).fit(Augmented(data, aug)))
    assert_same(
        reference,
        weights(matcher(data, num_workers=0).fit(Augmented(data, aug))),
        "(num_workers=0)",
    )
    resumed = crash_then_resume(
        data, tmp_path / "a", lambda c: Augmented(data, aug, c), crash_after=9, num_workers=2
    )
    assert_same(reference, weights(resumed))
    # Changing num_workers on resume (documented as safe) changes nothing.
    with pytest.raises(RuntimeError, match="simulated crash"):
        matcher(data, tmp_path / "b", checkpoint_every=1, num_workers=2).fit(
            Augmented(data, aug, 9)
        )
    resumed = matcher(data, tmp_path / "b", checkpoint_every=1, num_workers=0).fit(
        Augmented(data, aug), resume=True
    )
    assert_same(reference, weights(resumed), "(resumed with num_workers=0)")


def test_seeded_caption_augment_two_fits_in_one_process_agree_and_resume_bit_exact(data, tmp_path):
    aug = CaptionAugment.from_vocabulary(data.vocab, seed=0)
    train = Augmented(data, aug)
    first = weights(matcher(data).fit(train))
    disturb()
    assert_same(first, weights(matcher(data).fit(train)), "(a second fit in the same process)")
    resumed = crash_then_resume(data, tmp_path, lambda c: Augmented(data, aug, c), crash_after=9)
    assert_same(first, weights(resumed))
    # The augmentation draws something: another augment seed gives other weights.
    other = weights(
        matcher(data).fit(Augmented(data, CaptionAugment.from_vocabulary(data.vocab, seed=1)))
    )
    assert any(not torch.equal(first[k], other[k]) for k in first)


# ---------------------------------------------------------------- loaders iterated as given, streams
class MyLoader(DataLoader):
    """A DataLoader subclass: imtm iterates it as given (it cannot re-create it)."""


def test_dataloader_subclass_resumes_mid_epoch_and_at_epoch_end_bit_exactly(data, tmp_path):
    aug = CaptionAugment.from_vocabulary(data.vocab, seed=0)
    make = lambda c: MyLoader(
        Augmented(data, aug, c), batch_size=6, shuffle=True, collate_fn=collate
    )  # noqa: E731
    reference = weights(matcher(data).fit(make(None)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        matcher(data, tmp_path, checkpoint_every=1).fit(make(15))
    assert latest_checkpoint(tmp_path).name == "ckpt-00000002"  # mid-epoch
    disturb()
    resumed = matcher(data, tmp_path, checkpoint_every=1).fit(make(None), resume=True)
    assert_same(reference, weights(resumed), "(resumed mid-epoch)")
    run = tmp_path / "epochs"
    with pytest.raises(RuntimeError, match="simulated crash"):
        matcher(data, run).fit(make(30))
    assert latest_checkpoint(run).name == "ckpt-00000004"
    assert_same(reference, weights(matcher(data, run).fit(make(None), resume=True)))


class Stream(torch.utils.data.IterableDataset):
    """The toy items as a stream without a length: reshuffled by ``set_epoch``, noise drawn from
    torch's global generator on every item (an augmentation), split over worker processes, and
    crashing in epoch ``crash_epoch`` after ``crash_after`` items of one iterator (of one worker)."""

    def __init__(self, base, crash_after=None, crash_epoch=1, noise=0.1):
        self.base, self.epoch, self.noise = base, 0, noise
        self.crash_after, self.crash_epoch = crash_after, crash_epoch

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        order = torch.randperm(len(self.base), generator=torch.Generator().manual_seed(self.epoch))
        if info is not None:
            order = order[info.id :: info.num_workers]
        for seen, k in enumerate(order.tolist()):
            if self.epoch == self.crash_epoch and seen == self.crash_after:
                raise RuntimeError("simulated crash")
            item = self.base[k]
            if self.noise:
                item = {
                    **item,
                    "images": item["images"] + self.noise * torch.randn(item["images"].shape),
                }
            yield item


@pytest.mark.parametrize("workers, crash_after", [(0, 12), (2, 6)])
def test_a_stream_resumes_mid_epoch_bit_exactly(data, tmp_path, workers, crash_after):
    """steps_per_epoch=3 of a stream of 4 batches; crashed reading batch 2 of epoch 2 (in a
    worker process too), resumed from the checkpoint after its batch 0."""
    make = lambda c=None: DataLoader(  # noqa: E731
        Stream(data, c), batch_size=6, collate_fn=collate, num_workers=workers
    )
    kw = dict(steps_per_epoch=3, epochs=3)
    reference = weights(matcher(data, **kw).fit(make()))
    disturb()
    assert_same(reference, weights(matcher(data, **kw).fit(make())), "(a second fit)")
    with pytest.raises(RuntimeError, match="simulated crash"):
        matcher(data, tmp_path, checkpoint_every=2, **kw).fit(make(crash_after))
    assert latest_checkpoint(tmp_path).name == "ckpt-00000004"  # epoch 2, after its batch 0
    disturb()
    resumed = matcher(data, tmp_path, checkpoint_every=2, **kw).fit(make(), resume=True)
    assert_same(reference, weights(resumed), "(a stream resumed mid-epoch)")
    # the stream's draws count: without the noise the weights differ
    plain = DataLoader(Stream(data, noise=0), batch_size=6, collate_fn=collate)
    other = weights(matcher(data, **kw).fit(plain))
    assert any(not torch.equal(reference[k], other[k]) for k in reference)


def test_seeded_stream_draws_per_batch_and_per_rank(data):
    """What a stream draws while imtm reads it depends on (seed, epoch, batch, rank) only."""
    from imtm.engine.training import SeededStream

    def images(**kw):
        loader = DataLoader(Stream(data), batch_size=6, collate_fn=collate)
        return [b["images"].feats for b in SeededStream(loader, 0, 1, **kw)]

    first = images()
    disturb()
    again = images()
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == 4
    # resumed at batch 2: the batches that follow are the same, drawn alike
    assert all(torch.equal(a, b) for a, b in zip(first[2:], images(start=2)))
    assert all(torch.equal(a, b) for a, b in zip(first, images(rank=0)))
    # another rank (under torchrun): other draws
    assert not any(torch.equal(a, b) for a, b in zip(first, images(rank=1)))


def test_a_stream_that_ends_early_on_resume_is_a_clear_error(data, tmp_path):
    kw = dict(steps_per_epoch=3, epochs=2, checkpoint_every=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        matcher(data, tmp_path, **kw).fit(
            DataLoader(Stream(data, 12, 0), batch_size=6, collate_fn=collate)
        )
    assert latest_checkpoint(tmp_path).name == "ckpt-00000002"
    short = DataLoader(Stream(toy_data(n_images=3)), batch_size=6, collate_fn=collate)  # 1 batch
    with pytest.raises(ValueError, match="stream ended after 1 batches while skipping the 2"):
        matcher(data, tmp_path, **kw).fit(short, resume=True)


def test_checkpoint_without_data_seeding_is_refused(data, tmp_path):
    matcher(data, tmp_path).fit(data)
    ckpt = latest_checkpoint(tmp_path)
    state = json.loads((ckpt / "state.json").read_text())
    del state["__dict__"]["data"]
    (ckpt / "state.json").write_text(json.dumps(state))
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    manifest["sha256"]["state.json"] = file_sha256(ckpt / "state.json")
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointError, match="earlier version of imtm, which drew the random numbers of data"
    ):
        matcher(data, tmp_path).fit(data, resume=True)
