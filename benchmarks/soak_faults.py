"""Fault-injection soak: SIGINT and SIGKILL at random moments, then resume; every resume exact or refused.

Each trial trains one small model (VSE++ blocks with dropout in the image projection, the
GRU text encoder, caption augmentation) in fresh child processes with a checkpoint after
every step, and interrupts them at random moments, drawn from ``--seed``: SIGINT
(Ctrl-C) or SIGKILL, at a uniform time between the start of the child's ``fit`` and the
length of an uninterrupted fit (so they land in a step, a checkpoint write, the start of an
epoch, or while data-loader workers load a batch). The next child resumes with ``fit(resume=True)``, until one
finishes. Its final weights are compared bit for bit with those of an uninterrupted run of
the same kind. The data come in one of three ways, in turn:

- ``loader``: a user ``DataLoader(shuffle=True, num_workers=2)`` over the augmented dataset;
- ``dataset``: the augmented dataset itself, ``Matcher(num_workers=2)``;
- ``subclass``: a ``DataLoader`` subclass (shuffle, two workers), which imtm iterates as
  given: a checkpoint written mid-epoch cannot be replayed and must be refused
  (``CheckpointError``), the refusal ending the trial.

Each resume is counted as bit-exact (its trial ended with the uninterrupted run's weights),
refused with a clear error, or silently different (its trial ended with other weights). The
goal: none silently different.

    OMP_NUM_THREADS=1 timeout 660 python benchmarks/soak_faults.py --minutes 10

Not a test: it never runs in the suite. Exits with status 1 when a resume was silently different.
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("loader", "dataset", "subclass")
REFUSED, INTERRUPTED = 3, 4  # the child's exit codes


# ---------------------------------------------------------------- the child: one fit(resume=True)
def child(run_dir: Path, kind: str, out: Path, epochs: int) -> int:
    import torch
    from torch.utils.data import DataLoader

    from imtm import Matcher
    from imtm.components import GlobalCosine, GRUTextEncoder, PrecomputedEncoder, TripletLoss
    from imtm.data import CaptionAugment, ImageCaptionDataset, collate, synthetic
    from imtm.engine.checkpoint import CheckpointError, latest_checkpoint
    from imtm.engine.serialization import save_tensors

    torch.set_num_threads(1)
    base = synthetic.load(view="regions", seed=0, n_train=12, n_dev=4, n_test=2, region_dim=16)[0]

    class Augmented(ImageCaptionDataset):
        def __init__(self):
            super().__init__(
                base.images, base.captions, base.caption_to_image, vocab=base.vocab, name="soak"
            )
            self.augment = CaptionAugment.from_vocabulary(base.vocab)

        def __getitem__(self, k):
            item = super().__getitem__(k)
            return {**item, "texts": self.augment(item["texts"])}

    class MyLoader(DataLoader):
        pass

    data = Augmented()
    workers = {"num_workers": 2, "multiprocessing_context": "fork"}
    train = {
        "loader": lambda: DataLoader(
            data, batch_size=10, shuffle=True, collate_fn=collate, **workers
        ),
        "dataset": lambda: data,
        "subclass": lambda: MyLoader(
            data, batch_size=10, shuffle=True, collate_fn=collate, **workers
        ),
    }[kind]()
    blocks = [
        ("image", PrecomputedEncoder(in_dim=16, out_dim=16, dropout=0.2)),
        ("text", GRUTextEncoder(vocab=base.vocab, out_dim=16, word_dim=8)),
        ("scorer", GlobalCosine()),
        ("loss", TripletLoss()),
    ]
    m = Matcher(
        blocks,
        epochs=epochs,
        batch_size=10,
        lr=1e-2,
        random_state=0,
        device="cpu",
        verbose=False,
        checkpoint_dir=str(run_dir),
        checkpoint_every=1,
        num_workers=2 if kind == "dataset" else 0,
    )
    latest = latest_checkpoint(run_dir) if (run_dir / "LATEST").exists() else None
    print(f"start {'resume ' + latest.name if latest else 'fresh'}", flush=True)
    try:
        m.fit(train, resume=True)
    except CheckpointError as e:
        print(f"refused: {e}", flush=True)
        return REFUSED
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return INTERRUPTED
    save_tensors(out, dict(m.components_.state_dict()))
    print("done", flush=True)
    return 0


# ---------------------------------------------------------------- the parent
def run_child(run_dir: Path, kind: str, out: Path, epochs: int, kill: tuple[str, float] | None):
    """Start a child; ``kill`` = (signal name, seconds after its fit started) unless it ended first.

    Return (exit code, output, seconds from the start of its fit to its end).
    """
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TQDM_DISABLE="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
    )
    proc = subprocess.Popen(
        [sys.executable, __file__, "child", str(run_dir), kind, str(out), str(epochs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(
        target=lambda: [lines.put(x) for x in proc.stdout] and None, daemon=True
    )
    reader.start()
    output, started = [], None
    deadline = time.time() + 600
    while started is None and time.time() < deadline:  # the import and data set-up take a while
        try:
            line = lines.get(timeout=0.05)
        except queue.Empty:
            if proc.poll() is not None and not reader.is_alive():
                break
            continue
        output.append(line)
        if line.startswith("start"):
            started = time.time()
    if kill is not None and started is not None:
        try:
            proc.wait(timeout=kill[1])
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT if kill[0] == "SIGINT" else signal.SIGKILL)
    try:
        proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "timeout", "".join(output), 0.0
    ended = time.time()
    reader.join(timeout=10)
    while not lines.empty():
        output.append(lines.get())
    return proc.returncode, "".join(output), ended - (started or ended)


def weights(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))


def same(a, b) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long to keep starting trials")
    p.add_argument("--seed", type=int, default=0, help="draws the signals and their moments")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-interrupts", type=int, default=4, help="interrupts per trial at most")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="imtm-soak-faults-"))
    print(
        f"soak_faults: seed={args.seed} epochs={args.epochs} minutes={args.minutes} work={work}",
        flush=True,
    )
    references, durations = {}, {}
    for kind in KINDS:
        code, output, seconds = run_child(
            work / f"ref-{kind}", kind, work / f"ref-{kind}.safetensors", args.epochs, None
        )
        if code != 0:
            print(f"the uninterrupted {kind} run failed ({code}):\n{output[-3000:]}")
            return 2
        durations[kind], references[kind] = seconds, weights(work / f"ref-{kind}.safetensors")
        print(f"reference {kind}: its fit took {durations[kind]:.1f}s", flush=True)

    counts = {
        "trials": 0,
        "SIGINT": 0,
        "SIGKILL": 0,
        "resumes": 0,
        "bit-exact": 0,
        "refused": 0,
        "silently different": 0,
        "before a refusal (not judged)": 0,
    }
    examples: list[str] = []
    deadline = time.monotonic() + 60 * args.minutes
    trial = 0
    while time.monotonic() < deadline:
        kind = KINDS[trial % len(KINDS)]
        trial += 1
        run_dir, out = work / f"trial-{trial}", work / f"trial-{trial}.safetensors"
        resumes, refused, log = 0, False, []
        for attempt in range(args.max_interrupts + 1):
            kill = None
            if attempt < args.max_interrupts:
                kill = (
                    rng.choice(["SIGINT", "SIGKILL"]),
                    round(rng.uniform(0, durations[kind]), 2),
                )
            code, output, _ = run_child(run_dir, kind, out, args.epochs, kill)
            resumed = "start resume" in output
            resumes += resumed
            log.append(f"{kill} -> {code}{' (resumed)' if resumed else ''}")
            if kill is not None and code in (INTERRUPTED, -signal.SIGKILL, -signal.SIGINT):
                counts[kill[0]] += 1
            if code == REFUSED:
                refused = True
                why = next(
                    (line for line in output.splitlines() if line.startswith("refused:")), ""
                )
                if len(examples) < 3:
                    examples.append(f"trial {trial} ({kind}): {why[:300]}")
                break
            if code == 0:
                break
            if code not in (INTERRUPTED, -signal.SIGKILL, -signal.SIGINT):
                print(
                    f"trial {trial} ({kind}): the child failed ({code}):\n{output[-3000:]}",
                    flush=True,
                )
                return 2
        counts["trials"] += 1
        counts["resumes"] += resumes
        if refused:
            counts["refused"] += 1
            counts["before a refusal (not judged)"] += (
                resumes - 1
            )  # the trial ends without final weights
            verdict = "refused"
        elif out.is_file() and same(references[kind], weights(out)):
            counts["bit-exact"] += (
                resumes  # a trial without resume (killed before any checkpoint) adds none
            )
            verdict = "bit-exact"
        else:
            counts["silently different"] += max(resumes, 1)
            verdict = "DIFFERENT"
        print(
            f"trial {trial:3d} {kind:8s} {verdict:9s} resumes {resumes}  " + "; ".join(log),
            flush=True,
        )
        shutil.rmtree(run_dir, ignore_errors=True)
        out.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    print("summary: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for e in examples:
        print(f"refusal: {e}")
    bad = counts["silently different"]
    print(
        f"verdict: {'FAIL' if bad else 'PASS'} (every judged resume bit-exact or refused: {'no' if bad else 'yes'})",
        flush=True,
    )
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(child(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), int(sys.argv[5])))
    sys.exit(main())
