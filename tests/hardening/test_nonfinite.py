"""Non-finite training steps: traced to the block that produced them, raised or skipped (``on_nonfinite``)."""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from toy import ToyHinge, ToyText, toy_data

from imtm import Matcher
from imtm.components import GlobalCosine, PrecomputedEncoder, TripletLoss
from imtm.data import ImageCaptionDataset, collate
from imtm.engine import training
from imtm.engine.training import NonFiniteError
from imtm.testing.distributed import run_ranks

sys.path.insert(
    0, str(Path(__file__).parent)
)  # the blocks' module, importable by spawned processes too
import nonfinite_blocks as nb
from nonfinite_blocks import PoisonedEncoder, PoisonedScorer


@pytest.fixture(scope="module")
def data():
    return toy_data(n_images=12, cpi=2)  # 24 captions: 6 batches of 4


def loader(data, order=None, batch_size=4):
    """A DataLoader whose batches come in a fixed order (``order``: batch indices)."""
    batches = [list(range(i, i + batch_size)) for i in range(0, len(data), batch_size)]
    if order is not None:
        batches = [batches[k] for k in order]
    return DataLoader(data, batch_sampler=batches, collate_fn=collate)


def matcher(data, enc=None, scorer=None, **kw):
    kw = {"epochs": 1, "batch_size": 4, "verbose": False, "lr": 1e-2, "warmup": 0, **kw}
    return Matcher(
        [
            ("image", enc or PoisonedEncoder()),
            ("text", ToyText(vocab=data.vocab)),
            ("scorer", scorer or PoisonedScorer()),
            ("loss", ToyHinge()),
        ],
        **kw,
    )


