"""Loading untrusted folders and configurations never runs code.

Every attack below carries a canary: a payload that, if executed (unpickled, imported,
eval'd), writes a file. Each test asserts the load is refused with the documented
error and that the canary file was never created.
"""

import io
import json
import pickle
import re
import shutil
import struct
import sys

import pytest
import torch
from toy import toy_components, toy_data

import imtm.components  # noqa: F401  (registers every built-in block)
from imtm import Matcher
from imtm.component import COMPONENT_REGISTRY, Component, Loss
from imtm.engine.checkpoint import CheckpointError, latest_checkpoint
from imtm.engine.serialization import MAX_JSON_DEPTH, ConfigError, encode_value, file_sha256


# ---------------------------------------------------------------- the canary
class Payload:
    """Pickles to ``exec("open(canary, 'w').write('ran')")``: unpickling it writes the canary."""

    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return (exec, (f"open({self.canary!r}, 'w').write('ran')",))


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "canary"
    yield path
    assert not path.exists(), "the payload ran"


def test_the_canary_payload_runs_when_unpickled(tmp_path):
    """The payload is live: plain unpickling runs it (so the other tests' 'not created' means something)."""
    path = tmp_path / "canary"
    pickle.loads(pickle.dumps(Payload(path)))
    assert path.read_text() == "ran"


def write_pickle(path, canary, torch_format=False):
    if torch_format:
        torch.save({"weight": Payload(canary)}, path)
    else:
        path.write_bytes(
            pickle.dumps({"weight": Payload(canary)}, protocol=2)
        )  # torch.load's own protocol


# ---------------------------------------------------------------- a saved model to tamper with
@pytest.fixture(scope="module")
def data():
    return toy_data(n_images=12)


def toy_matcher(data, **kw):
    return Matcher(toy_components(data.vocab), epochs=1, batch_size=6, verbose=False, **kw)


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    m = toy_matcher(data, checkpoint_dir=str(root / "run")).fit(data)
    m.save(root / "model")
    return root, m


@pytest.fixture
def model(saved, tmp_path):
    """A fresh copy of a folder written by Matcher.save."""
    folder = tmp_path / "model"
    shutil.copytree(saved[0] / "model", folder)
    return folder


def refresh_manifest(folder, replace=None):
    """Rewrite MANIFEST.json so every listed file's checksum matches (an attacker can always do this)."""
    path = folder / "MANIFEST.json"
    names = list(json.loads(path.read_text())["sha256"])
    if replace:
        names = [replace.get(n, n) for n in names]
    path.write_text(json.dumps({"sha256": {n: file_sha256(folder / n) for n in names}}))


def edit_config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    refresh_manifest(folder)


def test_an_untampered_folder_loads(model, saved, data):
    m = Matcher.load(model)
    torch.testing.assert_close(
        m.similarity(data.images, data.captions), saved[1].similarity(data.images, data.captions)
    )


# ---------------------------------------------------------------- pickles where weights belong
@pytest.mark.parametrize("torch_format", [False, True], ids=["pickle", "torch.save"])
def test_pickle_saved_as_model_safetensors_is_refused(model, canary, torch_format):
    write_pickle(model / "model.safetensors", canary, torch_format)
    refresh_manifest(model)
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        Matcher.load(model)


@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin"])
def test_pickle_weights_under_torch_names_are_never_read(model, canary, name):
    """In place of model.safetensors (manifest rewritten to list it): refused, not unpickled."""
    (model / "model.safetensors").unlink()
    write_pickle(model / name, canary, torch_format=True)
    refresh_manifest(model, replace={"model.safetensors": name})
    # Refused for listing a file imtm never writes, or for the missing model.safetensors.
    with pytest.raises(CheckpointError, match=rf"model\.safetensors|{re.escape(name)}"):
        Matcher.load(model)


@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin"])
def test_pickle_weights_beside_a_valid_model_are_never_read(model, saved, data, canary, name):
    """Beside model.safetensors: either refused as a file imtm never writes, or ignored; never unpickled."""
    write_pickle(model / name, canary, torch_format=True)
    try:
        m = Matcher.load(model)
    except CheckpointError as err:
        assert name in str(err)
    else:
        torch.testing.assert_close(
            m.similarity(data.images, data.captions),
            saved[1].similarity(data.images, data.captions),
        )


def test_pickle_saved_as_optimizer_state_is_refused_on_resume(saved, data, tmp_path, canary):
    run = tmp_path / "run"
    shutil.copytree(saved[0] / "run", run)
    folder = latest_checkpoint(run)
    write_pickle(folder / "optimizer.safetensors", canary, torch_format=True)
    refresh_manifest(folder)
    with pytest.raises(
        CheckpointError, match="optimizer.safetensors: not a readable safetensors file"
    ):
        toy_matcher(data, checkpoint_dir=str(run)).fit(data, resume=True)


