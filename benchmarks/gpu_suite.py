"""The GPU checks in one short script: GPU-marked tests, scorer throughput, bf16 training steps, two-stage search.

Not part of the test suite. Meant to run in under 8 minutes on one CUDA GPU::

    python benchmarks/gpu_suite.py                  # on a CUDA machine: full sizes
    python benchmarks/gpu_suite.py --device cpu     # smoke run on the CPU: tiny sizes, seconds to minutes

Sections, each printed with its ratios measured side by side in this one run:

  (1) the tests marked ``gpu`` (``pytest -m gpu``; they skip without CUDA, and say so);
  (2) each pairwise scorer's all-pairs throughput (default 5,000 images x 25,000 captions,
      N = 36 regions, 8-20 words, D = 1,024) with bf16 products, as a fraction of the
      measured bf16 ``torch.mm`` throughput on the same FLOPs (``2 N D`` per image and real
      word: the product every scorer needs at least; scorers doing more work than that
      product show a lower fraction). Goal: CHAN (hard assignment) and LAPS's sparse
      alignment >= 0.5; then (2b) the scorers that run a layer per pair, LAPS's full
      ``PatchSlimming`` (N = 196 + [CLS], D = 512) and DCPA's two ``InterModalPhraseAttention``
      branches, on a subset (``--pair-images`` x ``--pair-captions``), each as a fraction of
      the bf16 ``torch.mm`` rate over the FLOPs of its own products (``bench_laps.py``'s and
      ``bench_dcpa.py``'s counts), with the time the whole problem would take;
  (3) each preset's training step (``_steps.py``: forward of every block, losses, backward,
      AdamW) under bf16 autocast: samples/s and peak device memory;
  (4) two-stage retrieval (``bench_two_stage.py --quick`` sizes scaled to ``--gallery`` images;
      that script scores on the CPU: it measures the search, whatever the device here).

With ``--device cpu`` every section runs at smoke sizes and the header says so: the
numbers then show that the script works, not what a GPU does.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

MIN_WORDS, MAX_WORDS = 8, 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_rate(rows: int, inner: int, cols: int, dtype, device, repeats: int) -> float:
    """GFLOP/s of one ``(rows x inner) . (inner x cols)`` product into a reused output."""
    a = torch.randn(rows, inner, device=device).to(dtype)
    b = torch.randn(cols, inner, device=device).to(dtype)
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    seconds = best_time(lambda: torch.mm(a, b.t(), out=out), device, repeats)
    return 2.0 * rows * inner * cols / seconds / 1e9


def section_tests(args) -> None:
    print("(1) tests marked gpu:", flush=True)
    if args.device == "cpu":
        print(
            "    on the CPU they are skipped by design (no CUDA device); running them to show the skip"
        )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests" / "test_gpu.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    for line in proc.stdout.strip().splitlines()[-4:]:
        print("    " + line)
    print(f"    pytest exit status {proc.returncode}", flush=True)


def make_tokens(n_images, n_captions, n_regions, dim, device, seed=0):
    from imtm import Tokens

    g = torch.Generator().manual_seed(seed)
    images = Tokens(torch.randn(n_images, n_regions, dim, generator=g).to(device))
    lengths = torch.randint(MIN_WORDS, MAX_WORDS + 1, (n_captions,), generator=g)
    texts = Tokens.from_lengths(
        torch.randn(n_captions, MAX_WORDS, dim, generator=g).to(device), lengths.tolist()
    )
    return images, texts, int(lengths.sum())


def section_scorers(args, device) -> None:
    from imtm.components import (
        HardAssignmentCoding,
        LocalMatching,
        ScanAttention,
        SoftAssignmentCoding,
        SparsePatchWordAlignment,
    )

    bf16 = torch.bfloat16
    images, texts, words = make_tokens(args.images, args.captions, 36, args.dim, device)
    flops = 2.0 * args.images * 36 * words * args.dim
    roof = matmul_rate(
        args.images * 36 if device.type == "cuda" else 36 * 64,
        args.dim,
        min(words, 1 << 16),
        bf16,
        device,
        args.repeats,
    )
    print(
        f"(2) scorers, {args.images} images x {args.captions} captions, N=36, {MIN_WORDS}-{MAX_WORDS} words, "
        f"D={args.dim}, bf16 products; bf16 torch.mm: {roof:.0f} GFLOP/s",
        flush=True,
    )
    scorers = {
        "CHAN HardAssignmentCoding": lambda: HardAssignmentCoding(compute_dtype=bf16),
        "LAPS SparsePatchWordAlignment": lambda: SparsePatchWordAlignment(compute_dtype=bf16),
        "CHAN SoftAssignmentCoding": lambda: SoftAssignmentCoding(),
        "SCAN ScanAttention": lambda: ScanAttention(),
        "LocalMatching": lambda: LocalMatching(),
    }
    for name, make in scorers.items():
        try:
            block = make().to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=bf16):
                seconds = best_time(lambda block=block: block(images, texts), device, args.repeats)
        except Exception as err:  # noqa: BLE001 - reported, the suite goes on
            print(f"    {name:32} FAILED: {type(err).__name__}: {str(err)[:120]}")
            continue
        rate = flops / seconds / 1e9
        pairs = args.images * args.captions / seconds
        print(
            f"    {name:32} {seconds:8.3f} s  {pairs:12.3g} pairs/s  {rate:9.0f} GFLOP/s  "
            f"fraction of bf16 mm {rate / roof:.3f}",
            flush=True,
        )


def section_pair_scorers(args, device) -> None:
    """The scorers that run a layer per pair (LAPS's slimming, DCPA's branches), on a subset."""
    from bench_dcpa import useful_flops as dcpa_flops
    from bench_laps import make_scorer
    from bench_laps import useful_flops as laps_flops

    from imtm import Tokens
    from imtm.components import InterModalPhraseAttention

    bf16 = torch.bfloat16
    ni, nc = args.pair_images, args.pair_captions
    full = args.images * args.captions
    roof = matmul_rate(4096, args.dim, 4096, bf16, device, args.repeats)
    print(
        f"(2b) per-pair scorers on {ni} images x {nc} captions (DCPA: {max(1, ni // 4)} x "
        f"{max(1, nc // 5)}; the time for {args.images} x "
        f"{args.captions} scaled per pair), bf16 autocast; bf16 torch.mm {roof:.0f} GFLOP/s",
        flush=True,
    )
    # LAPS: N = 196 patches + [CLS] at D = 512 as in bench_laps.py; the roofline over our products.
    g = torch.Generator().manual_seed(0)
    patches, laps_dim = (196, 512) if device.type == "cuda" else (36, 64)
    images = torch.randn(ni, patches + 1, laps_dim, generator=g).to(device)
    lengths = torch.randint(MIN_WORDS, MAX_WORDS + 1, (nc,), generator=g)
    texts = Tokens.from_lengths(
        torch.randn(nc, MAX_WORDS, laps_dim, generator=g).to(device), lengths.tolist()
    )
    runs = {}
    slim = make_scorer(laps_dim, patches).to(device)
    flops = laps_flops(ni, nc, patches, laps_dim, slim.aggregation.num_out, int(lengths.sum()))
    runs["LAPS PatchSlimming"] = (
        lambda: slim(Tokens(images, num_prefix_tokens=1), texts)[0],
        flops,
    )
    # DCPA's layer per pair (feed-forward width 4 D) costs ~100x LAPS's pair: a quarter of the
    # images and a fifth of the captions.
    dni, dnc = max(1, ni // 4), max(1, nc // 5)
    regions, texts_d = make_tokens(dni, dnc, 36, args.dim, device)[:2]
    for direction in ("i2t", "t2i"):
        torch.manual_seed(0)
        block = InterModalPhraseAttention(direction, dim=args.dim, heads=8).eval().to(device)
        runs[f"DCPA {direction} (with feed-forward)"] = (
            lambda block=block: block(regions, texts_d),
            useful_flops_or_nan(dcpa_flops, block, regions, texts_d),
            dni * dnc,
        )
    for name, (fn, flops, *n_pairs) in runs.items():
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=bf16):
                seconds = best_time(fn, device, args.repeats)
        except Exception as err:  # noqa: BLE001 - reported, the suite goes on
            print(f"    {name:32} FAILED: {type(err).__name__}: {str(err)[:120]}")
            continue
        pairs = (n_pairs[0] if n_pairs else ni * nc) / seconds
        print(
            f"    {name:32} {seconds:8.3f} s  {pairs:12.3g} pairs/s  {flops / seconds / 1e9:9.0f} GFLOP/s  "
            f"fraction of bf16 mm {flops / seconds / 1e9 / roof:.3f}; {full:,} pairs would take "
            f"{full / pairs / 60:.1f} min",
            flush=True,
        )


def useful_flops_or_nan(fn, *args) -> float:
    try:
        return float(fn(*args))
    except Exception:  # noqa: BLE001 - only a printed ratio depends on it
        return float("nan")


def section_training(args, device) -> None:
    from _steps import PRESET_NAMES, load_data, make_batch, make_matcher, train_step

    print(
        f"(3) training step per preset under bf16 autocast, batch {args.batch_size}, embed_dim {args.embed_dim}:",
        flush=True,
    )
    for name in PRESET_NAMES:
        try:
            train = load_data(name, max(args.batch_size // 5 + 1, 8))
            m = make_matcher(
                name,
                train,
                embed_dim=args.embed_dim,
                batch_size=args.batch_size,
                compile=False,
                device=str(device),
            )
            opt = torch.optim.AdamW(
                [p for p in m.components_.parameters() if p.requires_grad], lr=1e-5
            )
            batch = make_batch(train, 0, args.batch_size, device=str(device))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

            def step(m=m, batch=batch, opt=opt):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    return train_step(m, batch, opt)

            seconds = best_time(step, device, args.repeats)
            peak = (
                f"{torch.cuda.max_memory_allocated(device) / 2**20:8.0f} MiB"
                if device.type == "cuda"
                else "n/a (CPU)"
            )
            print(
                f"    {name:6} {seconds * 1e3:9.1f} ms/step  {args.batch_size / seconds:9.1f} samples/s  "
                f"peak memory {peak}",
                flush=True,
            )
        except Exception as err:  # noqa: BLE001 - reported, the suite goes on
            print(f"    {name:6} FAILED: {type(err).__name__}: {str(err)[:160]}", flush=True)


def section_two_stage(args) -> None:
    print(
        f"(4) two-stage retrieval, {args.gallery} gallery images (bench_two_stage.py; it scores on the CPU):",
        flush=True,
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(HERE / "bench_two_stage.py"), "--images", str(args.gallery)]
    if args.device == "cpu":
        cmd.append("--quick")
        cmd[cmd.index("--images") + 1] = str(args.gallery)
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.two_stage_timeout
    )
    for line in proc.stdout.strip().splitlines()[-12:]:
        print("    " + line)
    if proc.returncode:
        print(f"    exit status {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"]
    )
    ap.add_argument("--sections", default="1234")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--captions", type=int, default=None)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--embed-dim", type=int, default=None)
    ap.add_argument("--gallery", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--pair-images", type=int, default=None, help="images of the per-pair scorers' subset"
    )
    ap.add_argument(
        "--pair-captions", type=int, default=None, help="captions of the per-pair scorers' subset"
    )
    ap.add_argument("--two-stage-timeout", type=int, default=240)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here; run with --device cpu for the smoke run")
    gpu = args.device == "cuda"
    defaults = {
        "images": 5000 if gpu else 40,
        "captions": 25000 if gpu else 200,
        "batch_size": 128 if gpu else 16,
        "embed_dim": 1024 if gpu else 32,
        "gallery": 100_000 if gpu else 5000,
        "pair_images": 256 if gpu else 4,
        "pair_captions": 1280 if gpu else 20,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not gpu:
        args.dim = min(args.dim, 128)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(
        f"gpu_suite: torch {torch.__version__}, device {name}"
        + (
            ""
            if gpu
            else " -- SMOKE RUN on the CPU at tiny sizes: it checks the script, it measures no GPU"
        ),
        flush=True,
    )
    t0 = time.perf_counter()
    if "1" in args.sections:
        section_tests(args)
    if "2" in args.sections:
        section_scorers(args, device)
        section_pair_scorers(args, device)
    if "3" in args.sections:
        section_training(args, device)
    if "4" in args.sections:
        section_two_stage(args)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
