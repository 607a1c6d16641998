"""Child process of test_kill_resume.py: fits a tiny Matcher and SIGKILLs it at chosen points.

Two ways to run it (the tests do both)::

    python kill_child.py scenarios SPEC.json   # run every scenario of SPEC, write REPORT.json beside it
    python kill_child.py fit RUN_DIR           # one fit(resume=True), printing "step N" after each step

``scenarios`` imports torch once, fits the uninterrupted reference, then runs each
scenario in forked processes: every kill of the scenario is one ``fit(resume=True)`` on
the scenario's run folder that ends by SIGKILL, and a last ``fit(resume=True)`` must
finish; its weights, history and ``best/`` go to files the test compares with the
reference. A kill is either

- ``{"event": k}``: at the k-th *event* of the fit. Events are the end of each training
  step, each checkpoint file write, each rename and each folder removal in
  :mod:`imtm.engine.checkpoint`, labelled (``"write .ckpt-00000003.tmp-<pid>/model.safetensors"``,
  ``"rename .best.tmp-<pid> -> best"``, ``"remove ckpt-00000001"``, ``"step 4"``);
- ``{"label": text, "nth": n}``: at the n-th event whose label contains ``text``;
- ``{"after_s": t}``: by the parent, ``t`` seconds after the fork (wherever the fit is then).

A kill at a write leaves half of the file written (the bytes the writer would have
written, cut in the middle), at a removal half of the folder's files removed, at a
rename nothing renamed yet. The hooks are installed here by monkeypatching the names the
checkpoint code calls; the library itself has no test hook.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

#: The fit every scenario runs: 3 epochs of 3 batches (9 steps), a checkpoint after every
#: step, an evaluation each epoch whose best (rSum) is epoch 2 on CPU, so ``best/`` is
#: written, then replaced, then kept while the last epoch trains on. On the CPU: the fits run
#: in forked processes, and CUDA cannot be used again in a forked process.
FIT = dict(
    epochs=3,
    batch_size=16,
    lr=1e-2,
    random_state=0,
    checkpoint_every=1,
    verbose=False,
    device="cpu",
)
DATA = dict(view="regions", seed=0, n_train=9, n_dev=6, n_test=2, region_dim=16)


def make_data():
    from imtm.data import synthetic

    train, dev, _ = synthetic.load(**DATA)
    return train, dev


def make_matcher(run_dir, train):
    from imtm import Matcher, presets

    return Matcher(
        presets.build("vsepp", train, embed_dim=8, word_dim=8, hardest=False),
        checkpoint_dir=str(run_dir),
        **FIT,
    )


def history_without_times(history: list) -> list:
    """The history of a fit without its wall-clock times (the one field two identical runs differ in)."""
    return [{k: v for k, v in entry.items() if k != "time_s"} for entry in history]


# ---------------------------------------------------------------- kill points
class Events:
    """Counts labelled events; SIGKILLs this process at the one the kill spec names."""

    def __init__(self):
        self.labels: list[str] = []
        self.kill: dict | None = None
        self.matched = 0

    def due(self, label: str) -> bool:
        """Record ``label``; True when this process must die here (the caller cuts its work short first)."""
        self.labels.append(label)
        kill = self.kill
        if kill is None:
            return False
        if "event" in kill:
            return len(self.labels) == kill["event"]
        if "label" in kill and kill["label"] in label:
            self.matched += 1
            return self.matched == kill.get("nth", 1)
        return False

    def die(self, label: str) -> None:
        # The last words go to a file: the parent reports where the kill landed.
        Path(os.environ["KILL_CHILD_LAST"]).write_text(f"{len(self.labels)}: {label}")
        os.kill(os.getpid(), signal.SIGKILL)


EVENTS = Events()


class _ModuleProxy:
    """A module with a few functions replaced (only the checkpoint module sees it)."""

    def __init__(self, module, **replaced):
        self._module = module
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._module, name)


def install_hooks() -> None:
    """Wrap what imtm.engine.checkpoint calls to write, rename and remove, and Trainer.step."""
    import shutil

    from safetensors.torch import save as safetensors_bytes

    import imtm.engine.checkpoint as checkpoint
    import imtm.engine.serialization as serialization
    from imtm.engine.training import Trainer

    def where(path) -> str:
        path = Path(path)
        return f"{path.parent.name}/{path.name}"

    plain_write = serialization.atomic_write_bytes

    def atomic_write_bytes(path, data: bytes) -> None:
        path = Path(path)
        label = f"write {where(path)}"
        if EVENTS.due(label):
            # What the real writer has on disk when killed mid-write: a half-written temporary.
            fd, _ = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            os.write(fd, data[: len(data) // 2])
            os.fsync(fd)
            EVENTS.die(label)
        plain_write(path, data)

    plain_save_file = serialization.save_file

    def save_file(tensors, filename, metadata=None):
        # filename is save_tensors' temporary ".<name>.<random>": label the file it becomes.
        tmp = Path(filename)
        label = f"write {tmp.parent.name}/{tmp.name[1:].rsplit('.', 1)[0]}"
        if EVENTS.due(label):
            data = safetensors_bytes(tensors, metadata=metadata)
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            EVENTS.die(label)
        return plain_save_file(tensors, filename, metadata=metadata)

    def replace(src, dst):
        label = f"rename {Path(src).name} -> {Path(dst).name}"
        if EVENTS.due(label):
            EVENTS.die(label)
        return os.replace(src, dst)

    def rmtree(path, ignore_errors=False, **kwargs):
        label = f"remove {Path(path).name}"
        if EVENTS.due(label):
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            for p in files[: (len(files) + 1) // 2]:
                p.unlink()
            EVENTS.die(label)
        return shutil.rmtree(path, ignore_errors=ignore_errors, **kwargs)

    plain_step = Trainer.step

    def step(self, *args, **kwargs):
        out = plain_step(self, *args, **kwargs)
        label = f"step {self.global_step + 1}"
        if os.environ.get("KILL_CHILD_PROGRESS"):
            print(label, flush=True)
        if EVENTS.due(label):
            EVENTS.die(label)
        return out

    serialization.atomic_write_bytes = atomic_write_bytes  # atomic_write_json looks it up here
    checkpoint.atomic_write_bytes = atomic_write_bytes  # LATEST
    serialization.save_file = save_file
    checkpoint.os = _ModuleProxy(os, replace=replace)
    checkpoint.shutil = _ModuleProxy(shutil, rmtree=rmtree)
    Trainer.step = step


# ---------------------------------------------------------------- processes
def in_child(
    work, timeout_s: float = 120.0, kill_after_s: float | None = None
) -> tuple[str, float]:
    """Run ``work()`` in a forked process; return how it ended (``"exit 0"``, ``"SIGKILL"``...) and its time."""
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            work()
        except BaseException:  # noqa: BLE001 - reported through the exit status and stderr
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if kill_after_s is not None:
        time.sleep(kill_after_s)
        os.kill(
            pid, signal.SIGKILL
        )  # a zombie until waited for: the pid cannot be reused meanwhile
    deadline = t0 + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.time() - t0
        time.sleep(0.01)
    if os.WIFSIGNALED(status):
        how = signal.Signals(os.WTERMSIG(status)).name
    else:
        how = f"exit {os.WEXITSTATUS(status)}"
    return how, time.time() - t0


def listing(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []


def latest_state(run_dir: Path) -> dict:
    """What LATEST names, and whether that checkpoint passes its checks (it must, after any kill)."""
    from imtm.engine.checkpoint import CheckpointError, latest_checkpoint, verify_manifest

    try:
        folder = latest_checkpoint(run_dir)
        if folder is None:
            return {"latest": None, "ok": True}
        verify_manifest(folder)
        return {"latest": folder.name, "ok": True}
    except CheckpointError as e:
        return {"latest": None, "ok": False, "error": str(e)}


def save_result(matcher, out: Path, extra: dict) -> None:
    from imtm.engine.serialization import save_tensors

    save_tensors(out / "weights.safetensors", dict(matcher.components_.state_dict()))
    best = Path(matcher.checkpoint_dir) / "best"
    record = {
        "history": history_without_times(matcher.history_),
        "best": matcher.best_,
        "n_epochs": matcher.n_epochs_,
        "best_saved": best.is_dir(),
        **extra,
    }
    (out / "result.json").write_text(json.dumps(record, indent=1, sort_keys=True))


def run_scenarios(spec_path: Path) -> None:
    import torch

    spec = json.loads(spec_path.read_text())
    work_dir = spec_path.parent
    train, dev = make_data()
    install_hooks()
    os.environ["KILL_CHILD_LAST"] = str(work_dir / "last_words")

    # The uninterrupted reference, with the events counted (no kill is armed).
    ref_dir = work_dir / "reference"
    ref_dir.mkdir()
    t0 = time.time()
    reference = make_matcher(ref_dir / "run", train).fit(train, eval_set=dev)
    ref_time = time.time() - t0
    ref_events = list(EVENTS.labels)
    save_result(
        reference,
        ref_dir,
        {
            "events": ref_events,
            "time_s": ref_time,
            "steps_run": len([e for e in ref_events if e.startswith("step ")]),
        },
    )

    rng = random.Random(spec["seed"])
    report = {
        "seed": spec["seed"],
        "reference_events": len(ref_events),
        "reference_time_s": ref_time,
        "scenarios": {},
    }
    for scenario in spec["scenarios"]:
        name = scenario["name"]
        out = work_dir / name
        out.mkdir()
        run_dir = out / "run"
        kills = []
        for kill in scenario["kills"]:
            kill = dict(kill)
            # Random points are drawn here, from the spec's seed, among the reference run's events
            # (or its duration); what was drawn goes to the report and into the test's messages.
            if kill.get("event") == "random":
                kill["event"] = rng.randint(
                    1, max(1, int(len(ref_events) * kill.get("within", 1.0)))
                )
            if kill.get("after_s") == "random":
                kill["after_s"] = round(rng.uniform(0.0, ref_time), 3)
            last = Path(os.environ["KILL_CHILD_LAST"])
            last.unlink(missing_ok=True)
            before = listing(run_dir)

            def killed_fit(kill=kill, run_dir=run_dir):
                EVENTS.kill = None if "after_s" in kill else kill
                EVENTS.labels, EVENTS.matched = [], 0  # count this process's events only
                make_matcher(run_dir, train).fit(train, eval_set=dev, resume=True)

            how, seconds = in_child(killed_fit, kill_after_s=kill.get("after_s"))
            kills.append(
                {
                    "spec": kill,
                    "ended": how,
                    "seconds": round(seconds, 3),
                    "at": last.read_text() if last.exists() else None,
                    "before": before,
                    "after": listing(run_dir),
                    **latest_state(run_dir),
                }
            )

        start = latest_state(run_dir)
        leftovers_before = [n for n in listing(run_dir) if n.startswith(".")]

        def final_fit(run_dir=run_dir, out=out):
            EVENTS.kill = None
            EVENTS.labels, EVENTS.matched = [], 0
            m = make_matcher(run_dir, train).fit(train, eval_set=dev, resume=True)
            steps = [e for e in EVENTS.labels if e.startswith("step ")]
            save_result(
                m,
                out,
                {
                    "steps_run": len(steps),
                    "listing_after": listing(run_dir),
                    "best_weights": _best_weights_equal(run_dir, ref_dir / "run"),
                },
            )

        how, seconds = in_child(final_fit)
        report["scenarios"][name] = {
            "kills": kills,
            "final": how,
            "final_seconds": round(seconds, 3),
            "resumed_from": start,
            "leftovers_before_resume": leftovers_before,
        }
    report["threads"] = torch.get_num_threads()
    (work_dir / "REPORT.json").write_text(json.dumps(report, indent=1, sort_keys=True))


def _best_weights_equal(run_dir: Path, ref_run_dir: Path) -> bool | None:
    """Whether ``best/`` holds bit for bit the reference run's best weights (None: a folder is missing)."""
    import torch

    from imtm.engine.checkpoint import read_checkpoint

    if not (run_dir / "best").is_dir() or not (ref_run_dir / "best").is_dir():
        return None
    a = read_checkpoint(run_dir / "best", with_train_state=False)["model_state"]
    b = read_checkpoint(ref_run_dir / "best", with_train_state=False)["model_state"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_one_fit(run_dir: Path) -> None:
    """One fit(resume=True), printing each step (the test kills it from outside)."""
    train, dev = make_data()
    install_hooks()
    os.environ["KILL_CHILD_PROGRESS"] = "1"
    print("ready", flush=True)
    make_matcher(run_dir, train).fit(train, eval_set=dev, resume=True)
    print("done", flush=True)


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    if sys.argv[1] == "scenarios":
        run_scenarios(Path(sys.argv[2]))
    elif sys.argv[1] == "fit":
        run_one_fit(Path(sys.argv[2]))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} scenarios SPEC.json | fit RUN_DIR")
