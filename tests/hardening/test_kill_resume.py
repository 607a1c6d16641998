"""SIGKILL a fit at random points and in the middle of checkpoint writes; resume must end identically.

One child process (``kill_child.py scenarios``) imports torch once, fits the uninterrupted
reference, and runs every scenario below in forked processes that die by SIGKILL; each
scenario ends with a ``fit(resume=True)`` that must finish with the reference's weights
(``torch.equal``), history and ``best/``, having resumed from the last complete checkpoint.
A second child is killed from here, at a step drawn from the seed, and resumed in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork (POSIX only)")

CHILD = Path(__file__).with_name("kill_child.py")
REPO = Path(__file__).resolve().parents[2]
SEED = 20261122  # every random kill point below is drawn from it (and printed when a test fails)

#: ``leaves``: a temporary the kill must have left behind (so the clean-up is really exercised);
#: ``missing``: a folder the kill must have left missing.
SCENARIOS = [
    {"name": "random-event-1", "kills": [{"event": "random"}]},
    {"name": "random-event-2", "kills": [{"event": "random"}]},
    {"name": "random-event-3", "kills": [{"event": "random"}]},
    {
        "name": "half-written-model",
        "kills": [{"label": "/model.safetensors", "nth": 4}],
        "leaves": ".ckpt-",
    },
    {
        "name": "half-written-state",
        "kills": [{"label": "/state.json", "nth": 6}],
        "leaves": ".ckpt-",
    },
    {
        "name": "half-written-manifest",
        "kills": [{"label": "/MANIFEST.json", "nth": 2}],
        "leaves": ".ckpt-",
    },
    # The checkpoint folder is renamed into place; LATEST (half written) still names the previous one.
    {"name": "before-latest", "kills": [{"label": "/LATEST", "nth": 5}], "leaves": ".LATEST."},
    # best/ is replaced in epoch 2: killed after renaming the old one aside, before renaming the new one in.
    {
        "name": "between-best-renames",
        "kills": [{"label": "rename .best.tmp-", "nth": 2}],
        "leaves": ".best.old-",
        "missing": "best",
    },
    {
        "name": "removing-old-best",
        "kills": [{"label": "remove .best.old-", "nth": 1}],
        "leaves": ".best.old-",
    },
    {"name": "pruning-old-checkpoint", "kills": [{"label": "remove ckpt-", "nth": 2}]},
    {
        "name": "several-kills-in-a-row",
        "kills": [
            {"event": "random", "within": 0.25},
            {"label": "/optimizer.safetensors", "nth": 2},
            {"event": "random", "within": 0.25},
            {"label": "rename .best.tmp-", "nth": 1},
            {"event": "random", "within": 0.25},
        ],
    },
    {"name": "random-time-1", "kills": [{"after_s": "random"}]},
    {"name": "random-time-2", "kills": [{"after_s": "random"}, {"after_s": "random"}]},
]


def child_env() -> dict:
    # No GPU in the children: their fits run on the CPU, and a process that touched CUDA cannot fork usefully.
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TQDM_DISABLE="1",
        CUDA_VISIBLE_DEVICES="",
    )
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Run every scenario in one child process; return its folder and REPORT.json."""
    work = tmp_path_factory.mktemp("kills")
    spec = work / "SPEC.json"
    spec.write_text(json.dumps({"seed": SEED, "scenarios": SCENARIOS}))
    proc = subprocess.run(
        [sys.executable, str(CHILD), "scenarios", str(spec)],
        env=child_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"the kill child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    return work, json.loads((work / "REPORT.json").read_text())


def result(folder: Path) -> tuple[dict, dict]:
    return load_file(str(folder / "weights.safetensors")), json.loads(
        (folder / "result.json").read_text()
    )


def assert_same_weights(ref: dict, got: dict, msg: str) -> None:
    assert ref.keys() == got.keys(), msg
    for key in ref:
        assert torch.equal(ref[key], got[key]), f"{key} differs from the uninterrupted run; {msg}"


def test_reference_run_has_every_kind_of_event(killed):
    # The targeted scenarios rely on these: a best/ that is replaced, old checkpoints pruned.
    work, _ = killed
    _, ref = result(work / "reference")
    events = ref["events"]
    assert ref["steps_run"] == 9 and ref["best"]["epoch"] == 2, ref["best"]
    for label in (
        "/model.safetensors",
        "/optimizer.safetensors",
        "/state.json",
        "/MANIFEST.json",
        "/LATEST",
        "rename best -> .best.old-",
        "remove .best.old-",
        "remove ckpt-",
    ):
        assert any(label in e for e in events), (
            f"no {label!r} among the reference run's events: {events}"
        )


@pytest.mark.parametrize("name", [s["name"] for s in SCENARIOS])
def test_killed_fit_resumes_to_the_uninterrupted_weights(killed, name):
    work, report = killed
    scenario = report["scenarios"][name]
    spec = next(s for s in SCENARIOS if s["name"] == name)
    msg = (
        f"scenario {name!r} (seed {SEED}, reference {report['reference_events']} events):\n"
        + json.dumps(scenario, indent=1)
    )
    for kill in scenario["kills"]:
        if "after_s" not in kill["spec"]:
            assert kill["ended"] == "SIGKILL", msg  # the kill point was reached
        if "label" in kill["spec"]:
            assert kill["spec"]["label"] in kill["at"], msg
        # After every kill, LATEST names a checkpoint that passes its checks.
        assert kill["ok"], msg
    if "leaves" in spec:
        assert any(n.startswith(spec["leaves"]) for n in scenario["leftovers_before_resume"]), msg
    if "missing" in spec:
        assert spec["missing"] not in scenario["kills"][-1]["after"], msg
    assert scenario["final"] == "exit 0", msg

    ref_weights, ref = result(work / "reference")
    got_weights, got = result(work / name)
    assert_same_weights(ref_weights, got_weights, msg)
    assert got["history"] == ref["history"], msg
    assert got["best"] == ref["best"], msg
    assert got["best_weights"] is True, f"best/ differs from the reference run's; {msg}"
    # Resumed from the last complete checkpoint, not from the start: only the steps after it ran.
    latest = scenario["resumed_from"]["latest"]
    done = int(latest.split("-")[1]) if latest else 0
    assert got["steps_run"] == ref["steps_run"] - done, msg
    # The killed writers' temporaries are gone.
    assert [n for n in got["listing_after"] if n.startswith(".")] == [], msg


def _load_child_module():
    spec = importlib.util.spec_from_file_location("kill_child_module", CHILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sigkill_from_outside_then_resume_in_this_process(killed, tmp_path):
    work, _ = killed
    step = random.Random(SEED).randint(2, 8)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), "fit", str(run_dir)],
        env=child_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.strip() == f"step {step}":
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    msg = f"killed after 'step {step}' (seed {SEED}); child output:\n" + "\n".join(lines[-30:])
    assert proc.returncode == -signal.SIGKILL, msg
    assert (run_dir / "LATEST").exists(), msg

    child = _load_child_module()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child that fitted the reference
    try:
        train, dev = child.make_data()
        m = child.make_matcher(run_dir, train).fit(train, eval_set=dev, resume=True)
    finally:
        torch.set_num_threads(threads)
    ref_weights, ref = result(work / "reference")
    assert_same_weights(ref_weights, dict(m.components_.state_dict()), msg)
    assert child.history_without_times(m.history_) == ref["history"], msg
    assert m.best_ == ref["best"], msg
