"""DIAS's training parts from the command line: distance-weighted negatives and K-means neighbour batches."""

import json

import pytest

from imtm.cli import main


@pytest.fixture
def small_data(monkeypatch):
    monkeypatch.setenv("IMTM_SYNTHETIC", "n_train=40,n_dev=8,n_test=10")


def test_train_dias_with_miner_and_neighbour_batches(tmp_path, small_data, monkeypatch):
    from imtm import Matcher
    from imtm.data import KMeansNeighborSampler

    seen = {}
    fit = Matcher.fit

    def recording_fit(self, train, *args, **kwargs):
        seen["sampler"] = getattr(train, "batch_sampler", None)
        out = fit(self, train, *args, **kwargs)
        seen["steps"] = self.history_[-1]["step"]
        return out

    monkeypatch.setattr(Matcher, "fit", recording_fit)
    run = tmp_path / "run"
    args = [
        "train",
        "--preset",
        "dias",
        "--epochs",
        "1",
        "--embed-dim",
        "16",
        "--word-dim",
        "8",
        "--out",
        str(run),
        "--quiet",
        "--batch-size",
        "16",
        "--miner",
        "--neighbour-batches",
        "4",
    ]
    assert main(args) == 0
    config = (run / "final").glob("*.json")
    text = " ".join(p.read_text() for p in config)
    assert "DistanceWeightedMiner" in text
    assert json.loads((run / "test_metrics.json").read_text())["rsum"] >= 0
    sampler = seen["sampler"]
    assert isinstance(sampler, KMeansNeighborSampler)
    assert (sampler.clusters_per_batch, sampler.images_per_cluster) == (4, 4)
    # One caption per image per epoch: 40 images in batches of 16 is 3 steps (200 captions would be 13).
    assert seen["steps"] == 3


def test_miner_is_refused_for_a_preset_without_one(tmp_path, small_data, capsys):
    assert (
        main(
            [
                "train",
                "--preset",
                "vsepp",
                "--epochs",
                "1",
                "--embed-dim",
                "8",
                "--word-dim",
                "8",
                "--out",
                str(tmp_path / "r"),
                "--quiet",
                "--miner",
            ]
        )
        != 0
    )
    assert (
        "--miner (distance-weighted negatives) is an option of the dias preset; 'vsepp' has none"
        in capsys.readouterr().err
    )


def test_neighbour_batches_out_of_range(tmp_path, small_data, capsys):
    assert (
        main(
            [
                "train",
                "--preset",
                "dias",
                "--epochs",
                "1",
                "--embed-dim",
                "8",
                "--word-dim",
                "8",
                "--out",
                str(tmp_path / "r"),
                "--quiet",
                "--batch-size",
                "8",
                "--neighbour-batches",
                "9",
            ]
        )
        != 0
    )
    assert (
        "--neighbour-batches must be between 1 and --batch-size (8), got 9"
        in capsys.readouterr().err
    )
