"""Damaged checkpoints are refused, never loaded; what a killed writer left is recovered or removed.

Every case damages a copy of one complete run folder (toy blocks, 3 epochs, a checkpoint
every 3 steps, an evaluation each epoch whose best is epoch 1) and tries it with
``Matcher.load`` and ``fit(resume=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy import toy_components, toy_data

from imtm import Matcher
from imtm.engine.checkpoint import (
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    recover_run,
    verify_manifest,
)
from imtm.engine.serialization import file_sha256

FILES = ["config.json", "model.safetensors", "optimizer.safetensors", "state.json", "record.json"]
LAST, OLDER = (
    "ckpt-00000024",
    "ckpt-00000021",
)  # the two checkpoints a finished run keeps (keep_last=2)
LOGS = [
    "epochs.csv",
    "steps.csv",
]  # the CSV logs (loggers=("csv",), the default) beside the checkpoints
ADVICE = rf"Complete checkpoints in .*, newest first: {OLDER}; continue from one with fit\(\.\.\., resume='{OLDER}'\)"


@pytest.fixture(scope="module")
def data():
    return toy_data()


def matcher(data, run_dir) -> Matcher:
    return Matcher(
        toy_components(data.vocab),
        epochs=3,
        batch_size=6,
        lr=1e-2,
        random_state=0,
        verbose=False,
        checkpoint_dir=run_dir,
        checkpoint_every=3,
        device="cpu",
    )


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished run folder and its final weights (those of epoch 1, its best, by keep_best)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    m = matcher(data, run_dir).fit(data, eval_set=data)
    assert m.best_["epoch"] == 1 and len(m.history_) == 3, (
        m.history_
    )  # the best is not the last epoch
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["LATEST", "best", OLDER, LAST] + LOGS
    )
    return run_dir, {k: v.clone() for k, v in m.components_.state_dict().items()}, m.history_


@pytest.fixture
def run(finished, tmp_path):
    """A fresh copy of the finished run folder, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(finished[0], copy, symlinks=True)
    return copy


@pytest.fixture(scope="module")
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def listing(folder: Path) -> dict[str, list[str]]:
    entries = [folder, *folder.rglob("*")]
    return {
        str(p.relative_to(folder)): sorted(os.listdir(p)) if p.is_dir() else [] for p in entries
    }


def resume_is_refused(data, run_dir: Path, match: str) -> None:
    """fit(resume=True) raises CheckpointError matching ``match`` and writes nothing."""
    before = listing(run_dir)
    with pytest.raises(CheckpointError, match=match):
        matcher(data, run_dir).fit(data, eval_set=data, resume=True)
    assert listing(run_dir) == before


def assert_same_weights(state: dict, expected: dict) -> None:
    assert state.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(state[key], expected[key], rtol=0, atol=0)


def rewrite_manifest(folder: Path, change) -> None:
    path = folder / "MANIFEST.json"
    manifest = json.loads(path.read_text())
    change(manifest["sha256"])
    path.write_text(json.dumps(manifest))


# ---------------------------------------------------------------- every file is covered
@pytest.mark.parametrize("damage", ["truncate", "alter"])
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_file_is_refused_by_load_and_resume(data, run, name, damage):
    path = run / LAST / name
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # one byte changed in the middle: same size, still parseable for JSON digits
        k = len(raw) // 2
        path.write_bytes(raw[:k] + bytes([raw[k] ^ 1]) + raw[k + 1 :])
    message = rf"{name}: checksum mismatch; the file was truncated or altered"
    with pytest.raises(CheckpointError, match=message):
        Matcher.load(run / LAST)
    resume_is_refused(data, run, rf"{LAST}/{message}.*Nothing was loaded.*{ADVICE}")


@pytest.mark.parametrize("name", FILES)
def test_a_manifest_without_an_entry_is_refused(data, run, name):
    rewrite_manifest(run / LAST, lambda sha: sha.pop(name))
    message = rf"MANIFEST.json does not list \[.*'{name}'.*\]"
    with pytest.raises(CheckpointError, match=message):
        Matcher.load(run / LAST)
    resume_is_refused(data, run, message + ".*" + ADVICE)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "MANIFEST.json: unreadable manifest"),
        ("delete", "no MANIFEST.json; the checkpoint is incomplete"),
        ("not a table", "malformed manifest"),
        ("unknown entry", r"lists \['../../escape'\], which are not checkpoint files"),
        ("wrong digest", "model.safetensors: checksum mismatch"),
    ],
)
def test_a_damaged_manifest_is_refused(data, run, damage, message):
    path = run / LAST / "MANIFEST.json"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:25])
    elif damage == "delete":
        path.unlink()
    elif damage == "not a table":
        path.write_text(json.dumps({"sha256": ["model.safetensors"]}))
    elif damage == "unknown entry":
        rewrite_manifest(run / LAST, lambda sha: sha.update({"../../escape": "0" * 64}))
    else:
        rewrite_manifest(run / LAST, lambda sha: sha.update({"model.safetensors": "0" * 64}))
    with pytest.raises(CheckpointError, match=message):
        Matcher.load(run / LAST)
    resume_is_refused(data, run, message + ".*" + ADVICE)


