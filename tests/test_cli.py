import json
import re
from pathlib import Path

import pytest
import torch

from imtm.cli import build_parser, main
from imtm.metrics import chance_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.DOTALL).group(1).strip().splitlines()
    assert len(block) == 2
    assert block[0].startswith("pip install") and block[0].endswith("imtm demo")
    ci = (ROOT / ".ci" / "run").read_text()
    assert block[1] in ci


def test_demo_runs_end_to_end_at_a_reduced_size_and_explains_itself(capsys):
    assert (
        main(
            ["demo", "--quick", "--epochs", "1", "--quiet", "--embed-dim", "32", "--word-dim", "16"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "R@K on the synthetic test split" in out
    for name in ("vsepp", "chan"):
        assert re.search(rf"\|\s*{name}\s*\|", out), out
    # Before the table: what is trained, on which data, what the table means; --quick is a smoke test.
    intro = " ".join(
        out.split("R@K on the synthetic test split")[0].split()
    )  # the paragraph is wrapped
    for words in (
        "vsepp VSE++",
        "chan CHAN:",
        "synthetic benchmark",
        "R@K is the percentage",
        "rSum adds",
        "'chance' row",
        "smoke test",
    ):
        assert words in intro, (words, intro)
    # After: the chance row, computed from the test split (--quick: 100 images x 5 captions), and a reading.
    chance = chance_metrics(torch.arange(100).repeat_interleave(5))
    row = re.search(r"^\| chance \|(.*)\|$", out, re.MULTILINE)
    assert row, out
    cells = [float(c) for c in row.group(1).split("|")]
    assert cells[-1] == pytest.approx(chance["rsum"], abs=0.05)
    assert cells[0] == pytest.approx(chance["i2t_r1"], abs=0.05)
    assert re.search(
        r"^Reading: (vsepp|chan) does best \(rSum [\d.]+, chance 31\.6\)", out, re.MULTILINE
    ), out
    assert "smoke-test numbers" in out


def test_train_and_evaluate_round_trip(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    args = [
        "train",
        "--preset",
        "vsepp",
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
        "256",
    ]
    monkeypatch.setenv("IMTM_SYNTHETIC", "n_train=100,n_dev=20,n_test=30")
    assert main(args) == 0
    assert (run / "final" / "model.safetensors").exists() and (run / "LATEST").exists()
    # The model card and the record carry the test metrics that imtm train printed.
    test_rsum = json.loads((run / "test_metrics.json").read_text())["rsum"]
    assert (
        json.loads((run / "final" / "record.json").read_text())["metrics"]["test split"]["rsum"]
        == test_rsum
    )
    assert "test split" in (run / "final" / "README.md").read_text()
    assert main(["evaluate", "--model", str(run / "final"), "--quiet"]) == 0
    assert "rsum" in capsys.readouterr().out.lower()


def test_unknown_preset_suggests(tmp_path):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["nope"])