def state(m):
    return {k: v.detach().clone() for k, v in m.components_.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- raise: the producer, the step
@pytest.mark.parametrize("fill", ["nan", "inf"])
@pytest.mark.parametrize("where", ["image", "scorer"])
def test_raise_names_the_block_that_produced_the_value_and_the_step(data, fill, where):
    enc = PoisonedEncoder(at=(3,) if where == "image" else (), fill=fill)
    scorer = PoisonedScorer(at=(3,) if where == "scorer" else (), fill=fill)
    value = "image_tokens" if where == "image" else "scores"
    with pytest.raises(
        NonFiniteError,
        match=rf"non-finite loss at step 3 \(stage 1, epoch 1, batch 3\): "
        rf"block '{where}' \(Poisoned\w+, position \d\) produced NaN/inf in "
        rf"its output '{value}'",
    ) as e:
        matcher(data, enc, scorer).fit(loader(data))
    err = e.value
    assert isinstance(err, FloatingPointError)
    assert (err.kind, err.block, err.value, err.step, err.epoch, err.batch) == (
        "loss",
        where,
        value,
        3,
        1,
        3,
    )
    assert err.blocks == ("loss",)  # the loss block that saw it


def test_second_epoch_position_is_reported(data):
    with pytest.raises(NonFiniteError, match=r"at step 7 \(stage 1, epoch 2, batch 1\)") as e:
        matcher(data, scorer=PoisonedScorer(at=(7,)), epochs=2).fit(loader(data))
    assert (e.value.step, e.value.epoch, e.value.batch) == (7, 2, 1)


def test_first_block_in_plan_order_is_named_and_padding_may_hold_anything(data):
    # The encoder fills its padding with NaN at every step (harmless: blocks honour the mask),
    # then writes one NaN at a real position at step 2, which the scorer carries on: the encoder is named.
    enc = PoisonedEncoder(at=(2,), padding_always=True)
    with pytest.raises(NonFiniteError, match=r"step 2 .*block 'image'") as e:
        matcher(data, enc).fit(loader(data))
    assert e.value.value == "image_tokens"
    # With padding NaN alone, nothing is non-finite: every step trains.
    m = matcher(data, PoisonedEncoder(padding_always=True), on_nonfinite="skip").fit(loader(data))
    assert m.skipped_steps_ == 0
    # Padding NaN before a real NaN produced later, by the scorer: the scorer is named, not the encoder.
    with pytest.raises(NonFiniteError, match=r"step 4 .*block 'scorer'"):
        matcher(data, PoisonedEncoder(padding_always=True), PoisonedScorer(at=(4,))).fit(
            loader(data)
        )


def test_loss_block_is_named_when_every_intermediate_is_finite(data):
    class NanHinge(ToyHinge):
        def forward(self, scores, positives):
            return super().forward(scores, positives) * torch.tensor(float("nan"))

    m = Matcher(
        [PoisonedEncoder(), ToyText(vocab=data.vocab), PoisonedScorer(), ("hinge", NanHinge())],
        epochs=1,
        batch_size=4,
        verbose=False,
    )
    with pytest.raises(
        NonFiniteError,
        match=r"step 0 .*loss block\(s\) \['hinge'\] returned NaN/inf from finite "
        r"inputs \(first: block 'hinge' \(NanHinge, position 3\)\)",
    ) as e:
        m.fit(loader(data))
    assert (e.value.block, e.value.value) == ("hinge", None)


def test_an_overflowing_weighted_sum_of_finite_losses_is_named_as_such(data):
    m = matcher(data)
    m.set_params(loss=ToyHinge(weight=1e39))  # weight * loss overflows float32; each loss is finite
    with pytest.raises(
        NonFiniteError,
        match=r"step 0 .*every loss is finite but their weighted sum overflowed "
        r"\(\{'loss': \d",
    ) as e:
        m.fit(loader(data))
    assert (e.value.kind, e.value.block, e.value.blocks) == ("loss", None, ("loss",))


def test_a_block_that_refuses_a_nan_input_does_not_hide_its_producer(data):
    """GlobalCosine checks its inputs (check_finite): a NaN the encoder produced used to surface as
    "check the input features" (a ValueError that bypassed on_nonfinite); it is traced to the encoder."""

    def real(**kw):
        return Matcher(
            [
                ("image", PoisonedEncoder(at=(2,))),
                ("text", ToyText(vocab=data.vocab)),
                ("scorer", GlobalCosine()),
                ("loss", TripletLoss()),
            ],
            epochs=1,
            batch_size=4,
            verbose=False,
            **kw,
        )

    with pytest.raises(
        NonFiniteError,
        match=r"step 2 .*block 'image' .* output 'image_tokens'; a later block "
        r"refused it \(.*holds 1 NaN or inf",
    ) as e:
        real().fit(loader(data))
    assert isinstance(e.value.__cause__, ValueError)
    with pytest.warns(RuntimeWarning, match=r"skipped step 2 .*block 'image'"):
        assert real(on_nonfinite="skip").fit(loader(data)).skipped_steps_ == 1


def test_nan_input_features_are_reported_as_input_by_a_checking_encoder(data):
    images = [x.clone() for x in data.images]
    images[5][1, 2] = float("nan")  # image 5: captions 10 and 11, batch 2
    bad = ImageCaptionDataset(images, data.captions, data.caption_to_image, vocab=data.vocab)
    for policy in ("raise", "skip"):
        m = Matcher(
            [
                ("image", PrecomputedEncoder(in_dim=6, out_dim=8)),
                ("text", ToyText(vocab=data.vocab)),
                ("scorer", GlobalCosine()),
                ("loss", TripletLoss()),
            ],
            epochs=1,
            batch_size=4,
            verbose=False,
            on_nonfinite=policy,
        )
        with pytest.raises(
            ValueError,
            match=r"the batch's input 'images' holds NaN/inf at step 2 .*fix or filter "
            r"the data",
        ) as e:
            m.fit(loader(bad))
        assert not isinstance(e.value, FloatingPointError)
        assert "holds 2 NaN or inf" in str(e.value.__cause__)  # image 5 is in the batch twice


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_nan_gradient_with_a_finite_loss_is_caught_and_names_the_block(data, grad_clip):
    with pytest.raises(
        NonFiniteError,
        match=r"non-finite gradient at step 2 .*the loss is finite but the "
        r"parameters of block\(s\) \['scorer'\] got NaN/inf gradients",
    ) as e:
        matcher(data, scorer=PoisonedScorer(grad_at=(2,)), grad_clip=grad_clip).fit(loader(data))
    assert (e.value.kind, e.value.block, e.value.blocks) == ("gradient", "scorer", ("scorer",))
    m = matcher(data, scorer=PoisonedScorer(grad_at=(2,)), grad_clip=grad_clip, on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="got NaN/inf gradients"):
        m.fit(loader(data))
    assert m.skipped_steps_ == 1
    assert all(bool(torch.isfinite(v).all()) for v in state(m).values())


# ---------------------------------------------------------------- skip: nothing moves, the step counts
def _grads(seed, shapes=((3, 4), (5,), (2, 2))):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3.0
    return params


@pytest.mark.parametrize("max_norm", [None, 0.5, 1e3])
def test_clipping_without_get_total_norm_is_torchs_and_leaves_nan_gradients_alone(
    monkeypatch, max_norm
):
    # torch < 2.6 (no get_total_norm) takes the by-hand path of _grad_norm; it is forced here on
    # any torch. Finite gradients: torch's clip_grad_norm_ (same norm, same scaled gradients).
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    ours, theirs = _grads(0), _grads(0)
    norm = training._grad_norm(ours, max_norm)
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in theirs]))
    if max_norm is not None:
        expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    torch.testing.assert_close(norm, expected)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)
    # A NaN gradient: the norm says so and no other gradient is scaled by it.
    params, before = _grads(1), _grads(1)
    params[1].grad[2] = float("nan")
    norm = training._grad_norm(params, max_norm)
    assert not bool(torch.isfinite(norm))
    torch.testing.assert_close(params[0].grad, before[0].grad)
    torch.testing.assert_close(params[2].grad, before[2].grad)
    assert int(params[1].grad.isnan().sum()) == 1
    # No gradient at all: a zero norm.
    assert float(training._grad_norm([torch.nn.Parameter(torch.zeros(2))], max_norm)) == 0.0


