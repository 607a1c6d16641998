"""Benchmark of DIAS's regularisers and neighbour sampler, printed as ratios measured side by side.

Not part of the test suite. Sections:

  (a) the cost of DIAS's losses in a training step: one step (forward, losses, backward) of
      the DIAS pipeline (precomputed regions + context layer, GRU text, soft-assignment coding,
      triplet loss) with and without the dimension-alignment and spatial-constraint losses,
      timed alternately on the same batch; the printed ratio is the extra time as a fraction
      of the step without them;
  (b) each loss alone (forward + backward on (B, D) embeddings) against a plain loop of the
      same maths (per dimension for Eq. 4-6, per pair for Eq. 7-10; outputs checked equal), and
      the dimension alignment against its matrix-product roofline, the (D, B) x (B, D) torch.mm
      that computes the correlation matrix;
  (c) the K-means of KMeansNeighborSampler (MiniBatchKMeans, the sampler's defaults) on
      30,000 image embeddings of dimension 1,024, and the time to form one epoch of batches;
      ``--full-kmeans`` also times scikit-learn's full KMeans (one init) for the ratio.

Usage::

    python benchmarks/bench_dias.py            # paper sizes: B = 128, D = 1,024, 30,000 images
    python benchmarks/bench_dias.py --quick    # small smoke run (seconds)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from imtm.data import ImageCaptionDataset, KMeansNeighborSampler, Vocabulary, collate
from imtm.engine.evaluation import run_blocks
from imtm.engine.graph import build_plan
from imtm.functional import dimension_alignment_loss, spatial_constraint_loss
from imtm.functional.dias import VARIANCE_EPS
from imtm.presets import dias

WORDS = [
    "a",
    "an",
    "the",
    "red",
    "blue",
    "green",
    "small",
    "big",
    "circle",
    "square",
    "disk",
    "left",
    "right",
    "of",
    "above",
    "below",
    "two",
    "three",
]


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------- (a) training step
def make_batch(b, n_regions, region_dim, g):
    captions = [
        " ".join(WORDS[int(k)] for k in torch.randint(0, len(WORDS), (int(m),), generator=g))
        for m in torch.randint(8, 16, (b,), generator=g)
    ]
    items = [
        {"images": torch.randn(n_regions, region_dim, generator=g), "texts": c, "image_ids": i}
        for i, c in enumerate(captions)
    ]
    batch = collate(items)
    batch["positives"] = batch["image_ids"][:, None] == batch["image_ids"][None, :]
    return batch, Vocabulary.build(captions)


def step_fn(plan, batch, with_dias):
    losses = [k for k in plan.losses() if with_dias or plan.names[k] == "loss"]
    blocks = [k for k in plan.needed_for([plan.names[k] for k in losses]) if not plan.is_loss(k)]

    def step():
        values = dict(batch)
        run_blocks(plan, blocks, values)
        total = sum(
            plan.blocks[k].weight * plan.blocks[k](*[values[n] for n in plan.blocks[k].requires])
            for k in losses
        )
        for p in plan.blocks[0].parameters():
            p.grad = None
        total.backward()
        return total

    return step


def section_a(args):
    g = torch.Generator().manual_seed(0)
    batch, vocab = make_batch(args.batch, 36, args.region_dim, g)
    torch.manual_seed(0)
    named = dias(vocab=vocab, region_dim=args.region_dim, embed_dim=args.dim, word_dim=300)
    plan = build_plan(named)
    base, full = step_fn(plan, batch, False), step_fn(plan, batch, True)
    base(), full()  # warm-up
    t_base, t_full = [], []
    for _ in range(args.repeats):  # alternate, so both see the same load
        t_base += timed(base, 1)
        t_full += timed(full, 1)
    mb, mf = statistics.median(t_base), statistics.median(t_full)
    print(
        f"(a) training step, B = {args.batch} captions, N = 36 regions, D = {args.dim}, median of {args.repeats}:"
    )
    print(
        f"    without DIAS losses {mb * 1e3:8.1f} ms | with them {mf * 1e3:8.1f} ms | "
        f"extra {(mf - mb) * 1e3:6.1f} ms = {(mf - mb) / mb:.3f} of the step"
    )


# ---------------------------------------------------------------------------- (b) the losses alone
def loop_dimension_loss(v, t, tau=0.1):
    """Eq. 4-6 one image dimension at a time (a row of C and a column of C per step)."""
    b, d = v.shape
    vz = (v - v.mean(0)) / ((v - v.mean(0)).square().mean(0) + VARIANCE_EPS).sqrt()
    tz = (t - t.mean(0)) / ((t - t.mean(0)).square().mean(0) + VARIANCE_EPS).sqrt()
    total = 0.0
    for i in range(d):
        row = torch.stack([(vz[:, i] * tz[:, j]).sum() / b for j in range(d)]) / tau
        col = torch.stack([(vz[:, j] * tz[:, i]).sum() / b for j in range(d)]) / tau
        total = total - torch.softmax(row, 0)[i] - torch.softmax(col, 0)[i]
    return total


def loop_spatial_loss(v, t, kind):
    """Eq. 7-10 without sparsity, one pair at a time."""
    b = v.shape[0]

    def dist(a, c):
        return 1 - torch.dot(a, c) / (a.norm().clamp_min(1e-8) * c.norm().clamp_min(1e-8))

    total = 0.0
    for i in range(b):
        for j in range(b):
            if i == j:
                continue
            if kind == "inter":
                diff = dist(v[i], t[j]) - dist(v[j], t[i])
            else:
                diff = dist(v[i], v[j]) - dist(t[i], t[j])
            total = total + diff * diff
    return total


def fwd_bwd(fn, v, t):
    a, c = v.clone().requires_grad_(), t.clone().requires_grad_()
    out = fn(a, c)
    out.backward()
    return out.detach()


def section_b(args):
    g = torch.Generator().manual_seed(1)
    v, t = (
        torch.randn(args.batch, args.dim, generator=g),
        torch.randn(args.batch, args.dim, generator=g),
    )
    print(
        f"(b) each loss alone, forward + backward on ({args.batch}, {args.dim}) embeddings, median of {args.repeats}:"
    )
    cases = [
        (
            "dimension alignment (Eq. 4-6)",
            lambda a, c: dimension_alignment_loss(a, c),
            loop_dimension_loss,
            args.loop_dim,
        ),
        (
            "inter-modality, sparse (Eq. 7-8, 11-16)",
            lambda a, c: spatial_constraint_loss(a, c, kind="inter"),
            None,
            0,
        ),
        (
            "inter-modality, dense (Eq. 7-8)",
            lambda a, c: spatial_constraint_loss(a, c, kind="inter", sparse=False),
            lambda a, c: loop_spatial_loss(a, c, "inter"),
            args.loop_batch,
        ),
        (
            "intra-modality, dense (Eq. 9-10)",
            lambda a, c: spatial_constraint_loss(a, c, kind="intra", sparse=False),
            lambda a, c: loop_spatial_loss(a, c, "intra"),
            args.loop_batch,
        ),
    ]
    for label, ours, loop, loop_size in cases:
        t_ours = statistics.median(timed(lambda ours=ours: fwd_bwd(ours, v, t), args.repeats))
        line = f"    {label:42s} {t_ours * 1e3:8.2f} ms"
        if loop is not None:
            # The loop on a slice small enough to finish; ours timed on the same slice, side by side.
            if "dimension" in label:
                vs, ts = v[:, :loop_size], t[:, :loop_size]
            else:
                vs, ts = v[:loop_size], t[:loop_size]
            expect = fwd_bwd(loop, vs.double(), ts.double())
            torch.testing.assert_close(fwd_bwd(ours, vs.double(), ts.double()), expect)
            t_small = statistics.median(
                timed(lambda ours=ours, vs=vs, ts=ts: fwd_bwd(ours, vs, ts), args.repeats)
            )
            t_loop = timed(lambda loop=loop, vs=vs, ts=ts: fwd_bwd(loop, vs, ts), 1)[0]
            line += (
                f" | on {tuple(vs.shape)}: ours {t_small * 1e3:.2f} ms, plain loop {t_loop * 1e3:.0f} ms "
                f"= {t_loop / t_small:.0f}x slower (same value)"
            )
        if "dimension" in label:
            vt = v.t().contiguous()
            t_mm = statistics.median(timed(lambda vt=vt: torch.mm(vt, t), args.repeats))
            t_fwd = statistics.median(timed(lambda: dimension_alignment_loss(v, t), args.repeats))
            line += (
                f"\n    {'':42s} forward {t_fwd * 1e3:.2f} ms vs roofline torch.mm (D, B) x (B, D) "
                f"{t_mm * 1e3:.2f} ms: {t_mm / t_fwd:.2f} of the roofline"
            )
        print(line)


# ---------------------------------------------------------------------------- (c) K-means sampler
def section_c(args):
    rng = np.random.default_rng(2)
    n, d = args.n_images, args.kmeans_dim
    centres = rng.standard_normal((200, d)).astype(np.float32)
    x = centres[rng.integers(0, 200, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    ds = ImageCaptionDataset(np.zeros((n, 1), dtype=np.float32), ["c"] * n, list(range(n)))
    sampler = KMeansNeighborSampler(ds)
    import sklearn.cluster  # noqa: F401  (imported before the clock starts)

    t0, c0 = time.perf_counter(), time.process_time()
    labels = sampler.update_embeddings(x)
    t_km, c_km = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    batches = list(sampler)
    t_batches = time.perf_counter() - t0
    print(
        f"(c) KMeansNeighborSampler on {n:,} x {d:,} embeddings ({sampler.n_clusters} clusters, MiniBatchKMeans, "
        f"batch {sampler.kmeans_batch_size}): {t_km:.1f} s to cluster ({c_km:.1f} CPU-s), {t_batches:.2f} s for one epoch of "
        f"{len(batches)} batches; {len(set(labels.tolist()))} non-empty clusters"
    )
    if args.full_kmeans:
        from sklearn.cluster import KMeans

        t0, c0 = time.perf_counter(), time.process_time()
        KMeans(n_clusters=sampler.n_clusters, n_init=1, max_iter=20, random_state=0).fit(
            x / np.linalg.norm(x, axis=1, keepdims=True)
        )
        t_full, c_full = time.perf_counter() - t0, time.process_time() - c0
        print(
            f"    full KMeans (one init, 20 iterations): {t_full:.1f} s ({c_full:.1f} CPU-s) = "
            f"{c_full / c_km:.1f}x the mini-batch clustering's CPU time"
        )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sections", default="abc")
    p.add_argument("--full-kmeans", action="store_true")
    args = p.parse_args()
    big = not args.quick
    args.batch, args.dim, args.region_dim = (128, 1024, 2048) if big else (32, 64, 64)
    args.repeats = 5 if big else 2
    args.loop_dim, args.loop_batch = (64, 32) if big else (8, 8)
    args.n_images, args.kmeans_dim = (30_000, 1024) if big else (2_000, 64)
    print(
        f"imtm DIAS benchmark | torch {torch.__version__} | {platform.processor() or platform.machine()} | "
        f"{torch.get_num_threads()} thread(s)"
    )
    with torch.random.fork_rng():
        if "a" in args.sections:
            section_a(args)
        if "b" in args.sections:
            section_b(args)
    if "c" in args.sections:
        section_c(args)


if __name__ == "__main__":
    main()
