"""The journeys a user takes, each command in a fresh process, as a user types it.

Train every preset for one short epoch from the command line on tiny synthetic data (LAPS
and ELA also from a tiny Karpathy-format folder of generated JPEGs), evaluate the saved model,
draw a figure from it, move the folder elsewhere and load it, build a two-stage retriever from
it, resume an interrupted ``imtm train``; then the README's command lines and its Python
example, copied verbatim from README.md. Sizes are tiny through the documented
``IMTM_SYNTHETIC`` variable and command-line flags only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import tiny_formats

ROOT = Path(__file__).resolve().parents[1]
TINY = "n_train=24,n_dev=4,n_test=8,image_size=24"
SMALL = ["--embed-dim", "16", "--word-dim", "8", "--batch-size", "32", "--quiet"]
# A ViT of one block over 8x8 patches of 32x32 images: the pixel presets at test size.
TINY_VIT = [
    "--image-model",
    "vit_tiny_patch16_224",
    "--img-size",
    "32",
    "--model-kwargs",
    json.dumps({"depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 8}),
]


def env(**extra) -> dict:
    e = dict(os.environ, IMTM_SYNTHETIC=TINY, TQDM_DISABLE="1", PYTHONPATH=str(ROOT), **extra)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    return e


def imtm(*args, cwd, check=True, timeout=600) -> subprocess.CompletedProcess:
    """``imtm ARGS`` in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-m", "imtm", *map(str, args)],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, (
            f"imtm {' '.join(map(str, args))}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def python(code: str, cwd) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def rsum_printed(out: str, label: str) -> float:
    """The rSum cell of the row ``label`` of a printed results table."""
    row = re.search(rf"^\| {re.escape(label)} \|(.*)\|$", out, re.MULTILINE)
    assert row, out
    return float(row.group(1).split("|")[-1])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("journeys")


@pytest.fixture(scope="module")
def karpathy(work):
    return tiny_formats.layout(work / "data")


_RUNS: dict = {}


def trained(preset: str, work, source: str = "synthetic", karpathy=None) -> Path:
    """``imtm train`` of ``preset`` for one short epoch (DCPA: one per stage); the run folder."""
    key = (preset, source)
    if key not in _RUNS:
        out = work / f"{preset}_{source}"
        epochs = "2" if preset == "dcpa" else "1"
        data = ["--data", "synthetic"]
        if source == "karpathy":
            data = [
                "--data",
                karpathy["sources"]["karpathy"],
                "--format",
                "karpathy",
                "--image-root",
                karpathy["images"],
                *TINY_VIT,
            ]
        imtm("train", "--preset", preset, "--epochs", epochs, "--out", out, *data, *SMALL, cwd=work)
        _RUNS[key] = out
    return _RUNS[key]


@pytest.mark.parametrize("preset", ["vsepp", "chan", "dcpa", "dias", "laps", "ela"])
def test_every_preset_trains_from_the_cli_and_its_saved_model_evaluates(preset, work):
    run = trained(preset, work)
    assert (run / "final" / "config.json").is_file() and (
        run / "final" / "model.safetensors"
    ).is_file()
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert 0.0 <= metrics["rsum"] <= 600.0
    # A fresh process loads the folder and scores the same test split: the same numbers.
    out = imtm(
        "evaluate", "--model", run / "final", "--data", "synthetic", "--quiet", cwd=work
    ).stdout
    assert rsum_printed(out, "final") == pytest.approx(metrics["rsum"], abs=0.051)


@pytest.mark.parametrize("preset", ["laps", "ela"])
def test_pixel_presets_train_from_image_files(preset, work, karpathy):
    run = trained(preset, work, "karpathy", karpathy)
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert 0.0 <= metrics["rsum"] <= 600.0
    model = run / "final"
    if (
        preset == "ela"
    ):  # its text encoder was written into the run folder: the model must not need it there
        model = work / "ela_elsewhere"
        shutil.copytree(run / "final", model)
        os.rename(run, work / "ela_karpathy_renamed")
    # The same test images read through the other raw-image formats give the same numbers.
    formats = (
        ("karpathy", "caption-files", "csv", "coco", "flickr30k-token")
        if preset == "laps"
        else ("albef",)
    )
    for fmt in formats:
        out = imtm(
            "evaluate",
            "--model",
            model,
            "--data",
            karpathy["sources"][fmt],
            "--format",
            fmt,
            "--image-root",
            karpathy["images"],
            "--quiet",
            cwd=work,
        ).stdout
        assert rsum_printed(out, model.name) == pytest.approx(metrics["rsum"], abs=0.051), fmt


def test_an_unknown_format_lists_the_formats(work):
    proc = imtm("train", "--data", "x.json", "--format", "karpathyy", cwd=work, check=False)
    assert proc.returncode == 2
    for fmt in (
        "synthetic",
        "precomp",
        "karpathy",
        "caption-files",
        "albef",
        "csv",
        "coco",
        "flickr30k-token",
    ):
        assert fmt in proc.stderr
    empty = work / "no_csv_here"
    empty.mkdir()
    proc = imtm(
        "evaluate",
        "--model",
        trained("vsepp", work) / "final",
        "--data",
        empty,
        "--format",
        "csv",
        cwd=work,
        check=False,
    )
    assert proc.returncode == 2 and "no .csv/.tsv split files" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2 and "Traceback" not in proc.stderr


