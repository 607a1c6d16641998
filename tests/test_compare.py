import csv
import importlib.util

import pytest

from imtm.cli import main
from imtm.compare import COMPARE_PRESETS, CompareSettings, baseline_reading, compare, markdown_table


def test_compare_cli_writes_table_csv_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--presets",
                "vsepp,laps",
                "--epochs",
                "1",
                "--quick",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| vsepp | regions |" in printed and "| laps | pixels |" in printed
    assert (
        printed.startswith("--quick: a smoke test")
        and "chance (random scores) on this test split" in printed
    )
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["preset"] for r in rows] == ["vsepp", "laps"]
    assert [r["view"] for r in rows] == ["regions", "pixels"]
    for r in rows:
        assert 0 <= float(r["i2t_r1"]) <= float(r["i2t_r5"]) <= float(r["i2t_r10"]) <= 100
        assert float(r["rsum"]) == pytest.approx(
            sum(
                float(r[k]) for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
            ),
            abs=1e-3,
        )
        assert float(r["train_s"]) > 0 and float(r["score_ms_per_1k_pairs"]) > 0
        assert (int(r["n_test_images"]), int(r["n_test_captions"])) == (20, 100)
    md = (out / "compare.md").read_text()
    assert "imtm compare --presets vsepp,laps" in md and "| laps | pixels | ViT" in md
    if importlib.util.find_spec("matplotlib") is not None:
        png = (out / "compare_recall.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
        assert "compare_recall.png" in md


def test_markdown_table_has_one_row_per_preset():
    row = {
        "preset": "chan",
        "view": "regions",
        "encoders": "e",
        "rsum": 60.0,
        "train_s": 1.0,
        "score_ms_per_1k_pairs": 2.0,
        **{k: 10.0 for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")},
    }
    lines = markdown_table([row, {**row, "preset": "vsepp"}]).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| chan | regions | e | 10.0")
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_compare_bad_inputs(tmp_path, capsys):
    tiny = CompareSettings(epochs=1, n_train=10, n_dev=2, n_test=5)
    with pytest.raises(ValueError, match="unknown preset 'chann'.*Did you mean 'chan'"):
        compare("chann", settings=tiny)
    with pytest.raises(ValueError, match="no presets given"):
        compare(" , ", settings=tiny)
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        compare("vsepp", settings=CompareSettings(epochs=0))
    with pytest.raises(ValueError, match="DCPA trains in two stages"):
        compare("dcpa", settings=tiny)
    with pytest.raises(ValueError, match="train on pixels"):
        compare("laps", data=str(tmp_path), settings=tiny)
    with pytest.raises(
        SystemExit
    ) as stop:  # a usage error: exit status 2, the valid names on stderr
        main(["compare", "--presets", "nope", "--quick", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert (
        "unknown preset 'nope'; choose from chan, dcpa, dias, ela, laps, vsepp"
        in capsys.readouterr().err
    )
    assert set(COMPARE_PRESETS) == {"vsepp", "chan", "dcpa", "dias", "laps", "ela", "vsepp-vit"}


def test_baseline_reading_compares_each_preset_with_its_views_baseline():
    rows = [
        {"preset": "vsepp", "view": "regions", "rsum": 200.0},
        {"preset": "chan", "view": "regions", "rsum": 150.0},
        {"preset": "vsepp-vit", "view": "pixels", "rsum": 100.0},
        {"preset": "laps", "view": "pixels", "rsum": 120.5},
        {"preset": "ela", "view": "pixels", "rsum": 100.0, "encoders": "ViT; BERT"},
    ]
    assert baseline_reading(rows) == [
        "- chan: rSum 150.0 against vsepp 200.0 (-50.0): not above the global baseline.",
        "- laps: rSum 120.5 against vsepp-vit 100.0 (+20.5): above the global baseline.",
        "- ela: rSum 100.0 against vsepp-vit 100.0 (+0.0): not above the global baseline (the encoders differ: "
        "ViT; BERT here).",
    ]
    assert baseline_reading(rows[3:]) == []  # no baseline of that view ran


def test_compare_refuses_unknown_backbones():
    with pytest.raises(
        ValueError, match=r"backbones must be one of \['synthetic', 'scratch'\], got 'synthetc'"
    ):
        compare(
            "laps",
            settings=CompareSettings(epochs=1, n_train=10, n_dev=2, n_test=5, backbones="synthetc"),
        )


def test_compare_pixel_rows_fine_tune_the_packaged_backbones(tmp_path):
    s = CompareSettings(
        epochs=1, n_train=12, n_dev=2, n_test=6, embed_dim=16, word_dim=16, batch_size=12
    )
    rows = compare("vsepp-vit,laps", settings=s, out=tmp_path, verbose=False)
    assert [r["encoders"].split(";")[0] for r in rows] == [
        "ViT synthetic-vit (pre-trained, frozen)"
    ] * 2
    md = (tmp_path / "compare.md").read_text()
    assert "--backbones synthetic" in md and "(64x64 pixels, 64 patches of 8x8)" in md
    assert "- laps: rSum" in md and "against vsepp-vit" in md


def test_compare_over_seeds_writes_mean_std_and_the_difference_per_seed(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--presets", "vsepp,chan", "--epochs", "1", "--quick", "--quiet"]
    assert main([*argv, "--seeds", "3,5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rSum seed 3 | rSum seed 5" in printed
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["preset"], r["seed"]) for r in rows] == [
        ("vsepp", "3"),
        ("chan", "3"),
        ("vsepp", "5"),
        ("chan", "5"),
    ]
    # Each seed's rows are the single-seed run of that seed (runs are deterministic per seed).
    single = tmp_path / "one"
    assert main([*argv, "--seed", "5", "--out", str(single)]) == 0
    with open(single / "compare.csv") as f:
        (one_vsepp, one_chan) = list(csv.DictReader(f))
    assert float(one_chan["rsum"]) == pytest.approx(float(rows[3]["rsum"]), abs=1e-3)
    assert float(one_vsepp["rsum"]) == pytest.approx(float(rows[2]["rsum"]), abs=1e-3)
    md = (out / "compare.md").read_text()
    assert "--seeds 3,5" in md and "mean +- standard deviation over the seeds" in md
    rsums = {(r["preset"], r["seed"]): float(r["rsum"]) for r in rows}
    chan = [rsums[("chan", s)] for s in ("3", "5")]
    mean = sum(chan) / 2
    std = abs(chan[0] - chan[1]) / 2**0.5
    line = next(x for x in md.splitlines() if x.startswith("| chan |"))
    assert f"{mean:.1f} +- {std:.1f}" in line
    diffs = [rsums[("chan", s)] - rsums[("vsepp", s)] for s in ("3", "5")]
    reading = next(x for x in md.splitlines() if x.startswith("- chan: rSum"))
    assert f"difference per seed {diffs[0]:+.1f}, {diffs[1]:+.1f}" in reading


@pytest.mark.parametrize("seeds", ["", "0,x", "1,1", [True]])
def test_compare_refuses_bad_seeds(seeds):
    with pytest.raises(ValueError, match="seeds"):
        compare("vsepp", settings=CompareSettings(epochs=1, n_train=8, n_test=4), seeds=seeds)


def test_compare_sets_the_warm_up_of_every_triplet_loss_but_dcpas(tmp_path):
    from imtm import presets
    from imtm.compare import build_components, load_splits

    s = CompareSettings(epochs=1, n_train=12, n_dev=2, n_test=6, embed_dim=16, word_dim=16)
    warm = {}
    for name in ("vsepp", "chan", "dias", "dcpa", "laps", "vsepp-vit"):
        train = load_splits("synthetic", COMPARE_PRESETS[name], s)[0]
        comps = build_components(name, train, s, tmp_path)[0]
        warm[name] = sorted(
            {b.warmup_epochs for _, b in comps if type(b).__name__ == "TripletLoss"}
        )
    assert warm == {
        "vsepp": [2],
        "chan": [2],
        "dias": [2],
        "dcpa": [presets.DCPA_WARMUP_EPOCHS],
        "laps": [2],
        "vsepp-vit": [2],
    }
    with pytest.raises(ValueError, match="warmup_epochs"):
        compare("vsepp", settings=CompareSettings(epochs=1, n_train=8, n_test=4, warmup_epochs=-1))
