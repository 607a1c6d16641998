"""DCPA's inter-modal phrase attention: blocked pairs against a per-caption loop, the roofline, a training step.

For every image-caption pair DCPA runs a decoder layer (Eq. 11-14). This script
times :class:`imtm.components.InterModalPhraseAttention` (both branches, autograd off)
on random features shaped like the 1,000 images x 5,000 captions evaluation (N = 36
regions, captions of 8-20 words, D = 1,024, 8 heads), twice: the attention sub-layers
alone (``feed_forward=False``) and the whole decoder layer with its feed-forward
sub-layer (the preset's default), each side by side with

- the per-caption loop of research code: for each caption, the decoder layer
  (torch's own ``nn.MultiheadAttention``, ``nn.LayerNorm`` and ``nn.Linear`` modules
  holding the same weights) over all images with the caption repeated; same scores, checked;
- the matrix-product roofline: ``torch.mm`` at the rate it reaches on this machine,
  measured right after, for the FLOPs of the matrix products the call must do on the real
  tokens (the per-set projections and self-attention, then per pair the logits, the values
  with the output projection, the feed-forward sub-layer and the cosines).

Both sides run on a subset (timing all 5,000,000 pairs on a shared core would take
hours); pairs per second do not depend on the subset size once a block is full.
Then training steps (forward and backward of both branches and the hardest-negative
triplet loss on one batch) against the same step in the per-caption structure (same
loss and gradients, checked), alternating, with the feed-forward sub-layers' forward and
backward alone on as many query tokens (the work neither structure can avoid), and the growth of the peak resident memory (VmHWM, reset
through ``/proc/self/clear_refs``) during one blocked call.

Each blocked timing runs ``--repeats`` times, each run followed by its roofline, and every
run's ratio is printed twice: by wall-clock time, and by this process's CPU time (on a
machine shared with other jobs the process waits for a core now and then; its CPU time
counts only what it ran, for the scorer and for ``torch.mm`` alike). The load average is
printed at the start and after the timings.

    python benchmarks/bench_dcpa.py [--dim 1024] [--images 64] [--captions 256] [--ffn-captions 32]
                                    [--loop-captions 4] [--repeats 3]
                                    [--sections attention ffn train memory]
                                    [--train-batch 32] [--train-dim 256] [--train-steps 5] [--quick]
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F

from imtm import Tokens
from imtm.components import InterModalPhraseAttention
from imtm.functional.topk import topk_mean

SECTIONS = ("attention", "ffn", "train", "memory")


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


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
    ffn = (
        (lambda y: block.norm3(y + block.linear2(torch.relu(block.linear1(y)))))
        if block.feed_forward
        else (lambda y: y)
    )
    i2t = block.direction == "i2t"
    v, vpad = images.feats, ~images.mask
    Bi = v.shape[0]
    outs = []
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
            y = ffn(n2(x + ca(x, wr, wr, need_weights=False)[0]))  # (Bi, N, D)
            best = (F.normalize(y, dim=-1) @ F.normalize(w[0], dim=-1).t()).amax(-1)  # (Bi, N)
            outs.append(topk_mean(best, images.mask, block.k))
        else:
            x = n1(w + sa(w, w, w, need_weights=False)[0]).expand(Bi, -1, -1)  # (Bi, m, D)
            y = ffn(n2(x + ca(x, v, v, key_padding_mask=vpad, need_weights=False)[0]))
            cos = F.normalize(y, dim=-1) @ F.normalize(v, dim=-1).transpose(1, 2)  # (Bi, m, N)
            best = cos.masked_fill(vpad[:, None, :], -float("inf")).amax(-1)
            outs.append(topk_mean(best, None, block.k))
    return torch.stack(outs, dim=1)


def mm_rate(dim: int, seconds: float = 1.0) -> tuple[float, float]:
    """FLOP/s of a large float32 ``torch.mm`` with inner size ``dim`` on this machine, now:
    per second of wall-clock time and per second of this process's CPU time."""
    a, b = torch.randn(4096, dim), torch.randn(dim, 2048)
    out = torch.empty(4096, 2048)
    torch.mm(a, b, out=out)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b, out=out)
        n += 1
    flops = n * 2 * 4096 * 2048 * dim
    return flops / (time.perf_counter() - t0), flops / (time.process_time() - c0)


