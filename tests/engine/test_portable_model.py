"""A saved model folder is self-contained and portable (issue 16, item 3).

A model built with an HFTextEncoder (a tiny random BERT folder) and a TimmVisionEncoder
(a tiny random ViT read from a local checkpoint) is saved, moved, zipped and unzipped
elsewhere while the encoder sources are deleted, and loaded in a fresh process in another
working directory, offline: the similarity scores are identical. No JSON file of the folder
names an absolute path. ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` follow
the Hugging Face names; the hub is replaced by a local folder (never the network).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imtm import Matcher
from imtm.engine.checkpoint import CheckpointError
from imtm.engine.model_folder import absolute_paths

pytest.importorskip("timm")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
VIT = {
    "model_name": "vit_tiny_patch16_224",
    "img_size": 24,
    "model_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 8},
}

LOAD = """
import json, sys
import numpy as np, torch
from imtm import Matcher
m = Matcher.load(sys.argv[1]) if sys.argv[4] == "load" else Matcher.from_pretrained(sys.argv[1])
images = torch.from_numpy(np.load(sys.argv[2]))
captions = json.load(open(sys.argv[3]))
np.save("scores.npy", m.similarity(images, captions).numpy())
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A fitted HFTextEncoder + TimmVisionEncoder model whose encoder sources live in ``src/``."""
    from safetensors.torch import save_file

    from imtm.components import GlobalCosine, HFTextEncoder, TimmVisionEncoder, TripletLoss
    from imtm.components.encoders.hf_text import write_local_bert
    from imtm.data import synthetic

    base = tmp_path_factory.mktemp("portable")
    train, _, test = synthetic.load(
        view="pixels", seed=0, n_train=8, n_dev=2, n_test=3, image_size=24
    )
    src = base / "src"
    bert = write_local_bert(
        src / "bert", train.captions + test.captions, hidden_size=16, num_layers=1, num_heads=2
    )
    vit = TimmVisionEncoder(**VIT).model
    torch.manual_seed(3)
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.05)
    save_file(
        {k: v.contiguous() for k, v in vit.state_dict().items()}, str(src / "vit.safetensors")
    )
    m = Matcher(
        [
            (
                "vision",
                TimmVisionEncoder(checkpoint_path=str(src / "vit.safetensors"), out_dim=8, **VIT),
            ),
            ("text", HFTextEncoder(str(bert), out_dim=8, max_length=32)),
            ("scorer", GlobalCosine()),
            ("loss", TripletLoss()),
        ],
        epochs=1,
        batch_size=8,
        lr=1e-3,
        verbose=False,
        device="cpu",
        checkpoint_dir=None,
    ).fit(train)
    images = torch.stack([test.images[i] for i in range(len(test.images))])
    captions = list(test.captions)
    return base, src, m, images, captions


def run_load(
    folder: Path, cwd: Path, images: Path, captions: Path, how: str = "load"
) -> np.ndarray:
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "load.py").write_text(LOAD)
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TQDM_DISABLE="1",
    )
    proc = subprocess.run(
        [sys.executable, "load.py", str(folder), str(images), str(captions), how],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return np.load(cwd / "scores.npy")


def json_strings_with(folder: Path, needle: str) -> list[str]:
    return [
        str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_text(errors="replace")
    ]


def test_a_moved_zipped_model_loads_offline_in_another_process_with_its_sources_deleted(built):
    base, src, m, images, captions = built
    reference = m.similarity(images, captions)
    first = m.save(base / "a" / "model")
    moved = base / "b" / "moved"
    moved.parent.mkdir()
    shutil.move(str(first), str(moved))
    archive = shutil.make_archive(str(base / "model"), "zip", root_dir=moved)
    shutil.rmtree(src)  # the BERT folder and the ViT checkpoint are gone
    shutil.rmtree(moved)
    unzipped = base / "c" / "unzipped"
    shutil.unpack_archive(archive, unzipped)
    np.save(base / "images.npy", images.numpy())
    (base / "captions.json").write_text(json.dumps(captions))
    scores = run_load(unzipped, base / "elsewhere", base / "images.npy", base / "captions.json")
    torch.testing.assert_close(torch.from_numpy(scores), reference, rtol=0, atol=0)


def test_no_json_file_of_the_folder_names_an_absolute_path(built, tmp_path):
    base, _, m, _, _ = built
    folder = m.save(tmp_path / "model")
    jsons = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.json"))
    expected = {
        "config.json",
        "record.json",
        "MANIFEST.json",
        "text/config.json",
        "text/tokenizer_config.json",
    }
    assert expected <= set(jsons)
    for name in jsons:
        found = absolute_paths(json.loads((folder / name).read_text()), name)
        assert not found, found
    for needle in (str(tmp_path), str(base), os.path.expanduser("~")):
        assert not json_strings_with(folder, needle), needle
    config = json.loads((folder / "config.json").read_text())
    blocks = {c["name"]: c["block"]["params"] for c in config["components"]}
    assert blocks["text"]["model_name_or_path"] == {"__asset__": "text"}
    assert blocks["vision"]["checkpoint_path"] == "vit.safetensors"
    record = json.loads((folder / "record.json").read_text())
    assert record["sources"] == {
        "text": {"model_name_or_path": "bert"},
        "vision": {"checkpoint_path": "vit.safetensors"},
    }


def test_the_folder_follows_the_hugging_face_layout_and_has_a_model_card(built, tmp_path):
    _, _, m, _, _ = built
    folder = m.save_pretrained(
        tmp_path / "chan-tiny", metrics={"test": {"rsum": 123.4, "i2t_r1": 5.0}}
    )
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files[:5] == [
        "MANIFEST.json",
        "README.md",
        "config.json",
        "model.safetensors",
        "record.json",
    ]
    assert {"text/config.json", "text/tokenizer.json", "text/tokenizer_config.json"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: imtm\n")
    assert "| text | HFTextEncoder |" in card and "| vision | TimmVisionEncoder |" in card
    assert "rsum 123.4" in card and 'Matcher.from_pretrained("chan-tiny")' in card
    assert "epochs trained: `1`" in card
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == set(files) - {"MANIFEST.json"}
    assert "README.md" not in manifest["sha256"]  # a card may be edited; it is never read back
    assert json.loads((folder / "record.json").read_text())["metrics"]["test"]["rsum"] == 123.4


def test_an_edited_card_still_loads_and_a_tampered_tokenizer_is_refused(built, tmp_path):
    _, _, m, images, captions = built
    folder = m.save(tmp_path / "model")
    (folder / "README.md").write_text("# my own card\n")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")  # as in a hub repository
    loaded = Matcher.load(folder)
    torch.testing.assert_close(
        loaded.similarity(images, captions), m.similarity(images, captions), rtol=0, atol=0
    )
    tok = folder / "text" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"[UNK]"', '"[UNKNOWN]"'))
    with pytest.raises(CheckpointError, match="tokenizer.json: checksum mismatch"):
        Matcher.load(folder)
    tok.unlink()
    (folder / "text" / "extra_vocab.txt").write_text("x\n")
    with pytest.raises(
        CheckpointError, match=r"extra_vocab.txt'\], which MANIFEST.json does not list"
    ):
        Matcher.load(folder)


def test_a_loaded_model_saved_again_is_the_same_portable_model(built, tmp_path):
    _, _, m, images, captions = built
    first = m.save(tmp_path / "one")
    again = Matcher.load(first).save(tmp_path / "two")
    assert json.loads((first / "config.json").read_text()) == json.loads(
        (again / "config.json").read_text()
    )
    assert Matcher.load(first).config_hash() == m.config_hash()
    shutil.rmtree(first)
    torch.testing.assert_close(
        Matcher.load(again).similarity(images, captions),
        m.similarity(images, captions),
        rtol=0,
        atol=0,
    )


def test_refitting_a_loaded_model_says_where_the_pretrained_encoder_went(built, tmp_path):
    from imtm.components.encoders.timm_vision import WeightsUnavailableError

    _, _, m, _, _ = built
    loaded = Matcher.load(m.save(tmp_path / "model"))
    with pytest.raises(WeightsUnavailableError, match="text-encoder folder of a saved imtm model"):
        loaded.set_params(vision__checkpoint_path=None)._build(0)


def test_from_pretrained_reads_a_hub_repository_through_huggingface_hub(
    built, tmp_path, monkeypatch
):
    hub = pytest.importorskip("huggingface_hub")
    _, _, m, images, captions = built
    served = m.save(tmp_path / "served")
    asked = {}

    def snapshot_download(repo_id, **kw):  # stands in for the hub: a local folder, no network
        asked.update(repo_id=repo_id, **kw)
        return str(served)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    loaded = Matcher.from_pretrained("someone/tiny-model", revision="main")
    assert asked["repo_id"] == "someone/tiny-model" and asked["revision"] == "main"
    torch.testing.assert_close(
        loaded.similarity(images, captions), m.similarity(images, captions), rtol=0, atol=0
    )
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub repository id"):
        Matcher.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


def test_push_to_hub_uploads_the_saved_folder(built, tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    _, _, m, images, captions = built
    calls = []

    class FakeApi:  # records the calls and keeps a copy of the uploaded folder; no network
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, *, repo_id, folder_path, **kw):
            shutil.copytree(folder_path, tmp_path / "uploaded")
            calls.append(("upload_folder", repo_id, kw))
            return "commit-info"

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    assert m.push_to_hub("someone/tiny-model", private=True, token="t") == "commit-info"
    assert calls[0] == ("init", "t") and calls[1] == (
        "create_repo",
        "someone/tiny-model",
        {"private": True, "exist_ok": True},
    )
    assert calls[2][1] == "someone/tiny-model"
    loaded = Matcher.from_pretrained(tmp_path / "uploaded")
    torch.testing.assert_close(
        loaded.similarity(images, captions), m.similarity(images, captions), rtol=0, atol=0
    )
