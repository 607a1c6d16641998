"""Soak run: train, checkpoint, resume, evaluate, save and load in a loop for a set time.

Every round builds a Matcher with the same seed, fits a short run on the built-in
synthetic benchmark with checkpoints in a temporary folder (every second round the
newest checkpoint is thrown away and the run resumed from the one before it),
evaluates, saves, loads and evaluates the loaded model. Each round must give the
same metrics and the same final weights, bit for bit, as round 1, and the loaded
model the same as the fitted one. After a warm-up, the process's resident memory
(VmRSS), open file descriptors and threads must not grow.

    OMP_NUM_THREADS=1 python benchmarks/soak.py --minutes 5 --preset vsepp
    OMP_NUM_THREADS=1 python benchmarks/soak.py --minutes 5 --preset chan
    OMP_NUM_THREADS=1 python benchmarks/soak.py --minutes 5 --preset laps --view pixels  # a one-layer ViT

Prints one line per round and a final verdict; exits with status 1 on any
difference or growth beyond the tolerances. Not a test: it never runs in the suite.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from imtm import Matcher, presets
from imtm.data import synthetic


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so VmRSS tracks live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (
        OSError,
        AttributeError,
    ):  # not glibc: VmRSS then also holds freed pages, which only adds noise
        pass


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def process_status() -> dict[str, float]:
    """Resident memory (MiB), open file descriptors and threads of this process (Linux /proc)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": int(fields["Threads"]),
    }


