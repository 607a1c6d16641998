"""The run folder (checkpoint_dir): one writer, checked before training, and only this run's best/.

- A second writer is refused with ``RunFolderBusy`` naming the owner's pid and host; a lock of
  a process that is gone is taken over; the lock is removed when ``fit`` ends.
- A folder that cannot be written is reported before the first step, not after an epoch.
- On resume, a ``best/`` that is not the one this run wrote (another run's) is refused.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from toy import Crashing, toy_components, toy_data

from imtm import Matcher
from imtm.engine.checkpoint import CheckpointError, RunFolderBusy, latest_checkpoint


@pytest.fixture(scope="module")
def data():
    return toy_data(n_images=12)


def matcher(data, run, **kw):
    kw = {"epochs": 2, "batch_size": 6, "verbose": False, "device": "cpu", "random_state": 0, **kw}
    return Matcher(toy_components(data.vocab), checkpoint_dir=str(run), **kw)


class Counting(Crashing):
    """Counts the items read; sees whether the lock file exists while training."""

    def __init__(self, base, run):
        super().__init__(base, limit=10**9)
        self.run, self.locked = run, []

    def __getitem__(self, k):
        self.locked.append((self.run / ".lock").is_file())
        return super().__getitem__(k)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    "owner, match",
    [
        (
            lambda: {"pid": os.getppid(), "host": socket.gethostname()},
            r"being written by process \d+ on host",
        ),
        (
            lambda: {"pid": os.getpid(), "host": socket.gethostname()},
            r"being written by process \d+ on host",
        ),
        (
            lambda: {"pid": dead_pid(), "host": "another-host.example"},
            r"on host 'another-host\.example'",
        ),
        (lambda: "not json", r"another process \(the lock file is unreadable\)"),
    ],
)
def test_a_second_writer_is_refused_naming_the_owner(data, tmp_path, owner, match):
    tmp_path.mkdir(exist_ok=True)
    value = owner()
    (tmp_path / ".lock").write_text(json.dumps(value) if isinstance(value, dict) else value)
    train = Counting(data, tmp_path)
    with pytest.raises(RunFolderBusy, match=match + r".*two writers on one checkpoint_dir"):
        matcher(data, tmp_path).fit(train)
    assert (
        train.seen == 0 and (tmp_path / ".lock").is_file()
    )  # nothing trained, the owner's lock kept
    assert not latest_checkpoint(tmp_path)


def test_the_lock_is_held_while_training_released_after_and_a_stale_one_taken_over(data, tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    train = Counting(data, tmp_path)
    matcher(data, tmp_path).fit(train)
    assert train.locked and all(train.locked)
    assert not (tmp_path / ".lock").exists()
    with pytest.raises(RuntimeError, match="simulated crash"):  # released however fit ends
        matcher(data, tmp_path).fit(Crashing(data, 7))
    assert not (tmp_path / ".lock").exists()


def test_an_unwritable_checkpoint_dir_is_reported_before_training(data, tmp_path):
    (tmp_path / "file").write_text("x")
    train = Counting(data, tmp_path)
    with pytest.raises(
        PermissionError,
        match=r"checkpoint_dir '.*file[/\\]run' cannot be written.*nothing was "
        r"trained",
    ):
        matcher(data, tmp_path / "file" / "run").fit(train)
    assert train.seen == 0
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes anywhere: only for other users
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match="cannot be written"):
                matcher(data, ro).fit(train)
        finally:
            ro.chmod(0o700)
        assert train.seen == 0


def test_another_runs_best_is_refused_on_resume(data, tmp_path):
    # Run A crashes in epoch 2 after best/ was written in epoch 1; run B (another seed) has its own best/.
    with pytest.raises(RuntimeError, match="simulated crash"):
        matcher(data, tmp_path / "a", checkpoint_every=1).fit(Crashing(data, 30), eval_set=data)
    matcher(data, tmp_path / "b", random_state=1).fit(data, eval_set=data)
    mine = tmp_path / "a" / "best"
    assert mine.is_dir()
    kept = tmp_path / "a-best"
    shutil.move(mine, kept)
    shutil.copytree(tmp_path / "b" / "best", mine)
    with pytest.raises(
        CheckpointError,
        match=r"best is not the best epoch of the run in .*it may come from another "
        r"run",
    ):
        matcher(data, tmp_path / "a", checkpoint_every=1).fit(data, eval_set=data, resume=True)
    # With this run's own best/ back, it resumes to the uninterrupted run's weights.
    shutil.rmtree(mine)
    shutil.move(kept, mine)
    resumed = matcher(data, tmp_path / "a", checkpoint_every=1).fit(
        data, eval_set=data, resume=True
    )
    reference = matcher(data, tmp_path / "ref").fit(data, eval_set=data)
    for k, v in reference.components_.state_dict().items():
        assert torch.equal(v, resumed.components_.state_dict()[k]), k