def test_skipped_step_leaves_weights_optimizer_and_schedule_unchanged(data, monkeypatch):
    seen = []
    original = training.Trainer.step

    def recording(self, batch, stage, opt, sched, loss_idx, run_idx):
        before = (state(self.m), copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()))
        out = original(self, batch, stage, opt, sched, loss_idx, run_idx)
        after = (state(self.m), copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()))
        seen.append((out, before, after, [p.grad for g in opt.param_groups for p in g["params"]]))
        return out

    monkeypatch.setattr(training.Trainer, "step", recording)
    with pytest.warns(RuntimeWarning, match=r"skipped step 2 .*block 'scorer'"):
        matcher(data, scorer=PoisonedScorer(at=(2,)), on_nonfinite="skip").fit(loader(data))
    assert [out is None for out, *_ in seen] == [False, False, True, False, False, False]
    _, before, after, grads = seen[2]
    assert_same(before[0], after[0])
    assert before[1]["state"].keys() == after[1]["state"].keys()
    for k, s in before[1]["state"].items():
        for name, v in s.items():
            assert torch.equal(v, after[1]["state"][k][name]), (k, name)
    assert before[2] == after[2]  # the schedule did not advance
    assert all(g is None for g in grads)  # no gradient left for the next step
    # guard: a step that is taken changes all three
    _, before, after, _ = seen[3]
    assert not torch.equal(before[0]["image.proj.weight"], after[0]["image.proj.weight"])
    assert before[2]["last_epoch"] + 1 == after[2]["last_epoch"]


def test_skipping_is_exactly_training_without_the_bad_batch(data):
    """The bad batch (index 2) skipped in place, or moved to the end and skipped there: the same weights
    bit for bit (the schedule advances with steps taken, and the toy blocks draw no random numbers)."""
    with pytest.warns(RuntimeWarning, match=r"skipped step 2 "):
        in_place = matcher(data, scorer=PoisonedScorer(at=(2,)), on_nonfinite="skip").fit(
            loader(data)
        )
    with pytest.warns(RuntimeWarning, match=r"skipped step 5 "):
        at_end = matcher(data, scorer=PoisonedScorer(at=(5,)), on_nonfinite="skip").fit(
            loader(data, [0, 1, 3, 4, 5, 2])
        )
    assert in_place.skipped_steps_ == at_end.skipped_steps_ == 1
    assert in_place.history_[0]["skipped_steps"] == 1
    assert_same(state(in_place), state(at_end))
    # guard: with batch 2 trained on, the weights differ
    clean = matcher(data, on_nonfinite="skip").fit(loader(data))
    assert clean.skipped_steps_ == 0
    assert not torch.equal(state(clean)["image.proj.weight"], state(in_place)["image.proj.weight"])


