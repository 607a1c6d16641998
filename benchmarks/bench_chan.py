"""Benchmark of CHAN's scoring engine (hard assignment coding), printed as ratios measured side by side.

Not part of the test suite. Every comparison runs in this one process on the
same inputs (random features, a fixed seed), with autograd off, at torch's
default thread count; peak memory is measured in one fresh subprocess per
method. Sections:

  (a) hard assignment (log-sum-exp pooling) for 1,000 images x 5,000 captions of
      8-20 words, D = 1,024, with N = 36 regions and N = 197 ViT patches: pairs/s,
      achieved GFLOP/s on the useful FLOPs (2 N D per real word per image), and the
      ratio to the matrix-product roofline (one torch.mm with the same rows and inner
      size, its columns cut so that its output fits in memory);
  (b) against the straightforward dense way (the shape of the authors' code): for
      each shard of 100 images, one einsum over all captions, padded, then a masked
      max over regions and the pooling; same outputs (checked), speed ratio, and
      peak memory of each;
  (c) sum pooling (ColBERT's MaxSim) against the fast-maxsim package (one call per
      caption, with the caption's words as the query and the images as documents);
  (d) soft assignment against hard assignment, time per pair;
  (e) bfloat16 products (float32 accumulation inside the kernel) against a bfloat16
      torch.mm of the same shape;
  (f) with CUDA: bfloat16 throughput as a fraction of the device's matrix-product
      throughput (skipped on CPU).

Usage::

    python benchmarks/bench_chan.py            # full sizes (several minutes on 2 cores)
    python benchmarks/bench_chan.py --quick    # small smoke run (seconds)
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

from imtm.functional import hard_assignment_scores, masked_pool, soft_assignment_scores
from imtm.functional.blocking import DEFAULT_MAX_BLOCK_ELEMENTS

MAX_WORDS, MIN_WORDS = 20, 8
#: Output elements of the roofline product (1 GiB in float32): big enough to run at peak.
ROOFLINE_ELEMENTS = 1 << 28
#: Images per shard of the dense reference, as asked of it.
DENSE_SHARD = 100


# ---------------------------------------------------------------------------- problem and methods
def make_problem(n_images, n_captions, n_regions, dim, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, n_regions, dim, generator=g)
    texts = torch.randn(n_captions, MAX_WORDS, dim, generator=g)
    lengths = torch.randint(MIN_WORDS, MAX_WORDS + 1, (n_captions,), generator=g)
    text_mask = torch.arange(MAX_WORDS) < lengths[:, None]
    return images.to(device), texts.to(device), text_mask.to(device)


def dense_scores(images, texts, text_mask, pooling="lse", temperature=0.1, shard=DENSE_SHARD, image_mask=None):
    """The straightforward way, shaped like the authors' code: per shard of images, every (image,
    caption, region, word) cosine at once, padding included; masked max over regions; pooling."""
    t = F.normalize(texts, dim=-1)
    if image_mask is None:
        image_mask = torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
    rows = []
    for i0 in range(0, images.shape[0], shard):
        v = F.normalize(images[i0 : i0 + shard], dim=-1)
        sims = torch.einsum("ind,tmd->itnm", v, t)  # (shard, Bt, N, M)
        valid = image_mask[i0 : i0 + shard, None, :, None] & text_mask[None, :, None, :]
        words = sims.masked_fill(~valid, -math.inf).amax(dim=2)  # each word's best real region
        rows.append(masked_pool(words, text_mask[None], pooling, temperature))
    return torch.cat(rows)


def ours(images, texts, text_mask, **kw):
    return hard_assignment_scores(images, texts, None, text_mask, **kw)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def side_by_side(fns: dict, repeats: int, device) -> tuple[dict, dict]:
    """Best-of-``repeats`` seconds of each function, the functions interleaved in every round."""
    best = {k: math.inf for k in fns}
    outs = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds, outs[name] = timed(fn, device)
            best[name] = min(best[name], seconds)
    return best, outs


def roofline_fn(rows, inner, cols, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, inner, generator=g).to(device, dtype)
    b = torch.randn(cols, inner, generator=g).to(device, dtype)
    return lambda: torch.mm(a, b.t())


def roofline_shape(rows, cols):
    return rows, max(1, min(cols, ROOFLINE_ELEMENTS // rows))


# ---------------------------------------------------------------------------- peak memory (subprocess)
def _status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args) -> None:
    """Run one method once in this fresh process; print its peak RSS above the inputs as JSON."""
    images, texts, text_mask = make_problem(args.mem_images, args.n_captions, args.mem_regions, args.dim)
    method = {"ours": lambda: ours(images, texts, text_mask, max_block_elements=args.max_block_elements),
              "dense": lambda: dense_scores(images, texts, text_mask)}[args.memory_child]
    with torch.no_grad():
        # Warm up on a slice so that library workspaces count as baseline, not as the method's memory.
        {"ours": lambda: ours(images[:2], texts[:50], text_mask[:50]),
         "dense": lambda: dense_scores(images[:2], texts[:50], text_mask[:50])}[args.memory_child]()
        base = _status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        t0 = time.perf_counter()
        method()
        seconds = time.perf_counter() - t0
        peak = _status_mb("VmHWM")
    print(json.dumps({"peak_mb": peak - base, "seconds": seconds}))


def measure_memory(method, args):
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", method, "--n-captions", str(args.n_captions),
           "--mem-images", str(args.mem_images), "--mem-regions", str(args.mem_regions), "--dim", str(args.dim)]
    if args.max_block_elements:
        cmd += ["--max-block-elements", str(args.max_block_elements)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- report
def useful_flops(n_images, n_regions, text_mask, dim):
    return 2.0 * n_images * n_regions * int(text_mask.sum()) * dim


def section_a_b(args, device, n_regions, with_dense_captions):
    images, texts, text_mask = make_problem(args.n_images, args.n_captions, n_regions, args.dim, device=device)
    flops = useful_flops(args.n_images, n_regions, text_mask, args.dim)
    padded = 2.0 * args.n_images * n_regions * args.n_captions * MAX_WORDS * args.dim
    rows, cols = roofline_shape(args.n_images * n_regions, int(text_mask.sum()))
    roof = roofline_fn(rows, args.dim, cols, torch.float32, device)
    kw = {"max_block_elements": args.max_block_elements}
    with torch.no_grad():
        ours(images[:4], texts[:64], text_mask[:64], **kw)  # warm-up
        roof()
        best, _outs = side_by_side({"roofline": roof, "ours": lambda: ours(images, texts, text_mask, **kw)}, args.repeats, device)
    roof_gflops = 2.0 * rows * cols * args.dim / best["roofline"] / 1e9
    got_gflops = flops / best["ours"] / 1e9
    pairs = args.n_images * args.n_captions
    print(f"(a) hard assignment, lse pooling, {args.n_images} images x {args.n_captions} captions, N={n_regions}, "
          f"D={args.dim}, {int(text_mask.sum())} real words ({flops / padded:.2f} of the padded work), float32")
    print(f"    ours:      {best['ours']:8.2f} s  {pairs / best['ours']:12,.0f} pairs/s  {got_gflops:7.1f} GFLOP/s (useful FLOPs)")
    print(f"    roofline:  torch.mm ({rows}x{args.dim})·({args.dim}x{cols}) {roof_gflops:7.1f} GFLOP/s")
    print(f"    ratio to roofline (useful FLOPs): {got_gflops / roof_gflops:.3f}")
    if not with_dense_captions:
        return
    # (b) the dense way, on the captions given (all of them at N=36; a subset where it would not fit in memory)
    nb = with_dense_captions
    sub = (images, texts[:nb], text_mask[:nb])
    with torch.no_grad():
        dense_scores(images[:2], texts[:64], text_mask[:64])
        best_b, outs_b = side_by_side(
            {"ours": lambda: ours(*sub, **kw), "dense": lambda: dense_scores(*sub)}, args.repeats, device
        )
    torch.testing.assert_close(outs_b["ours"], outs_b["dense"], rtol=1e-4, atol=1e-4)
    print(f"(b) dense einsum per shard of {DENSE_SHARD} images, {args.n_images} images x {nb} captions, N={n_regions}: "
          f"same scores (max |diff| {float((outs_b['ours'] - outs_b['dense']).abs().max()):.1e})")
    print(f"    ours {best_b['ours']:.2f} s, dense {best_b['dense']:.2f} s: ours is {best_b['dense'] / best_b['ours']:.2f}x faster")


def section_memory(args):
    rows = {}
    for method in ("ours", "dense"):
        rows[method] = measure_memory(method, args)
    if rows["ours"] is None:
        print("(b) peak memory: skipped (needs Linux /proc/self/clear_refs)")
        return
    dense_shard_mb = DENSE_SHARD * args.n_captions * args.mem_regions * MAX_WORDS * 4 / 2**20
    print(f"(b) peak memory above the inputs ({args.mem_images} images x {args.n_captions} captions, N={args.mem_regions}; "
          "VmHWM after resetting it via /proc/self/clear_refs, one fresh process per method):")
    print(f"    ours  {rows['ours']['peak_mb']:8.1f} MiB   (block budget: "
          f"{(args.max_block_elements or DEFAULT_MAX_BLOCK_ELEMENTS) * 4 / 2**20:.0f} MiB of similarities)")
    print(f"    dense {rows['dense']['peak_mb']:8.1f} MiB   (one shard's similarity tensor alone: {dense_shard_mb:.0f} MiB)")
    print(f"    ours / dense: {rows['ours']['peak_mb'] / rows['dense']['peak_mb']:.3f}")


def section_c(args, device):
    try:
        import fast_maxsim
        import numpy as np
    except ImportError as err:
        print(f"(c) skipped: fast-maxsim is not importable ({err}); pip install fast-maxsim==0.2.0")
        return
    if device.type != "cpu":
        print("(c) skipped: fast-maxsim runs on CPU only")
        return
    nc = args.sub_captions
    images, texts, text_mask = make_problem(args.n_images, nc, 36, args.dim, seed=2)
    # fast-maxsim expects unit vectors; normalising outside its timing favours it.
    docs = np.ascontiguousarray(F.normalize(images, dim=-1).numpy())
    tn = F.normalize(texts, dim=-1)
    queries = [np.ascontiguousarray(tn[t][text_mask[t]].numpy()) for t in range(nc)]

    def fast():
        return torch.from_numpy(np.stack([fast_maxsim.maxsim_scores(q, docs) for q in queries], axis=1))

    with torch.no_grad():
        fast_maxsim.maxsim_scores(queries[0], docs[:4])
        best, outs = side_by_side({"ours": lambda: ours(images, texts, text_mask, pooling="sum"), "fast": fast},
                                  args.repeats, device)
    torch.testing.assert_close(outs["ours"], outs["fast"].to(outs["ours"].dtype), rtol=1e-4, atol=1e-3)
    print(f"(c) sum pooling (MaxSim), {args.n_images} images x {nc} captions, N=36: same scores "
          f"(max |diff| {float((outs['ours'] - outs['fast']).abs().max()):.1e})")
    print(f"    ours {best['ours']:.2f} s, fast-maxsim {getattr(fast_maxsim, '__version__', '0.2.0')} {best['fast']:.2f} s: "
          f"ours is {best['fast'] / best['ours']:.2f}x faster")


def section_d_e(args, device):
    nc = args.sub_captions
    images, texts, text_mask = make_problem(args.n_images, nc, 36, args.dim, seed=3, device=device)
    pairs = args.n_images * nc
    kw = {"max_block_elements": args.max_block_elements}
    with torch.no_grad():
        soft_assignment_scores(images[:2], texts[:32], None, text_mask[:32])
        best, _ = side_by_side(
            {"hard": lambda: ours(images, texts, text_mask, **kw),
             "soft": lambda: soft_assignment_scores(images, texts, None, text_mask, **kw)},
            args.repeats, device,
        )
    print(f"(d) soft vs hard assignment, {args.n_images} images x {nc} captions, N=36, float32:")
    print(f"    hard {best['hard'] / pairs * 1e6:.3f} us/pair, soft {best['soft'] / pairs * 1e6:.3f} us/pair: "
          f"soft / hard = {best['soft'] / best['hard']:.2f}")

    flops = useful_flops(args.n_images, 36, text_mask, args.dim)
    rows, cols = roofline_shape(args.n_images * 36, int(text_mask.sum()))
    roof32 = roofline_fn(rows, args.dim, cols, torch.float32, device)
    roof16 = roofline_fn(rows, args.dim, cols, torch.bfloat16, device)
    with torch.no_grad():
        ours(images[:2], texts[:32], text_mask[:32], compute_dtype=torch.bfloat16)
        roof16()
        best, outs = side_by_side(
            {"roof16": roof16, "bf16": lambda: ours(images, texts, text_mask, compute_dtype=torch.bfloat16, **kw),
             "roof32": roof32, "fp32": lambda: ours(images, texts, text_mask, **kw)},
            args.repeats, device,
        )
    g = {k: (2.0 * rows * cols * args.dim if k.startswith("roof") else flops) / v / 1e9 for k, v in best.items()}
    print(f"(e) bfloat16 products (float32 accumulation), {args.n_images} images x {nc} captions, N=36:")
    print(f"    bf16 ours {g['bf16']:.1f} GFLOP/s vs bf16 torch.mm {g['roof16']:.1f} GFLOP/s: ratio {g['bf16'] / g['roof16']:.3f}")
    print(f"    fp32 ours {g['fp32']:.1f} GFLOP/s vs fp32 torch.mm {g['roof32']:.1f} GFLOP/s: ratio {g['fp32'] / g['roof32']:.3f}")
    print(f"    bf16 / fp32 speed: {best['fp32'] / best['bf16']:.2f}x; max |score diff| "
          f"{float((outs['bf16'] - outs['fp32']).abs().max()):.1e}")


def section_f(args):
    if not torch.cuda.is_available():
        print("(f) skipped: no CUDA device")
        return
    device = torch.device("cuda")
    images, texts, text_mask = make_problem(args.n_images, args.n_captions, 36, args.dim, device=device)
    flops = useful_flops(args.n_images, 36, text_mask, args.dim)
    rows, cols = args.n_images * 36, int(text_mask.sum())
    roof = roofline_fn(rows, args.dim, cols, torch.bfloat16, device)
    kw = {"max_block_elements": args.max_block_elements}
    with torch.no_grad():
        for _ in range(2):
            roof()
            ours(images, texts, text_mask, compute_dtype=torch.bfloat16, **kw)
        best, _ = side_by_side(
            {"roof": roof, "bf16": lambda: ours(images, texts, text_mask, compute_dtype=torch.bfloat16, **kw)},
            max(3, args.repeats), device,
        )
    g_roof = 2.0 * rows * cols * args.dim / best["roof"] / 1e9
    g_ours = flops / best["bf16"] / 1e9
    print(f"(f) CUDA {torch.cuda.get_device_name(device)}, bf16, {args.n_images} images x {args.n_captions} captions, N=36:")
    print(f"    ours {g_ours:.0f} GFLOP/s vs torch.mm ({rows}x{args.dim})·({args.dim}x{cols}) {g_roof:.0f} GFLOP/s: "
          f"fraction {g_ours / g_roof:.3f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--n-images", type=int, default=None)
    p.add_argument("--n-captions", type=int, default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (best is kept)")
    p.add_argument("--max-block-elements", type=int, default=None, help="block budget (default: the library's)")
    p.add_argument("--sections", default="abcdef", help="which sections to run, e.g. 'ab'")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mem-images", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--mem-regions", type=int, default=36, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    full = {"n_images": 1000, "n_captions": 5000, "dim": 1024, "repeats": 1, "sub_captions": 1000, "mem_images": 200,
                "dense197": 1000}
    quick = {"n_images": 64, "n_captions": 320, "dim": 256, "repeats": 3, "sub_captions": 160, "mem_images": 200, "dense197": 160}
    preset = quick if args.quick else full
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    device = torch.device("cpu")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"bench_chan: torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}; "
          f"{'quick' if args.quick else 'full'} sizes, best of {args.repeats}")
    t0 = time.perf_counter()
    if "a" in args.sections or "b" in args.sections:
        section_a_b(args, device, 36, args.n_captions if "b" in args.sections else 0)
        section_a_b(args, device, 197, args.dense197 if "b" in args.sections else 0)
    if "b" in args.sections:
        section_memory(args)
    if "c" in args.sections:
        section_c(args, device)
    if "d" in args.sections or "e" in args.sections:
        section_d_e(args, device)
    if "f" in args.sections:
        section_f(args)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
