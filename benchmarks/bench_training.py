"""One training step of every preset: samples/s, the share of each block, and LAPS against the authors' structure.

Not part of the test suite. A step is what ``Matcher.fit`` does per batch (``_steps.py``):
every block in order on one batch of the synthetic benchmark, the weighted losses, backward,
AdamW. For every preset: the median step time, samples/s, and the fraction of the step
spent in each block's forward and in backward + optimizer (each part timed on its own,
which adds a synchronisation per block).

LAPS against the authors' structure, side by side in one run on the same batches (and our block
with ``cosine_route="gram"``, the route the papers' widths take, beside its default): the same
Matcher with its ``PatchSlimming`` block's forward replaced by a per-caption Python loop in
the structure of ``CrossSparseAggrNet_v2.forward`` (lib/cross_net.py of CrossmodalGroup/LAPS,
read for this benchmark): for each caption in turn, the caption's attention over the patches,
``TokenSparse`` (sort, keep the top ``N_s``, fuse the rest), ``TokenAggregation`` (the
aggregation MLP on the kept patches), the [CLS] token prepended, the alignment with the
caption's words; the image-only scores are computed once before the loop, as they do. The
loop is ``loop_scores`` of ``bench_laps.py`` with autograd on, plus the per-caption keep masks
(their ``score_mask``) for the ratio loss. Both variants select the top ``N_s`` patches (the
authors' v2 net does so in training too; our block does so in eval mode, set for both), so
they compute the same scores: the largest difference is printed. DCPA against its authors'
structure is not measured here.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py               # every preset
    OMP_NUM_THREADS=1 python benchmarks/bench_training.py --presets laps
    python benchmarks/bench_training.py --quick
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from collections import defaultdict

import torch
from _steps import PRESET_NAMES, load_data, make_batch, make_matcher, train_step
from bench_laps import loop_scores

from imtm.functional.patch_slimming import cheaper_cosine_route, num_kept


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def authors_laps_forward(slim):
    """PatchSlimming's forward in the authors' structure: one caption at a time."""

    def forward(image_tokens, text_tokens):
        images, texts = image_tokens.feats, text_tokens.feats
        scores = loop_scores(slim, images, texts, text_mask=text_tokens.mask)
        # The keep masks, per caption as their score_mask, then in the block's (Bi, Bt, 1 + N) layout.
        patches = images[:, 1:]
        a_p, a_s = slim.scorer.image_scores(patches, None)
        n_s = int(num_kept(torch.tensor([patches.shape[1]]), slim.selector.ratio))
        masks = []
        with torch.no_grad():
            for t in range(texts.shape[0]):
                words = texts[t, text_tokens.mask[t]]
                from imtm.functional.patch_slimming import minmax_normalize

                a_r = minmax_normalize(patches @ words.mean(0) / patches.shape[-1], dim=1)
                a = (1 - slim.scorer.beta) * a_p + slim.scorer.beta / 2 * (a_s + a_r)
                keep = a.argsort(dim=1, descending=True, stable=True)[:, :n_s]
                masks.append(torch.zeros_like(a).scatter_(1, keep, 1.0))
        decisions = torch.stack(masks, dim=1)
        cls = torch.ones(*decisions.shape[:2], 1, dtype=decisions.dtype, device=decisions.device)
        return scores, torch.cat([cls, decisions], dim=-1)

    return forward


def cheaper_route(slim, vals) -> str:
    """The cosine route ``"auto"`` picks for this block's inputs."""
    images, texts = vals["image_tokens"], vals["text_tokens"]
    p = images.num_prefix_tokens
    n_agg = slim.aggregation.num_out
    return cheaper_cosine_route(
        images.feats.shape[1] - p, texts.feats.shape[1], images.dim, n_agg, p
    )


def shared_work_forward():
    """PatchSlimming replaced by a mean-pooled cosine over the same tokens (keeping every patch): the
    step's work that any scorer shares (encoders, ratio loss, backward through the encoders, the
    optimizer). The authors' step over it bounds what a faster scorer can gain (Amdahl)."""

    def forward(image_tokens, text_tokens):
        img = image_tokens.feats[:, 1:].mean(1)
        txt = text_tokens.masked_mean()
        scores = (
            torch.nn.functional.normalize(img, dim=-1)
            @ torch.nn.functional.normalize(txt, dim=-1).t()
        )
        keep = torch.ones(
            img.shape[0],
            txt.shape[0],
            image_tokens.feats.shape[1],
            dtype=img.dtype,
            device=img.device,
        )
        return scores, keep

    return forward


def step_profile(m, batches, repeats):
    opt = torch.optim.AdamW([p for p in m.components_.parameters() if p.requires_grad], lr=1e-5)
    totals, parts = [], defaultdict(list)
    for _ in range(repeats):
        for values in batches:
            acc = defaultdict(float)
            t0 = time.perf_counter()
            train_step(m, values, opt, timer=lambda n, s, acc=acc: acc.__setitem__(n, acc[n] + s))
            totals.append(time.perf_counter() - t0)
            for k, v in acc.items():
                parts[k].append(v)
    return median(totals), {k: median(v) for k, v in parts.items()}