def test_draw_a_figure_from_the_saved_model(work):
    run = trained("chan", work)
    imtm(
        "viz",
        "words",
        "--model",
        run / "final",
        "--out",
        work / "words.png",
        "--n-test",
        "4",
        cwd=work,
    )
    assert (work / "words.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_move_the_folder_elsewhere_load_it_and_build_a_two_stage_retriever(work):
    run = trained("chan", work)
    moved = work / "elsewhere" / "chan_model"
    moved.parent.mkdir()
    shutil.copytree(run / "final", moved)
    os.rename(run, work / "chan_renamed")  # nothing of the old place is left to read from
    _RUNS[("chan", "synthetic")] = work / "chan_renamed"
    metrics = json.loads((work / "chan_renamed" / "test_metrics.json").read_text())
    out = imtm("evaluate", "--model", moved, "--quiet", cwd=work / "elsewhere").stdout
    assert rsum_printed(out, "chan_model") == pytest.approx(metrics["rsum"], abs=0.051)
    code = f"""
import json, torch
from imtm import Matcher
from imtm.data import load_dataset
from imtm.retrieval import TwoStageRetriever
m = Matcher.load({str(moved)!r})
test = load_dataset("synthetic", split="test")
r = TwoStageRetriever(m, k=len(test.images)).fit(images=test.images)
found = r.text_to_image(test.captions, top=3)
full = m.similarity(test.images, test.captions).T.topk(3, dim=1).indices
print(json.dumps({{"two_stage": found.indices.tolist(), "full": full.tolist(), "n": len(test.captions)}}))
"""
    result = json.loads(python(code, work).strip().splitlines()[-1])
    # With every image a candidate, stage 2 ranks exactly as full scoring does.
    assert result["two_stage"] == result["full"] and len(result["full"]) == result["n"]


def test_resume_an_interrupted_train(work):
    args = [
        "train",
        "--preset",
        "vsepp",
        "--epochs",
        "3",
        "--checkpoint-every",
        "1",
        "--embed-dim",
        "16",
        "--word-dim",
        "8",
        "--batch-size",
        "16",
        "--quiet",
    ]
    whole = work / "whole"
    imtm(*args, "--out", whole, cwd=work)
    cut = work / "cut"
    proc = subprocess.Popen(
        [sys.executable, "-m", "imtm", *args, "--out", str(cut)],
        cwd=work,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not list(cut.glob("ckpt-*")):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)  # no chance to save anything more
    proc.wait()
    assert not (cut / "final").exists()
    imtm(*args, "--out", cut, "--resume", cwd=work)
    interrupted = json.loads((cut / "test_metrics.json").read_text())
    assert interrupted == json.loads((whole / "test_metrics.json").read_text())


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def _command_lines() -> list[str]:
    section = _readme().split("## Command line", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip()]


def _readme_data(cwd: Path, karpathy) -> None:
    """The files the README's commands name, at tiny size, where they name them (relative paths)."""
    shutil.copy(karpathy["sources"]["karpathy"], cwd / "dataset_flickr30k.json")
    shutil.copytree(karpathy["images"], cwd / "flickr30k-images")
    precomp = cwd / "data" / "f30k_precomp"
    precomp.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("dev", 4), ("test", 4)):
        np.save(precomp / f"{split}_ims.npy", rng.normal(size=(n, 3, 8)).astype(np.float32))
        (precomp / f"{split}_caps.txt").write_text(
            "".join(f"a thing number {k % 7}\n" for k in range(5 * n))
        )
    import timm
    from safetensors.torch import save_file

    vit = timm.create_model("vit_base_patch16_224", pretrained=False)
    save_file(
        {k: v.contiguous() for k, v in vit.state_dict().items()}, str(cwd / "vit_b16.safetensors")
    )


@pytest.mark.slow
def test_the_readme_command_lines_run_verbatim(work, karpathy):
    lines = _command_lines()
    assert [line.split()[1] for line in lines][:3] == ["demo", "train", "evaluate"] and len(
        lines
    ) >= 6
    cwd = work / "readme_commands"
    cwd.mkdir()
    _readme_data(cwd, karpathy)
    if shutil.which("imtm", path=env()["PATH"]) is None:
        pytest.skip("the imtm command is not installed (pip install -e .)")
    for line in lines:
        proc = subprocess.run(
            line, shell=True, cwd=cwd, env=env(), capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert (cwd / "runs" / "chan" / "final" / "config.json").is_file()
    assert (cwd / "runs" / "compare" / "compare.md").is_file()
    assert (cwd / "features" / "f30k" / "test_ims.npy").is_file()


def test_the_readme_python_example_runs_verbatim_and_prints_its_result(work):
    code = re.search(r"```python\n(.*?)```", _readme(), re.S).group(1)
    cwd = work / "readme_python"
    cwd.mkdir()
    out = python(code, cwd)
    # At this size (IMTM_SYNTHETIC: 8 test images) the numbers only show that it ran and printed.
    assert 0.0 < rsum_printed(out, "vsepp") <= 600.0
    assert (cwd / "runs" / "vsepp" / "config.json").is_file()
