"""What a newcomer meets on the command line: short errors, exit codes, --help, --threads, the demo's words.

The usage mistakes run through the real ``imtm`` command in fresh subprocesses (started
together, so the suite waits for the slowest, not the sum); the rest runs in-process.
"""

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imtm import cli
from imtm.cli import EXAMPLES, build_parser, main
from imtm.metrics import chance_metrics, retrieval_metrics

ROOT = Path(__file__).resolve().parents[1]


def _mistakes(tmp: Path) -> dict:
    """name -> (argv after ``imtm``, exit status, regexes the message must match: what and the fix)."""
    empty = tmp / "empty"
    empty.mkdir()
    missing = tmp / "no_such_run" / "final"
    return {
        "wrong preset": (
            ["train", "--preset", "chna"],
            2,
            [r"unknown preset 'chna'", r"chan, dcpa, dias", r"Did you mean 'chan'", r"--preset"],
        ),
        "wrong demo preset": (
            ["demo", "--presets", "vsepp,chna"],
            2,
            [r"unknown preset 'chna'", r"--presets"],
        ),
        "empty data folder": (
            ["train", "--data", str(empty), "--quiet"],
            2,
            [r"train_ims\.npy", re.escape(str(empty)), r"--data takes 'synthetic'"],
        ),
        "bad --data spec": (
            ["train", "--data", "synthtic", "--quiet"],
            2,
            [r"synthtic", r"--data takes 'synthetic'"],
        ),
        "wrong viz kind": (
            ["viz", "wordz", "--model", str(missing), "--out", str(tmp / "x.png")],
            2,
            [r"invalid choice: 'wordz'", r"'words'", r"imtm viz --help"],
        ),
        "missing model folder": (
            ["evaluate", "--model", str(missing)],
            2,
            [re.escape(str(missing)), r"--model takes a folder written by 'imtm train'"],
        ),
        "wrong data format": (
            ["train", "--data", str(empty), "--format", "karpathi"],
            2,
            [r"invalid choice: 'karpathi'", r"'karpathy'", r"--format"],
        ),
        "threads not a number": (
            ["demo", "--threads", "many"],
            2,
            [r"--threads", r"at least 1, e\.g\. 4"],
        ),
        "no command": ([], 2, [r"name a command: demo"]),
        "unknown command": (["trian"], 2, [r"invalid choice: 'trian'", r"'train'"]),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_messages")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cases = _mistakes(tmp)
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "imtm.cli", *argv],
            cwd=tmp,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, (argv, _, _) in cases.items()
    }
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[name] = (p.returncode, stdout, stderr)
    return cases, out


@pytest.mark.parametrize(
    "name",
    [
        "wrong preset",
        "wrong demo preset",
        "empty data folder",
        "bad --data spec",
        "wrong viz kind",
        "missing model folder",
        "wrong data format",
        "threads not a number",
        "no command",
        "unknown command",
    ],
)
def test_each_usage_mistake_gets_two_lines_naming_the_fix(runs, name):
    cases, out = runs
    argv, status, patterns = cases[name]
    code, _, stderr = out[name]
    assert code == status, (argv, code, stderr)
    lines = stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, stderr
    assert "Traceback" not in stderr and 'File "' not in stderr, stderr
    assert lines[0].startswith("imtm"), stderr
    for pattern in patterns:
        assert re.search(pattern, stderr), (pattern, stderr)


def test_debug_shows_the_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "imtm.cli",
            "evaluate",
            "--model",
            str(tmp_path / "nope"),
            "--debug",
        ],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 1 and "Traceback (most recent call last)" in p.stderr, p.stderr
    assert len(p.stderr.splitlines()) > 2


def _raising(exc):
    def cmd(args):
        raise exc

    return cmd


@pytest.mark.parametrize(
    "exc, status, patterns",
    [
        (RuntimeError("CUDA out of memory"), 1, [r"RuntimeError: CUDA out of memory", r"--debug"]),
        (FloatingPointError("non-finite loss at step 3"), 1, [r"non-finite loss", r"--debug"]),
        (OSError(28, "No space left on device"), 1, [r"No space left", r"--debug"]),
        (
            ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib"),
            1,
            [r"'matplotlib'.*not installed", r"pip install 'imtm\[viz\]'"],
        ),
        (KeyError("rsum"), 1, [r"internal error KeyError", r"bug in imtm.*--debug"]),
        (
            ValueError("lr must be positive, got -1.0;\nuse e.g. --lr 1e-3"),
            2,
            [r"lr must be positive.* use e\.g\. --lr"],
        ),
        (TypeError("demo: embed_dim must be an int"), 2, [r"^imtm demo: embed_dim must be an int"]),
        (
            FileNotFoundError(2, "No such file or directory", "runs/x/final"),
            2,
            [r"no such file or folder: 'runs/x/final'"],
        ),
        (
            SystemExit("imtm: --data must be 'synthetic' or a folder"),
            2,
            [r"^imtm demo: --data must be"],
        ),
        (KeyboardInterrupt(), 130, [r"interrupted"]),
    ],
)
def test_errors_map_to_one_message_and_an_exit_status(monkeypatch, capsys, exc, status, patterns):
    monkeypatch.setattr(cli, "cmd_demo", _raising(exc))
    assert main(["demo", "--quick"]) == status
    err = capsys.readouterr().err
    assert 1 <= len(err.strip().splitlines()) <= 2 and "Traceback" not in err, err
    for pattern in patterns:
        assert re.search(pattern, err, re.MULTILINE), (pattern, err)
    monkeypatch.setattr(cli, "cmd_demo", _raising(RuntimeError("boom")))
    with pytest.raises(
        RuntimeError, match="boom"
    ):  # --debug: the exception itself, traceback and all
        main(["demo", "--debug"])