def drop_newest_checkpoint(run_dir: Path) -> str:
    """Delete the newest checkpoint and point LATEST at the one before it, as if the run had been killed."""
    ckpts = sorted(p for p in run_dir.glob("ckpt-*") if p.is_dir())
    if len(ckpts) < 2:
        raise RuntimeError(
            f"{run_dir}: need two checkpoints to resume from the earlier one, found {len(ckpts)}"
        )
    shutil.rmtree(ckpts[-1])
    (run_dir / "LATEST").write_text(ckpts[-2].name)
    return ckpts[-2].name


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that differ (in keys, dtype, shape or any bit)."""
    bad = sorted(set(a) ^ set(b))
    bad += [
        k
        for k in sorted(set(a) & set(b))
        if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])
    ]
    return bad


def one_round(args, data, resume: bool, tmp: Path) -> tuple[dict, dict, list[str], str]:
    train, test = data
    params = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "random_state": args.seed,
        "device": "cpu",
        "verbose": False,
        "checkpoint_dir": str(tmp / "run"),
        "keep_best": False,
    }

    def blocks():
        kwargs = {"embed_dim": args.embed_dim, "word_dim": args.embed_dim}
        if args.preset == "laps":  # a one-layer ViT of 8 x 8 patches on the pixel view's images
            kwargs.update(
                model_name="vit_tiny_patch16_224",
                img_size=args.image_size,
                model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
            )
        return presets.build(args.preset, train, **kwargs)

    m = Matcher(blocks(), **params).fit(train)
    note = ""
    if resume:
        name = drop_newest_checkpoint(tmp / "run")
        m = Matcher(blocks(), **params).fit(train, resume=True)
        note = f"resumed from {name}"
    metrics = m.evaluate(test)
    state = {k: v.detach().clone() for k, v in m.components_.state_dict().items()}
    m.save(tmp / "model")
    loaded = Matcher.load(tmp / "model", device="cpu")
    problems = []
    if loaded.evaluate(test) != metrics:
        problems.append("the loaded model's metrics differ from the fitted model's")
    diff = same_state(state, loaded.components_.state_dict())
    if diff:
        problems.append(f"the loaded weights differ from the fitted ones: {diff[:3]}")
    return metrics, state, problems, note


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="how long to keep starting rounds")
    p.add_argument("--preset", default="vsepp", choices=sorted(presets.PRESETS))
    p.add_argument(
        "--view", default="regions", choices=("regions", "pixels"), help="synthetic benchmark view"
    )
    p.add_argument("--image-size", type=int, default=32, help="pixel view: image side (LAPS)")
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--inject-leak-mib",
        type=float,
        default=0.0,
        help="keep this many MiB alive per round (checks that the verdict catches a leak)",
    )
    p.add_argument(
        "--inject-fd-leak", action="store_true", help="leave one file open per round (same purpose)"
    )
    p.add_argument(
        "--warmup-rounds", type=int, default=2, help="rounds before the memory baseline is taken"
    )
    p.add_argument(
        "--rss-tolerance-mib",
        type=float,
        default=32.0,
        help="allowed VmRSS growth after the warm-up: median of the last third of the rounds "
        "minus the median of the first third",
    )
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error(
            "--epochs must be >= 2 (a resumed round restarts from the checkpoint before the last)"
        )

    if (args.view == "pixels") != (args.preset == "laps"):
        p.error(
            "--preset laps takes --view pixels; the other presets take region features (--view regions)"
        )
    train, _, test = synthetic.load(
        view=args.view,
        seed=args.seed,
        n_train=args.n_train,
        n_dev=10,
        n_test=args.n_test,
        **({"image_size": args.image_size} if args.view == "pixels" else {}),
    )
    print(
        f"soak: preset={args.preset} view={args.view} n_train={args.n_train} n_test={args.n_test} "
        f"epochs={args.epochs} embed_dim={args.embed_dim} minutes={args.minutes} "
        f"torch threads={torch.get_num_threads()} pid={os.getpid()}",
        flush=True,
    )

    deadline = time.monotonic() + 60 * args.minutes
    first_metrics = first_state = None
    failures: list[str] = []
    samples: list[dict[str, float]] = []
    leaked: list = []
    rounds = 0
    while time.monotonic() < deadline or rounds < args.warmup_rounds + 2:
        rounds += 1
        resume = rounds % 2 == 0
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="imtm-soak-") as tmp:
            metrics, state, problems, note = one_round(args, (train, test), resume, Path(tmp))
        if first_metrics is None:
            first_metrics, first_state = metrics, state
        else:
            if metrics != first_metrics:
                changed = {
                    k: (first_metrics[k], v)
                    for k, v in metrics.items()
                    if first_metrics.get(k) != v
                }
                problems.append(f"metrics differ from round 1: {changed}")
            diff = same_state(first_state, state)
            if diff:
                problems.append(
                    f"weights differ from round 1 in {len(diff)} tensors, e.g. {diff[:3]}"
                )
        del state
        if args.inject_leak_mib:
            leaked.append(torch.ones(int(args.inject_leak_mib * 2**18)))  # float32: 4 bytes each
        if args.inject_fd_leak:
            leaked.append(open(os.devnull))  # noqa: SIM115 (kept open on purpose)
        release_freed_memory()
        s = process_status()
        samples.append(s)
        failures += [f"round {rounds}: {x}" for x in problems]
        print(
            f"round {rounds:3d}  {time.perf_counter() - t0:6.1f}s  rsum {metrics['rsum']:8.3f}  "
            f"{'identical' if not problems else 'DIFFERENT'}  rss {s['rss_mib']:7.1f} MiB  fds {s['fds']:3d}  "
            f"threads {s['threads']:2d}  {note}",
            flush=True,
        )

    # The baseline is the end of the warm-up. A leak lifts every later round, so memory growth
    # compares the medians of the first and last thirds of the rounds after it (a lone round
    # that caught the allocator holding freed pages does not count); fds and threads must
    # never exceed the baseline.
    base = samples[args.warmup_rounds - 1]
    after = samples[args.warmup_rounds - 1 :]
    n = len(after)
    third = max(1, n // 3)
    growth = {
        k: median([x[k] for x in after[-third:]]) - median([x[k] for x in after[:third]])
        for k in base
    }
    peak = {k: max(x[k] for x in after) - base[k] for k in base}
    xs = range(n)
    mean_x, mean_y = (n - 1) / 2, sum(x["rss_mib"] for x in after) / n
    slope = sum((i - mean_x) * (x["rss_mib"] - mean_y) for i, x in zip(xs, after)) / max(
        1e-12, sum((i - mean_x) ** 2 for i in xs)
    )
    if growth["rss_mib"] > args.rss_tolerance_mib:
        failures.append(
            f"VmRSS grew by {growth['rss_mib']:.1f} MiB after the warm-up (median of the last third "
            "of the rounds against the first third) "
            f"(tolerance {args.rss_tolerance_mib} MiB)"
        )
    for key in ("fds", "threads"):
        if peak[key] > 0:
            failures.append(f"{key} grew by up to {int(peak[key])} after the warm-up")
    print(
        f"summary: {args.preset} {args.view}: {rounds} rounds in {args.minutes:g} min; metrics and weights "
        f"{'identical to round 1 in every round' if not any('round 1' in f for f in failures) else 'DIFFER'}; "
        f"after warm-up (round {args.warmup_rounds}): rss {growth['rss_mib']:+.1f} MiB "
        f"(last third vs first third, medians; peak {peak['rss_mib']:+.1f}, slope {slope:+.2f} MiB/round), "
        f"fds {int(peak['fds']):+d}, threads {int(peak['threads']):+d} (peaks)"
    )
    for f in failures:
        print(f"FAIL: {f}")
    print(f"verdict: {'FAIL' if failures else 'PASS'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
