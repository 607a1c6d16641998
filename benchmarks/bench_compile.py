"""Eager against ``Matcher(compile=True)``: the training step time of every preset, after warm-up.

Not part of the test suite. For each preset, two Matchers with the same seed are fitted for
one short epoch on a small synthetic split (the warm-up: compilation happens there), one
eager and one with ``compile=True``; then the same training steps (forward of every block,
the weighted losses, backward, an AdamW step; see ``_steps.py``) run on new batches, eager
and compiled alternately, so that both see the same load on a shared machine. Printed per
preset: the median step time of each, their ratio (compiled / eager: <= 1 means compiling
pays), the number of recompilations during the timed steps (0: no batch recompiles), and the
fastest step of each (with few steps the median can be a step that recompiled).
Then one loss per preset compiled with ``fullgraph=True`` (the ``eager`` backend: it checks
that the loss traces without a graph break).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py                 # every preset
    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --presets chan  # one
    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --presets ela --per-block   # and each block
    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --encoder-layer 32 128      # the transformer layer
    python benchmarks/bench_compile.py --quick                           # small smoke run
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from collections import defaultdict

import torch
import torch._dynamo
from _steps import PRESET_NAMES, load_data, make_batch, make_matcher, train_step

from imtm.matcher import _CompiledCall


def recompile_count() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["recompiles"].values()) if "recompiles" in counters else 0


def frames_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def bench_preset(name: str, args) -> dict:
    train = load_data(name, args.n_train, seed=args.seed)
    t0 = time.perf_counter()
    eager = make_matcher(name, train, embed_dim=args.dim, batch_size=args.batch_size, compile=False)
    fit_eager = time.perf_counter() - t0
    torch._dynamo.reset()
    t0 = time.perf_counter()
    compiled = make_matcher(
        name, train, embed_dim=args.dim, batch_size=args.batch_size, compile=True
    )
    fit_compiled = time.perf_counter() - t0
    graphs_after_warmup = frames_compiled()
    # New batches (other captions than the warm-up's), the same for both.
    batches = [
        make_batch(train, args.batch_size * (k + 1) + 7, args.batch_size) for k in range(args.steps)
    ]
    opts = {
        key: torch.optim.AdamW([p for p in m.components_.parameters() if p.requires_grad], lr=1e-5)
        for key, m in (("eager", eager), ("compiled", compiled))
    }
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    parts: dict[str, dict[str, list[float]]] = {
        "eager": defaultdict(list),
        "compiled": defaultdict(list),
    }
    for _ in range(args.repeats):
        for values in batches:
            for key, m in (("eager", eager), ("compiled", compiled)):
                acc: dict[str, float] = defaultdict(float)
                timer = (
                    (lambda n, s, acc=acc: acc.__setitem__(n, acc[n] + s))
                    if args.per_block
                    else None
                )
                t0 = time.perf_counter()
                train_step(m, values, opts[key], timer=timer)
                times[key].append(time.perf_counter() - t0)
                for k, v in acc.items():
                    parts[key][k].append(v)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    if args.per_block:  # (each block's forward after a synchronisation; the steps above include it)
        compiled_blocks = {
            n
            for n, b in compiled.components_.items()
            if isinstance(b._compiled_call_impl, _CompiledCall)
        }
        for k in parts["eager"]:
            e, c = (sorted(parts[x][k])[len(parts[x][k]) // 2] * 1e3 for x in ("eager", "compiled"))
            state = (
                "compiled"
                if k in compiled_blocks
                else ("eager" if k in compiled.components_ else "")
            )
            print(
                f"    {name}: {k:22} eager {e:7.2f} ms, compiled Matcher {c:7.2f} ms ({c / e:4.2f})  {state}"
            )
    best = {f"best_{k}": min(v) for k, v in times.items()}
    failed = [
        n for n, b in compiled.components_.items() if getattr(b, "_imtm_compile_failed", False)
    ]
    return {
        "fit_eager": fit_eager,
        "fit_compiled": fit_compiled,
        **med,
        **best,
        "new_graphs": frames_compiled() - graphs_after_warmup,
        "failed": failed,
    }


def fullgraph_losses(name: str, args) -> list[str]:
    train = load_data(name, args.n_train, seed=args.seed)
    m = make_matcher(name, train, embed_dim=args.dim, batch_size=args.batch_size, compile=False)
    values = make_batch(train, 0, args.batch_size)
    plan, lines = m.plan_, []
    for k, block in enumerate(plan.blocks):
        inputs = [values[r] for r in block.requires]
        if plan.is_loss(k):
            torch._dynamo.reset()
            try:
                got = torch.compile(block, fullgraph=True, backend="eager")(*inputs)
                torch.testing.assert_close(got, block(*inputs))
                lines.append(f"{plan.names[k]} ({type(block).__name__}): fullgraph OK")
            except Exception as err:  # noqa: BLE001 - reported, the run goes on
                lines.append(
                    f"{plan.names[k]} ({type(block).__name__}): FAILS ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:160]})"
                )
            continue
        out = block(*inputs)
        provides = tuple(block.provides)
        values.update({provides[0]: out} if len(provides) == 1 else dict(zip(provides, out)))
    return lines


def encoder_layer_timing(dims, steps: int = 15) -> None:
    """One ``CrossModalEncoder`` layer in training, forward and backward on 48 pairs of 65 patches and
    18-23 words: eager against ``torch.compile`` of its transformer layers (Inductor with automatic
    dynamic shapes, Inductor with static shapes, and AOT autograd without code generation),
    alternating, medians. The measurement behind ``compiles_on_cpu = False`` of ELA's blocks."""
    from imtm.components import CrossModalEncoder

    print(
        "CrossModalEncoder(dim, layers=1, heads=2) layers, forward + backward, 48 pairs, median ms:"
    )
    for dim in dims:
        torch.manual_seed(0)
        enc = CrossModalEncoder(dim, layers=1, heads=2).train()
        pad = torch.cat([torch.zeros(48, 65, dtype=torch.bool), torch.rand(48, 23) > 0.85], 1)
        x = torch.randn(48, 88, dim, requires_grad=True)
        variants = {
            "eager": enc.encoder,
            "inductor": torch.compile(enc.encoder),
            "inductor, static shapes": torch.compile(enc.encoder, dynamic=False),
            "aot_eager": torch.compile(enc.encoder, backend="aot_eager"),
        }

        def run(f, x=x, pad=pad):
            f(x, src_key_padding_mask=pad).sum().backward()

        for f in variants.values():
            for _ in range(3):
                run(f)
        ts: dict[str, list[float]] = defaultdict(list)
        for _ in range(steps):
            for k, f in variants.items():
                t0 = time.perf_counter()
                run(f)
                ts[k].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in ts.items()}
        print(
            f"  D = {dim:4d}: "
            + ", ".join(f"{k} {v:.1f}" for k, v in med.items())
            + f"  (inductor / eager {med['inductor'] / med['eager']:.2f})",
            flush=True,
        )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESET_NAMES), choices=PRESET_NAMES)
    ap.add_argument(
        "--n-train", type=int, default=32, help="synthetic training images (5 captions each)"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dim", type=int, default=64, help="embed_dim (and word_dim) of the presets")
    ap.add_argument("--steps", type=int, default=4, help="timed batches")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--per-block",
        action="store_true",
        help="also each block's forward time in both Matchers (and whether it is compiled)",
    )
    ap.add_argument(
        "--encoder-layer",
        type=int,
        nargs="*",
        metavar="D",
        help="time ELA's cross-modal transformer layer eager and compiled at these widths "
        "(default 32 128 256) instead of the presets",
    )
    args = ap.parse_args(argv)
    if args.encoder_layer is not None:
        encoder_layer_timing(args.encoder_layer or [32, 128, 256], steps=3 if args.quick else 15)
        return
    if args.quick:
        args.n_train, args.batch_size, args.dim, args.steps, args.repeats = 16, 16, 32, 2, 1
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.manual_seed(args.seed)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads={torch.get_num_threads()}, "
        f"seed={args.seed}, batch={args.batch_size}, dim={args.dim}, {args.steps} batches x {args.repeats}"
    )
    print(
        f"{'preset':8} {'fit eager':>10} {'fit compiled':>13} {'step eager':>11} {'step compiled':>14} "
        f"{'compiled/eager':>15} {'new graphs':>11} {'fastest eager':>14} {'fastest compiled':>17}  failed to compile"
    )
    for name in args.presets:
        r = bench_preset(name, args)
        print(
            f"{name:8} {r['fit_eager']:9.2f}s {r['fit_compiled']:12.2f}s {r['eager'] * 1e3:9.1f}ms "
            f"{r['compiled'] * 1e3:12.1f}ms {r['compiled'] / r['eager']:15.2f} {r['new_graphs']:11d} "
            f"{r['best_eager'] * 1e3:12.1f}ms {r['best_compiled'] * 1e3:15.1f}ms  "
            f"{', '.join(r['failed']) or '-'}",
            flush=True,
        )
    print("losses under torch.compile(fullgraph=True, backend='eager'):")
    for name in args.presets:
        for line in fullgraph_losses(name, args):
            print(f"  {name}: {line}", flush=True)


if __name__ == "__main__":
    main()
