"""The training loop's callbacks: every event in order, stopping, the CSV step log, early stopping, loggers."""

import ast
import math
from pathlib import Path

import pytest
import torch
from toy import ToyCosine, ToyHinge, ToyImage, ToyText, toy_data

from imtm import Matcher, Stage
from imtm.data import ImageCaptionDataset
from imtm.engine.callbacks import Callback, CSVLogger, EarlyStopping, read_log
from imtm.engine.checkpoint import latest_checkpoint


@pytest.fixture(scope="module")
def data():
    return toy_data(n_images=12)  # 24 captions: 4 batches of 6


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
    blocks = [
        ("image", ToyImage()),
        ("text", ToyText(vocab=data.vocab)),
        ("score", ToyCosine()),
        ("loss", ToyHinge()),
    ]
    return Matcher(blocks, checkpoint_dir=None if run is None else str(run), **kw)


class Recorder(Callback):
    def __init__(self, stop_at=None, stop_on=None):
        self.events, self.stop_at, self.stop_on, self.logs = [], stop_at, stop_on, []

    def on_fit_start(self, trainer):
        self.events.append(("fit_start",))

    def on_epoch_start(self, trainer, info):
        self.events.append(("epoch_start", info["stage"], info["epoch"]))

    def on_batch_end(self, trainer, logs):
        self.events.append(("batch", logs["stage"], logs["epoch"], logs["batch"]))
        self.logs.append(logs)
        if self.stop_at is not None and logs["step"] == self.stop_at:
            trainer.should_stop = True

    def on_eval(self, trainer, metrics):
        self.events.append(("eval", trainer.stage_idx, trainer.epoch + 1))
        assert "rsum" in metrics

    def on_epoch_end(self, trainer, entry):
        self.events.append(("epoch_end", entry["stage"], entry["epoch"]))
        if self.stop_on is not None and (entry["stage"], entry["epoch"]) == self.stop_on:
            trainer.should_stop = True

    def on_fit_end(self, trainer):
        self.events.append(("fit_end",))


def expected_events(stages_epochs, n_batches, evaluate):
    out = [("fit_start",)]
    for s, epochs in enumerate(stages_epochs):
        for e in range(1, epochs + 1):
            out.append(("epoch_start", s, e))
            out += [("batch", s, e, b) for b in range(n_batches)]
            if evaluate:
                out.append(("eval", s, e))
            out.append(("epoch_end", s, e))
    return out + [("fit_end",)]


def test_callbacks_see_every_event_in_order(data):
    rec = Recorder()
    stages = [Stage(epochs=1, name="a"), Stage(epochs=2, name="b")]
    matcher(data, stages=stages).fit(data, data, callbacks=[rec])
    assert rec.events == expected_events([1, 2], 4, evaluate=True)
    rec2 = Recorder()
    matcher(data).fit(data, callbacks=[rec2])
    assert rec2.events == expected_events([2], 4, evaluate=False)


def test_step_logs_hold_losses_lrs_grad_norm_and_speed(data):
    rec = Recorder()
    matcher(data, lr_factors={"image": 0.5}, lr_scheduler="constant", warmup=0, grad_clip=None).fit(
        data, callbacks=[rec]
    )
    first = rec.logs[0]
    assert [r["step"] for r in rec.logs] == list(range(1, 9))
    assert first["lr/default"] == pytest.approx(5e-2) and first["lr/image"] == pytest.approx(2.5e-2)
    assert math.isfinite(first["loss/loss"]) and first["grad_norm"] > 0 and first["samples"] == 6
    assert first["samples_per_s"] > 0 and first["time_s"] > 0 and first["skipped"] is False


def test_a_callback_stops_training_mid_epoch(data):
    rec = Recorder(stop_at=3)
    m = matcher(data, epochs=5).fit(data, callbacks=[rec])
    assert [r["step"] for r in rec.logs] == [1, 2, 3]
    assert len(m.history_) == 1 and m.history_[0]["stopped"] is True and m.history_[0]["step"] == 3
    assert rec.events[-2:] == [("epoch_end", 0, 1), ("fit_end",)]


def test_a_callback_stops_training_at_an_epoch_end(data):
    rec = Recorder(stop_on=(0, 2))
    m = matcher(data, stages=[Stage(epochs=3), Stage(epochs=2)]).fit(data, callbacks=[rec])
    assert [(h["stage"], h["epoch"]) for h in m.history_] == [(0, 1), (0, 2)]
    assert "stopped" not in m.history_[-1]


def test_bad_callbacks_are_refused(data):
    with pytest.raises(TypeError, match="Callback"):
        matcher(data).fit(data, callbacks=[print])
    with pytest.raises(ValueError, match="loggers"):
        matcher(data, loggers=["csvv"]).fit(data)


# ---------------------------------------------------------------- CSV
def test_the_csv_log_has_a_row_per_step_and_per_epoch(data, tmp_path):
    m = matcher(data, tmp_path, epochs=3, lr_scheduler="x0.5 every epoch", warmup=0).fit(data, data)
    rows = read_log(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["lr/default"] for r in rows] == pytest.approx(
        [5e-2] * 4 + [2.5e-2] * 4 + [1.25e-2] * 4
    )
    assert all(
        r["loss/loss"] is not None and r["grad_norm"] > 0 and r["skipped"] == 0 for r in rows
    )
    # the epoch means of the step log are the history's losses
    for e, h in enumerate(m.history_):
        mean = sum(r["loss/loss"] for r in rows[4 * e : 4 * e + 4]) / 4
        assert mean == pytest.approx(h["loss/loss"])
    epochs = read_log(tmp_path / "epochs.csv")
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and epochs[0]["eval/rsum"] == pytest.approx(
        m.history_[0]["eval"]["rsum"]
    )


