"""A saved TwoStageRetriever folder: no data loss on save, nothing outside the folder on load (issue 17, 1 and 9)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from toy import toy_data

from imtm import Matcher
from imtm.components import GRUTextEncoder, HardAssignmentCoding, PrecomputedEncoder, TripletLoss
from imtm.retrieval import TwoStageRetriever


@pytest.fixture(scope="module")
def data():
    return toy_data(n_images=8, cpi=2)


@pytest.fixture(scope="module")
def model(data):
    blocks = [
        ("image", PrecomputedEncoder(in_dim=6, out_dim=8)),
        ("text", GRUTextEncoder(vocab=data.vocab, out_dim=8, word_dim=8)),
        ("coding", HardAssignmentCoding(pooling="lse", temperature=0.1)),
        ("loss", TripletLoss()),
    ]
    return Matcher(blocks, epochs=0, verbose=False, device="cpu", random_state=1).fit(data)


@pytest.fixture(scope="module")
def retriever(model, data):
    return TwoStageRetriever(model, k=3).fit(images=data.images, captions=data.captions)


def contents(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def results(r, data):
    res = r.text_to_image(data.captions, top=2)
    return res.indices, res.scores


def retriever_images(r):
    return toy_data(n_images=8, cpi=2).images


# ---------------------------------------------------------------- save: no data loss (17.1)
def test_save_refuses_a_folder_of_user_files_and_leaves_them(retriever, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    (folder / "images").mkdir()
    (folder / "images" / "holiday.jpg").write_bytes(b"jpeg")
    before = contents(folder)
    with pytest.raises(FileExistsError, match=r"not empty .*overwrite=True"):
        retriever.save(folder)
    assert contents(folder) == before
    # overwrite=True: the retriever's files beside the user's, which stay as they were
    retriever.save(folder, overwrite=True)
    after = contents(folder)
    assert {k: after[k] for k in before} == before and "retriever.json" in after


def test_saving_again_replaces_only_the_retrievers_files(retriever, model, data, tmp_path):
    folder = retriever.save(tmp_path / "gallery")
    listed = json.loads((folder / "retriever.json").read_text())["files"]
    assert "images/embedding.npy" in listed and "captions/text_tokens.feats.npy" in listed
    (folder / "README.txt").write_text("my gallery notes")
    only_images = TwoStageRetriever(model, k=2).fit(images=data.images)
    only_images.save(folder)  # a retriever of the same kind: no overwrite needed
    assert (folder / "README.txt").read_text() == "my gallery notes"
    assert not (
        folder / "captions"
    ).exists()  # the earlier retriever's files are gone, not the user's
    loaded = TwoStageRetriever.load(folder, model)
    assert loaded.k == 2
    for a, b in zip(results(loaded, data), results(only_images, data)):
        torch.testing.assert_close(a, b)


def test_a_retriever_folder_written_before_the_file_list_is_recognised(retriever, model, tmp_path):
    folder = retriever.save(tmp_path / "gallery")
    meta = json.loads((folder / "retriever.json").read_text())
    del meta["files"]  # the format of earlier versions
    (folder / "retriever.json").write_text(json.dumps(meta))
    (folder / "notes.txt").write_text("keep")
    TwoStageRetriever(model, k=2).fit(images=retriever_images(retriever)).save(folder)
    assert not (folder / "captions").exists()
    assert (folder / "notes.txt").read_text() == "keep"


def test_save_refuses_to_write_over_a_matcher_folder_without_overwrite(retriever, model, tmp_path):
    folder = model.save(tmp_path / "model")
    before = contents(folder)
    with pytest.raises(
        FileExistsError, match=r"not a saved imtm.TwoStageRetriever/1 folder.*overwrite=True"
    ):
        retriever.save(folder)
    assert contents(folder) == before


# ---------------------------------------------------------------- load: the folder only (17.9)
def edit(folder, change):
    meta = json.loads((folder / "retriever.json").read_text())
    change(meta)
    (folder / "retriever.json").write_text(json.dumps(meta))


@pytest.fixture
def saved(retriever, tmp_path):
    return retriever.save(tmp_path / "gallery")


def rename_value(meta, new):
    values = meta["galleries"]["image"]["values"]
    values[new] = values.pop("image_tokens")


@pytest.mark.parametrize(
    "evil", ["ABSOLUTE", "../outside/image_tokens", "../../image_tokens", "a/b", ""]
)
def test_a_value_named_by_a_path_is_refused_and_nothing_outside_is_opened(
    saved, model, tmp_path, evil, monkeypatch
):
    outside = tmp_path / "outside"
    outside.mkdir()
    for part in ("feats", "mask"):
        np.save(
            outside / f"image_tokens.{part}.npy",
            np.load(saved / "images" / f"image_tokens.{part}.npy"),
        )
    name = str(outside / "image_tokens") if evil == "ABSOLUTE" else evil
    edit(saved, lambda meta: rename_value(meta, name))
    opened = []
    real_load = np.load
    monkeypatch.setattr(
        np, "load", lambda p, *a, **k: (opened.append(str(p)), real_load(p, *a, **k))[1]
    )
    with pytest.raises(ValueError, match="never a path"):
        TwoStageRetriever.load(saved, model)
    assert not [p for p in opened if "outside" in p]


def test_a_symlink_out_of_the_folder_is_refused(saved, model, tmp_path):
    outside = tmp_path / "elsewhere.npy"
    target = saved / "images" / "embedding.npy"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):
        TwoStageRetriever.load(saved, model)


def test_a_symlink_inside_the_folder_is_accepted(saved, model, data, retriever):
    target = saved / "images" / "embedding.npy"
    os.replace(target, saved / "images" / "copy.npy")
    target.symlink_to("copy.npy")
    loaded = TwoStageRetriever.load(saved, model)
    for a, b in zip(results(loaded, data), results(retriever, data)):
        torch.testing.assert_close(a, b)


def test_a_fifo_in_place_of_an_array_is_refused_without_blocking(saved, model):
    target = saved / "images" / "image_tokens.feats.npy"
    target.unlink()
    os.mkfifo(target)
    with pytest.raises(ValueError, match="FIFO"):
        TwoStageRetriever.load(saved, model)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(galleries=[]), "'galleries' must be an object"),
        (lambda m: m.update(galleries={}), "'galleries' must be an object"),
        (
            lambda m: m["galleries"].update(videos={"size": 1, "values": {}}),
            "unknown gallery 'videos'",
        ),
        (lambda m: m["galleries"].update(image=[1, 2]), "gallery 'image' must be an object"),
        (
            lambda m: m["galleries"]["image"].pop("size"),
            "gallery 'image' must be an object with an integer 'size'",
        ),
        (lambda m: m["galleries"]["image"].update(size="8"), "an integer 'size'"),
        (lambda m: m["galleries"]["image"].update(values=None), "a 'values' object"),
        (
            lambda m: m["galleries"]["image"]["values"].update(image_tokens="tokens"),
            "value 'image_tokens' must be",
        ),
        (lambda m: m["galleries"]["image"]["values"]["image_tokens"].pop("kind"), "'kind'"),
        (lambda m: m["galleries"]["image"]["values"]["image_tokens"].update(grid=[1]), "'grid'"),
        (
            lambda m: m["galleries"]["image"]["values"]["image_tokens"].update(
                num_prefix_tokens=-1
            ),
            "'num_prefix_tokens'",
        ),
        (lambda m: m.update(index=["torch"]), "'index' is"),
        (lambda m: m.update(index="annoy"), "'index' is 'annoy'"),
        (lambda m: m.update(k="3"), "'k' and 'query_block'"),
        (lambda m: m.update(query_block=0), "'k' and 'query_block'"),
        (lambda m: m.update(weights=None), "'weights' must be a string"),
        (lambda m: m.pop("galleries"), "lacks \\['galleries'\\]"),
    ],
)
def test_malformed_entries_give_the_documented_error(saved, model, change, message):
    edit(saved, change)
    with pytest.raises(ValueError, match=message):
        TwoStageRetriever.load(saved, model)
