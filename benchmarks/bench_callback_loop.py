"""Step time of the callback training loop against the loop before it, side by side in one process.

Not part of the test suite. Trains the CHAN preset (precomputed regions, BiGRU text, hard
assignment coding, triplet loss) on the synthetic regions data with the same seed twice per
round: once with today's ``Trainer`` (the public loop with callbacks, the default ``loggers``
and, with ``--run-folder``, its CSV step log), once with the loop of commit ``bf97c0b``
(``imtm/engine/training.py`` read from git and run on the same Matcher). Rounds alternate the
order; the printed numbers are each loop's median seconds per step over the rounds and the
overhead of the new loop relative to the old one, of the medians and of the fastest rounds (the
least disturbed by other work on a shared machine). Both loops give the same weights (checked).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_callback_loop.py            # 5 rounds
    OMP_NUM_THREADS=1 python benchmarks/bench_callback_loop.py --quick    # 2 small rounds
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from imtm import Matcher, presets
from imtm.data import synthetic

ROOT = Path(__file__).resolve().parents[1]
#: The last commit with the loop before callbacks.
OLD = "bf97c0b"
#: Imports of the old loop whose names have since moved or lost their underscore.
RENAMED = {
    "from imtm.data.seeding import SeededItems, _restored,": "from imtm.data.seeding import SeededItems, restored as _restored,",
    "from imtm.engine.evaluation import move, run_blocks": "from imtm.engine.blocks import move, run_blocks",
}


def old_trainer_class():
    """``Trainer`` of imtm/engine/training.py at commit OLD, as a module of its own."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{OLD}:imtm/engine/training.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # Names the library has renamed or moved since OLD (same functions).
    for before, after in RENAMED.items():
        source = source.replace(before, after)
    module = types.ModuleType("imtm_training_" + OLD)
    module.__file__ = f"<{OLD}:imtm/engine/training.py>"
    sys.modules[module.__name__] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module.Trainer


def make(train, args, run_dir=None) -> Matcher:
    return Matcher(
        presets.chan(
            vocab=train.vocab, region_dim=train.region_dim, embed_dim=args.dim, word_dim=64
        ),
        epochs=args.epochs,
        batch_size=args.batch,
        lr=2e-4,
        device="cpu",
        random_state=0,
        verbose=False,
        checkpoint_dir=run_dir,
    )


def time_new(train, args) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        m = make(train, args, Path(tmp) / "run" if args.run_folder else None)
        t0 = time.perf_counter()
        m.fit(train)
        return time.perf_counter() - t0, m.components_.state_dict()


def time_old(train, args, Trainer) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        m = make(train, args, Path(tmp) / "run" if args.run_folder else None)
        m.validate()
        t0 = time.perf_counter()
        Trainer(m, train).run(resume=False)
        return time.perf_counter() - t0, m.components_.state_dict()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument(
        "--run-folder", action="store_true", help="both loops write checkpoints (and the CSV log)"
    )
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.n_train, args.epochs = 2, 100, 1
    torch.manual_seed(0)
    train, _, _ = synthetic.load(view="regions", seed=0, n_train=args.n_train, n_dev=10, n_test=10)
    Trainer = old_trainer_class()
    steps = args.epochs * -(-len(train) // args.batch)
    time_new(train, args)  # warm-up (first-call costs of both paths)
    time_old(train, args, Trainer)
    new, old = [], []
    for r in range(args.rounds):
        order = (
            [("new", time_new), ("old", time_old)]
            if r % 2 == 0
            else [("old", time_old), ("new", time_new)]
        )
        weights = {}
        for name, fn in order:
            seconds, state = fn(train, args) if name == "new" else fn(train, args, Trainer)
            (new if name == "new" else old).append(seconds / steps)
            weights[name] = state
        assert all(torch.equal(weights["new"][k], weights["old"][k]) for k in weights["new"]), (
            "loops differ"
        )
    n, o = statistics.median(new), statistics.median(old)
    print(
        f"CHAN preset, synthetic regions: {len(train)} captions, batch {args.batch}, dim {args.dim}, "
        f"{steps} steps per fit, {args.rounds} rounds, run folder: {args.run_folder}"
    )
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(
        f"old loop ({OLD}): median {o * 1e3:.2f} ms/step  (rounds: {', '.join(f'{x * 1e3:.2f}' for x in old)})"
    )
    print(
        f"callback loop:    median {n * 1e3:.2f} ms/step  (rounds: {', '.join(f'{x * 1e3:.2f}' for x in new)})"
    )
    print(
        f"overhead of the callback loop: {100 * (n / o - 1):+.2f}% of the median, "
        f"{100 * (min(new) / min(old) - 1):+.2f}% of the fastest round (same weights: yes)"
    )


if __name__ == "__main__":
    main()
