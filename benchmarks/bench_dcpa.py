"""DCPA's inter-modal phrase attention: blocked pairs against a per-caption loop, and peak memory.

For every image-caption pair DCPA runs a decoder layer (Eq. 11-14). This script
times :class:`imtm.components.InterModalPhraseAttention` (both branches) on random
features shaped like the 1,000 images x 5,000 captions evaluation (N = 36 regions,
captions of 8-20 words, D = 1,024, 8 heads), side by side with

- the per-caption loop of research code: for each caption, the decoder layer
  (torch's own ``nn.MultiheadAttention`` and ``nn.LayerNorm`` modules holding the
  same weights) over all images with the caption repeated; same outputs, checked;
- the same loop with the caption-independent self-attention hoisted out of it;
- the matrix-product roofline: ``torch.mm`` at the rate it reaches on this machine,
  for the useful FLOPs of the blocked path's three products (logits, values, cosines).

Both sides run on a subset (timing all 5,000,000 pairs on a shared core would take
hours); pairs per second do not depend on the subset size once a block is full.
Then the growth of the peak resident memory (VmHWM, reset through
``/proc/self/clear_refs``) during one blocked call, next to what an unblocked
implementation would hold for the same call.

    python benchmarks/bench_dcpa.py [--dim 1024] [--images 40] [--captions 400] [--loop-captions 8] [--quick]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from imtm import Tokens
from imtm.components import InterModalPhraseAttention
from imtm.functional.topk import topk_mean


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def loop_scores(
    block: InterModalPhraseAttention, images: Tokens, texts: Tokens, hoist: bool
) -> torch.Tensor:
    """One caption at a time, as research code scores DCPA: the decoder layer over all images."""
    sa, n1, ca, n2 = block.self_attn, block.norm1, block.cross_attn, block.norm2
    i2t = block.direction == "i2t"
    v, vpad = images.feats, ~images.mask
    Bi = v.shape[0]
    out = torch.empty(Bi, texts.batch_size)
    x_images = (
        n1(v + sa(v, v, v, key_padding_mask=vpad, need_weights=False)[0])
        if (hoist and i2t)
        else None
    )
    for t in range(texts.batch_size):
        w = texts.feats[t : t + 1, : int(texts.mask[t].sum())]  # the caption's real words (1, m, D)
        if i2t:
            x = (
                x_images
                if hoist
                else n1(v + sa(v, v, v, key_padding_mask=vpad, need_weights=False)[0])
            )
            wr = w.expand(Bi, -1, -1)
            y = n2(x + ca(x, wr, wr, need_weights=False)[0])  # (Bi, N, D)
            best = (F.normalize(y, dim=-1) @ F.normalize(w[0], dim=-1).t()).amax(-1)  # (Bi, N)
            out[:, t] = topk_mean(best, images.mask, block.k)
        else:
            x = n1(w + sa(w, w, w, need_weights=False)[0]).expand(Bi, -1, -1)  # (Bi, m, D)
            y = n2(x + ca(x, v, v, key_padding_mask=vpad, need_weights=False)[0])
            cos = F.normalize(y, dim=-1) @ F.normalize(v, dim=-1).transpose(1, 2)  # (Bi, m, N)
            best = cos.masked_fill(vpad[:, None, :], -float("inf")).amax(-1)
            out[:, t] = topk_mean(best, None, block.k)
    return out


def mm_rate(dim: int, seconds: float = 1.0) -> float:
    """FLOP/s of a large float32 ``torch.mm`` with inner size ``dim`` on this machine, now."""
    a, b = torch.randn(4096, dim), torch.randn(dim, 2048)
    out = torch.empty(4096, 2048)
    torch.mm(a, b, out=out)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b, out=out)
        n += 1
    return n * 2 * 4096 * 2048 * dim / (time.perf_counter() - t0)


def useful_flops(block, images: Tokens, texts: Tokens) -> float:
    """FLOPs of the blocked path's pairwise products: logits, head-folded values, cosines (padding included)."""
    q, k = (images, texts) if block.direction == "i2t" else (texts, images)
    L, M, D, H = q.num_tokens, k.num_tokens, q.dim, block.heads
    return 2.0 * q.batch_size * k.batch_size * L * M * D * (2 + H)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--images", type=int, default=40, help="images in the timed subset")
    p.add_argument("--captions", type=int, default=400, help="captions in the blocked timing")
    p.add_argument(
        "--loop-captions", type=int, default=8, help="captions in the loop timing (a prefix)"
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    args = p.parse_args()
    if args.quick:
        args.dim, args.images, args.captions, args.loop_captions = 64, 8, 40, 4
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = Tokens(torch.randn(args.images, args.regions, args.dim, generator=g))
    lengths = torch.randint(8, 21, (args.captions,), generator=g)
    texts = Tokens.from_lengths(torch.randn(args.captions, 20, args.dim, generator=g), lengths)
    print(
        f"threads {torch.get_num_threads()}; D = {args.dim}, {args.heads} heads, N = {args.regions} regions, "
        f"captions of 8-20 words; timed subset {args.images} images x {args.captions} captions "
        f"(loop: x {args.loop_captions}); full problem 1,000 x 5,000"
    )
    for direction in ("i2t", "t2i"):
        block = InterModalPhraseAttention(direction, dim=args.dim, heads=args.heads).eval()
        sub = texts[: args.loop_captions]
        with torch.no_grad():
            block(images[:2], texts[:4])  # warm-up
            t0 = time.perf_counter()
            blocked = block(images, texts)
            t_blocked = time.perf_counter() - t0
            rate = mm_rate(args.dim)
            t0 = time.perf_counter()
            naive = loop_scores(block, images, sub, hoist=False)
            t_loop = time.perf_counter() - t0
            if (
                direction == "i2t"
            ):  # for t2i the self-attention is over the caption's words: nothing to hoist
                t0 = time.perf_counter()
                hoisted = loop_scores(block, images, sub, hoist=True)
                t_hoist = time.perf_counter() - t0
                torch.testing.assert_close(hoisted, naive, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(blocked[:, : args.loop_captions], naive, rtol=1e-4, atol=1e-5)
        n_blocked, n_loop = args.images * args.captions, args.images * args.loop_captions
        pps, pps_loop = n_blocked / t_blocked, n_loop / t_loop
        roof = useful_flops(block, images, texts) / rate
        print(
            f"[{direction}] blocked           {pps:10.0f} pairs/s  ({t_blocked:.2f}s for {n_blocked} pairs; "
            f"1,000 x 5,000 would take {5e6 / pps / 60:.0f} min)"
        )
        print(
            f"[{direction}] per-caption loop  {pps_loop:10.0f} pairs/s  ({t_loop:.2f}s for {n_loop} pairs)  "
            f"blocked / loop = {pps / pps_loop:.1f}x   (same scores: checked)"
        )
        if direction == "i2t":
            pps_hoist = n_loop / t_hoist
            print(
                f"[{direction}] loop, self-attention hoisted {pps_hoist:10.0f} pairs/s  blocked / hoisted = "
                f"{pps / pps_hoist:.1f}x"
            )
        print(
            f"[{direction}] roofline: torch.mm at {rate / 1e9:.1f} GFLOP/s would do the blocked path's products in "
            f"{roof:.2f}s; blocked reaches {roof / t_blocked:.2f} of it"
        )
    # Peak memory of one blocked call (image-to-text) against an unblocked implementation of it.
    block = InterModalPhraseAttention("i2t", dim=args.dim, heads=args.heads).eval()
    with torch.no_grad():
        block(images[:2], texts[:4])
        reset_hwm()
        base = vm_hwm_mib()
        block(images, texts)
        growth = vm_hwm_mib() - base
    pairs = args.images * args.captions
    dense = pairs * args.regions * max(args.dim, args.heads * 20) * 4 / 2**20
    budget = 1 << 24
    inputs = (images.feats.numel() + texts.feats.numel()) * 4 / 2**20
    print(
        f"[memory] peak resident growth during one blocked call ({args.images} x {args.captions}): "
        f"{growth:.0f} MiB; block budget 2**24 numbers = {budget * 4 / 2**20:.0f} MiB per intermediate; "
        f"inputs {inputs:.0f} MiB"
    )
    print(
        f"[memory] an unblocked call holds (pairs, N, max(D, H*M)) float32 intermediates: {dense:.0f} MiB each "
        f"here, {5e6 * args.regions * max(args.dim, args.heads * 20) * 4 / 2**30:.0f} GiB each for 1,000 x 5,000"
    )


if __name__ == "__main__":
    main()