def test_an_extra_or_a_missing_file_is_refused(data, run):
    (run / LAST / "notes.txt").write_text("added by hand")
    message = r"holds \['notes.txt'\], which MANIFEST.json does not list"
    with pytest.raises(CheckpointError, match=message):
        Matcher.load(run / LAST)
    resume_is_refused(data, run, message)
    (run / LAST / "notes.txt").unlink()
    (run / LAST / "optimizer.safetensors").unlink()
    message = "optimizer.safetensors is missing"
    with pytest.raises(CheckpointError, match=message):
        Matcher.load(run / LAST)
    resume_is_refused(data, run, message + ".*" + ADVICE)


def test_a_manifest_rewritten_to_match_is_not_detected_by_checksums(data, run):
    # The documented limit: checksums catch damage, not a forger who also rewrites the manifest.
    record = json.loads((run / LAST / "record.json").read_text())
    record["seed"] = 12345
    (run / LAST / "record.json").write_text(json.dumps(record))
    rewrite_manifest(
        run / LAST, lambda sha: sha.update({"record.json": file_sha256(run / LAST / "record.json")})
    )
    verify_manifest(run / LAST)
    assert Matcher.load(run / LAST).seed_ == 12345
    # A forged manifest over a file that no longer parses is still refused by the reader.
    weights = run / LAST / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    rewrite_manifest(
        run / LAST, lambda sha: sha.update({"model.safetensors": file_sha256(weights)})
    )
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        Matcher.load(run / LAST)
    resume_is_refused(data, run, "model.safetensors: not a readable safetensors file")


# ---------------------------------------------------------------- LATEST
@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "LATEST is empty"),
        (b"  \n", "LATEST is empty"),
        (b"../elsewhere", r"LATEST names '../elsewhere', which is not a checkpoint folder of"),
        (
            b".ckpt-00000024.tmp-1",
            r"LATEST names '.ckpt-00000024.tmp-1', which is not a checkpoint folder of",
        ),
        (b"ckpt-99999999", "LATEST names ckpt-99999999, which does not exist"),
        (b"\xff\xfe\x00garbage", "LATEST names .*, which"),
        (b"x" * 1500, "which is not a checkpoint folder of"),
    ],
)
def test_a_bad_latest_is_refused(data, run, content, message):
    # A complete checkpoint waits at each place a bad LATEST could lead to: none may be read.
    shutil.copytree(run / LAST, run.parent / "elsewhere")
    shutil.copytree(run / LAST, run / ".ckpt-00000024.tmp-1")
    (run / "LATEST").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        latest_checkpoint(run)
    resume_is_refused(
        data, run, message + rf".*Complete checkpoints in .*, newest first: {LAST}, {OLDER}"
    )


def test_load_of_a_run_folder_says_what_to_load(run):
    # Matcher.load reads one checkpoint folder, never LATEST: a run folder is refused with a pointer.
    with pytest.raises(
        CheckpointError,
        match=r"no MANIFEST.json.*a training run folder: load one of its checkpoints",
    ):
        Matcher.load(run)


def test_latest_naming_a_link_out_of_the_run_folder_is_refused(data, run):
    shutil.copytree(run / LAST, run.parent / "elsewhere")
    (run / "ckpt-link").symlink_to(run.parent / "elsewhere", target_is_directory=True)
    (run / "LATEST").write_text("ckpt-link")
    resume_is_refused(data, run, "LATEST names 'ckpt-link', which is not a checkpoint folder of")


# ---------------------------------------------------------------- resuming from an older checkpoint
def test_resume_from_a_named_older_checkpoint_gives_the_same_weights(data, run, finished):
    (run / LAST / "model.safetensors").write_bytes(b"damaged")
    assert [p.name for p in complete_checkpoints(run)] == [OLDER]
    m = matcher(data, run).fit(data, eval_set=data, resume=OLDER)
    assert_same_weights(m.components_.state_dict(), finished[1])
    assert [{k: v for k, v in h.items() if k != "time_s"} for h in m.history_] == [
        {k: v for k, v in h.items() if k != "time_s"} for h in finished[2]
    ]
    assert (run / "LATEST").read_text() == LAST  # rewritten by the resumed run, and complete again
    verify_manifest(run / LAST)