def header_file(path, header: bytes, length=None, body=b""):
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + body)


@pytest.mark.parametrize(
    "case", ["huge length", "not json", "offsets past the end", "truncated", "empty"]
)
def test_malformed_safetensors_header_is_refused(model, case):
    path = model / "model.safetensors"
    if case == "huge length":
        header_file(path, b"{}", length=1 << 62)
    elif case == "not json":
        header_file(path, b"{not json" + b" " * 7)
    elif case == "offsets past the end":
        header = json.dumps(
            {
                "image.proj.weight": {
                    "dtype": "F32",
                    "shape": [1 << 20, 1 << 20],
                    "data_offsets": [0, 1 << 42],
                }
            }
        ).encode()
        header_file(path, header + b" " * (-len(header) % 8), body=b"\0" * 16)
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:11])
    else:
        path.write_bytes(b"")
    refresh_manifest(model)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Matcher.load(model)


# ---------------------------------------------------------------- configurations naming code
def set_first_block(name, params=None):
    def edit(cfg):
        cfg["components"][0]["block"] = {"__component__": name, "params": params or {}}

    return edit


@pytest.mark.parametrize(
    "name",
    [
        "os.system",
        "builtins.eval",
        "subprocess.Popen",
        "torch.nn.Linear",
        "imtm.components.pooling.MaxPooling",
        "NoSuchBlock",
        "Component",
        "Loss",
        "LinkedComponent",
        "_Pooling",
        "TiedEmbedding",
    ],
)
def test_config_naming_code_or_an_unregistered_block_is_refused(model, canary, name):
    params = {
        "command": f"touch {canary}",
        "args": [f"touch {canary}"],
        "source": f"open({str(canary)!r}, 'w')",
    }
    edit_config(model, set_first_block(name, params))
    with pytest.raises(ConfigError, match=f"unknown block '{name}'"):
        Matcher.load(model)


def test_abstract_bases_are_not_registered_but_their_subclasses_are():
    for base in ("Loss", "LinkedComponent", "_Pooling", "TiedEmbedding"):
        assert base not in COMPONENT_REGISTRY
    assert COMPONENT_REGISTRY["MaxPooling"].__name__ == "MaxPooling"
    assert COMPONENT_REGISTRY["TripletLoss"].__name__ == "TripletLoss"

    class UserBase(Component, abstract=True):
        pass

    class UserLoss(Loss):
        requires = ("scores",)

        def forward(self, scores):
            return scores.mean()

    class UserBlock(UserBase):
        requires = ("scores",)
        provides = ("scores",)

        def forward(self, scores):
            return scores

    assert "UserBase" not in COMPONENT_REGISTRY
    assert COMPONENT_REGISTRY["UserLoss"] is UserLoss
    assert COMPONENT_REGISTRY["UserBlock"] is UserBlock


def nested(tag_value, depth=3):
    value = tag_value
    for _ in range(depth):
        value = {"__dict__": {"inner": {"__tuple__": [1, value]}}}
    return value


@pytest.mark.parametrize(
    "value, message",
    [
        (
            nested({"__component__": "os.system", "params": {"command": "touch x"}}),
            "unknown block 'os.system'",
        ),
        (nested({"__component__": "Loss", "params": {}}), "unknown block 'Loss'"),
        (
            nested({"__object__": "Popen", "data": {"args": ["touch", "x"]}}),
            "unknown object type 'Popen'",
        ),
        (nested({"__object__": "Vocabulary", "data": "not a dict"}), "cannot rebuild Vocabulary"),
        (nested({"__component__": ["os", "system"]}), "a block is a class name"),
        (nested({"__tuple__": {"a": 1}}), "malformed __tuple__"),
        ({"__dtype__": "load"}, "unknown dtype 'load'"),
        ({"__dtype__": "save"}, "unknown dtype 'save'"),
        ({"__dtype__": "Tensor"}, "unknown dtype 'Tensor'"),
        ({"__dtype__": "__class__"}, "unknown dtype '__class__'"),
        ({"__code__": "import os"}, "unrecognised value"),
    ],
)
def test_tagged_values_deep_in_a_parameter_are_refused(model, monkeypatch, value, message):
    def edit(cfg):
        cfg["components"][1]["block"]["params"]["vocab"] = value

    edit_config(model, edit)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(ConfigError, match=message):
        Matcher.load(model)


def test_config_that_is_not_a_matcher_is_refused(model):
    edit_config(
        model,
        lambda cfg: cfg["components"][0].update(
            block={"__object__": "Stage", "data": {"epochs": 1}}
        ),
    )
    with pytest.raises(ConfigError, match="is a Stage, not a block"):
        Matcher.load(model)


