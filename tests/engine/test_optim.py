"""Optimisers, schedules, parameter groups, per-stage options, warm start and init_from.

Each option is checked end to end through ``Matcher.fit`` (what the optimizer's state in the
last checkpoint holds), against the plain formula of its schedule, and for bit-exact resume.
"""

import functools
import json
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from toy import ToyCosine, ToyHinge, ToyImage, ToyText, toy_data

from imtm import Matcher, Stage
from imtm.data import ImageCaptionDataset
from imtm.engine.checkpoint import latest_checkpoint, read_checkpoint
from imtm.engine.optim import (
    describe,
    init_state,
    interpolate_pos_embed,
    optimizer_spec,
    schedule_factor,
    schedule_spec,
    state_digest,
)
from imtm.engine.serialization import decode_value


@pytest.fixture(scope="module")
def data():
    return toy_data(n_images=12)  # 24 captions: 4 batches of 6


def blocks(data):
    return [
        ("image", ToyImage()),
        ("text", ToyText(vocab=data.vocab)),
        ("score", ToyCosine()),
        ("loss", ToyHinge()),
    ]


def matcher(data, run=None, **kw):
    kw = {
        "epochs": 2,
        "batch_size": 6,
        "verbose": False,
        "device": "cpu",
        "random_state": 0,
        "lr": 5e-2,
        **kw,
    }
    return Matcher(blocks(data), checkpoint_dir=None if run is None else str(run), **kw)


def weights(m, prefix=""):
    return {
        k: v.detach().clone() for k, v in m.components_.state_dict().items() if k.startswith(prefix)
    }


