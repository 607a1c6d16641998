"""Gradient accumulation with cached embeddings, fp16 loss scaling, and streamed training data."""

import pytest
import torch
from dist_workers import components
from torch.utils.data import IterableDataset
from toy import ToyCosine, ToyHinge, ToyImage, ToyText, toy_data

from imtm import Loss, Matcher
from imtm.engine.callbacks import Callback
from imtm.engine.checkpoint import latest_checkpoint


@pytest.fixture(scope="module")
def data():
    return toy_data(n_images=12, cpi=2)


def fitted_gradients(m: Matcher, train, batch_size: int) -> tuple[dict, dict]:
    """The gradients and losses of one step on the first batch (the weights as built from seed 0)."""
    m.set_params(batch_size=batch_size).validate()
    tr = m.trainer(train)
    tr.seed = 0
    m._build(0)
    stage = tr.stages[0]
    opt, sched = tr.make_optimizer(stage)
    tr.set_modes(stage)
    tr.global_step, tr.skipped = 0, 0
    loss_idx = tr.active_losses(stage)
    run_idx = m.plan_.needed_for([m.plan_.names[k] for k in loss_idx])
    batch = next(tr.batches(0, 0))
    logs = tr.step(batch, stage, opt, sched, loss_idx, run_idx)
    return {
        n: p.grad.clone() for n, p in m.components_.named_parameters() if p.grad is not None
    }, logs


def make(data, blocks, **kw):
    return Matcher(
        blocks,
        epochs=1,
        lr=1e-3,
        grad_clip=None,
        device="cpu",
        random_state=0,
        verbose=False,
        warmup=0,
        lr_scheduler="constant",
        **kw,
    )


@pytest.mark.parametrize("k", [2, 3, 5])
def test_accumulation_equals_the_large_batch_for_all_pairs_losses(data, k):
    """CHAN's hard-assignment scorer with triplet (hardest negative) and InfoNCE losses: every pair of the batch."""
    one = fitted_gradients(make(data, components(data.vocab)), data, 24)
    acc = fitted_gradients(make(data, components(data.vocab), accumulate=k), data, 24)
    assert one[1].keys() == acc[1].keys()
    for name in one[1]:
        assert acc[1][name] == pytest.approx(one[1][name], rel=1e-6, abs=1e-6)
    assert one[0].keys() == acc[0].keys() and len(one[0]) >= 4
    for name in one[0]:
        torch.testing.assert_close(acc[0][name], one[0][name], rtol=1e-6, atol=1e-6, msg=name)


def test_accumulation_with_global_embeddings_and_dropout_replays_the_same_masks(data):
    """ToyImage has dropout: each micro-batch's second pass draws the masks of its first."""
    blocks = lambda: [ToyImage(), ToyText(vocab=data.vocab), ToyCosine(), ToyHinge()]  # noqa: E731
    grads, _ = fitted_gradients(make(data, blocks(), accumulate=4), data, 24)
    again, _ = fitted_gradients(make(data, blocks(), accumulate=4), data, 24)
    for name in grads:
        torch.testing.assert_close(grads[name], again[name], rtol=0, atol=0)
    # without replaying the masks the cached gradient would not match the re-run: the loss would still
    # fall, but the gradient of the image block would differ from a plain finite-difference check
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_accumulation_trains_and_resumes_bit_exactly(data, tmp_path):
    kw = dict(
        epochs=2, batch_size=12, lr=1e-2, device="cpu", random_state=0, verbose=False, accumulate=3
    )
    ref = Matcher(components(data.vocab), **kw).fit(data)

    class Stop(Callback):
        def on_batch_end(self, trainer, logs):
            if logs["step"] == 3:
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        Matcher(components(data.vocab), checkpoint_dir=str(tmp_path), checkpoint_every=1, **kw).fit(
            data, callbacks=[Stop()]
        )
    assert (
        latest_checkpoint(tmp_path).name == "ckpt-00000002"
    )  # the callback raised before step 3 was saved
    resumed = Matcher(
        components(data.vocab), checkpoint_dir=str(tmp_path), checkpoint_every=1, **kw
    ).fit(data, resume=True)
    for k, v in ref.components_.state_dict().items():
        assert torch.equal(v, resumed.components_.state_dict()[k]), k


def test_bad_accumulate_is_refused(data):
    with pytest.raises(ValueError, match="accumulate"):
        make(data, components(data.vocab), accumulate=0).fit(data)