def useful_flops(block, images: Tokens, texts: Tokens) -> float:
    """FLOPs of the matrix products one call must do, on the real tokens only (padding not counted).

    Per query set with ``l`` real tokens: the self-attention (``8 l D^2 + 4 l^2 D``) and the
    cross-attention's query projection (``2 l D^2``); per key set with ``m`` real tokens: the key
    and value projections (``4 m D^2``); per pair: the logits ``2 l m D``, the values with the
    output projection (the cheaper in total of folded, ``2 m D^2`` per key set plus ``2 l H m D``
    per pair, and unfolded, ``2 l m D + 2 l D^2`` per pair), the feed-forward sub-layer
    ``4 l D F`` when the block has it, and the cosines ``2 l m D``.
    """
    q, k = (images, texts) if block.direction == "i2t" else (texts, images)
    lq = q.mask.sum(1).double()  # (Bq,)
    mk = k.mask.sum(1).double()  # (Bk,)
    D, H = q.dim, block.heads
    F_ = block.linear1.out_features if block.feed_forward else 0
    lm = lq.sum() * mk.sum()  # sum over pairs of l * m
    l_all = lq.sum() * k.batch_size  # sum over pairs of l
    single = (10 * lq * D * D + 4 * lq * lq * D).sum() + (4 * mk * D * D).sum()
    folded = 2 * mk.sum() * D * D + 2 * lm * H * D
    unfolded = 2 * lm * D + 2 * l_all * D * D
    pairwise = 4 * lm * D + torch.minimum(folded, unfolded) + 4 * l_all * D * F_
    return float(single + pairwise)