@pytest.mark.parametrize("command", ["demo", "train", "evaluate", "compare", "extract", "viz"])
def test_help_lists_presets_formats_examples_and_threads(capsys, command):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and all(e in text for e in EXAMPLES[command])
    assert "--threads N" in text and "--debug" in text
    if command in ("demo", "train", "compare"):
        assert "presets:" in text and re.search(r"^\s+chan\s+CHAN: ", text, re.MULTILINE)
        listed = text.split("presets:\n", 1)[1].split("\n\n", 1)[0].splitlines()
        assert listed and all(len(line.split(None, 1)) == 2 for line in listed), (
            listed
        )  # each described
    if command in ("train", "evaluate", "compare"):
        assert "data (--data):" in text and "synthetic" in text
    if command == "extract":
        assert "formats (--format):" in text and "karpathy" in text


def test_every_help_example_parses():
    parser = build_parser()
    for command, lines in EXAMPLES.items():
        for line in lines:
            argv = line.split()[1:]
            args = parser.parse_args(argv)
            assert args.command == command


def test_threads_is_applied_before_the_work(monkeypatch):
    seen = {}

    def fake_demo(args):
        seen["threads"] = torch.get_num_threads()
        return 0

    monkeypatch.setattr(cli, "cmd_demo", fake_demo)
    before = torch.get_num_threads()
    try:
        assert main(["demo", "--threads", "1"]) == 0
        assert seen["threads"] == 1
        assert main(["demo", "--threads", "2"]) == 0
        assert seen["threads"] == 2
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ chance level
def _chance_by_enumeration(c2i):
    """The recalls averaged over every ranking of the captions and of the images (plain loops)."""
    n_img, n_cap = max(c2i) + 1, len(c2i)
    sums = {f"{d}_r{k}": 0.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
    caption_orders = list(itertools.permutations(range(n_cap)))
    for order in caption_orders:
        for i in range(n_img):
            best = min(pos for pos, t in enumerate(order) if c2i[t] == i)
            for k in (1, 5, 10):
                sums[f"i2t_r{k}"] += 100.0 * (best < k) / (n_img * len(caption_orders))
    image_orders = list(itertools.permutations(range(n_img)))
    for order in image_orders:
        for t in range(n_cap):
            pos = order.index(c2i[t])
            for k in (1, 5, 10):
                sums[f"t2i_r{k}"] += 100.0 * (pos < k) / (n_cap * len(image_orders))
    return sums


@pytest.mark.parametrize("c2i", [[0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2], [0, 0, 0, 1, 2, 3, 4]])
def test_chance_metrics_match_enumerating_every_ranking(c2i):
    got = chance_metrics(c2i)
    want = _chance_by_enumeration(c2i)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["rsum"] == pytest.approx(sum(want.values()))


def test_chance_metrics_match_random_scores_on_average():
    g = torch.Generator().manual_seed(0)
    c2i = torch.arange(40).repeat_interleave(5)
    runs = [retrieval_metrics(torch.rand(40, 200, generator=g), c2i) for _ in range(300)]
    want = chance_metrics(c2i)
    for key in ("i2t_r1", "i2t_r10", "t2i_r5", "rsum"):
        mean = sum(r[key] for r in runs) / len(runs)
        assert mean == pytest.approx(want[key], rel=0.1), key


def test_chance_metrics_bad_input():
    with pytest.raises(ValueError, match="no captions"):
        chance_metrics([])
    with pytest.raises(ValueError, match="no caption"):
        chance_metrics([0, 2])
    with pytest.raises(TypeError, match="integer"):
        chance_metrics(torch.tensor([0.0, 1.0]))


def test_demo_reading_names_the_best_the_runner_up_and_models_near_chance():
    chance = chance_metrics(torch.arange(1000).repeat_interleave(5))
    line = cli._demo_reading(
        {"vsepp": {"rsum": 266.2, "t2i_r1": 15.9}, "chan": {"rsum": 503.4, "t2i_r1": 57.6}}, chance
    )
    assert line.startswith(
        "Reading: chan does best (rSum 503.4, chance 3.2), ahead of vsepp (266.2); for 58% "
    )
    assert "Near chance" not in line
    line = cli._demo_reading({"vsepp": {"rsum": 5.0, "t2i_r1": 0.2}}, chance)
    assert "ahead of" not in line and line.endswith(
        "Near chance: vsepp (too little training; more --epochs or --n-train)."
    )
