"""Two-stage retrieval against full fine-grained scoring on a 50,000-image synthetic gallery.

Side by side, in one run, text-to-image search with CHAN's scorer (hard assignment
coding, visual codebook, log-sum-exp pooling):

- full scoring: every query caption against every gallery image through the
  engine's blocked all-pairs path (what ``Matcher.similarity`` runs once both sides
  are encoded), on a subset of the queries (it is the slow side), timed per query;
- :class:`imtm.retrieval.TwoStageRetriever` for k in 10, 50, 100, 200: stage 1 ranks the
  whole gallery by the cosine of masked-mean tokens (CHAN has no global embedding),
  stage 2 re-scores the top-k with the same scorer; also with faiss (when installed),
  from a saved memory-mapped gallery, and with a plain per-query loop for stage 2;
- the matrix-product roofline: full scoring's FLOPs at the speed of one large matmul.

The gallery is generated with planted matches (no trained encoder is involved, so
the numbers measure search, not learning): a pool of object prototypes; each image
holds ``N`` objects (prototype + noise); each caption names some objects of its
image (prototype + word noise) plus words shared by all captions. Images that share
objects with the target are the hard negatives. The Matcher is the CHAN preset built
on a tiny synthetic split and never trained: its encoders are bypassed (the gallery
tokens are given directly), only its scorer is used.

Run (about 5-10 minutes on one thread)::

    OMP_NUM_THREADS=1 python benchmarks/bench_two_stage.py     # 8 objects per image: a strong stage 1
    OMP_NUM_THREADS=1 python benchmarks/bench_two_stage.py --objects-per-image 18 --word-noise 1.0 --objects 2000
    OMP_NUM_THREADS=1 python benchmarks/bench_two_stage.py --quick   # 5,000 images, about a minute

The second gallery makes the masked-mean embedding a weak first stage (a caption names 5
of 18 objects), to show what two-stage search loses when stage 1 misses the target.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from imtm import Matcher, Tokens, presets
from imtm.data import synthetic
from imtm.engine.evaluation import blocked_scores, run_blocks
from imtm.retrieval import TwoStageRetriever


def planted_gallery(
    n_images,
    n_queries,
    *,
    n_regions,
    n_objects_per_image,
    n_words,
    n_named,
    dim,
    n_objects,
    region_noise,
    word_noise,
    n_shared_words,
    seed,
):
    """Image region tokens (n_images, N, D), query caption tokens (Q, M, D) and each query's image.

    Each image holds ``n_objects_per_image`` distinct objects of a shared pool; its ``N``
    regions are noisy views of them (several regions per object, as detector proposals
    overlap); a caption names ``n_named`` of its image's objects and adds shared words.
    """
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(n_objects, dim, generator=g), dim=-1)
    shared = F.normalize(torch.randn(n_shared_words, dim, generator=g), dim=-1)
    objects = torch.empty(n_images, n_objects_per_image, dtype=torch.long)
    feats = torch.empty(n_images, n_regions, dim)
    view = torch.arange(n_regions) % n_objects_per_image  # region r shows object r mod K
    for a in range(0, n_images, 4096):  # chunks: bounded temporary memory
        b = min(n_images, a + 4096)
        objects[a:b] = torch.rand(b - a, n_objects, generator=g).argsort(1)[:, :n_objects_per_image]
        feats[a:b] = (
            protos[objects[a:b][:, view]]
            + region_noise * torch.randn(b - a, n_regions, dim, generator=g) / dim**0.5
        )
    targets = torch.randperm(n_images, generator=g)[:n_queries]
    pick = torch.rand(n_queries, n_objects_per_image, generator=g).argsort(1)[:, :n_named]
    named = objects[targets].gather(1, pick)
    words = (
        protos[named] + word_noise * torch.randn(n_queries, n_named, dim, generator=g) / dim**0.5
    )
    filler = shared[torch.randint(0, n_shared_words, (n_queries, n_words - n_named), generator=g)]
    # named words first, so that a shorter caption (fewer filler words) keeps all of them
    texts = torch.cat([words, filler], 1)
    lengths = torch.randint(n_named + 1, n_words + 1, (n_queries,), generator=g)
    return Tokens(feats), Tokens.from_lengths(texts, lengths), targets


def recalls(ranked: torch.Tensor, targets: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    hit = ranked == targets[:, None]
    return {f"R@{k}": 100.0 * float(hit[:, :k].any(1).float().mean()) for k in ks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=1000, help="queries for two-stage search")
    p.add_argument(
        "--full-queries", type=int, default=200, help="queries scored against the whole gallery"
    )
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--words", type=int, default=8)
    p.add_argument(
        "--named", type=int, default=5, help="words of a caption that name objects of its image"
    )
    p.add_argument(
        "--objects", type=int, default=500, help="object prototypes shared by all images"
    )
    p.add_argument("--objects-per-image", type=int, default=8)
    p.add_argument("--region-noise", type=float, default=1.0)
    p.add_argument("--word-noise", type=float, default=1.5)
    p.add_argument("--ks", default="10,50,100,200")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="5,000 images, 300 queries, 40 fully scored"
    )
    args = p.parse_args()
    if args.quick:
        args.images, args.queries, args.full_queries = 5000, 300, 40
    ks = [int(k) for k in args.ks.split(",")]
    torch.manual_seed(args.seed)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); the machine is shared with other jobs, "
        "so absolute times vary; ratios are measured side by side in this one run"
    )

    t0 = time.perf_counter()
    images, queries, targets = planted_gallery(
        args.images,
        args.queries,
        n_regions=args.regions,
        n_objects_per_image=args.objects_per_image,
        n_words=args.words,
        n_named=args.named,
        dim=args.dim,
        n_objects=args.objects,
        region_noise=args.region_noise,
        word_noise=args.word_noise,
        n_shared_words=50,
        seed=args.seed,
    )
    print(
        f"gallery: {args.images} images x {args.regions} regions x D={args.dim} "
        f"({images.feats.numel() * 4 / 2**30:.2f} GiB float32); {args.queries} query captions of up to "
        f"{args.words} words ({args.named} name objects of their image); generated in {time.perf_counter() - t0:.1f}s"
    )

    train, _, _ = synthetic.load(view="regions", seed=0, n_train=8, n_dev=2, n_test=2)
    m = Matcher(
        presets.chan(
            vocab=train.vocab,
            region_dim=train.region_dim,
            embed_dim=args.dim,
            word_dim=16,
            context_heads=1,
        ),
        epochs=0,
        verbose=False,
        device="cpu",
    ).fit(train)
    plan = m.plan_
    pair = m._eval_plan()[2]
    print(f"scorer: {plan.blocks[pair[0]]!r}")

    # ---------------------------------------------------------------- full fine-grained scoring
    nf = args.full_queries
    qf = {"text_tokens": queries[:nf]}
    t0 = time.perf_counter()
    full = blocked_scores(
        plan, pair, {"image_tokens": images}, qf, args.images, nf, image_block=4096, text_block=nf
    )["scores"]
    full_s = time.perf_counter() - t0
    full_ranked = full.T.topk(10, dim=1).indices
    full_rec = recalls(full_ranked, targets[:nf])
    flops = 2.0 * args.images * float(queries[:nf].mask.sum()) * args.regions * args.dim
    a = torch.randn(4096, args.dim)
    b = torch.randn(args.dim, 4096)
    t1 = time.perf_counter()
    reps = 0
    while time.perf_counter() - t1 < 2.0:
        a @ b
        reps += 1
    gflops = reps * 2.0 * 4096 * 4096 * args.dim / (time.perf_counter() - t1) / 1e9
    print(
        f"\nfull scoring: {nf} queries x {args.images} images in {full_s:.1f}s = {full_s / nf * 1e3:.1f} ms/query; "
        f"{flops / full_s / 1e9:.1f} GFLOP/s vs matmul roofline {gflops:.1f} GFLOP/s "
        f"({flops / full_s / 1e9 / gflops:.2f} of roofline)"
    )

    # ---------------------------------------------------------------- two-stage search
    rows = []
    header = (
        f"{'method':34s} {'queries/s':>10s} {'ms/query':>9s} {'x full':>7s}  R@1 / R@5 / R@10 (all {args.queries})"
        f"   R@1 / R@5 / R@10 (the {nf} fully scored)"
    )
    rows.append(("full fine-grained scoring", nf / full_s, None, None, full_rec))

    def run(name, retriever, **kw):
        qv = {"text_tokens": queries}
        retriever.text_to_image({"text_tokens": queries[:8]}, top=10)  # warm-up
        t = time.perf_counter()
        res = retriever.text_to_image(qv, top=10)
        dt = time.perf_counter() - t
        rows.append(
            (
                name,
                args.queries / dt,
                recalls(res.indices, targets),
                recalls(res.indices[:nf], targets[:nf]),
                None,
            )
        )
        return res

    gallery = {"image_tokens": images}
    stage1 = None
    for k in ks:
        r = TwoStageRetriever(m, k=k, index="torch").fit(images=gallery)
        res = run(f"two-stage k={k} (torch index)", r)
        if k == max(ks):
            stage1 = res.candidates
    r100 = TwoStageRetriever(m, k=100, index="torch").fit(images=gallery)
    try:
        import faiss  # noqa: F401

        run(
            "two-stage k=100 (faiss IndexFlatIP)",
            TwoStageRetriever(m, k=100, index="faiss").fit(images=gallery),
        )
    except ImportError:
        print("(faiss not installed: pip install 'imtm[faiss]' for its row)")
    tmp = Path(tempfile.mkdtemp(prefix="imtm_two_stage_"))
    try:
        t = time.perf_counter()
        r100.save(tmp / "gallery")
        save_s = time.perf_counter() - t
        mm = TwoStageRetriever.load(tmp / "gallery", m, mmap=True)
        run("two-stage k=100 (memory-mapped)", mm)
        print(
            f"saved gallery: {sum(f.stat().st_size for f in (tmp / 'gallery').rglob('*') if f.is_file()) / 2**30:.2f}"
            f" GiB in {save_s:.1f}s"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for qb in (1, 8):
        r100.query_block = qb
        run(f"two-stage k=100, blocks of {qb} quer{'y' if qb == 1 else 'ies'}", r100)

    # stage 2 as a plain loop: one scorer call per (query, candidate list), nothing grouped
    cand_all = (
        TwoStageRetriever(m, k=100)
        .fit(images=gallery)
        .text_to_image({"text_tokens": queries}, top=10)
        .candidates
    )
    t = time.perf_counter()
    plain = []
    for q in range(args.queries):
        vals = {
            "image_tokens": images[cand_all[q]].trim(),
            "text_tokens": queries[q : q + 1].trim(),
        }
        run_blocks(plan, pair, vals)
        plain.append(cand_all[q][vals["scores"][:, 0].topk(10).indices])
    plain_s = time.perf_counter() - t
    plain = torch.stack(plain)
    rows.append(
        (
            "stage 2 alone, plain per-query loop",
            args.queries / plain_s,
            recalls(plain, targets),
            recalls(plain[:nf], targets[:nf]),
            None,
        )
    )

    full_qps = nf / full_s
    print()
    print(header)
    for name, qps, rec_all, rec_sub, rec_full in rows:
        if rec_full is not None:
            sub = " / ".join(f"{rec_full[k]:5.1f}" for k in ("R@1", "R@5", "R@10"))
            print(
                f"{name:34s} {qps:10.2f} {1e3 / qps:9.1f} {1.0:7.1f}  {'(not run on all)':>22s}   {sub}"
            )
            continue
        all_ = " / ".join(f"{rec_all[k]:5.1f}" for k in ("R@1", "R@5", "R@10"))
        sub = " / ".join(f"{rec_sub[k]:5.1f}" for k in ("R@1", "R@5", "R@10"))
        print(f"{name:34s} {qps:10.2f} {1e3 / qps:9.1f} {qps / full_qps:7.1f}  {all_:>22s}   {sub}")
    if stage1 is not None:
        hit = stage1 == targets[:, None]
        print(
            "\nstage 1 alone (masked-mean cosine): target among the top k for "
            + ", ".join(
                f"k={k}: {100.0 * float(hit[:, :k].any(1).float().mean()):.1f}%" for k in ks
            )
        )
    print(
        f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    )


if __name__ == "__main__":
    main()
