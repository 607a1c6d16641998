"""``imtm viz KIND``: pictures of saved models from the command line."""

import re
import struct
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from imtm import Matcher, presets
from imtm.cli import main
from imtm.data import synthetic


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    train, _, _ = synthetic.load(view="regions", seed=0, n_train=16, n_dev=2, n_test=4)
    root = tmp_path_factory.mktemp("models")
    # One saved DCPA model serves every kind: its pairwise blocks read image and text tokens too.
    m = Matcher(
        presets.build("dcpa", train, embed_dim=16, word_dim=8, hardest=False, heads=2, k=3),
        batch_size=16,
        checkpoint_dir=None,
        verbose=False,
        random_state=0,
        stages=presets.default_stages("dcpa", 2),
    ).fit(train)
    path = m.save(root / "dcpa")
    return {"chan": path, "dcpa": path}


def size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    return struct.unpack(">II", data[16:24])


def test_viz_words_recall_retrieved_and_dcpa(saved, tmp_path, capsys):
    common = ["--n-test", "6", "--dpi", "50"]
    assert (
        main(
            ["viz", "words", "--model", str(saved["chan"]), "--out", str(tmp_path / "w.png")]
            + common
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    assert size(tmp_path / "w.png")[0] == 4 * 100  # 4 panels of 2 inches at 50 dpi
    assert (
        main(
            [
                "viz",
                "recall",
                "--model",
                f"a={saved['chan']}",
                "--model",
                f"b={saved['dcpa']}",
                "--out",
                str(tmp_path / "r.png"),
            ]
            + common
        )
        == 0
    )
    assert size(tmp_path / "r.png") == (300, 150)
    assert (
        main(
            [
                "viz",
                "retrieved",
                "--direction",
                "t2i",
                "--index",
                "3",
                "--model",
                str(saved["chan"]),
                "--out",
                str(tmp_path / "t.png"),
            ]
            + common
        )
        == 0
    )
    assert size(tmp_path / "t.png") == (500, 120)
    assert (
        main(
            ["viz", "dcpa", "--model", str(saved["dcpa"]), "--out", str(tmp_path / "d.png")]
            + common
        )
        == 0
    )
    assert size(tmp_path / "d.png") == (3 * 130, 150)


def usage_error(argv, capsys, pattern):
    """``imtm`` exits 2 with a short message matching ``pattern`` (the CLI's usage errors)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err) and len(err.strip().splitlines()) <= 2, err


def test_viz_bad_index(saved, tmp_path, capsys):
    usage_error(
        [
            "viz",
            "words",
            "--model",
            str(saved["chan"]),
            "--out",
            str(tmp_path / "x.png"),
            "--n-test",
            "6",
            "--index",
            "6",
        ],
        capsys,
        r"--index must lie in \[0, 6\)",
    )


def test_viz_formats_titles_and_block_flag(saved, tmp_path, capsys):
    import xml.etree.ElementTree as ET

    from imtm.viz.command import _models

    common = ["--n-test", "6", "--dpi", "50"]
    assert (
        main(
            ["viz", "recall", "--model", str(saved["dcpa"]), "--out", str(tmp_path / "r.pdf")]
            + common
        )
        == 0
    )
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF-")
    assert (
        main(
            ["viz", "words", "--model", str(saved["dcpa"]), "--out", str(tmp_path / "w.svg")]
            + common
        )
        == 0
    )
    assert ET.parse(tmp_path / "w.svg").getroot().tag.endswith("svg")
    # titles come from the model's record, not from the folder's name; same titles say which folder
    (label,) = _models([str(saved["dcpa"])])
    assert label != "dcpa" and "epochs" in label and "ScoreFusion" in label
    import shutil

    copy = shutil.copytree(saved["dcpa"], tmp_path / "again" / "final")
    two = list(_models([str(saved["dcpa"]), str(copy)]))
    assert len(two) == 2 and two[1] == f"{label} (again/final)"
    # a kind that needs a block the model lacks names the flag
    usage_error(
        ["viz", "laps-kept", "--model", str(saved["dcpa"]), "--out", str(tmp_path / "k.png")]
        + common,
        capsys,
        r"needs a LAPS model with a PatchSlimming block \(chosen with --block NAME",
    )
    usage_error(
        [
            "viz",
            "laps-kept",
            "--block",
            "nope",
            "--model",
            str(saved["dcpa"]),
            "--out",
            str(tmp_path / "k.png"),
        ]
        + common,
        capsys,
        r"--block nope: model .* has no block of that name",
    )
    usage_error(
        [
            "viz",
            "recall",
            "--block",
            "x",
            "--model",
            str(saved["dcpa"]),
            "--out",
            str(tmp_path / "k.png"),
        ],
        capsys,
        "--block is for the kinds",
    )
    usage_error(
        ["viz", "recall", "--model", str(saved["dcpa"]), "--out", str(tmp_path / "k.jpg")],
        capsys,
        r"use \.png, \.pdf or \.svg",
    )


def test_viz_words_come_from_the_models_vocabulary(tmp_path):
    from imtm.components import GlobalCosine, GRUTextEncoder, PrecomputedEncoder, TripletLoss
    from imtm.viz.figure import caption_words, encode_pair

    train, _, test = synthetic.load(view="regions", seed=0, n_train=8, n_dev=2, n_test=2)
    # blocks named automatically (no "text" block): the words still come from the GRU's vocabulary
    m = Matcher(
        [
            PrecomputedEncoder(in_dim=train.region_dim, out_dim=8),
            GRUTextEncoder(vocab=train.vocab, out_dim=8),
            GlobalCosine(),
            TripletLoss(),
        ],
        epochs=1,
        batch_size=16,
        verbose=False,
    ).fit(train)
    caption = "a red circle and a zebra"
    _, txt = encode_pair(m, test.images[0], caption)
    assert caption_words(m, caption, txt) == ["a", "red", "circle", "and", "a", "<unk>"]
