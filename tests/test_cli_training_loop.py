"""``imtm train``'s flags for the training loop: listed by --help, bad values refused with the fix,
and a pre-train -> fine-tune journey in fresh processes that uses them, then ``imtm evaluate``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imtm import Matcher
from imtm.cli import LOGGER_NAMES, build_parser, main
from imtm.engine.callbacks import LOGGERS
from imtm.engine.optim import state_digest

ROOT = Path(__file__).resolve().parents[1]
TINY = "n_train=24,n_dev=4,n_test=8"
SMALL = ["--preset", "vsepp", "--embed-dim", "8", "--word-dim", "8", "--batch-size", "8"]
FLAGS = [
    "--optimizer",
    "--lr-scheduler",
    "--lr-factors",
    "--accumulate",
    "--steps-per-epoch",
    "--init-from",
    "--init-blocks",
    "--logger",
    "--early-stopping",
    "--monitor",
]


def imtm(*args, cwd) -> subprocess.CompletedProcess:
    """``imtm ARGS`` in a fresh interpreter, as a user types it."""
    env = dict(os.environ, IMTM_SYNTHETIC=TINY, TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "imtm", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"imtm {' '.join(map(str, args))}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_the_logger_names_are_the_libraries():
    assert set(LOGGER_NAMES) == set(LOGGERS)


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--optimizer", "sgdd", "Did you mean 'sgd'"),
        ("--optimizer", '{"name": "sgd", "momentum": ', "not a valid JSON object"),
        ("--optimizer", "[1]", "unknown optimizer"),
        ("--lr-scheduler", "cosin", "Did you mean 'cosine'"),
        ("--lr-factors", "image", "expected BLOCK=FACTOR pairs"),
        ("--lr-factors", "image=-1", "must be a number >= 0"),
        ("--lr-factors", "image=fast", "must be a number >= 0"),
        ("--accumulate", "0", "at least 1"),
        ("--steps-per-epoch", "two", "at least 1"),
        ("--init-blocks", ",", "block names"),
        ("--logger", "mlflow", "invalid choice"),
        ("--early-stopping", "-2", "at least 1"),
        ("--monitor", "rsun", "Did you mean 'rsum'"),
    ],
)
def test_bad_values_are_refused_with_what_to_give(flag, value, says, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["train", flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and says in err, err


def test_values_the_parser_checks_only_against_the_model_name_the_fix(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("IMTM_SYNTHETIC", TINY)
    out = str(tmp_path / "run")
    base = ["train", *SMALL, "--epochs", "1", "--quiet", "--out", out]
    assert main([*base, "--lr-factors", "imag=0.1"]) == 2
    err = capsys.readouterr().err
    assert "lr_factors names block 'imag'" in err and "Did you mean 'image'" in err, err
    assert main([*base, "--init-blocks", "image"]) == 2
    assert "give --init-from too" in capsys.readouterr().err
    missing = str(tmp_path / "no-such-model")
    assert main([*base, "--init-from", missing]) == 2
    err = capsys.readouterr().err
    assert missing in err, err


def test_train_help_lists_the_loop_flags_then_pretrain_finetune_and_evaluate(tmp_path):
    """Fresh processes: --help; pre-train; fine-tune from it with the loop's flags; evaluate."""
    shown = imtm("train", "--help", cwd=tmp_path).stdout
    for flag in FLAGS:
        assert flag in shown, flag
    assert "training loop" in shown

    imtm("train", *SMALL, "--epochs", "1", "--quiet", "--seed", "1", "--out", "pre", cwd=tmp_path)
    imtm(
        "train",
        *SMALL,
        "--epochs",
        "3",
        "--quiet",
        "--out",
        "tuned",
        "--optimizer",
        '{"name": "sgd", "momentum": 0.9}',
        "--lr-scheduler",
        "x0.5 every epoch",
        "--lr-factors",
        "image=0.5",
        "--accumulate",
        "2",
        "--steps-per-epoch",
        "2",
        "--init-from",
        "pre/final",
        "--init-blocks",
        "image",
        "--logger",
        "csv",
        "--early-stopping",
        "1",
        "--monitor",
        "t2i_medr",
        cwd=tmp_path,
    )
    final = tmp_path / "tuned" / "final"
    params = json.loads((final / "config.json").read_text())["params"]
    assert params["optimizer"] == {"__dict__": {"name": "sgd", "momentum": 0.9}}
    assert params["lr_scheduler"] == "x0.5 every epoch"
    assert params["lr_factors"] == {"__dict__": {"image": 0.5}}
    assert params["accumulate"] == 2 and params["steps_per_epoch"] == 2
    assert params["init_from"] == {"__dict__": {"folder": "pre/final"}}
    assert params["init_blocks"] == ["image"]
    record = json.loads((final / "record.json").read_text())
    assert record["init_from"]["blocks"] == ["image"]
    history = record["history"]
    assert [h["step"] for h in history] == [2 * (k + 1) for k in range(len(history))]
    # the CSV logger's step log: a row per step, the lr of the image block's group at half
    with open(tmp_path / "tuned" / "steps.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == history[-1]["step"]
    assert float(rows[0]["lr/image"]) == pytest.approx(0.5 * float(rows[0]["lr/default"]))
    if len(rows) > 3:  # the step decay: the second epoch at half the first's lr (past the warm-up)
        assert float(rows[3]["lr/default"]) == pytest.approx(0.5 * float(rows[1]["lr/default"]))
    out = imtm("evaluate", "--model", final, "--quiet", cwd=tmp_path).stdout
    assert "rsum" in out.lower()
    # the image block started from the pre-trained model: the record holds the sha256 of its weights
    pre = Matcher.load(tmp_path / "pre" / "final").components_.state_dict()
    image = {k: v for k, v in pre.items() if k.startswith("image.")}
    assert record["init_from"]["weights_sha256"] == state_digest(image)
