import json
import os

import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from torch.utils.data import DataLoader
from toy import Crashing, ToyCosine, ToyHinge, ToyImage, ToyText, toy_components, toy_data

from imtm import Matcher, Stage
from imtm.data import ImageCaptionDataset, collate
from imtm.engine.checkpoint import CheckpointError
from imtm.engine.graph import PipelineError
from imtm.engine.serialization import ConfigError


@pytest.fixture(scope="module")
def data():
    return toy_data()


def small(data, **kw):
    kw.setdefault("epochs", 2)
    kw.setdefault("batch_size", 6)
    kw.setdefault("verbose", False)
    return Matcher(toy_components(data.vocab), **kw)


# ---------------------------------------------------------------- construction and validation
def test_init_only_stores(data):
    m = Matcher(components="not a list", epochs=-3)
    assert m.components == "not a list" and m.epochs == -3
    with pytest.raises(TypeError, match="components must be a list"):
        m.validate()


def test_missing_requirement_names_block_position_and_providers(data):
    m = Matcher([ToyText(vocab=data.vocab), ToyCosine(), ToyImage(), ToyHinge()])
    with pytest.raises(
        PipelineError, match=r"'toycosine' \(position 1, ToyCosine\) requires 'image_tokens'"
    ) as e:
        m.validate()
    assert "'toyimage' (position 2)" in str(e.value)
    assert "ToyImage" in str(e.value)


def test_no_scorer_is_an_error(data):
    m = Matcher([ToyImage(), ToyText(vocab=data.vocab)])
    with pytest.raises(PipelineError, match="no block provides 'scores'"):
        m.validate()


@pytest.mark.parametrize("name", sorted(__import__("imtm.matcher").matcher.MATCHER_CONSTRAINTS))
def test_declared_matcher_constraints_refuse_what_they_exclude(data, name):
    # Read from MATCHER_CONSTRAINTS (imtm.contract's vocabulary): no hand-written table here.
    from imtm.contract import InvalidParameterError, refused_values
    from imtm.matcher import MATCHER_CONSTRAINTS

    small(data).validate()  # the defaults pass
    bad_values = refused_values(MATCHER_CONSTRAINTS[name])
    assert bad_values, f"{name}: no value to refuse"
    for bad in bad_values:
        with pytest.raises(InvalidParameterError, match=rf"Matcher: {name} must be .*, got "):
            small(data, **{name: bad}).validate()


def test_bad_parameter_values(data):
    with pytest.raises(ValueError, match="precision must be one of.*Did you mean 'bf16'"):
        small(data, precision="bf61").validate()
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        small(data, batch_size=0).validate()
    with pytest.raises(ValueError, match="names block 'toyimg'.*Did you mean 'toyimage'"):
        small(data, stages=[Stage(epochs=1, train=["toyimg"])]).validate()


def test_validate_checks_every_block_hyper_parameters(data):
    from imtm.components import HardAssignmentCoding

    m = Matcher(
        [ToyImage(), ToyText(vocab=data.vocab), HardAssignmentCoding(pooling="lsee"), ToyHinge()]
    )
    with pytest.raises(ValueError, match=r"block 'hardassignmentcoding'.*pooling must be one of"):
        m.validate()


def test_auto_names_follow_make_pipeline(data):
    m = Matcher([ToyImage(), ToyImage(), ("text", ToyText(vocab=data.vocab))])
    assert [n for n, _ in m.named_components] == ["toyimage-1", "toyimage-2", "text"]
    with pytest.raises(ValueError, match="must not contain '__'"):
        _ = Matcher([("a__b", ToyImage())]).named_components


# ---------------------------------------------------------------- scikit-learn protocol
def test_get_set_params_and_clone(data):
    m = small(data)
    p = m.get_params()
    assert p["toyhinge__margin"] == 0.2 and p["epochs"] == 2
    m.set_params(toyhinge__margin=0.1, epochs=3)
    assert m.named_components[3][1].margin == 0.1 and m.epochs == 3
    c = clone(m)
    assert c is not m and c.get_params()["toyhinge__margin"] == 0.1
    assert c.named_components[0][1] is not m.named_components[0][1]
    with pytest.raises(ValueError, match="Did you mean 'epochs'"):
        m.set_params(epoch=3)
    with pytest.raises(ValueError, match="no block named 'toyhing'.*Did you mean 'toyhinge'"):
        m.set_params(toyhing__margin=0.3)


