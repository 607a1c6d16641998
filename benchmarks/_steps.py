"""One training step of a preset, for the step benchmarks (bench_compile.py, bench_training.py).

A step here is what ``Matcher.fit`` does per batch: the blocks the preset's losses need, in order,
on one collated batch of the synthetic benchmark, the weighted sum of its losses, backward, an
AdamW step. All losses take part (DCPA's two stages at once); blocks no loss needs (ELA's
re-ranker, used at inference) are left out, as ``Matcher.fit`` leaves them out. The blocks are the
fitted ones of a ``Matcher`` (``components_``, ``plan_``), so ``Matcher(compile=True)``'s
compiled blocks are the ones timed. The scripts import it as ``from _steps import ...``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable

import torch

from imtm import Matcher, presets
from imtm.data import synthetic
from imtm.data.collate import collate

__all__ = ["PRESET_NAMES", "make_matcher", "make_batch", "train_step", "time_steps"]

PRESET_NAMES = ("vsepp", "chan", "dcpa", "dias", "laps", "ela")

_WORKDIR = tempfile.TemporaryDirectory(prefix="imtm-bench-")


def load_data(name: str, n_train: int, seed: int = 0):
    view = "pixels" if name in presets.PIXEL_PRESETS else "regions"
    train, _, _ = synthetic.load(view=view, seed=seed, n_train=n_train, n_dev=2, n_test=2)
    return train


def preset_kwargs(name: str, embed_dim: int) -> dict:
    kw: dict = {"embed_dim": embed_dim}
    if name not in presets.PIXEL_PRESETS:
        kw["word_dim"] = embed_dim
    return kw


def make_matcher(
    name: str, train, *, embed_dim: int, batch_size: int, compile: bool, device: str = "cpu"
) -> Matcher:
    """A Matcher of preset ``name`` fitted for one epoch on ``train`` (the warm-up: compilation happens there)."""
    comps = presets.build(name, train, workdir=_WORKDIR.name, **preset_kwargs(name, embed_dim))
    m = Matcher(
        comps,
        epochs=1,
        batch_size=batch_size,
        compile=compile,
        verbose=False,
        device=device,
        keep_best=False,
    )
    m.fit(train)
    m.components_.train()
    return m


def make_batch(train, start: int, batch_size: int, device: str = "cpu") -> dict:
    batch = collate([train[i % len(train)] for i in range(start, start + batch_size)])
    values = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
    ids = values["image_ids"]
    values["positives"] = ids[:, None] == ids[None, :]
    return values


def train_step(
    m: Matcher, values: dict, opt: torch.optim.Optimizer, timer: Callable | None = None
) -> float:
    """One step: blocks in order, weighted losses, backward, optimizer. ``timer(name, seconds)`` gets
    each block's forward time (after a device synchronisation) when given.

    As ``Matcher.fit``, the step runs only the blocks the losses need (``Plan.needed_for``): an
    inference-only block such as ELA's re-ranker is left out.
    """
    plan = m.plan_
    values = dict(values)
    total = 0.0
    run = set(plan.needed_for([plan.names[k] for k in range(len(plan.blocks)) if plan.is_loss(k)]))
    for k, block in enumerate(plan.blocks):
        if k not in run:
            continue
        t0 = time.perf_counter()
        out = block(*[values[r] for r in block.requires])
        if timer is not None:
            _sync(values)
            timer(plan.names[k], time.perf_counter() - t0)
        if plan.is_loss(k):
            total = total + getattr(block, "weight", 1.0) * out.float()
            continue
        provides = tuple(block.provides)
        if len(provides) == 1:
            values[provides[0]] = out
        else:
            values.update(zip(provides, out))
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    if timer is not None:
        _sync(values)
        timer("backward + optimizer", time.perf_counter() - t0)
    return float(total.detach())


def _sync(values) -> None:
    if torch.cuda.is_available() and any(
        isinstance(v, torch.Tensor) and v.is_cuda for v in values.values()
    ):
        torch.cuda.synchronize()


def time_steps(m: Matcher, batches: list[dict], repeats: int = 1) -> float:
    """Seconds per step, the median over ``repeats`` passes over ``batches``."""
    opt = torch.optim.AdamW([p for p in m.components_.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(repeats):
        for values in batches:
            t0 = time.perf_counter()
            train_step(m, values, opt)
            _sync(values)
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]