def test_one_warning_per_epoch_naming_the_block_and_counts_in_history(data):
    m = matcher(data, enc=PoisonedEncoder(at=(1, 3, 8), fill="inf"), on_nonfinite="skip", epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.fit(loader(data))
    msgs = [
        str(w.message)
        for w in caught
        if issubclass(w.category, RuntimeWarning) and "skipped" in str(w.message)
    ]
    assert len(msgs) == 2, msgs
    assert "skipped step 1 (stage 1, epoch 1, batch 1)" in msgs[0] and "block 'image'" in msgs[0]
    assert "skipped step 8 (stage 1, epoch 2, batch 2)" in msgs[1]
    assert [h["skipped_steps"] for h in m.history_] == [2, 3]  # counted over the run
    assert m.skipped_steps_ == 3


def test_a_run_that_only_skips_raises_after_an_epoch_of_skips(data):
    m = matcher(data, scorer=PoisonedScorer(at=tuple(range(2, 20))), on_nonfinite="skip", epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(
            NonFiniteError,
            match=r"the last 6 steps \(as many as one epoch holds\) were all skipped"
            r".*step 7 \(stage 1, epoch 2, batch 1\)",
        ):
            m.fit(loader(data))
    assert m.skipped_steps_ == 6
    # isolated skips, even many in all, do not trip it: every other step is bad over three epochs
    m = matcher(
        data, scorer=PoisonedScorer(at=tuple(range(1, 18, 2))), on_nonfinite="skip", epochs=3
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m.fit(loader(data))
    assert m.skipped_steps_ == 9


def test_bf16_autocast_nan_is_traced(data):
    with pytest.raises(NonFiniteError, match=r"step 1 .*block 'scorer'"):
        matcher(data, scorer=PoisonedScorer(at=(1,)), precision="bf16", device="cpu").fit(
            loader(data)
        )
    m = matcher(
        data, enc=PoisonedEncoder(at=(1,)), precision="bf16", device="cpu", on_nonfinite="skip"
    )
    with pytest.warns(RuntimeWarning, match=r"skipped step 1 .*block 'image'"):
        m.fit(loader(data))
    assert m.skipped_steps_ == 1


# ---------------------------------------------------------------- torchrun: the same decision on every rank
@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)
def test_a_nan_on_one_rank_is_skipped_by_every_rank(data):
    """Rank 1's loss is NaN, rank 0's is finite (and the NaN gives rank 1 no NaN gradient: the hinge
    clamps it away): without one all-reduced decision the ranks would step apart."""
    res = run_ranks(nb.fit_with_a_nan_on_one_rank, nprocs=2, args=(2, 1), timeout=180)
    for r in res:
        assert r["skipped"] == 1 and r["history"][-1]["skipped_steps"] == 1
    assert res[0]["state"].keys() == res[1]["state"].keys()
    for k, v in res[0]["state"].items():
        assert (v == res[1]["state"][k]).all(), k
    assert any(
        "skipped step 1" in w and "on rank 1" in w and "block 'scorer'" in w
        for w in res[1]["warnings"]
    )
    assert any("skipped step 1" in w and "another rank's step" in w for w in res[0]["warnings"])
    # The same as one process with the combined batch that skips the same step.
    single = Matcher(
        nb.components(data.vocab, PoisonedScorer(at=(1,))),
        epochs=1,
        batch_size=4,
        lr=1e-2,
        warmup=0,
        device="cpu",
        random_state=0,
        verbose=False,
        on_nonfinite="skip",
    )
    with pytest.warns(RuntimeWarning, match=r"skipped step 1 .*block 'scorer'"):
        single.fit(data)
    assert single.skipped_steps_ == 1
    for k, v in single.components_.state_dict().items():
        torch.testing.assert_close(
            torch.as_tensor(res[0]["state"][k]), v, rtol=1e-4, atol=1e-5, msg=k
        )