def alternate_steps(m, slim, batches, repeats):
    """Median (wall, CPU) seconds per step of our block, of the authors' structure and of the shared
    work alone (:func:`shared_work_forward`), alternating batch by batch so that all see the same load."""
    opt = torch.optim.AdamW([p for p in m.components_.parameters() if p.requires_grad], lr=1e-5)
    walls: dict[str, list[float]] = defaultdict(list)
    cpus: dict[str, list[float]] = defaultdict(list)
    swapped = {"authors": authors_laps_forward(slim), "shared": shared_work_forward()}
    route = slim.cosine_route
    for _ in range(repeats):
        for values in batches:
            for key in ("ours", "gram", "authors", "shared"):
                if key in swapped:
                    slim.forward = swapped[key]
                if (
                    key == "gram"
                ):  # ours with the cosines from the Gram matrix (the papers' widths' route)
                    slim.cosine_route = "gram"
                try:
                    t0, c0 = time.perf_counter(), time.process_time()
                    train_step(m, values, opt)
                    walls[key].append(time.perf_counter() - t0)
                    cpus[key].append(time.process_time() - c0)
                finally:
                    slim.cosine_route = route
                    if key in swapped:
                        del slim.forward
    return {k: (median(walls[k]), median(cpus[k])) for k in walls}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESET_NAMES), choices=PRESET_NAMES)
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.batch_size, args.dim, args.steps, args.repeats = 16, 16, 32, 2, 1
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)
    print(f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1 / 5 / 15 min)")
    print(
        f"bench_training: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"threads={torch.get_num_threads()}, seed={args.seed}, batch={args.batch_size}, dim={args.dim}, "
        f"{args.steps} batches x {args.repeats}"
    )
    for name in args.presets:
        train = load_data(name, args.n_train, seed=args.seed)
        m = make_matcher(name, train, embed_dim=args.dim, batch_size=args.batch_size, compile=False)
        batches = [
            make_batch(train, args.batch_size * k + 3, args.batch_size) for k in range(args.steps)
        ]
        total, parts = step_profile(m, batches, args.repeats)
        share = ", ".join(f"{k} {v / sum(parts.values()):.2f}" for k, v in parts.items())
        print(
            f"{name:6} {total * 1e3:8.1f} ms/step  {args.batch_size / total:8.1f} samples/s  share: {share}",
            flush=True,
        )
        if name == "laps":
            slim = m.components_["laps"]
            slim.eval()  # top-N_s selection in both variants
            with torch.no_grad():
                values = batches[0]
                plan = m.plan_
                vals = dict(values)
                for k, block in enumerate(plan.blocks):
                    if plan.names[k] == "laps":
                        break
                    out = block(*[vals[r] for r in block.requires])
                    provides = tuple(block.provides)
                    vals.update(
                        {provides[0]: out} if len(provides) == 1 else dict(zip(provides, out))
                    )
                args_laps = [vals[r] for r in slim.requires]
                want = slim(*args_laps)[0]
                got = authors_laps_forward(slim)(*args_laps)[0]
            times = alternate_steps(m, slim, batches, args.repeats)
            (ours_t, ours_c), (authors_t, authors_c) = times["ours"], times["authors"]
            print(
                f"       LAPS step, top-N_s selection: ours {ours_t * 1e3:.1f} ms, authors' structure "
                f"(per-caption loop) {authors_t * 1e3:.1f} ms: ours {authors_t / ours_t:.2f}x faster "
                f"by wall-clock time; by CPU time {ours_c * 1e3:.1f} ms against {authors_c * 1e3:.1f} ms, "
                f"{authors_c / ours_c:.2f}x (goal >= 2x); scores max abs diff "
                f"{float((got - want).abs().max()):.1e}",
                flush=True,
            )
            gram_t, gram_c = times["gram"]
            print(
                f"       ours with cosine_route='gram' (the default 'auto' takes "
                f"{cheaper_route(slim, vals)!r} here): {gram_t * 1e3:.1f} ms wall, {gram_c * 1e3:.1f} ms "
                f"CPU; the authors' structure over it: {authors_t / gram_t:.2f}x by wall-clock time",
                flush=True,
            )
            shared_t, shared_c = times["shared"]
            print(
                f"       shared work (the scorer replaced by a mean-pooled cosine): {shared_t * 1e3:.1f} ms "
                f"wall, {shared_c * 1e3:.1f} ms CPU; so the authors' step over it, the most any scorer "
                f"could gain: {authors_t / shared_t:.2f}x by wall-clock time, {authors_c / shared_c:.2f}x "
                f"by CPU time; our scorer's own part {(ours_t - shared_t) * 1e3:.1f} ms against the "
                f"authors' {(authors_t - shared_t) * 1e3:.1f} ms: "
                f"{(authors_t - shared_t) / max(ours_t - shared_t, 1e-9):.2f}x",
                flush=True,
            )
    print(f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1 / 5 / 15 min)")


if __name__ == "__main__":
    main()
