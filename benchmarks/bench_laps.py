"""Benchmark of LAPS's slimming scorer (PatchSlimming), printed as ratios measured side by side.

Not part of the test suite. Every comparison runs in this one process on the same
inputs (random features, a fixed seed), with autograd off, in eval mode (top-N_s
selection); peak memory is measured in one fresh subprocess per block size.
Sections:

  (a) the full slimming scorer (significance, selection, aggregation, fusion, sparse
      alignment) for 128 images x 640 captions of 8-16 words, N = 196 patches + [CLS],
      D = 512, rho = 0.5, lambda = 0.4 (N_s = 98, N_c = 39): ours, vectorised over all
      pairs in blocks, against a per-caption loop of the same maths in the structure
      of the authors' code (``CrossSparseAggrNet_v2.forward`` in lib/cross_net.py of
      CrossmodalGroup/LAPS loops over the captions: for each caption the caption's attention, top-N_s, the
      aggregation MLP on the kept patches, fusion, alignment; the image-only a^p and
      a^s are hoisted out of the loop, which favours the loop). Same outputs, checked.
      When the loop would take too long on the machine, it runs on the first captions
      only and its time is scaled per caption (printed as such);
  (b) the bare sparse alignment (Eq. 8) over all 197 tokens, ours (blocked) against a
      per-caption loop, same outputs checked;
  (c) the matrix-product roofline: one torch.mm with the FLOPs of our products, timed
      right after ours;
  (d) peak memory of the full scorer against the block budget (max_block_elements): the
      high-water mark of the resident memory above the inputs (VmHWM, reset through
      /proc/self/clear_refs), one fresh process per budget, on 32 images x 640 captions.

Usage::

    python benchmarks/bench_laps.py            # full sizes (minutes on 2 busy cores)
    python benchmarks/bench_laps.py --quick    # small smoke run (seconds)
    python benchmarks/bench_laps.py --repeats 2 --no-memory   # (a)-(c) only, best of 2 runs

Section (a) is printed twice: by wall-clock time and by this process's CPU time (on a
machine shared with other jobs the wall-clock time includes waiting for a core).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from imtm import Tokens
from imtm.components import (
    GumbelSelector,
    PatchScorer,
    PatchSlimming,
    SparsePatchWordAlignment,
    TokenAggregation,
)
from imtm.functional import sparse_alignment_scores
from imtm.functional.patch_slimming import minmax_normalize, num_kept

MIN_WORDS, MAX_WORDS = 8, 16


def make_problem(n_images, n_captions, n_patches, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, n_patches + 1, dim, generator=g)
    texts = torch.randn(n_captions, MAX_WORDS, dim, generator=g)
    lengths = torch.randint(MIN_WORDS, MAX_WORDS + 1, (n_captions,), generator=g)
    text_mask = torch.arange(MAX_WORDS) < lengths[:, None]
    return images, texts, text_mask


def make_scorer(dim, n_patches, ratio=0.5, lam=0.4, budget=None):
    torch.manual_seed(0)
    num_out = max(1, int(lam * int(num_kept(torch.tensor([n_patches]), ratio)) + 1e-6))
    return PatchSlimming(
        PatchScorer(dim),
        GumbelSelector(ratio),
        TokenAggregation(dim, num_out),
        SparsePatchWordAlignment(),
        max_block_elements=budget,
    ).eval()


def ours(slim, images, texts, text_mask):
    return slim(Tokens(images, num_prefix_tokens=1), Tokens(texts, text_mask))[0]


def loop_scores(slim, images, texts, text_mask, n_captions=None):
    """The per-caption loop: everything that depends on the caption is recomputed per caption."""
    cls, patches = images[:, :1], images[:, 1:]
    n_img, n_p, dim = patches.shape
    a_p, a_s = slim.scorer.image_scores(patches, None)  # image-only: hoisted
    beta = slim.scorer.beta
    n_s = int(num_kept(torch.tensor([n_p]), slim.selector.ratio))
    cols = []
    for t in range(texts.shape[0] if n_captions is None else n_captions):
        words = texts[t, text_mask[t]]  # (M_t, D)
        a_r = minmax_normalize(patches @ words.mean(0) / dim, dim=1)
        a = (1 - beta) * a_p + beta / 2 * (a_s + a_r)
        order = a.argsort(dim=1, descending=True, stable=True)
        keep, drop = order[:, :n_s], order[:, n_s:]
        kept = patches.gather(1, keep[..., None].expand(-1, -1, dim))
        w = torch.softmax(slim.aggregation.mlp(kept), dim=1)  # the aggregation MLP, per caption
        agg = w.transpose(1, 2) @ kept  # (Bi, N_c, D)
        dropped = patches.gather(1, drop[..., None].expand(-1, -1, dim))
        fw = torch.softmax(a.gather(1, drop), dim=1)
        fused = (fw[..., None] * dropped).sum(1, keepdim=True)
        slimmed = torch.cat([cls, agg, fused], dim=1)
        A = F.normalize(slimmed, dim=-1) @ F.normalize(words, dim=-1).t()  # (Bi, K, M_t)
        cols.append(A.amax(2).mean(1) + A.amax(1).mean(1))
    return torch.stack(cols, dim=1)


def loop_alignment(images, texts, text_mask):
    v = F.normalize(images, dim=-1)
    cols = []
    for t in range(texts.shape[0]):
        A = v @ F.normalize(texts[t, text_mask[t]], dim=-1).t()
        cols.append(A.amax(2).mean(1) + A.amax(1).mean(1))
    return torch.stack(cols, dim=1)


def timed(fn, repeat=1):
    """``(best wall-clock seconds, output)`` over ``repeat`` runs; the CPU seconds of this process
    for the same runs are kept in ``timed.cpu`` (the best run's)."""
    best, best_cpu = math.inf, math.inf
    out = None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    timed.cpu = best_cpu
    return best, out


timed.cpu = math.nan


def useful_flops(n_images, n_captions, n_patches, dim, num_out, words):
    """FLOPs of our products: patch-word dots (all tokens), W^T applied to them, and the Gram norms."""
    n_tok = n_patches + 1
    k = num_out + 1
    per_image = (
        2 * n_tok * dim * words
        + 2 * n_patches * k * words
        + 2 * n_patches * n_patches * k * n_captions
    )
    return n_images * per_image


def roofline(flops, dim):
    """Seconds of torch.mm at full size for ``flops`` (a (r x dim) @ (dim x 4096) product)."""
    rows = max(1, int(flops // (2 * dim * 4096)))
    a, b = torch.randn(min(rows, 16384), dim), torch.randn(dim, 4096)
    reps = max(1, math.ceil(rows / a.shape[0]))
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return (time.perf_counter() - t0) * rows / (reps * a.shape[0])


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(args):
    n_images, n_captions, n_patches, dim, budget = args
    images, texts, text_mask = make_problem(n_images, n_captions, n_patches, dim)
    slim = make_scorer(dim, n_patches, budget=budget)
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
    base = _status_kib("VmRSS")
    with torch.no_grad():
        t0 = time.perf_counter()
        ours(slim, images, texts, text_mask)
        secs = time.perf_counter() - t0
    print(json.dumps({"extra_mib": (_status_kib("VmHWM") - base) / 1024, "seconds": secs}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--loop-captions",
        type=int,
        default=64,
        help="captions the full-scorer loop runs on (then scaled)",
    )
    p.add_argument(
        "--mem-images", type=int, default=32, help="images of the memory runs (all captions)"
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="runs of (a)'s timings, the best of each kept"
    )
    p.add_argument(
        "--no-memory", action="store_true", help="skip section (d) (fresh processes, slow)"
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        peak_memory_child(json.loads(args.child))
        return
    n_images, n_captions, n_patches, dim = (16, 48, 36, 64) if args.quick else (128, 640, 196, 512)
    loop_captions = min(n_captions, 16 if args.quick else args.loop_captions)
    print(f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1 / 5 / 15 min)")
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}); "
        "the machine is shared with other jobs, so absolute times are noisy: compare the ratios"
    )
    images, texts, text_mask = make_problem(n_images, n_captions, n_patches, dim)
    slim = make_scorer(dim, n_patches)
    words = int(text_mask.sum())
    print(
        f"problem: {n_images} images x {n_captions} captions ({words} words), N = {n_patches} patches + [CLS], "
        f"D = {dim}, N_s = {int(num_kept(torch.tensor([n_patches]), 0.5))}, N_c = {slim.aggregation.num_out}"
    )

    with torch.no_grad():
        # (a) full scorer
        ours(slim, images[:2], texts[:4], text_mask[:4])  # warm-up
        t_ours, s_ours = timed(lambda: ours(slim, images, texts, text_mask), args.repeats)
        c_ours = timed.cpu
        flops = useful_flops(n_images, n_captions, n_patches, dim, slim.aggregation.num_out, words)
        t_roof = roofline(flops, dim)
        t_loop, s_loop = timed(
            lambda: loop_scores(slim, images, texts, text_mask, loop_captions), args.repeats
        )
        c_loop = timed.cpu * n_captions / loop_captions
        torch.testing.assert_close(s_ours[:, :loop_captions], s_loop, rtol=1e-4, atol=1e-4)
        diff = float((s_ours[:, :loop_captions] - s_loop).abs().max())
        t_loop_all = t_loop * n_captions / loop_captions
        scaled = (
            ""
            if loop_captions == n_captions
            else f" (timed on the first {loop_captions} captions, scaled per caption)"
        )
        print(
            f"(a) full slimming scorer: ours {t_ours:.2f} s, per-caption loop {t_loop_all:.2f} s{scaled}; "
            f"ours is {t_loop_all / t_ours:.1f}x faster; outputs agree (max abs diff {diff:.1e})"
        )
        print(
            f"(a) by CPU time of this process: ours {c_ours:.2f} s, per-caption loop {c_loop:.2f} s; "
            f"ours is {c_loop / c_ours:.1f}x faster (goal >= 6x)"
        )
        print(
            f"(c) roofline: torch.mm over our products' {flops / 1e9:.0f} GFLOP takes {t_roof:.2f} s; "
            f"ours takes {t_ours / t_roof:.1f}x that ({flops / t_ours / 1e9:.1f} GFLOP/s achieved)"
        )
        # (b) bare alignment
        t_a, s_a = timed(lambda: sparse_alignment_scores(images, texts, None, text_mask))
        t_al, s_al = timed(lambda: loop_alignment(images, texts, text_mask))
        torch.testing.assert_close(s_a, s_al, rtol=1e-4, atol=1e-4)
        print(
            f"(b) bare sparse alignment over {n_patches + 1} tokens: ours {t_a:.2f} s, per-caption loop {t_al:.2f} s; "
            f"ours is {t_al / t_a:.1f}x faster; outputs agree"
        )

    print(f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1 / 5 / 15 min)")
    if args.no_memory:
        return
    # (d) memory against the block budget, one fresh process per budget
    budgets = [1 << 18, 1 << 20, 1 << 22] if args.quick else [1 << 20, 1 << 22, 1 << 24]
    mem_images = min(n_images, args.mem_images)
    pair_bytes = mem_images * n_captions * n_patches * (slim.aggregation.num_out + 1) * 4
    print(
        f"(d) memory runs: {mem_images} images x {n_captions} captions; one (pairs x N x (N_c + 1)) float32 "
        f"tensor over all of them would take {pair_bytes / 2**20:.0f} MiB"
    )
    for budget in budgets:
        child = json.dumps([mem_images, n_captions, n_patches, dim, budget])
        out = subprocess.run(
            [sys.executable, __file__, "--child", child], capture_output=True, text=True, check=True
        )
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"(d) max_block_elements = 2**{budget.bit_length() - 1}: peak memory above the inputs "
            f"{res['extra_mib']:.0f} MiB, {res['seconds']:.2f} s"
        )


if __name__ == "__main__":
    main()
