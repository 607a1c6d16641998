"""Paper recipes: presets.recipe(name) builds the paper's Matcher; imtm train --recipe keeps the recipe's
name and results; imtm evaluate prints the reported row, the measured row and the gap."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imtm import Matcher, Stage, presets
from imtm.components.encoders.hf_text import write_local_bert
from imtm.data import synthetic
from imtm.recipes import RECIPES, PaperResult, paper_gap, recipe, recipe_names

TINY_VIT = dict(depth=1, embed_dim=16, num_heads=2, patch_size=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    regions = synthetic.load(view="regions", seed=0, n_train=6, n_dev=2, n_test=3)
    pixels = synthetic.load(view="pixels", seed=0, n_train=6, n_dev=2, n_test=3, image_size=32)
    bert = write_local_bert(
        root / "bert",
        regions[0].captions + pixels[0].captions,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
    )
    glove = root / "glove.txt"
    glove.write_text(
        "".join(f"{w} " + " ".join(["0.1"] * 300) + "\n" for w in regions[0].vocab.itos[2:])
    )
    return {"regions": regions, "pixels": pixels, "bert": str(bert), "glove": str(glove)}


def tiny_overrides(r, data):
    """What replaces the pretrained pieces of a recipe offline (the training parameters stay the recipe's)."""
    if r.preset == "laps":
        return {
            "image": "vit_tiny_patch16_224",
            "pretrained": False,
            "img_size": 32,
            "model_kwargs": TINY_VIT,
            "text_model": data["bert"],
            "embed_dim": 16,
        }
    if r.preset == "ela":
        return {
            "image_model": "vit_tiny_patch16_224",
            "pretrained": False,
            "img_size": 32,
            "model_kwargs": TINY_VIT,
            "text_model": data["bert"],
            "embed_dim": 16,
            "heads": 2,
            "cross_layers": 1,
        }
    kw = {"embed_dim": 16}
    if r.preset_kwargs.get("text") == "gru-glove":
        kw["word_vectors"] = data["glove"]
    if r.preset_kwargs.get("text") == "bert":
        kw["text_model"] = data["bert"]
    if r.preset in ("chan", "dias"):
        kw["context_heads"] = 2
    if r.preset == "dcpa":
        kw.update(heads=2, k=3)
    return kw


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_builds_its_matcher_with_the_recipes_training_parameters(name, data):
    r = recipe(name)
    train = data["pixels" if r.preset in presets.PIXEL_PRESETS else "regions"][0]
    m = presets.build_recipe(
        name,
        train,
        matcher_kwargs={"checkpoint_dir": None, "verbose": False},
        **tiny_overrides(r, data),
    )
    assert isinstance(m, Matcher)
    for key, value in r.matcher_kwargs.items():
        assert getattr(m, key) == value, key
    if r.stages is None:
        assert m.stages is None
    else:
        assert [s.epochs for s in m.stages] == [s["epochs"] for s in r.stages]
        assert all(isinstance(s, Stage) for s in m.stages)
    m.validate()
    assert r.sources and r.differs  # every recipe says where its values come from and what differs
    if r.paper is not None:
        assert r.paper.source and r.paper.dataset and r.paper.protocol == r.protocol


def test_laps_recipe_values():
    r = recipe("laps-vit-b16-f30k")
    assert r.matcher_kwargs["batch_size"] == 128 and r.matcher_kwargs["optimizer"] == "adamw"
    assert (
        recipe("laps-swin-b-coco").matcher_kwargs["batch_size"] == 256
    )  # CrossmodalGroup/LAPS issue #11
    assert (
        r.matcher_kwargs["lr_factors"] == {"image": 0.1, "text": 0.1}
        and r.matcher_kwargs["grad_clip"] == 2.0
    )
    # lr x0.3 at epochs 9, 15, 20, 25 of 30
    lrs = [(s["epochs"], s["lr"]) for s in r.stages]
    assert [e for e, _ in lrs] == [9, 6, 5, 5, 5] and sum(e for e, _ in lrs) == 30
    for (_, a), (_, b) in zip(lrs, lrs[1:]):
        assert b == pytest.approx(0.3 * a)
    assert r.preset_kwargs["text"] == "bert" and r.preset_kwargs["ratio_weight"] == 2.0
    assert recipe("laps-swin-b-f30k").preset_kwargs["backbone"] == "swin"


def test_ela_recipes_follow_their_own_config_files():
    """Retrieval_flickr.yaml and Retrieval_coco.yaml of Lydia-yang/ELA differ in lr and k_test."""
    f30k, coco = recipe("ela-vit-b16-f30k"), recipe("ela-vit-b16-coco")
    assert (f30k.matcher_kwargs["lr"], f30k.preset_kwargs["rerank_k"]) == (1e-5, 128)
    assert (coco.matcher_kwargs["lr"], coco.preset_kwargs["rerank_k"]) == (7e-6, 256)
    assert any("Retrieval_coco.yaml" in where for where in coco.sources.values())
    for r in (f30k, coco):
        assert r.matcher_kwargs["batch_size"] == 26 and r.matcher_kwargs["epochs"] == 10


def test_recipe_is_a_copy_and_unknown_names_suggest():
    r = recipe("chan-gru-f30k")
    r.matcher_kwargs["epochs"] = 1
    assert RECIPES["chan-gru-f30k"].matcher_kwargs["epochs"] == 25
    assert presets.recipe("chan-gru-f30k").matcher_kwargs["lr_scheduler"] == "x0.1 every 15 epochs"
    with pytest.raises(ValueError, match="Did you mean 'chan-gru-f30k'"):
        recipe("chan-gru-f3k")


def test_paper_rows_and_gap():
    row = PaperResult("t", "F", "f30k_1k", (1.0, 2.0, 3.0), (4.0, 5.0, 6.0)).as_metrics()
    assert row["rsum"] == 21.0
    partial = recipe("laps-vit-b16-f30k").paper.as_metrics()
    assert partial["i2t_r10"] is None and partial["rsum"] is None and partial["i2t_r1"] == 75.8
    gap = paper_gap({"i2t_r1": 70.0, "i2t_r10": 90.0, "rsum": 400.0}, partial)
    assert gap["i2t_r1"] == pytest.approx(-5.8) and gap["i2t_r10"] is None and gap["rsum"] is None


def test_every_recorded_row_is_consistent_and_names_its_source():
    full = 0
    for name in recipe_names():
        paper = recipe(name).paper
        if paper is None:
            continue
        row = paper.as_metrics()
        assert all(row[k] is not None for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")), name
        assert all(0 < v <= 100 for k, v in row.items() if k != "rsum" and v is not None), name
        for r1, r5, r10 in (paper.i2t, paper.t2i):
            assert r1 <= r5 and (r10 is None or r5 <= r10), name  # recall never falls with K
        if row["rsum"] is not None:
            full += 1
            # rSum as printed: within rounding of the printed recalls' sum (a mistyped value fails here).
            recalls = sum(
                row[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
            )
            assert abs(row["rsum"] - recalls) <= 0.15, (name, row["rsum"], recalls)
            assert "R@10 and rSum:" in paper.source, name  # where the full row was read
    assert full == 4  # CHAN's four rows; LAPS's README gives R@1 / R@5 only


def _run(args, env, cwd):
    return subprocess.run(
        [sys.executable, "-m", "imtm", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


@pytest.mark.slow
def test_train_with_a_recipe_then_evaluate_prints_the_paper_row(tmp_path, data):
    """The user journey in fresh processes: imtm train --recipe ..., then imtm evaluate on the saved model."""
    env = dict(
        os.environ,
        IMTM_SYNTHETIC="n_train=12,n_dev=4,n_test=6",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    out = tmp_path / "run"
    args = [
        "train",
        "--recipe",
        "laps-vit-b16-f30k",
        "--data",
        "synthetic",
        "--random-init",
        "--image-model",
        "vit_tiny_patch16_224",
        "--img-size",
        "64",
        "--model-kwargs",
        json.dumps(TINY_VIT),
        "--text-model",
        data["bert"],
        "--embed-dim",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "20",
        "--out",
        str(out),
        "--quiet",
    ]
    done = _run(args, env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "recipe laps-vit-b16-f30k: the paper's row" in done.stdout
    assert "| paper | 75.8 | 93.8 | - | 62.5 | 87.5 | - | - |" in done.stdout
    record = json.loads((out / "final" / "record.json").read_text())
    assert record["recipe"]["name"] == "laps-vit-b16-f30k"
    assert record["recipe"]["paper"]["metrics"]["t2i_r1"] == 62.5
    measured = json.loads((out / "test_metrics.json").read_text())
    done = _run(["evaluate", "--model", str(out / "final"), "--quiet"], env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("| gap"))
    assert line.split("|")[2].strip() == f"{measured['i2t_r1'] - 75.8:.1f}"
    # Without --recipe nothing about papers is printed; --preset and --recipe together are refused.
    done = _run(
        ["train", "--preset", "laps", "--recipe", "laps-vit-b16-f30k", "--data", "synthetic"],
        env,
        tmp_path,
    )
    assert done.returncode != 0 and "not both" in (done.stderr + done.stdout)