def test_resume_argument_is_checked(data, run):
    with pytest.raises(
        CheckpointError, match=r"ckpt-00000005: no such checkpoint folder.*" + OLDER
    ):
        matcher(data, run).fit(data, resume="ckpt-00000005")
    with pytest.raises(
        TypeError, match="resume must be True, False or the name or path of a checkpoint folder"
    ):
        matcher(data, run).fit(data, resume=3)
    with pytest.raises(CheckpointError, match="holds weights only; it cannot be resumed"):
        matcher(data, run).fit(data, resume="best")


# ---------------------------------------------------------------- best/ and leftovers of killed writers
def test_best_renamed_aside_by_a_killed_writer_is_restored(data, run, finished, dead_pid):
    # Killed between renaming best/ aside and renaming its replacement in: best/ is missing.
    os.replace(run / "best", run / f".best.old-{dead_pid}")
    shutil.copytree(run / LAST, run / f".best.tmp-{dead_pid}")  # the replacement, never renamed in
    m = matcher(data, run).fit(data, eval_set=data, resume=True)
    # keep_best ends with epoch 1's weights, read back from the restored best/.
    assert_same_weights(m.components_.state_dict(), finished[1])
    assert sorted(p.name for p in run.iterdir()) == sorted(["LATEST", "best", OLDER, LAST] + LOGS)


def test_a_removed_best_is_reported(data, run):
    shutil.rmtree(run / "best")
    resume_is_refused(data, run, r"records a best epoch .* but .*best is missing, so keep_best")


def test_leftovers_are_never_read_and_are_removed_by_the_next_writer(data, run, finished, dead_pid):
    # A complete-looking temporary with a later step, and leftovers of every kind.
    shutil.copytree(run / LAST, run / f".ckpt-00000099.tmp-{dead_pid}")
    shutil.copytree(run / OLDER, run / f".{LAST}.old-{dead_pid}")
    (run / ".LATEST.ab12cd34").write_bytes(b"ckpt-000")
    shutil.copytree(run / OLDER, run / ".ckpt-00000030.tmp-1")  # process 1 runs: kept
    (run / "notes.txt").write_text("not imtm's")
    (run / ".keep").write_text("not imtm's either")
    assert [p.name for p in complete_checkpoints(run)] == [LAST, OLDER]
    assert latest_checkpoint(run).name == LAST
    (run / LAST / "state.json").write_bytes(b"{}")  # so that resuming must go back to OLDER
    with pytest.raises(CheckpointError, match=ADVICE):
        matcher(data, run).fit(data, eval_set=data, resume=True)
    m = matcher(data, run).fit(data, eval_set=data, resume=OLDER)
    assert_same_weights(m.components_.state_dict(), finished[1])
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [".ckpt-00000030.tmp-1", ".keep", "LATEST", "best", OLDER, LAST, "notes.txt"] + LOGS
    )


def test_recover_run_restores_only_complete_folders_of_gone_processes(run, dead_pid):
    os.replace(run / "best", run / f".best.old-{dead_pid}")
    os.replace(run / OLDER, run / f".{OLDER}.old-1")  # its writer (process 1) may still run
    (run / LAST / "model.safetensors").unlink()
    os.replace(run / LAST, run / f".{LAST}.old-{dead_pid}")  # incomplete: kept aside, not restored
    done = recover_run(run)
    assert f"restored best from .best.old-{dead_pid}" in done
    assert any(
        line.startswith(f"kept .{LAST}.old-{dead_pid}: it cannot replace the missing {LAST}")
        for line in done
    )
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [f".{OLDER}.old-1", f".{LAST}.old-{dead_pid}", "LATEST", "best"] + LOGS
    )
    assert recover_run(run / "nowhere") == []


def test_a_save_killed_while_replacing_a_model_is_recovered(data, finished, tmp_path, dead_pid):
    m = Matcher.load(finished[0] / LAST)
    m.save(tmp_path / "model")
    os.replace(
        tmp_path / "model", tmp_path / f".model.old-{dead_pid}"
    )  # killed between the two renames
    (tmp_path / f".model.tmp-{dead_pid}").mkdir()
    (tmp_path / f".other.tmp-{dead_pid}").mkdir()  # another model's: not this writer's business
    with pytest.raises(
        CheckpointError,
        match=rf"model: no such checkpoint folder; .* left the previous version in "
        rf"\.model\.old-{dead_pid}",
    ):
        Matcher.load(tmp_path / "model")
    m.save(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.tmp-{dead_pid}", "model"]
    assert_same_weights(
        Matcher.load(tmp_path / "model").components_.state_dict(), m.components_.state_dict()
    )
