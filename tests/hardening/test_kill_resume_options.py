"""Every training option of the loop resumes bit-exactly after a real SIGKILL.

One child process (``kill_options_child.py``) fits each scenario uninterrupted, then kills
a run of it twice by SIGKILL (after steps drawn from ``SEED``, before their checkpoints are
written) and resumes it; the resumed run must end with the reference's weights
(``torch.equal``), history, epoch count and fp16 overflow count. The scenarios: SGD with
momentum, a step decay and an lr factor; two stages with their own optimizer, schedule
(warm restarts), batch size and lr factors; ``accumulate=3`` (cached embeddings, dropout);
fp16 with a gradient scaler that skips overflowing steps; ``EarlyStopping`` (its state in
the checkpoint); a stream with ``steps_per_epoch`` killed mid-epoch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork (POSIX only)")

CHILD = Path(__file__).with_name("kill_options_child.py")
REPO = Path(__file__).resolve().parents[2]
SEED = 20261206
SCENARIOS = [
    "sgd-step-decay-lr-factors",
    "stages-adam-restarts",
    "accumulate",
    "fp16-scaler",
    "early-stopping",
    "stream",
]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    work = tmp_path_factory.mktemp("kill-options")
    spec = work / "SPEC.json"
    spec.write_text(json.dumps({"seed": SEED, "scenarios": SCENARIOS}))
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(spec)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, f"the child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return work, json.loads((work / "REPORT.json").read_text())


def read(folder: Path) -> tuple[dict, dict]:
    return load_file(str(folder / "weights.safetensors")), json.loads(
        (folder / "result.json").read_text()
    )


@pytest.mark.parametrize("name", SCENARIOS)
def test_killed_twice_then_resumed_ends_like_the_uninterrupted_run(killed, name):
    work, report = killed
    rep = report[name]
    msg = f"scenario {name}, seed {SEED}: {rep}"
    assert rep["reference"] == "exit 0" and rep["final"] == "exit 0", msg
    assert [k["ended"] for k in rep["kills"]] == ["SIGKILL", "SIGKILL"], msg
    ref_w, ref = read(work / name / "reference")
    got_w, got = read(work / name / "resumed")
    assert ref_w.keys() == got_w.keys() and ref_w, msg
    for key in ref_w:
        assert torch.equal(ref_w[key], got_w[key]), f"{key} differs; {msg}"
    assert got == ref, msg


def test_the_scenarios_exercise_what_they_name(killed):
    """Guards against scenarios that cannot fail: each option really acted in the reference."""
    work, report = killed
    fp16 = read(work / "fp16-scaler" / "reference")[1]
    assert fp16["overflow_steps"] > 0  # the scaler skipped steps (its state had to resume)
    early = read(work / "early-stopping" / "reference")[1]
    assert early["epochs_run"] == 3  # stopped early (its state had to resume)
    stream = report["stream"]
    assert stream["steps"] == 6  # 2 epochs of steps_per_epoch=3
    # a kill inside an epoch of the stream (not at its end): a mid-epoch resume was needed
    assert any(k["at_step"] % 3 for k in stream["kills"]), stream
    weights = {n: read(work / n / "reference")[0] for n in SCENARIOS}
    base = weights["sgd-step-decay-lr-factors"]["image.proj.weight"]
    others = [
        w["image.proj.weight"] for n, w in weights.items() if n != "sgd-step-decay-lr-factors"
    ]
    assert all(not torch.equal(base, o) for o in others)  # the options change the training
