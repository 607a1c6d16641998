"""Benchmark of ELA's transport and lexicon heads, printed as ratios measured side by side.

Not part of the test suite. Everything runs in this one process on the same
inputs (random patch and word states, a fixed seed), autograd off. Sections:

  (a) transport between 64 images of 197 patches and 64 captions of 20 words
      (cosine-distance costs of random states, D = 256), one problem per pair:
      the default ``transport_plan`` (batched IPOT, beta = 0.5, 50 iterations) against
      - POT's exact ``ot.emd`` solving the problems one by one (the reference cost);
      - POT's ``ot.sinkhorn`` one by one, at the largest regularisation of a sweep
        whose mean cost gap to ``ot.emd`` is within 10% of IPOT's on the same problems ("equal accuracy");
      - POT's batched ``ot.solve_batch``: its proximal solver (``reg=None``) and its
        log-Sinkhorn at the same regularisation; and what it returns on padded
        problems (zero-mass marginals);
      - the batched log-domain Sinkhorn in torch (``method="sinkhorn"``) at that
        regularisation, and IPOT without flushing tiny entries (denormals);
      plus the cost gap to ``ot.emd`` of IPOT at 10 to 200 iterations;
  (b) with CUDA: the same batch on the GPU (skipped on CPU);
  (c) the patch-to-lexicon head at vocabulary 30,522: time and size of the logits
      for the masked patches only (30% of 197) against all patches; and the
      word-to-lexicon head on captions of 20 words.

Usage::

    python benchmarks/bench_ela_transport.py            # full sizes (about a minute on 2 busy cores)
    python benchmarks/bench_ela_transport.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
import warnings

import numpy as np
import ot
import torch

from imtm.functional import cosine_cost, transport_cost, transport_plan
from imtm.functional.transport import _ipot, _marginals


def best_time(fn, repeat=3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def per_problem(solve, cost):
    """Solve each (N, M) problem with a POT function on NumPy arrays (uniform marginals)."""
    c = cost.double().numpy()
    n, m = c.shape[1:]
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    return torch.from_numpy(np.stack([solve(a, b, ck) for ck in c]))


def gap(plan, cost, exact):
    """Mean and max relative gap of <T, C> to the exact cost (NaN plans count as NaN)."""
    g = (transport_cost(plan.double(), cost.double()) - exact) / exact
    return float(g.mean()), float(g.abs().max())


def marginal_error(plan, n, m):
    return float(max((plan.sum(2) - 1 / n).abs().max(), (plan.sum(1) - 1 / m).abs().max()))


def section_a(args):
    g = torch.Generator().manual_seed(0)
    b, n, m, d = args.problems, args.patches, args.words, 256
    cost = cosine_cost(torch.randn(b, n, d, generator=g), torch.randn(b, m, d, generator=g))
    print(
        f"(a) transport: {b} problems of {n} patches x {m} words, float32 costs (float64 inside POT)"
    )
    t_emd, plan_emd = best_time(lambda: per_problem(lambda a, bb, c: ot.emd(a, bb, c), cost), 1)
    exact = transport_cost(plan_emd, cost.double())
    t_ipot, plan_ipot = best_time(lambda: transport_plan(cost))
    g_ipot = gap(plan_ipot, cost, exact)
    print(f"  ot.emd, one problem at a time         {t_emd * 1e3:9.1f} ms  (reference cost)")
    print(
        f"  transport_plan (IPOT, 50 it, batched) {t_ipot * 1e3:9.1f} ms  gap to emd: mean {g_ipot[0]:.4%}, "
        f"max {g_ipot[1]:.4%}; {t_emd / t_ipot:.2f}x faster than ot.emd"
    )
    a, bb, ms, mt, _, _ = _marginals(cost, None, None)
    t_nf, _ = best_time(
        lambda: _ipot(cost, a, bb, ms, mt, beta=0.5, n_iter=50, inner_iter=1, flush=False), 2
    )
    print(
        f"  IPOT without flushing tiny entries    {t_nf * 1e3:9.1f} ms  ({t_nf / t_ipot:.2f}x the flushed time)"
    )
    # Costs of random states cluster near 1, so no entry gets denormal in 50 iterations; costs spread
    # over [0, 2] (far and near words, as in a trained model) do. Flushed and not, side by side.
    wide = torch.rand(b, n, m, generator=g) * 2
    aw, bw, msw, mtw, _, _ = _marginals(wide, None, None)
    kept = _ipot(wide, aw, bw, msw, mtw, beta=0.5, n_iter=50, inner_iter=1, flush=False)
    tiny = torch.finfo(torch.float32).tiny
    n_den = int(((kept > 0) & (kept < tiny)).sum())
    t_wf, _ = best_time(lambda: _ipot(wide, aw, bw, msw, mtw, beta=0.5, n_iter=50, inner_iter=1))
    t_wn, _ = best_time(
        lambda: _ipot(wide, aw, bw, msw, mtw, beta=0.5, n_iter=50, inner_iter=1, flush=False)
    )
    print(
        f"  costs uniform in [0, 2]: {n_den} denormal entries without flushing; flushed {t_wf * 1e3:.1f} ms, "
        f"not flushed {t_wn * 1e3:.1f} ms ({t_wn / t_wf:.2f}x)"
    )
    for it in (10, 20, 50, 100, 200):
        gm, gx = gap(transport_plan(cost, n_iter=it), cost, exact)
        print(f"    IPOT {it:3d} iterations: gap mean {gm:.4%}, max {gx:.4%}")
    # Equal accuracy: the largest regularisation whose Sinkhorn plans, on the same first problems,
    # come within 10% (relative) of IPOT's mean gap there, or closer.
    n_sub = min(8, b)
    target = gap(plan_ipot[:n_sub], cost[:n_sub], exact[:n_sub])[0]
    print(
        f"    IPOT's gap on the first {n_sub} problems: mean {target:.4%} (Sinkhorn must reach {1.1 * target:.4%})"
    )
    chosen = None
    for reg in (0.05, 0.02, 0.01, 0.005, 0.002):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sub = cost[:n_sub]
            p = per_problem(
                lambda a_, b_, c, reg=reg: ot.sinkhorn(
                    a_,
                    b_,
                    c,
                    reg,
                    method="sinkhorn_log",
                    numItermax=args.sinkhorn_iter,
                    stopThr=1e-9,
                ),
                sub,
            )
        gm, _ = gap(p, sub, exact[: sub.shape[0]])
        print(f"    ot.sinkhorn reg={reg}: gap mean {gm:.4%} (on {sub.shape[0]} problems)")
        if gm <= 1.1 * target:
            chosen = reg
            break
    if chosen is None:
        chosen = reg
        print(f"    (no swept regularisation reached IPOT's gap; timing the smallest, {chosen})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_sk, p_sk = best_time(
            lambda: per_problem(
                lambda a_, b_, c: ot.sinkhorn(
                    a_,
                    b_,
                    c,
                    chosen,
                    method="sinkhorn_log",
                    numItermax=args.sinkhorn_iter,
                    stopThr=1e-9,
                ),
                cost,
            ),
            1,
        )
    gs = gap(p_sk, cost, exact)
    print(
        f"  ot.sinkhorn (log) reg={chosen}, one by one {t_sk * 1e3:9.1f} ms  gap mean {gs[0]:.4%}; "
        f"IPOT is {t_sk / t_ipot:.1f}x faster"
    )
    t_tsk, p_tsk = best_time(
        lambda: transport_plan(cost, method="sinkhorn", reg=chosen, n_iter=args.sinkhorn_iter), 1
    )
    gt = gap(p_tsk, cost, exact)
    print(
        f"  torch log-Sinkhorn reg={chosen}, {args.sinkhorn_iter} it   {t_tsk * 1e3:9.1f} ms  gap mean {gt[0]:.4%}; "
        f"IPOT is {t_tsk / t_ipot:.1f}x faster"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_sb, res = best_time(lambda: ot.solve_batch(cost.double(), reg=None, max_iter=50), 1)
        pb = res.plan
        gb = gap(pb, cost, exact)
        print(
            f"  ot.solve_batch(reg=None), 50 it       {t_sb * 1e3:9.1f} ms  gap mean {gb[0]:.4%}, "
            f"marginal error {marginal_error(pb, n, m):.2e}  (POT {ot.__version__})"
        )
        t_sl, res = best_time(
            lambda: ot.solve_batch(
                cost.double(),
                reg=chosen,
                method="log_sinkhorn",
                max_iter=args.sinkhorn_iter,
                tol=1e-9,
            ),
            1,
        )
        gl = gap(res.plan, cost, exact)
        print(
            f"  ot.solve_batch(log_sinkhorn, {chosen})  {t_sl * 1e3:9.1f} ms  gap mean {gl[0]:.4%}; "
            f"IPOT is {t_sl / t_ipot:.1f}x faster"
        )
        # Padding as zero-mass marginals: what a batched solver must survive.
        a_pad = torch.full((b, n), 1.0 / (n - 10), dtype=torch.float64)
        a_pad[:, -10:] = 0
        rp = ot.solve_batch(cost.double(), reg=None, a=a_pad, max_iter=50)
        n_nan = int(torch.isnan(rp.plan).flatten(1).any(1).sum())
    ours = transport_plan(cost, torch.arange(n).expand(b, n) < n - 10)
    print(
        f"  padded problems (10 zero-mass patches): ot.solve_batch NaN plans {n_nan}/{b}; "
        f"transport_plan NaN plans {int(torch.isnan(ours).flatten(1).any(1).sum())}/{b}"
    )
    return cost


def section_b(cost):
    if not torch.cuda.is_available():
        print("(b) CUDA: skipped (no GPU on this machine)")
        return
    c = cost.cuda()
    transport_plan(c)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        transport_plan(c)
    torch.cuda.synchronize()
    print(
        f"(b) CUDA ({torch.cuda.get_device_name()}): IPOT 50 it on the same batch {(time.perf_counter() - t0) / 10 * 1e3:.2f} ms"
    )


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def section_c(args):
    from imtm.components import PatchToLexiconHead

    v, d, n, bsz = 30522, 256, 197, args.lexicon_batch
    emb = torch.nn.Embedding(v, d)
    head = PatchToLexiconHead(dim=d, embed_dim=d, vocab_size=v, embedding=emb).eval()
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(bsz, n, d, generator=g)
    masked = torch.rand(bsz, n, generator=g) < 0.3
    n_masked = int(masked.sum())
    with torch.no_grad():
        t_m, out = best_time(lambda: head.logits(feats[masked]))
        t_all, out_all = best_time(lambda: head.logits(feats.reshape(-1, d)), 2)
    mib = lambda t: t.numel() * t.element_size() / 2**20
    print(
        f"(c) patch-to-lexicon logits, V = {v}, D = {d}, {bsz} images x {n} patches, {n_masked} masked:"
    )
    print(f"  masked patches only: {t_m * 1e3:8.1f} ms, logits {mib(out):8.1f} MiB")
    print(
        f"  all patches:         {t_all * 1e3:8.1f} ms, logits {mib(out_all):8.1f} MiB "
        f"({t_all / t_m:.2f}x the time, {mib(out_all) / mib(out):.2f}x the memory)"
    )
    from imtm import Tokens
    from imtm.components import WordToLexiconHead

    w2l = WordToLexiconHead(
        dim=d, embed_dim=d, vocab_size=v, embedding=emb, layers=1, heads=4
    ).eval()
    words = Tokens.from_lengths(
        torch.randn(bsz, 20, d, generator=g), torch.randint(8, 21, (bsz,), generator=g)
    )
    with torch.no_grad():
        t_w, out_w = best_time(lambda: w2l(words), 2)
    print(
        f"  word-to-lexicon head (1 layer), {bsz} captions x 20 words: {t_w * 1e3:8.1f} ms, "
        f"logits {mib(out_w):8.1f} MiB (captions are short: (B, M, V) is kept)"
    )
    print(f"  process peak RSS so far: {peak_rss_mb():.0f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sections", default="abc")
    args = parser.parse_args()
    args.problems, args.patches, args.words = (8, 50, 10) if args.quick else (64, 197, 20)
    args.sinkhorn_iter = 500 if args.quick else 5000
    args.lexicon_batch = 4 if args.quick else 32
    print(
        f"torch {torch.__version__}, POT {ot.__version__}, {platform.processor() or platform.machine()}, "
        f"threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}); "
        "shared machine: timings move with the load, ratios are measured side by side"
    )
    cost = None
    if "a" in args.sections:
        cost = section_a(args)
    if "b" in args.sections and cost is not None:
        section_b(cost)
    if "c" in args.sections:
        section_c(args)


if __name__ == "__main__":
    main()