def test_unknown_matcher_parameter_is_refused(model):
    edit_config(model, lambda cfg: cfg["params"].update(epochz=3))
    with pytest.raises(
        ConfigError, match="unknown Matcher parameter 'epochz'.*Did you mean 'epochs'"
    ):
        Matcher.load(model)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 300, 100_000])
def test_deeply_nested_config_fails_with_config_error(model, depth):
    """Shallow enough for json but deep enough to recurse past the limit, or too deep for json itself."""
    text = (
        '{"format": "imtm.Matcher/1", "components": [], "params": {"stages": '
        + "[" * depth
        + "]" * depth
        + "}}"
    )
    (model / "config.json").write_text(text)
    refresh_manifest(model)
    with pytest.raises(CheckpointError, match="nest"):
        Matcher.load(model)


def test_deeply_nested_config_in_memory_fails_with_config_error():
    value = []
    for _ in range(5000):
        value = [value]
    with pytest.raises(ConfigError, match="nest deeper than"):
        Matcher.from_config(
            {"format": "imtm.Matcher/1", "components": [], "params": {"stages": value}}
        )


def test_huge_parameter_fails_with_a_clear_error(model):
    edit_config(
        model, lambda cfg: cfg["components"][0]["block"]["params"].update(in_dim=[0] * 200_000)
    )
    with pytest.raises(ConfigError, match="cannot rebuild ToyImage"):
        Matcher.load(model)


@pytest.mark.parametrize(
    "name, content",
    [
        ("config.json", b"\xff\xfe not utf-8"),
        ("record.json", b"[1, 2]"),
        ("config.json", b'"a string"'),
    ],
)
def test_json_files_of_the_wrong_shape_are_refused(model, name, content):
    (model / name).write_bytes(content)
    refresh_manifest(model)
    with pytest.raises(CheckpointError, match=name):
        Matcher.load(model)


# ---------------------------------------------------------------- links and names leading elsewhere
def test_symlink_out_of_the_folder_is_refused(model, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(model / "model.safetensors", outside)  # same bytes: the checksum alone would pass
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="symlink to .*outside the checkpoint folder"):
        Matcher.load(model)


def test_symlink_to_a_device_is_refused_before_it_is_read(model):
    (model / "record.json").unlink()
    (model / "record.json").symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(CheckpointError, match="record.json is a symlink to /dev/zero"):
        Matcher.load(model)


def test_latest_naming_a_folder_outside_the_run_is_refused(saved, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved[0] / "run", run)
    shutil.copytree(latest_checkpoint(run), tmp_path / "stolen")
    (run / "LATEST").write_text("../stolen")
    with pytest.raises(CheckpointError, match="not a checkpoint folder of"):
        toy_matcher(data, checkpoint_dir=str(run)).fit(data, resume=True)


# ---------------------------------------------------------------- folders a configuration points at
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    pytest.importorskip("transformers")
    from imtm.components.encoders.hf_text import write_local_bert

    return write_local_bert(
        tmp_path_factory.mktemp("bert"),
        ["a red circle", "a blue square"],
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        intermediate_size=8,
    )