def timed(fn):
    """``fn()`` and its wall-clock and process CPU seconds."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def time_branch(block, images, texts, sub, rate_dim, repeats):
    """Blocked scores (``repeats`` times, each followed by the roofline) and the per-caption loop on
    ``sub``: timings, checked equal; the roofline ratios of every run, by wall-clock and by CPU time."""
    flops = useful_flops(block, images, texts)
    runs = []
    with torch.no_grad():
        block(images[:2], texts[:4])  # warm-up
        for _ in range(repeats):
            blocked, wall, cpu = timed(lambda: block(images, texts))
            rate_wall, rate_cpu = mm_rate(rate_dim)
            runs.append((wall, cpu, rate_wall, flops / rate_wall / wall, flops / rate_cpu / cpu))
        naive, t_loop, _ = timed(lambda: loop_scores(block, images, sub, hoist=False))
    torch.testing.assert_close(blocked[:, : sub.batch_size], naive, rtol=1e-4, atol=1e-5)
    return runs, t_loop


def train_step_loop(block, images: Tokens, texts: Tokens) -> torch.Tensor:
    """One training forward in the per-caption structure: for each caption, the layer over all images."""
    return loop_scores(block, images, texts, hoist=False)


def ffn_floor_step(branches, images: Tokens, texts: Tokens) -> float:
    """Seconds of the work no structure can avoid: each branch's feed-forward sub-layer, forward and
    backward, on as many query tokens as the step has (every real query token of every pair), as two
    plain ``nn.Linear`` calls with a ReLU between them."""
    seconds = 0.0
    for b in branches:
        q = images if b.direction == "i2t" else texts
        rows = int(q.mask.sum()) * (texts if b.direction == "i2t" else images).batch_size
        x = torch.randn(rows, q.dim, requires_grad=True)
        t0 = time.perf_counter()
        y = b.linear2(torch.relu(b.linear1(x)))
        y.sum().backward()
        seconds += time.perf_counter() - t0
        b.zero_grad(set_to_none=True)
    return seconds


def bench_training(args) -> None:
    """Forward + backward of both branches and the triplet loss on one batch: blocked vs per-caption loop,
    alternating step by step, and the feed-forward work both must do; then the same without the
    feed-forward sub-layer."""
    g = torch.Generator().manual_seed(1)
    B, D = args.train_batch, args.train_dim
    images = Tokens(torch.randn(B, args.regions, D, generator=g))
    lengths = torch.randint(8, 21, (B,), generator=g)
    texts = Tokens.from_lengths(torch.randn(B, 20, D, generator=g), lengths)
    positives = torch.eye(B, dtype=torch.bool)
    for ffn in (True, False):
        torch.manual_seed(0)
        branches = [
            InterModalPhraseAttention(d, dim=D, heads=args.heads, feed_forward=ffn)
            for d in ("i2t", "t2i")
        ]
        train_steps(args, branches, images, texts, positives, ffn)


def train_steps(args, branches, images, texts, positives, ffn: bool) -> None:
    from imtm.functional.losses import triplet_loss

    B, D = images.batch_size, images.dim

    def step(score_fn, n=B):
        for b in branches:
            b.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), time.process_time()
        s_i2t, s_t2i = (score_fn(b) for b in branches)
        pos = positives[:n, :n]
        loss = triplet_loss(s_i2t, pos, margin=0.1, hardest=True)
        loss = loss + triplet_loss(s_t2i, pos, margin=0.1, hardest=True)
        loss.backward()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        grads = [p.grad.clone() for b in branches for p in b.parameters()]
        return (seconds, cpu), float(loss.detach()), grads

    step(lambda b: b(images[:2], texts[:2]), 2)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {"blocked": [], "loop": [], "floor": []}
    for _ in range(args.train_steps):  # alternating, so that all three see the same load
        t, l_blocked, g_blocked = step(lambda b: b(images, texts))
        times["blocked"].append(t)
        t, l_loop, g_loop = step(lambda b: train_step_loop(b, images, texts))
        times["loop"].append(t)
        if ffn:
            c0 = time.process_time()
            times["floor"].append(
                (ffn_floor_step(branches, images, texts), time.process_time() - c0)
            )
    assert abs(l_blocked - l_loop) <= 1e-3 * max(1.0, abs(l_loop)), (l_blocked, l_loop)
    for a, b in zip(g_blocked, g_loop):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    (tb, cb), (tl, cl) = (
        (median([x[0] for x in times[k]]), median([x[1] for x in times[k]]))
        for k in ("blocked", "loop")
    )
    tag = "[train]" if ffn else "[train, attention sub-layers only]"
    print(
        f"{tag} one step of both branches + hardest-negative triplet loss, batch {B} "
        f"({B * B} pairs), D = {D}, {'with' if ffn else 'without'} the feed-forward sub-layer; "
        f"median of {args.train_steps} steps, blocked and loop alternating:"
    )
    print(
        f"{tag} blocked {tb:.2f}s ({B / tb:.1f} samples/s); per-caption loop "
        f"{tl:.2f}s ({B / tl:.1f} samples/s); blocked / loop = {tl / tb:.2f}x by wall-clock time, "
        f"{cl / cb:.2f}x by CPU time ({'goal >= 2x; ' if ffn else ''}same loss and gradients: checked)"
    )
    if not ffn:
        return
    tf, cf = median([x[0] for x in times["floor"]]), median([x[1] for x in times["floor"]])
    print(
        f"[train] the feed-forward sub-layers alone (forward + backward on every pair's query tokens, "
        f"work both structures must do): {tf:.2f}s wall, {cf:.2f}s CPU; the loop over it, the most any "
        f"structure could gain: {tl / tf:.2f}x by wall-clock time, {cl / cf:.2f}x by CPU time"
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--images", type=int, default=64, help="images in the timed subset")
    p.add_argument("--captions", type=int, default=256, help="captions in the blocked timing")
    p.add_argument(
        "--ffn-captions",
        type=int,
        default=32,
        help="captions (a prefix) in the timing of the layer with its feed-forward sub-layer",
    )
    p.add_argument(
        "--loop-captions", type=int, default=4, help="captions in the loop timing (a prefix)"
    )
    p.add_argument("--train-batch", type=int, default=32, help="batch of the training-step timing")
    p.add_argument("--train-dim", type=int, default=256, help="D of the training-step timing")
    p.add_argument(
        "--train-steps", type=int, default=5, help="timed training steps of each structure"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed blocked calls per branch, each with its roofline",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        default=list(SECTIONS),
        choices=SECTIONS,
        help="what to time: the attention sub-layers, the layer with its feed-forward sub-layer, "
        "a training step, peak memory",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    args = p.parse_args()
    if args.quick:
        args.dim, args.images, args.captions, args.loop_captions = 64, 8, 40, 4
        args.ffn_captions = 20
        args.train_batch, args.train_dim, args.train_steps = 8, 32, 1
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = Tokens(torch.randn(args.images, args.regions, args.dim, generator=g))
    lengths = torch.randint(8, 21, (args.captions,), generator=g)
    texts = Tokens.from_lengths(torch.randn(args.captions, 20, args.dim, generator=g), lengths)
    print(f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1 / 5 / 15 min)")
    print(
        f"threads {torch.get_num_threads()}; D = {args.dim}, {args.heads} heads, N = {args.regions} regions, "
        f"captions of 8-20 words; timed subset {args.images} images x {args.captions} captions "
        f"(with the feed-forward sub-layer: x {args.ffn_captions}; loop: x {args.loop_captions}); "
        "full problem 1,000 x 5,000"
    )
    sub = texts[: args.loop_captions]
    for ffn in (False, True):
        if ("ffn" if ffn else "attention") not in args.sections:
            continue
        timed_texts = texts[: args.ffn_captions] if ffn else texts
        layer = (
            "decoder layer with its feed-forward sub-layer" if ffn else "attention sub-layers only"
        )
        for direction in ("i2t", "t2i"):
            torch.manual_seed(0)
            block = InterModalPhraseAttention(
                direction, dim=args.dim, heads=args.heads, feed_forward=ffn
            ).eval()
            runs, t_loop = time_branch(block, images, timed_texts, sub, args.dim, args.repeats)
            t_blocked = median([r[0] for r in runs])
            n_blocked, n_loop = (
                args.images * timed_texts.batch_size,
                args.images * args.loop_captions,
            )
            pps, pps_loop = n_blocked / t_blocked, n_loop / t_loop
            tag = f"[{direction}{' +ffn' if ffn else ''}]"
            print(f"{tag} {layer}")
            print(
                f"{tag} blocked           {pps:10.0f} pairs/s  ({t_blocked:.2f}s for {n_blocked} pairs, "
                f"median of {len(runs)}; 1,000 x 5,000 would take {5e6 / pps / 60:.0f} min)"
            )
            print(
                f"{tag} per-caption loop  {pps_loop:10.0f} pairs/s  ({t_loop:.2f}s for {n_loop} pairs)  "
                f"blocked / loop = {pps / pps_loop:.1f}x   (same scores: checked)"
            )
            for k, (wall, cpu, rate, by_wall, by_cpu) in enumerate(runs):
                print(
                    f"{tag} run {k + 1}: blocked {wall:.2f}s wall / {cpu:.2f}s CPU; torch.mm right after "
                    f"at {rate / 1e9:.1f} GFLOP/s (wall); fraction of the roofline: {by_wall:.2f} by "
                    f"wall-clock time, {by_cpu:.2f} by CPU time"
                )
            print(
                f"{tag} roofline (the layer's products on the real tokens at torch.mm's rate): median "
                f"{median([r[3] for r in runs]):.2f} by wall-clock time, "
                f"{median([r[4] for r in runs]):.2f} by CPU time (goal >= 0.6)"
            )
    print(f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1 / 5 / 15 min)")
    if "train" in args.sections:
        bench_training(args)
    if "memory" not in args.sections:
        return
    # Peak memory of one blocked call (image-to-text, the whole layer, the feed-forward timing's
    # pairs) against an unblocked implementation of it.
    block = InterModalPhraseAttention("i2t", dim=args.dim, heads=args.heads).eval()
    texts = texts[: args.ffn_captions]
    with torch.no_grad():
        block(images[:2], texts[:4])
        reset_hwm()
        base = vm_hwm_mib()
        block(images, texts)
        growth = vm_hwm_mib() - base
    hidden = block.linear1.out_features
    per_pair = args.regions * max(args.dim, args.heads * 20, hidden) * 4
    dense = args.images * texts.batch_size * per_pair / 2**20
    inputs = (images.feats.numel() + texts.feats.numel()) * 4 / 2**20
    print(
        f"[memory] peak resident growth during one blocked call ({args.images} x {texts.batch_size}): "
        f"{growth:.0f} MiB; CPU block budget 2**20 numbers = 4 MiB per intermediate; inputs {inputs:.0f} MiB"
    )
    print(
        f"[memory] an unblocked call holds (pairs, N, max(D, H*M, F)) float32 intermediates: {dense:.0f} MiB each "
        f"here, {5e6 * per_pair / 2**30:.0f} GiB each for 1,000 x 5,000"
    )


if __name__ == "__main__":
    main()