def test_clone_of_fitted_is_unfitted(data):
    m = small(data, epochs=1).fit(data)
    assert hasattr(m, "components_")
    assert not hasattr(clone(m), "components_")


def test_not_fitted_error(data):
    with pytest.raises(NotFittedError, match="call fit"):
        small(data).similarity(data.images, data.captions)


def test_fit_leaves_unfitted_blocks_untouched(data):
    m = small(data, epochs=1)
    before = {k: v.clone() for k, v in m.named_components[0][1].state_dict().items()}
    m.fit(data)
    after = m.named_components[0][1].state_dict()
    for k in before:
        torch.testing.assert_close(before[k], after[k])
    assert m.n_epochs_ == 1 and len(m.history_) == 1 and "loss/toyhinge" in m.history_[0]


# ---------------------------------------------------------------- evaluation
def test_similarity_blocked_equals_unblocked(data):
    m = small(data).fit(data)
    full = m.similarity(data.images, data.captions)
    m.set_params(image_block=5, text_block=7, eval_batch_size=3)
    torch.testing.assert_close(m.similarity(data.images, data.captions), full, rtol=1e-6, atol=1e-6)
    # the same as a training-style forward over all pairs at once
    plan = m.plan_
    vals = {
        "images": collate([{"images": x, "texts": "a", "image_ids": 0} for x in data.images])[
            "images"
        ],
        "texts": data.captions,
    }
    from imtm.engine.evaluation import run_blocks

    with torch.no_grad():
        run_blocks(plan, [0, 1, 2], vals)
    torch.testing.assert_close(vals["scores"], full, rtol=1e-6, atol=1e-6)


def test_evaluate_and_score(data):
    m = small(data).fit(data)
    res = m.evaluate(data)
    assert {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"} <= set(res)
    assert m.score(data) == pytest.approx(res["rsum"])
    with pytest.raises(TypeError, match="has no 'images'"):
        m.evaluate([1, 2, 3])


def test_fit_accepts_a_dataloader(data):
    loader = DataLoader(data, batch_size=8, shuffle=False, collate_fn=collate)
    m = small(data, epochs=1).fit(loader, eval_set=data)
    assert "eval" in m.history_[0]


def test_bf16_autocast_runs(data):
    m = small(data, epochs=1, precision="bf16").fit(data)
    s = m.similarity(data.images, data.captions)
    assert s.dtype == torch.float32 and bool(torch.isfinite(s).all())


# ---------------------------------------------------------------- bad input
def test_empty_dataset(data):
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 2))
    with pytest.raises(ValueError, match="training dataset is empty"):
        small(data).fit(empty)


def test_train_must_be_a_dataset(data):
    with pytest.raises(TypeError, match="train must be a torch Dataset or DataLoader"):
        small(data).fit(42)


def test_mismatched_image_ids(data):
    def bad_collate(items):
        b = collate(items)
        b["image_ids"] = b["image_ids"][:-1]
        return b

    loader = DataLoader(data, batch_size=4, collate_fn=bad_collate)
    with pytest.raises(ValueError, match="image_ids has 3 entries but the batch holds 4 captions"):
        small(data).fit(loader)


def test_nan_in_batch_features_is_reported_as_input_not_blamed_on_a_block(data):
    images = [x.clone() for x in data.images]
    images[0][0, 0] = float("nan")
    bad = ImageCaptionDataset(images, data.captions, data.caption_to_image, vocab=data.vocab)
    loader = DataLoader(bad, batch_size=4, collate_fn=collate)
    # The toy blocks do not check their inputs: the NaN reaches the loss and is traced back to the batch.
    for policy in ("raise", "skip"):
        with pytest.raises(
            ValueError, match=r"the batch's input 'images' holds NaN/inf at step 0 \(stage 1"
        ):
            small(data, on_nonfinite=policy).fit(loader)


# ---------------------------------------------------------------- stages
def test_stage_freezes_blocks(data):
    m = small(data, stages=[Stage(epochs=1, train=["toytext"])])
    m.fit(data)
    fresh = small(data)
    fresh._build(0)
    torch.testing.assert_close(
        m.components_["toyimage"].proj.weight, fresh.components_["toyimage"].proj.weight
    )
    assert not torch.equal(
        m.components_["toytext"].emb.weight, fresh.components_["toytext"].emb.weight
    )