def custom_code_folder(bert, folder, canary):
    """A transformers folder whose model and tokenizer need its own module, which writes the canary."""
    shutil.copytree(bert, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(
        model_type="imtm_custom",
        auto_map={"AutoConfig": "modeling_x.XConfig", "AutoModel": "modeling_x.XModel"},
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok.update(
        tokenizer_class="XTokenizer", auto_map={"AutoTokenizer": ["modeling_x.XTokenizer", None]}
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    (folder / "modeling_x.py").write_text(
        f"open({str(canary)!r}, 'w').write('ran')\n"
        "from transformers import BertConfig as XConfig, BertModel as XModel, BertTokenizer as XTokenizer\n"
    )
    return folder


@pytest.fixture
def offline_yes(monkeypatch):
    """Offline, and a 'y' waiting on stdin: an interactive 'run the custom code? [y/N]' prompt would get it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 4))


def test_hf_folder_with_custom_code_is_refused(bert, tmp_path, canary, offline_yes):
    from imtm.components import HFTextEncoder

    folder = custom_code_folder(bert, tmp_path / "custom", canary)
    with pytest.raises(ValueError, match="trust_remote_code"):
        HFTextEncoder(folder)


def test_matcher_config_pointing_at_custom_code_is_refused(
    model, bert, tmp_path, canary, offline_yes
):
    folder = custom_code_folder(bert, tmp_path / "custom", canary)
    edit_config(
        model,
        lambda cfg: cfg["components"][1].update(
            block={
                "__component__": "HFTextEncoder",
                "params": {"model_name_or_path": str(folder), "out_dim": 8},
            }
        ),
    )
    with pytest.raises(ValueError, match="trust_remote_code"):
        Matcher.load(model)


def test_hf_pickle_weights_with_code_are_refused(bert, tmp_path, canary, offline_yes):
    """A folder with only ``pytorch_model.bin`` is read with ``weights_only=True``: a pickle that
    carries code is refused with the file's name, and the code never runs (the canary stays)."""
    from imtm.components import HFTextEncoder

    only_pickle = tmp_path / "only_pickle"
    shutil.copytree(bert, only_pickle)
    (only_pickle / "model.safetensors").unlink()
    write_pickle(only_pickle / "pytorch_model.bin", canary, torch_format=True)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*weights_only=True"):
        HFTextEncoder(only_pickle)

    both = tmp_path / "both"
    shutil.copytree(bert, both)
    write_pickle(both / "pytorch_model.bin", canary, torch_format=True)
    enc = HFTextEncoder(both)  # the safetensors weights, the pickle untouched
    reference = HFTextEncoder(bert)
    torch.testing.assert_close(enc.model.state_dict(), reference.model.state_dict())


@pytest.fixture(scope="module")
def timm_kwargs():
    pytest.importorskip("timm")
    return {
        "model_name": "vit_tiny_patch16_224",
        "img_size": 16,
        "model_kwargs": {"depth": 1, "embed_dim": 8, "num_heads": 2, "patch_size": 8},
    }


@pytest.mark.parametrize("torch_format", [False, True], ids=["pickle", "torch.save"])
def test_timm_checkpoint_path_with_code_is_refused(
    model, tmp_path, canary, timm_kwargs, torch_format
):
    from imtm.components import TimmVisionEncoder

    evil = tmp_path / "weights.pth"
    write_pickle(evil, canary, torch_format)
    with pytest.raises(
        ValueError, match="weights_only=True"
    ):  # built directly: read without unpickling code
        TimmVisionEncoder(checkpoint_path=str(evil), **timm_kwargs)
    edit_config(
        model,
        lambda cfg: cfg["components"][0].update(
            block={
                "__component__": "TimmVisionEncoder",
                "params": encode_value(dict(timm_kwargs, checkpoint_path=str(evil)))["__dict__"],
            }
        ),
    )
    # Matcher.load never opens checkpoint_path (the weights come from model.safetensors): here they
    # belong to another block, which is what is refused.
    with pytest.raises(CheckpointError, match="the weights come from another configuration"):
        Matcher.load(model)


def test_timm_pretrained_file_with_code_is_refused(tmp_path, canary, timm_kwargs, monkeypatch):
    """timm's own loader, reached through model_kwargs, reads with weights_only=True too."""
    from imtm.components import TimmVisionEncoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    evil = tmp_path / "weights.pth"
    write_pickle(evil, canary, torch_format=True)
    kw = dict(timm_kwargs)
    kw["model_kwargs"] = dict(kw["model_kwargs"], pretrained_cfg_overlay={"file": str(evil)})
    # Recent timm reads the file with torch.load(weights_only=True) (RuntimeError); timm 1.0.3 (the
    # floor) reads this ViT's file with numpy's npz loader, which never unpickles (KeyError). Either
    # way the payload never runs (the canary fixture checks it).
    with pytest.raises((RuntimeError, KeyError), match="weights_only|not a file in the archive"):
        TimmVisionEncoder(pretrained=True, **kw)


# ---------------------------------------------------------------- the command line
def test_cli_evaluate_refuses_a_pickle_model(model, canary, capsys):
    from imtm.cli import main

    write_pickle(model / "model.safetensors", canary, torch_format=True)
    refresh_manifest(model)
    assert main(["evaluate", "--model", str(model), "--quiet"]) == 2
    err = capsys.readouterr().err
    # One short message (no traceback) naming the file and what is wrong with it.
    assert (
        err.startswith("imtm evaluate: ")
        and "model.safetensors: not a readable safetensors file" in err
    )
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_cli_evaluate_refuses_a_config_naming_code(model, canary, capsys):
    from imtm.cli import main

    edit_config(model, set_first_block("os.system", {"command": f"touch {canary}"}))
    assert main(["evaluate", "--model", str(model), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imtm evaluate: unknown block 'os.system'")
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_load_does_not_restore_where_a_later_fit_writes(saved, model):
    # A saved model names no run folder; one whose configuration names one (a checkpoint's, or an
    # edited file) must not make a loaded model write or prune there.
    root, _ = saved
    assert json.loads((model / "config.json").read_text())["params"]["checkpoint_dir"] is None
    edit_config(model, lambda cfg: cfg["params"].update(checkpoint_dir=str(root / "run")))
    assert Matcher.load(model).checkpoint_dir is None
