"""The trainer tells epoch-dependent blocks the epoch (start_epoch), in a resumed run too."""

import shutil

import torch

from imtm import Matcher, Stage
from imtm.components import GlobalCosine, GRUTextEncoder, PrecomputedEncoder, TripletLoss
from imtm.data import synthetic
from imtm.engine.epochs import start_epoch


class RecordingLoss(TripletLoss):
    """A TripletLoss that records every epoch it is told (a test double of an epoch-dependent block)."""

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        self.told = getattr(self, "told", []) + [epoch]


def blocks(train, warmup=1, loss_cls=TripletLoss):
    return [
        ("image", PrecomputedEncoder(in_dim=train.region_dim, out_dim=16)),
        ("text", GRUTextEncoder(vocab=train.vocab, out_dim=16, word_dim=8)),
        ("scorer", GlobalCosine()),
        ("loss", loss_cls(warmup_epochs=warmup)),
    ]


def test_start_epoch_reaches_nested_blocks_only_where_they_listen():
    inner = torch.nn.ModuleDict({"loss": TripletLoss(warmup_epochs=1)})
    outer = torch.nn.ModuleDict({"wrapper": inner, "linear": torch.nn.Linear(2, 2)})
    assert start_epoch(outer, 3) == ["wrapper.loss"]
    assert inner["loss"].epoch_ == 3


def test_fit_tells_each_stage_its_epochs():
    train, _, _ = synthetic.load(seed=0, n_train=12, n_dev=2, n_test=2)
    m = Matcher(
        blocks(train, loss_cls=RecordingLoss),
        epochs=3,
        batch_size=20,
        verbose=False,
        random_state=0,
        stages=[Stage(epochs=2, name="a"), Stage(epochs=2, name="b")],
    )
    m.fit(train)
    assert m.components_["loss"].told == [0, 1, 0, 1]


def test_the_warm_up_switch_matters_and_a_resumed_run_ends_where_the_uninterrupted_one_does(
    tmp_path,
):
    train, _, _ = synthetic.load(seed=0, n_train=24, n_dev=2, n_test=2)
    common = {"epochs": 3, "batch_size": 16, "lr": 5e-3, "verbose": False, "random_state": 0}
    full = Matcher(
        blocks(train), checkpoint_dir=tmp_path / "full", checkpoint_every=3, **common
    ).fit(train)
    summed = Matcher(blocks(train, warmup=3), **common).fit(train)
    # The switch to the hardest negative changes the weights (the hook is not a no-op).
    a, b = full.components_.state_dict(), summed.components_.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # Resume from a checkpoint written inside an epoch after the switch: the same final weights.
    ckpts = sorted(p.name for p in (tmp_path / "full").glob("ckpt-*"))
    steps_per_epoch = -(-len(train) // 16)
    steps = [int(c.split("-")[1]) for c in ckpts]
    mid = ckpts[max(k for k, n in enumerate(steps) if n > steps_per_epoch and n % steps_per_epoch)]
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    resumed = Matcher(
        blocks(train), checkpoint_dir=tmp_path / "resumed", checkpoint_every=3, **common
    )
    resumed.fit(train, resume=mid)
    for name, value in full.components_.state_dict().items():
        torch.testing.assert_close(
            resumed.components_.state_dict()[name], value, rtol=0, atol=0, msg=name
        )