# ---------------------------------------------------------------- persistence
def test_save_load_identical_similarities(data, tmp_path):
    m = small(data).fit(data)
    m.save(tmp_path / "model")
    files = sorted(os.listdir(tmp_path / "model"))
    assert files == [
        "MANIFEST.json",
        "README.md",
        "config.json",
        "model.safetensors",
        "record.json",
    ]
    loaded = Matcher.load(tmp_path / "model")
    torch.testing.assert_close(
        loaded.similarity(data.images, data.captions),
        m.similarity(data.images, data.captions),
        rtol=0,
        atol=0,
    )
    assert loaded.get_params()["toyhinge__margin"] == 0.2
    rec = json.loads((tmp_path / "model" / "record.json").read_text())
    assert {"seed", "versions", "data_fingerprint", "evaluation_protocol", "params"} <= set(rec)
    assert rec["params"]["lr"] == m.lr and rec["versions"]["torch"] == torch.__version__


def test_altered_checkpoint_is_refused(data, tmp_path):
    m = small(data, epochs=1).fit(data)
    m.save(tmp_path / "model")
    with open(tmp_path / "model" / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        Matcher.load(tmp_path / "model")


def test_unregistered_block_is_refused(data, tmp_path):
    m = small(data, epochs=1).fit(data)
    m.save(tmp_path / "model")
    cfg_path = tmp_path / "model" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["components"][0]["block"]["__component__"] = "os.system"
    cfg_path.write_text(json.dumps(cfg))
    manifest = json.loads((tmp_path / "model" / "MANIFEST.json").read_text())
    from imtm.engine.serialization import file_sha256

    manifest["sha256"]["config.json"] = file_sha256(cfg_path)
    (tmp_path / "model" / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="unknown block 'os.system'"):
        Matcher.load(tmp_path / "model")


def test_weights_of_another_configuration(data, tmp_path):
    m = small(data, epochs=1).fit(data)
    other = Matcher(
        [ToyImage(out_dim=4), ToyText(vocab=data.vocab, out_dim=4), ToyCosine(), ToyHinge()],
        epochs=1,
        verbose=False,
    ).fit(data)
    with pytest.raises(CheckpointError, match="another configuration.*shape mismatch"):
        m.load_state(other.components_.state_dict())


# ---------------------------------------------------------------- resume
@pytest.mark.parametrize("limit", [13, 37, 50])
def test_resume_gives_the_same_weights(data, tmp_path, limit):
    kw = dict(epochs=3, batch_size=5, checkpoint_every=2)
    full = small(data, checkpoint_dir=tmp_path / "a", **kw).fit(data, eval_set=data)
    with pytest.raises(RuntimeError, match="simulated crash"):
        small(data, checkpoint_dir=tmp_path / "b", **kw).fit(Crashing(data, limit), eval_set=data)
    resumed = small(data, checkpoint_dir=tmp_path / "b", **kw).fit(data, eval_set=data, resume=True)
    a, b = full.components_.state_dict(), resumed.components_.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert [h["loss/toyhinge"] for h in full.history_] == [
        h["loss/toyhinge"] for h in resumed.history_
    ]


def test_resume_from_another_configuration_is_refused(data, tmp_path):
    small(data, epochs=1, checkpoint_dir=tmp_path).fit(data)
    with pytest.raises(CheckpointError, match="another configuration"):
        small(data, epochs=1, checkpoint_dir=tmp_path, lr=1e-3).fit(data, resume=True)


def test_resume_without_checkpoint_starts_afresh(data, tmp_path):
    m = small(data, epochs=1, checkpoint_dir=tmp_path / "new").fit(data, resume=True)
    assert m.n_epochs_ == 1


def test_interrupt_keeps_a_checkpoint(data, tmp_path):
    class Interrupting(Crashing):
        def __getitem__(self, k):
            self.seen += 1
            if self.seen > self.limit:
                raise KeyboardInterrupt
            return ImageCaptionDataset.__getitem__(self, k)

    with pytest.raises(KeyboardInterrupt):
        small(data, checkpoint_dir=tmp_path).fit(Interrupting(data, 20))
    latest = (tmp_path / "LATEST").read_text()
    state = json.loads((tmp_path / latest / "state.json").read_text())
    assert state["__dict__"]["position"]["__dict__"]["batch"] == 3