class Crash(ImageCaptionDataset):
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


def test_the_csv_log_keeps_one_row_per_step_after_a_resume(data, tmp_path):
    reference = read_log(matcher(data, tmp_path / "ref", epochs=3).fit(data) and tmp_path / "ref")
    with pytest.raises(RuntimeError):
        matcher(data, tmp_path / "run", epochs=3, checkpoint_every=3).fit(
            Crash(data, crash_after=40)
        )
    done = read_log(tmp_path / "run")
    assert (
        len(done) == 6
    )  # steps 1..6 ran; the checkpoint holds step 6 (an epoch end is step 4, then every 3)
    matcher(data, tmp_path / "run", epochs=3, checkpoint_every=3).fit(Crash(data), resume=True)
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["loss/loss"] for r in rows] == [r["loss/loss"] for r in reference]


def test_a_csv_file_imtm_did_not_write_is_left_alone(data, tmp_path):
    (tmp_path / "steps.csv").write_text("mine\n1\n")
    with pytest.warns(RuntimeWarning, match="not written by imtm"):
        matcher(data, tmp_path).fit(data)
    assert (tmp_path / "steps.csv").read_text() == "mine\n1\n"


def test_csv_logger_to_a_folder_of_its_own_without_a_run_folder(data, tmp_path):
    matcher(data, loggers=()).fit(data, callbacks=[CSVLogger(tmp_path / "logs")])
    assert len(read_log(tmp_path / "logs")) == 8


# ---------------------------------------------------------------- early stopping
def test_early_stopping_stops_after_patience_evaluations_without_improvement(data):
    stop = EarlyStopping("rsum", patience=2, min_delta=1e9)  # nothing counts as an improvement
    m = matcher(data, epochs=10).fit(data, data, callbacks=[stop])
    assert len(m.history_) == 3 and stop.wait == 2 and stop.stopped_epoch == 3
    with pytest.raises(ValueError, match="eval_set"):
        matcher(data).fit(data, callbacks=[EarlyStopping()])
    with pytest.raises(KeyError, match="rsumm"):
        matcher(data).fit(data, data, callbacks=[EarlyStopping("rsumm")])


def test_early_stopping_resumes_bit_exactly(data, tmp_path):
    def fit(folder, train, **kw):
        stop = EarlyStopping("rsum", patience=3, min_delta=1e9)  # stops after the 4th evaluation
        return matcher(data, folder, epochs=8, checkpoint_every=3).fit(
            train, data, callbacks=[stop], **kw
        )

    ref = fit(None, data)
    assert len(ref.history_) == 4
    with pytest.raises(RuntimeError):
        fit(
            tmp_path, Crash(data, crash_after=60)
        )  # mid third epoch: the callback's state is in the checkpoint
    assert latest_checkpoint(tmp_path) is not None
    resumed = fit(tmp_path, Crash(data), resume=True)
    assert len(resumed.history_) == 4
    for k, v in ref.components_.state_dict().items():
        assert torch.equal(v, resumed.components_.state_dict()[k]), k


# ---------------------------------------------------------------- optional loggers (offline only)
def test_tensorboard_logger_writes_events(data, tmp_path):
    pytest.importorskip("tensorboard")
    matcher(data, tmp_path, loggers=("tensorboard",)).fit(data, data)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_logger_offline(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from imtm.engine.callbacks import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    matcher(data, tmp_path, loggers=()).fit(
        data, callbacks=[WandbLogger(mode="offline", project="imtm-test")]
    )
    assert list(Path(tmp_path).rglob("*.wandb"))


# ---------------------------------------------------------------- layering
ENGINE = Path(__file__).resolve().parents[2] / "imtm" / "engine"


def imports(path: Path) -> list[tuple[str, list[str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_the_engine_imports_nothing_from_the_matcher_and_no_private_names():
    for path in sorted(ENGINE.glob("*.py")):
        for module, names in imports(path):
            assert module != "imtm.matcher", f"{path.name} imports imtm.matcher"
            if module.startswith("imtm"):
                package = ENGINE.parents[1].joinpath(*module.split("."))
                # an underscore module of the package (imtm._io) is internal by name, not a private name
                private = [
                    n
                    for n in names
                    if n.startswith("_")
                    and not n.startswith("__")
                    and not (package / f"{n}.py").is_file()
                    and not (package / n).is_dir()
                ]
                assert not private, f"{path.name} imports private names {private} from {module}"


def test_distributed_and_training_do_not_import_each_other():
    assert not any(m == "imtm.engine.training" for m, _ in imports(ENGINE / "distributed.py"))
    assert not any(m == "imtm.engine.evaluation" for m, _ in imports(ENGINE / "training.py"))
    import imtm.engine.evaluation as evaluation
    import imtm.engine.training as training
    from imtm.engine.blocks import run_blocks

    assert training.run_blocks is run_blocks and evaluation.run_blocks is run_blocks
