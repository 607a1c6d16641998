"""Saving never loses data and respects the umask (issue 17, items 1 and 14).

``Matcher.save`` refuses a non-empty folder that is not a saved Matcher (offering
``overwrite=True``), and even with ``overwrite=True`` replaces only the files an earlier
imtm model listed in its own manifest. Model and checkpoint files get mode 0o666 less the
umask, as ``open``, ``torch.save`` and safetensors give them.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from toy import toy_components, toy_data

from imtm import Matcher


@pytest.fixture(scope="module")
def data():
    return toy_data(n_images=8)


@pytest.fixture(scope="module")
def fitted(data):
    return Matcher(toy_components(data.vocab), epochs=1, batch_size=4, verbose=False).fit(data)


def user_files(folder):
    """A user's files: a document, a folder with a file, and a config.json of their own elsewhere."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "photos").mkdir()
    (folder / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return {"notes.txt": b"my notes", "photos/cat.jpg": b"\xff\xd8 not really a jpeg"}


def contents(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


# ---------------------------------------------------------------- no data loss (17.1)
def test_save_refuses_a_folder_of_user_files_and_leaves_every_file(fitted, tmp_path):
    folder = tmp_path / "work"
    before = user_files(folder)
    with pytest.raises(
        FileExistsError, match=r"is not empty .*not a saved imtm.Matcher/1 folder.*overwrite=True"
    ):
        fitted.save(folder)
    assert contents(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no temporary left beside it


def test_save_into_the_working_directory_keeps_it(fitted, tmp_path, monkeypatch):
    before = user_files(tmp_path / "cwd")
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(FileExistsError):
        fitted.save(os.getcwd())
    assert contents(tmp_path / "cwd") == before


def test_overwrite_writes_the_model_beside_user_files(fitted, data, tmp_path):
    folder = tmp_path / "work"
    before = user_files(folder)
    fitted.save(folder, overwrite=True)
    after = contents(folder)
    assert {k: after[k] for k in before} == before
    torch.testing.assert_close(
        Matcher.load(folder).similarity(data.images, data.captions),
        fitted.similarity(data.images, data.captions),
    )


def test_user_files_beside_a_model_survive_saving_again(fitted, data, tmp_path):
    folder = fitted.save(tmp_path / "model")
    before = user_files(folder)
    other = Matcher(
        toy_components(data.vocab), epochs=1, batch_size=4, verbose=False, random_state=7
    ).fit(data)
    other.save(folder)  # an imtm model of the same kind: replaced without overwrite=True
    after = contents(folder)
    assert {k: after[k] for k in before} == before
    torch.testing.assert_close(
        Matcher.load(folder).similarity(data.images, data.captions),
        other.similarity(data.images, data.captions),
    )


def test_overwrite_replaces_a_previous_model_folder(fitted, data, tmp_path):
    folder = fitted.save(tmp_path / "model")
    stale = (
        folder / "extra"
    )  # a file an older imtm wrote and listed, which the new model does not have
    stale.mkdir()
    (stale / "vocab.txt").write_text("a\n")
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    manifest["files"].append("extra/vocab.txt")
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    other = Matcher(
        toy_components(data.vocab), epochs=1, batch_size=4, verbose=False, random_state=3
    ).fit(data)
    other.save(folder, overwrite=True)
    assert not stale.exists()
    assert sorted(os.listdir(folder)) == [
        "MANIFEST.json",
        "README.md",
        "config.json",
        "model.safetensors",
        "record.json",
    ]
    torch.testing.assert_close(
        Matcher.load(folder).similarity(data.images, data.captions),
        other.similarity(data.images, data.captions),
    )


def test_a_user_file_under_a_model_file_name_is_never_replaced(fitted, tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}')
    with pytest.raises(FileExistsError, match=r"holds \['config.json'\], which imtm did not write"):
        fitted.save(folder, overwrite=True)
    assert contents(folder) == {"config.json": b'{"mine": true}'}


def test_a_manifest_naming_files_outside_the_folder_removes_nothing_there(fitted, data, tmp_path):
    folder = fitted.save(tmp_path / "model")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (folder / "link.txt").symlink_to(victim)
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    manifest["files"] += ["../victim.txt", str(victim), "link.txt"]
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    fitted.save(folder)
    assert victim.read_text() == "keep me" and (folder / "link.txt").is_symlink()


def test_saving_to_dot_replaces_the_model_in_the_working_directory(
    fitted, data, tmp_path, monkeypatch
):
    folder = fitted.save(tmp_path / "model")
    before = user_files(tmp_path / "model")
    monkeypatch.chdir(folder)
    other = Matcher(
        toy_components(data.vocab), epochs=1, batch_size=4, verbose=False, random_state=5
    ).fit(data)
    other.save(".")
    after = contents(folder)
    assert {k: after[k] for k in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    torch.testing.assert_close(
        Matcher.load(".").similarity(data.images, data.captions),
        other.similarity(data.images, data.captions),
    )


def test_saving_over_the_model_that_is_the_working_directory_keeps_it_usable(
    fitted, data, tmp_path, monkeypatch
):
    folder = fitted.save(tmp_path / "model")
    monkeypatch.chdir(folder)
    other = Matcher(
        toy_components(data.vocab), epochs=1, batch_size=4, verbose=False, random_state=6
    ).fit(data)
    other.save(".")
    assert Path(os.getcwd()).exists() and Path(".").resolve() == folder.resolve()
    torch.testing.assert_close(
        Matcher.load(".").similarity(data.images, data.captions),
        other.similarity(data.images, data.captions),
    )


def test_save_refuses_a_file_and_an_empty_folder_is_used(fitted, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="is not a folder"):
        fitted.save(tmp_path / "afile")
    (tmp_path / "empty").mkdir()
    fitted.save(tmp_path / "empty")
    assert (tmp_path / "empty" / "MANIFEST.json").is_file()


# ---------------------------------------------------------------- the umask (17.14)
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_model_and_checkpoint_files_respect_the_umask(data, tmp_path, umask):
    old = os.umask(umask)
    try:
        m = Matcher(
            toy_components(data.vocab),
            epochs=1,
            batch_size=4,
            verbose=False,
            checkpoint_dir=tmp_path / "run",
        ).fit(data)
        m.save(tmp_path / "model")
    finally:
        os.umask(old)
    files = [
        p for p in [*(tmp_path / "run").rglob("*"), *(tmp_path / "model").rglob("*")] if p.is_file()
    ]
    names = {p.name for p in files}
    assert {
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
        "MANIFEST.json",
        "LATEST",
    } <= names
    modes = {p.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    folders = [p for p in [*(tmp_path / "run").rglob("*"), tmp_path / "model"] if p.is_dir()]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in folders} == {oct(0o777 & ~umask)}
