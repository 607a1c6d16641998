"""Child process of test_kill_resume_options.py: the training options of the loop, killed by SIGKILL.

``python kill_options_child.py SPEC.json`` imports torch once and, for each scenario of
SPEC (a set of options: optimizer, schedule, lr factors, stages, accumulation, fp16 scaling,
early stopping, a stream), fits the uninterrupted reference in a forked process, then runs
the scenario's kills: each one a ``fit(resume=True)`` in a forked process that SIGKILLs
itself right after the step the spec names (before that step's checkpoint is written), and
a last ``fit(resume=True)`` that must finish. The weights, history and counters of the
reference and of the resumed run go to files beside SPEC that the test compares.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # kill_child (this folder), toy (tests/)

from kill_child import history_without_times, in_child  # noqa: E402

#: Which step's end kills the process (``None``: no kill), set in the forked child.
KILL_AT: list[int | None] = [None]


def install_step_hook() -> None:
    """SIGKILL this process at the end of step ``KILL_AT[0]`` (counted over the whole run)."""
    from imtm.engine.training import Trainer

    plain = Trainer.step

    def step(self, *args, **kwargs):
        out = plain(self, *args, **kwargs)
        if KILL_AT[0] is not None and self.global_step + 1 == KILL_AT[0]:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    Trainer.step = step


def scenario(name: str, run_dir: Path | None):
    """``(matcher, train, fit keyword arguments)`` of scenario ``name`` (a new one every call)."""
    import torch
    from torch.utils.data import DataLoader, IterableDataset
    from toy import ToyCosine, ToyHinge, ToyImage, ToyText, toy_data

    from imtm import Loss, Matcher, Stage
    from imtm.data import collate
    from imtm.engine.callbacks import EarlyStopping

    data = toy_data(n_images=12)  # 24 captions: 4 batches of 6
    blocks = [
        ("image", ToyImage()),
        ("text", ToyText(vocab=data.vocab)),
        ("score", ToyCosine()),
        ("loss", ToyHinge()),
    ]
    kw = dict(
        epochs=2,
        batch_size=6,
        lr=5e-2,
        device="cpu",
        random_state=0,
        verbose=False,
        checkpoint_every=2,
        checkpoint_dir=None if run_dir is None else str(run_dir),
    )
    fit: dict = {}
    train = data
    if name == "sgd-step-decay-lr-factors":
        kw.update(
            optimizer=("sgd", {"momentum": 0.9}),
            lr_scheduler="x0.5 every epoch",
            lr_factors={"image": 0.5},
        )
    elif name == "stages-adam-restarts":
        kw.update(
            stages=[
                Stage(epochs=1, optimizer="adam", lr_scheduler="constant", batch_size=4, name="a"),
                Stage(
                    epochs=2,
                    lr_scheduler={"name": "cosine_restarts", "period": 1},
                    lr_factors={"text": 0.1},
                    name="b",
                ),
            ]
        )
    elif name == "accumulate":
        kw.update(accumulate=3, batch_size=12)
    elif name == "fp16-scaler":

        class Huge(Loss):
            """InfoNCE-like loss large enough that the first fp16 gradients overflow."""

            requires = ("scores", "positives")
            provides = ("huge",)

            def __init__(self, factor=30.0, *, requires=None, provides=None):
                super().__init__(requires=requires, provides=provides)
                self.factor = factor

            def forward(self, scores, positives):
                s = scores.float()
                return self.factor * (s - s.diagonal()[None]).clamp_min(-1).mean()

        blocks[-1] = ("loss", Huge())
        kw.update(precision="fp16", lr=1e-3)
    elif name == "early-stopping":
        kw.update(epochs=6, lr=0.3, lr_scheduler="constant", warmup=0)
        # min_delta out of reach: the first evaluation sets the best, two more stop the run
        # (epoch 3 of 6); the resumed run must know how many evaluations have not improved.
        fit = dict(eval_set=data, callbacks=[EarlyStopping("rsum", patience=2, min_delta=1e3)])
    elif name == "stream":

        class Stream(IterableDataset):
            """The toy items without a length, reshuffled by set_epoch, with noise from torch's generator."""

            def __init__(self):
                self.epoch = 0

            def set_epoch(self, epoch):
                self.epoch = epoch

            def __iter__(self):
                g = torch.Generator().manual_seed(self.epoch)
                for k in torch.randperm(len(data), generator=g).tolist():
                    item = data[k]
                    noise = 0.1 * torch.randn(item["images"].shape)
                    yield {**item, "images": item["images"] + noise}

        train = DataLoader(Stream(), batch_size=6, collate_fn=collate)
        kw.update(steps_per_epoch=3)
    else:
        raise ValueError(f"unknown scenario {name!r}")
    return Matcher(blocks, **kw), train, fit


def run_and_save(name: str, run_dir: Path | None, out: Path, resume: bool) -> None:
    from imtm.engine.serialization import save_tensors

    m, train, fit = scenario(name, run_dir)
    m.fit(train, resume=resume, **fit)
    save_tensors(out / "weights.safetensors", dict(m.components_.state_dict()))
    result = {
        "history": history_without_times(m.history_),
        "n_epochs": m.n_epochs_,
        "epochs_run": len(m.history_),
        "overflow_steps": getattr(m, "overflow_steps_", None),
        "steps": m.history_[-1]["step"] if m.history_ else 0,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=str))


def main(spec_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    spec = json.loads(spec_path.read_text())
    work = spec_path.parent
    install_step_hook()
    # One fit here first: what a first fit imports lazily is then imported in every forked child.
    m, train, fit = scenario(spec["scenarios"][0], None)
    m.set_params(epochs=1).fit(train, **fit)
    rng = random.Random(spec["seed"])
    report = {}
    for name in spec["scenarios"]:
        ref = work / name / "reference"
        ref.mkdir(parents=True)
        t0 = time.time()
        how, _ = in_child(lambda name=name, ref=ref: run_and_save(name, None, ref, False))
        steps = json.loads((ref / "result.json").read_text())["steps"]
        # Two kills after steps drawn from the seed: the second one in the resumed run.
        first = rng.randint(2, max(2, steps // 2))
        second = rng.randint(first + 1, steps - 1)
        run_dir, out = work / name / "run", work / name / "resumed"
        out.mkdir()
        kills = []
        for at in (first, second):

            def killed(at=at, run_dir=run_dir, out=out, name=name):
                KILL_AT[0] = at
                run_and_save(name, run_dir, out, True)

            ended, _ = in_child(killed)
            kills.append({"at_step": at, "ended": ended})
        KILL_AT[0] = None
        final, _ = in_child(
            lambda name=name, run_dir=run_dir, out=out: run_and_save(name, run_dir, out, True)
        )
        report[name] = {
            "reference": how,
            "steps": steps,
            "kills": kills,
            "final": final,
            "seconds": round(time.time() - t0, 2),
        }
    (work / "REPORT.json").write_text(json.dumps(report, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
