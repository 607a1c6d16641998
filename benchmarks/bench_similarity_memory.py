"""Peak memory of Matcher.similarity on 1,000 images x 5,000 captions against the dense size.

Runs the CHAN preset (hard-assignment coding, embed_dim 1024) untrained on the
synthetic test split: memory does not depend on the weights. Reports the growth
of the process's peak resident memory during ``similarity`` next to the size of
the dense ``(n_images, n_captions, N, M)`` similarity tensor that an unblocked
implementation would hold, and the cached token features.

    python benchmarks/bench_similarity_memory.py [--embed-dim 1024] [--image-block 128] [--text-block 1024]
"""

import argparse
import resource
import time

import torch

from imtm import Matcher, presets
from imtm.data import synthetic


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--embed-dim", type=int, default=1024)
    p.add_argument("--image-block", type=int, default=128)
    p.add_argument("--text-block", type=int, default=1024)
    args = p.parse_args()
    train, _, test = synthetic.load(view="regions", seed=0, n_train=50, n_dev=10, n_test=1000)
    m = Matcher(
        presets.build("chan", train, embed_dim=args.embed_dim),
        epochs=0,
        verbose=False,
        image_block=args.image_block,
        text_block=args.text_block,
    )
    m.fit(train)  # zero epochs: builds the blocks
    m.similarity(test.images[:8], test.captions[:40])  # warm-up allocations
    n_tok_i = max(x.shape[0] for x in test.images)
    before = peak_mib()
    t0 = time.perf_counter()
    S = m.similarity(test.images, test.captions)
    dt = time.perf_counter() - t0
    after = peak_mib()
    # the per-side caches similarity() holds while scoring, measured after the fact
    iv = m.encode_images(test.images)
    tv = m.encode_texts(test.captions)
    cache_mib = (
        sum(v.feats.numel() * v.feats.element_size() for v in (*iv.values(), *tv.values())) / 2**20
    )
    n_words = tv["text_tokens"].num_tokens
    n_i, n_t = S.shape
    dense_sim = n_i * n_t * n_tok_i * n_words * 4 / 2**20
    dense_feat = n_i * n_t * n_words * args.embed_dim * 4 / 2**20
    print(
        f"similarity {n_i} x {n_t}, N <= {n_tok_i} regions, M <= {n_words} words, D = {args.embed_dim}: {dt:.1f}s"
    )
    print(f"  output matrix                               {S.numel() * 4 / 2**20:10.1f} MiB")
    print(f"  cached token features (both sides)          {cache_mib:10.1f} MiB")
    print(
        f"  peak resident memory growth during the call {max(0.0, after - before):10.1f} MiB (caches included)"
    )
    print(
        f"  of which pairwise work (growth - caches)     {max(0.0, after - before - cache_mib):10.1f} MiB"
    )
    print(f"  dense (n_i, n_t, N, M) float32 similarities {dense_sim:10.1f} MiB")
    print(f"  dense (n_i, n_t, M, D) float32 (soft coding){dense_feat:10.1f} MiB")
    print(
        f"  ratio peak growth / dense (n_i, n_t, N, M)   {max(0.0, after - before) / dense_sim:10.4f}"
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