# ---------------------------------------------------------------- fp16 loss scaling
class Huge(Loss):
    """A loss whose fp16 gradients overflow while the scale is large (InfoNCE times ``factor``)."""

    requires = ("scores", "positives")
    provides = ("huge",)

    def __init__(self, factor=100.0, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.factor = factor

    def forward(self, scores, positives):
        return self.factor * (scores.float() - scores.float().diagonal()[None]).clamp_min(-1).mean()


def test_fp16_scaler_skips_overflow_steps_and_trains_on(data):
    steps = []

    class Watch(Callback):
        def on_batch_end(self, trainer, logs):
            steps.append(
                (
                    logs["skipped"],
                    trainer.scaler.get_scale(),
                    {k: v.clone() for k, v in trainer.model.components_.state_dict().items()},
                )
            )

    blocks = [("image", ToyImage()), ("text", ToyText(vocab=data.vocab)), ToyCosine(), Huge()]
    m = Matcher(
        blocks,
        precision="fp16",
        epochs=4,
        batch_size=6,
        lr=1e-3,
        device="cpu",
        random_state=0,
        verbose=False,
        on_nonfinite="raise",
    )
    m.fit(data, callbacks=[Watch()])
    skipped = [i for i, (s, _, _) in enumerate(steps) if s]
    assert skipped and skipped[0] == 0 and len(skipped) < len(steps), (
        skipped
    )  # overflows first, then trains
    assert m.overflow_steps_ == len(skipped) and m.skipped_steps_ == 0
    scales = [sc for _, sc, _ in steps]
    assert scales[skipped[-1]] < 65536.0  # each overflow halved the scale
    first = skipped[0]
    assert first == 0 or all(
        torch.equal(steps[first - 1][2][k], steps[first][2][k]) for k in steps[first][2]
    )
    fresh = Matcher(
        blocks, precision="fp16", epochs=0, device="cpu", random_state=0, verbose=False
    ).fit(data)
    for (
        k,
        v,
    ) in fresh.components_.state_dict().items():  # an overflowed first step left the weights alone
        assert torch.equal(v, steps[0][2][k]), k
    trained = next(i for i, (s, _, _) in enumerate(steps) if not s)
    assert any(
        not torch.equal(steps[trained][2][k], fresh.components_.state_dict()[k])
        for k in steps[0][2]
    )
    assert all(torch.isfinite(v).all() for v in m.components_.state_dict().values())


def test_fp16_scaler_state_resumes_bit_exactly(data, tmp_path):
    def blocks():
        return [
            ("image", ToyImage()),
            ("text", ToyText(vocab=data.vocab)),
            ToyCosine(),
            Huge(factor=30.0),
        ]

    kw = dict(
        precision="fp16",
        epochs=3,
        batch_size=6,
        lr=1e-3,
        device="cpu",
        random_state=0,
        verbose=False,
    )
    ref = Matcher(blocks(), **kw).fit(data)

    class Stop(Callback):
        def on_batch_end(self, trainer, logs):
            if logs["step"] == 6:
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        Matcher(blocks(), checkpoint_dir=str(tmp_path), checkpoint_every=1, **kw).fit(
            data, callbacks=[Stop()]
        )
    resumed = Matcher(blocks(), checkpoint_dir=str(tmp_path), checkpoint_every=1, **kw).fit(
        data, resume=True
    )
    assert resumed.overflow_steps_ == ref.overflow_steps_ > 0
    for k, v in ref.components_.state_dict().items():
        assert torch.equal(v, resumed.components_.state_dict()[k]), k


# ---------------------------------------------------------------- streams
class Stream(IterableDataset):
    """The toy items as a stream without a length, reshuffled by ``set_epoch``."""

    def __init__(self, base):
        self.base, self.epoch, self.epochs_seen = base, 0, []

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.epochs_seen.append(epoch)

    def __iter__(self):
        order = torch.randperm(
            len(self.base), generator=torch.Generator().manual_seed(self.epoch)
        ).tolist()
        return (self.base[k] for k in order)


def test_an_iterable_dataset_trains_with_steps_per_epoch(data):
    stream = Stream(data)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        Matcher(components(data.vocab), epochs=1, batch_size=6, device="cpu", verbose=False).fit(
            stream
        )
    m = Matcher(
        components(data.vocab),
        epochs=2,
        batch_size=6,
        steps_per_epoch=3,
        device="cpu",
        verbose=False,
    ).fit(stream)
    assert [h["step"] for h in m.history_] == [3, 6]
    assert stream.epochs_seen == [0, 1]
    assert m.record_["n_train"] is None