def assert_same(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def last_optimizer(run):
    return read_checkpoint(latest_checkpoint(run))["train_state"]["optimizer"]


# ---------------------------------------------------------------- schedules against their formulas
def test_step_decay_text_and_dict_agree_with_the_formula():
    assert schedule_spec("x0.9 every epoch") == {"name": "step", "gamma": 0.9, "every": 1}
    assert schedule_spec("x0.1 every 10 epochs") == {"name": "step", "gamma": 0.1, "every": 10}
    f = schedule_factor("x0.9 every epoch", steps_per_epoch=5, total_steps=50, warmup=0)
    for step in range(50):
        assert f(step) == pytest.approx(0.9 ** (step // 5))


def test_step_decay_at_milestones():
    spec = schedule_spec("x0.3 at epochs 9,15,20,25")
    assert spec == {"name": "step", "gamma": 0.3, "milestones": [9, 15, 20, 25]}
    f = schedule_factor(spec, steps_per_epoch=3, total_steps=90, warmup=0)
    for step in range(90):
        epoch = step // 3
        passed = len([m for m in (9, 15, 20, 25) if epoch >= m])
        assert f(step) == pytest.approx(0.3**passed)
    with pytest.raises(ValueError, match="increasing"):
        schedule_spec({"name": "step", "milestones": [5, 3]})
    with pytest.raises(ValueError, match="not both"):
        schedule_spec({"name": "step", "milestones": [5], "every": 2})


def test_cosine_restarts_follow_sgdr():
    spec = {"name": "cosine_restarts", "period": 2, "mult": 2}
    f = schedule_factor(spec, steps_per_epoch=3, total_steps=60, warmup=0)
    # plain loop: cycles of 6, 12, 24 steps
    starts, length, step_values = 0, 6, []
    for step in range(42):
        while step >= starts + length:
            starts += length
            length *= 2
        step_values.append(0.5 * (1 + math.cos(math.pi * (step - starts) / length)))
    assert [f(s) for s in range(42)] == pytest.approx(step_values)
    assert f(6) == pytest.approx(1.0) and f(18) == pytest.approx(1.0)  # restarts


@settings(max_examples=30, deadline=None)
@given(warm=st.integers(0, 20), total=st.integers(1, 100))
def test_cosine_with_warmup_ramps_then_decays_within_bounds(warm, total):
    f = schedule_factor("cosine", steps_per_epoch=7, total_steps=total, warmup=warm)
    values = [f(s) for s in range(total)]
    assert all(0 <= v <= 1 + 1e-12 for v in values)
    w = min(warm, total)
    assert values[:w] == pytest.approx([(s + 1) / warm for s in range(w)])
    assert all(
        a >= b - 1e-12 for a, b in zip(values[w:], values[w + 1 :])
    )  # non-increasing after warm-up


def test_constant_is_constant_after_warmup():
    f = schedule_factor("constant", steps_per_epoch=4, total_steps=20, warmup=4)
    assert [f(s) for s in range(8)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1, 1])


@pytest.mark.parametrize(
    "bad, match",
    [
        ("cosin", "cosine"),
        ({"name": "step", "gama": 0.9}, "gamma"),
        ({"name": "step", "gamma": -1}, "gamma"),
        ({"name": "cosine_restarts", "period": 0}, "period"),
        (3, "lr_scheduler must be"),
    ],
)
def test_bad_schedules_are_refused_with_the_fix(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        schedule_spec(bad)


@pytest.mark.parametrize(
    "bad, match",
    [
        ("adamm", "adam"),
        (("sgd", 0.9), "pair"),
        ({"momentum": 0.9}, "'name'"),
        (("sgd", {"params": []}), "params"),
        (torch.nn.Linear, "optimizer must be"),
    ],
)
def test_bad_optimizers_are_refused_with_the_fix(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        optimizer_spec(bad)


def test_optimizer_forms():
    assert optimizer_spec("Adam") == (torch.optim.Adam, {})
    assert optimizer_spec(torch.optim.RMSprop) == (torch.optim.RMSprop, {})
    assert optimizer_spec("torch.optim.RMSprop") == (torch.optim.RMSprop, {})
    assert optimizer_spec({"name": "sgd", "momentum": 0.5}) == (torch.optim.SGD, {"momentum": 0.5})
    assert describe(torch.optim.RMSprop) == "torch.optim.RMSprop"


# ---------------------------------------------------------------- end to end through fit
@pytest.mark.parametrize(
    "optimizer, state_key",
    [
        ("adam", "exp_avg"),
        ("adamw", "exp_avg"),
        (("sgd", {"momentum": 0.9}), "momentum_buffer"),
        (torch.optim.RMSprop, "square_avg"),
    ],
)
def test_fit_uses_the_named_optimizer(data, tmp_path, optimizer, state_key):
    matcher(data, tmp_path, epochs=1, optimizer=optimizer).fit(data)
    state = last_optimizer(tmp_path)["state"]
    assert state and all(state_key in s for s in state.values())


def test_lr_factors_make_groups_and_the_schedule_reaches_each(data, tmp_path):
    m = matcher(
        data, tmp_path, lr=0.1, warmup=0, lr_scheduler="x0.5 every epoch", lr_factors={"image": 0.1}
    )
    m.fit(data)
    groups = {g["name"]: g for g in last_optimizer(tmp_path)["param_groups"]}
    assert set(groups) == {"default", "image"}
    # 2 epochs done: the schedule's step count is 8 -> factor 0.5 ** 2
    assert groups["default"]["lr"] == pytest.approx(0.1 * 0.25)
    assert groups["image"]["lr"] == pytest.approx(0.01 * 0.25)
    assert groups["image"]["initial_lr"] == pytest.approx(0.01)


def test_lr_factor_zero_freezes_the_block(data):
    start = matcher(data, epochs=0).fit(data)
    m = matcher(data, lr_factors={"image": 0}).fit(data)
    assert_same(weights(start, "image."), weights(m, "image."))
    assert not torch.equal(
        weights(start, "text.")["text.emb.weight"], weights(m, "text.")["text.emb.weight"]
    )


def test_bad_lr_factors_are_refused(data):
    with pytest.raises(ValueError, match="imag"):
        matcher(data, lr_factors={"imag": 0.1}).fit(data)
    with pytest.raises(ValueError, match=r"lr_factors\['image'\]"):
        matcher(data, lr_factors={"image": -1}).fit(data)
    with pytest.raises(ValueError, match="unknown optimizer"):
        matcher(data, optimizer="lion").fit(data)


def test_stage_fields_batch_size_optimizer_schedule(data, tmp_path):
    stages = [
        Stage(epochs=1, batch_size=6, optimizer="adam", name="a"),
        Stage(
            epochs=2,
            batch_size=12,
            optimizer=("sgd", {"momentum": 0.9}),
            lr=0.2,
            lr_scheduler="constant",
            lr_factors={"text": 0.5},
            name="b",
        ),
    ]
    m = matcher(data, tmp_path, stages=stages, warmup=0).fit(data)
    assert [h["step"] for h in m.history_] == [4, 6, 8]  # 4 batches of 6, then 2 of 12 per epoch
    opt = last_optimizer(tmp_path)
    assert all("momentum_buffer" in s for s in opt["state"].values())
    assert {g["name"]: g["lr"] for g in opt["param_groups"]} == pytest.approx(
        {"default": 0.2, "text": 0.1}
    )


def test_stage_batch_size_with_a_dataloader_is_refused(data):
    from torch.utils.data import DataLoader

    from imtm.data import collate

    with pytest.raises(ValueError, match="DataLoader"):
        matcher(data, stages=[Stage(epochs=1, batch_size=4)]).fit(
            DataLoader(data, batch_size=6, collate_fn=collate)
        )


def test_a_torch_scheduler_factory_is_stepped_per_step(data, tmp_path):
    factory = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.5)
    m = matcher(data, tmp_path, lr=0.1, lr_scheduler=factory).fit(data)
    assert m.get_config()["params"]["lr_scheduler"] == "torch.optim.lr_scheduler.StepLR"
    assert last_optimizer(tmp_path)["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.5 ** (8 // 3))
    # a configuration records the factory by name: it must be given again
    again = Matcher.from_config(m.get_config())
    with pytest.raises(ValueError, match="factory"):
        again.fit(data)


# ---------------------------------------------------------------- clone, serialise, resume
def test_new_options_clone_and_round_trip_through_the_configuration(data):
    stages = [
        Stage(
            epochs=1,
            optimizer=("sgd", {"momentum": 0.9}),
            lr_scheduler="x0.9 every epoch",
            batch_size=4,
            lr_factors={"image": 0.5},
        )
    ]
    m = matcher(
        data,
        optimizer=torch.optim.Adam,
        lr_scheduler={"name": "cosine_restarts", "period": 2},
        lr_factors={"image": 0.1},
        stages=stages,
    )
    c = clone(m)
    assert (
        c.optimizer is torch.optim.Adam
        and c.lr_factors == {"image": 0.1}
        and c.stages[0].batch_size == 4
    )
    back = Matcher.from_config(m.get_config())
    assert back.optimizer == "torch.optim.Adam" and back.lr_scheduler == m.lr_scheduler
    assert back.lr_factors == m.lr_factors
    assert back.stages[0].to_dict() == stages[0].to_dict()
    assert back.get_config() == m.get_config()


class Crash(ImageCaptionDataset):
    """The toy data, raising after ``crash_after`` items."""

    def __init__(self, base, crash_after=None):
        super().__init__(
            base.images, base.captions, base.caption_to_image, vocab=base.vocab, name="toy"
        )
        self.crash_after, self.seen = crash_after, 0

    def __getitem__(self, k):
        self.seen += 1
        if self.crash_after is not None and self.seen > self.crash_after:
            raise RuntimeError("simulated crash")
        return super().__getitem__(k)


RESUME_OPTIONS = {
    "sgd-step-factors": dict(
        optimizer=("sgd", {"momentum": 0.9}),
        lr_scheduler="x0.7 every epoch",
        lr_factors={"image": 0.3},
    ),
    "adam-restarts": dict(optimizer="adam", lr_scheduler={"name": "cosine_restarts", "period": 1}),
    "stages": dict(
        stages=[
            Stage(epochs=1, batch_size=4, optimizer="adam"),
            Stage(epochs=2, batch_size=6, lr_scheduler="constant", lr_factors={"text": 0.0}),
        ]
    ),
}


@pytest.mark.parametrize("case", sorted(RESUME_OPTIONS))
def test_every_new_option_resumes_bit_exactly_after_a_crash(data, tmp_path, case):
    kw = RESUME_OPTIONS[case]
    reference = weights(matcher(data, **kw).fit(Crash(data)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        matcher(data, tmp_path, checkpoint_every=1, **kw).fit(Crash(data, crash_after=33))
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and int(ckpt.name.split("-")[1]) >= 5  # past the first epoch, mid-run
    resumed = matcher(data, tmp_path, checkpoint_every=1, **kw).fit(Crash(data), resume=True)
    assert_same(reference, weights(resumed))


# ---------------------------------------------------------------- warm start and init_from
def test_warm_start_continues_from_the_fitted_blocks(data):
    m = matcher(data, epochs=1).fit(data)
    first = weights(m)
    m.set_params(epochs=0).fit(data, warm_start=True)
    assert_same(first, weights(m))  # nothing trained: the fitted weights, not fresh ones
    m.set_params(epochs=1).fit(data, warm_start=True)
    assert len(m.history_) == 2 and m.n_epochs_ == 2
    # the same as a fresh Matcher that starts from the first fit's weights (same seed, order, optimizer)
    twin = matcher(data, epochs=1, init_from=matcher(data, epochs=1).fit(data)).fit(data)
    assert_same(weights(twin), weights(m))
    cold = matcher(data, epochs=1).fit(data)
    assert_same(first, weights(cold))  # without warm_start: afresh


def test_warm_start_refuses_weights_that_no_longer_fit(data):
    m = matcher(data, epochs=1).fit(data)
    m.set_params(image__out_dim=4, text__out_dim=4)
    with pytest.raises(ValueError, match="warm_start"):
        m.fit(data, warm_start=True)


def test_init_from_copies_only_the_named_blocks(data, tmp_path):
    source = matcher(data, epochs=1, random_state=1).fit(data)
    fresh = matcher(data, epochs=0).fit(data)
    m = matcher(data, epochs=0, init_from=source, init_blocks=["image"]).fit(data)
    assert_same(weights(source, "image."), weights(m, "image."))
    assert_same(weights(fresh, "text."), weights(m, "text."))
    # from a saved folder and from a run folder (its newest checkpoint) alike
    source.save(tmp_path / "saved")
    from_folder = matcher(data, epochs=0, init_from=tmp_path / "saved", init_blocks=["image"]).fit(
        data
    )
    assert_same(weights(m), weights(from_folder))
    matcher(data, tmp_path / "run", epochs=1, random_state=1).fit(data)
    from_run = matcher(data, epochs=0, init_from=str(tmp_path / "run"), init_blocks=["image"]).fit(
        data
    )
    assert_same(weights(m), weights(from_run))


def test_init_from_errors_name_the_fix(data):
    with pytest.raises(ValueError, match="init_from is None"):
        matcher(data, init_blocks=["image"]).fit(data)
    with pytest.raises(ValueError, match="imag"):
        matcher(data, init_from=matcher(data), init_blocks=["imag"]).fit(data)
    with pytest.raises(ValueError, match="not fitted"):
        matcher(data, epochs=0, init_from=matcher(data)).fit(data)


def test_clone_keeps_a_fitted_init_from(data):
    source = matcher(data, epochs=1).fit(data)
    m = matcher(data, init_from=source, init_blocks=["image"])
    assert clone(m).init_from is source


def decoded_params(m, **kw):
    return {k: decode_value(v) for k, v in m.get_config(**kw)["params"].items()}


def test_a_matcher_given_as_init_from_is_recorded_truthfully_through_save_load_and_clone(
    data, tmp_path
):
    """Not as None: the configuration describes the source Matcher (JSON, never a pickle), the
    record keeps the sha256 of the weights copied; a loaded model cannot apply it again silently."""
    source = matcher(data, epochs=1, random_state=1).fit(data)
    m = matcher(data, epochs=1, init_from=source, init_blocks=["image"]).fit(data)
    described = {"matcher": {"config_hash": source.config_hash(), "n_epochs": 1}}
    for portable in (False, True):
        params = decoded_params(m, portable=portable)
        assert params["init_from"] == described and params["init_blocks"] == ["image"]
    copied = state_digest(weights(source, "image."))
    assert copied != state_digest(weights(source))  # only the named block's weights
    assert m.record_["init_from"] == {
        "source": described,
        "blocks": ["image"],
        "weights_sha256": copied,
    }
    m.save(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert "__object__" not in json.dumps(config["params"])  # plain JSON values
    loaded = Matcher.load(tmp_path / "model")
    assert loaded.init_from == described and loaded.init_blocks == ["image"]
    assert loaded.record_["init_from"]["weights_sha256"] == copied
    twin = clone(loaded)
    assert twin.init_from == described and twin.init_from is not loaded.init_from
    assert decoded_params(twin)["init_from"] == described  # saved again: the same description
    with pytest.raises(ValueError, match="cannot be applied again"):
        twin.fit(data)
    assert_same(
        weights(twin.set_params(init_from=None, init_blocks=None).fit(data)),
        weights(matcher(data, epochs=1).fit(data)),
    )


def test_a_folder_given_as_init_from_is_saved_by_its_name(data, tmp_path):
    source = matcher(data, epochs=1, random_state=1).fit(data)
    source.save(tmp_path / "pretrained")
    m = matcher(data, epochs=1, init_from=tmp_path / "pretrained").fit(data)
    assert decoded_params(m)["init_from"] == str(tmp_path / "pretrained")  # live: the path
    assert decoded_params(m, portable=True)["init_from"] == {"folder": "pretrained"}
    assert m.record_["init_from"]["source"] == {"folder": "pretrained"}
    assert m.record_["init_from"]["weights_sha256"] == state_digest(weights(source))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no absolute path in the saved folder
        m.save(tmp_path / "model")
    assert Matcher.load(tmp_path / "model").init_from == {"folder": "pretrained"}


@pytest.mark.parametrize("bad", [{"matcher": "x"}, {"folder": 3}, {"path": "a"}, {}])
def test_init_from_refuses_a_dict_that_is_not_a_record(data, bad):
    with pytest.raises(TypeError, match="init_from must be"):
        matcher(data, init_from=bad).fit(data)


# ---------------------------------------------------------------- position tables
def test_interpolate_pos_embed_matches_a_plain_resize_and_keeps_the_prefix():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 1 + 16, 5, generator=g)
    out = interpolate_pos_embed(pos, 1 + 36)
    assert out.shape == (1, 37, 5)
    torch.testing.assert_close(out[:, :1], pos[:, :1])
    # plain: each channel as a 4x4 image resized to 6x6
    for c in range(5):
        img = pos[0, 1:, c].reshape(1, 1, 4, 4)
        want = torch.nn.functional.interpolate(
            img, size=(6, 6), mode="bicubic", align_corners=False
        ).flatten()
        torch.testing.assert_close(out[0, 1:, c], want)
    torch.testing.assert_close(interpolate_pos_embed(pos, 17), pos)  # same size: unchanged
    assert interpolate_pos_embed(pos[0], 37).shape == (37, 5)
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.zeros(1, 7, 2), 11)


def test_init_state_refuses_shapes_other_than_position_tables():
    a = torch.nn.ModuleDict({"x": torch.nn.Linear(3, 2)})
    with pytest.raises(ValueError, match="only position tables"):
        init_state(a, {"x.weight": torch.zeros(2, 4), "x.bias": torch.zeros(2)}, None)
    with pytest.raises(ValueError, match="no block"):
        init_state(a, {"x.weight": torch.zeros(2, 3), "x.bias": torch.zeros(2)}, ["y"])


def test_pretrain_then_finetune_at_another_resolution_on_other_data():
    """ELA's chain: pre-train a ViT at one image size, fine-tune its image block at another on other data."""
    from imtm.components import GlobalCosine, GRUTextEncoder, InfoNCELoss, TimmVisionEncoder
    from imtm.data import synthetic

    def vit(size):
        return TimmVisionEncoder(
            "vit_tiny_patch16_224",
            img_size=size,
            out_dim=16,
            model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 8},
        )

    pre, _, _ = synthetic.load(view="pixels", seed=0, n_train=16, n_dev=4, n_test=4, image_size=32)
    fine, _, test = synthetic.load(
        view="pixels", seed=1, n_train=16, n_dev=4, n_test=4, image_size=48
    )
    kw = dict(epochs=1, batch_size=16, lr=1e-3, device="cpu", verbose=False)
    pretrained = Matcher(
        [
            ("image", vit(32)),
            ("text", GRUTextEncoder(vocab=pre.vocab, out_dim=16)),
            GlobalCosine(),
            InfoNCELoss(),
        ],
        **kw,
    ).fit(pre)
    tuned = Matcher(
        [
            ("image", vit(48)),
            ("text", GRUTextEncoder(vocab=fine.vocab, out_dim=16)),
            GlobalCosine(),
            InfoNCELoss(),
        ],
        init_from=pretrained,
        init_blocks=["image"],
        epochs=0,
        **{k: v for k, v in kw.items() if k != "epochs"},
    ).fit(fine)
    key = next(k for k in weights(tuned) if k.endswith("pos_embed"))
    src = weights(pretrained)[key]
    assert src.shape[1] == 1 + 16 and weights(tuned)[key].shape[1] == 1 + 36
    torch.testing.assert_close(weights(tuned)[key], interpolate_pos_embed(src, 37))
    other = next(k for k in weights(tuned) if k.startswith("image.") and "qkv.weight" in k)
    torch.testing.assert_close(weights(tuned)[other], weights(pretrained)[other])
    tuned.set_params(epochs=1).fit(fine, warm_start=True)
    assert torch.isfinite(tuned.similarity(test.images, test.captions)).all()


def test_keep_best_skips_epochs_before_a_later_stage_first_trains_a_block(data):
    # Stage "b" trains the image block for the first time, at a learning rate too small to move
    # the ranking: its epoch is still the only candidate (an equal rSum earlier would otherwise
    # be kept), since stage "a" ends with the image block at its initial weights. When both
    # stages train every block, stage "a" stays a candidate: with the same unmoving stage "b",
    # its equal (or better) rSum is kept.
    staged = [Stage(epochs=2, train=["text"], name="a"), Stage(epochs=1, lr=1e-9, name="b")]
    m = matcher(data, stages=staged).fit(data, eval_set=data)
    assert (m.best_["stage"], m.best_["epoch"]) == (1, 1)
    assert m.history_[-1]["eval"]["rsum"] == m.best_["rsum"]
    both = [Stage(epochs=2, name="a"), Stage(epochs=1, lr=1e-9, name="b")]
    m = matcher(data, stages=both).fit(data, eval_set=data)
    assert m.best_["stage"] == 0
    assert m.best_["rsum"] >= m.history_[-1]["eval"]["rsum"]
