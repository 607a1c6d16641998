"""The Markdown pages the ablation scripts write to docs/results/ (one layout for all five).

A page is a title, paragraphs about the run, the R@K table of :func:`imtm.metrics.format_table`,
then more blocks (paragraphs, or lists of lines such as a second table), each followed by a
blank line. The scripts import it as ``from _results import ...`` (``python benchmarks/x.py``
puts this folder on the path).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from imtm.metrics import format_table

__all__ = [
    "add_compare_arguments",
    "add_quick_argument",
    "binding_note",
    "compare_settings",
    "binding_timing_table",
    "claim_reading",
    "markdown_table",
    "mean_std",
    "page",
    "page_command",
    "quick_regions_sizes",
    "seeded_table",
    "write_page",
]

Block = str | Sequence[str]


def binding_note(detail: str = "") -> str:
    """The paragraph that says what the binding-accuracy column measures (``detail`` inside the brackets)."""
    return (
        "Binding accuracy: for images that differ only by two objects' swapped colours, how often a caption "
        f"scores its own image above the twin (50 = chance{'; ' + detail if detail else ''})."
    )


def markdown_table(header: Sequence[str], align: str, rows: Sequence[Sequence]) -> list[str]:
    """Lines of a Markdown table; ``align`` has one letter per column, ``l`` (``---``) or ``r`` (``---:``)."""
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(
            f"align must give 'l' or 'r' for each of the {len(header)} columns, got {align!r}"
        )
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |",
    ]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def binding_timing_table(rows: Sequence[tuple[str, float, float, float]]) -> list[str]:
    """The per-model table of fit time, scoring time and binding accuracy: rows ``(label, fit_s, eval_s, binding)``."""
    return markdown_table(
        ["model", "fit (s)", "scoring + eval (s)", "binding accuracy"],
        "lrrr",
        [
            (label, f"{fit_s:.0f}", f"{eval_s:.1f}", f"{binding:.1f}")
            for label, fit_s, eval_s, binding in rows
        ],
    )


def page(
    title: str, intro: Sequence[Block], results: Mapping, after: Sequence[Block] = ()
) -> list[str]:
    """The lines of a page: ``# title``, the ``intro`` blocks, the R@K table of ``results``, the ``after`` blocks.

    A block is a paragraph (one string) or a list of lines; a blank line follows each.
    """
    lines = [f"# {title}", ""]
    for block in [*intro, format_table(results), *after]:
        lines += [block, ""] if isinstance(block, str) else [*block, ""]
    return lines


def write_page(out: str | Path, lines: Sequence[str], keep_from: str | None = None) -> str:
    """Write ``lines`` to ``out`` (folders created) and print them; return the text written.

    ``keep_from``: a heading; when the file already holds it, that section (notes on a run)
    is kept, from the heading to the end, after the new lines.
    """
    out = Path(out)
    lines = list(lines)
    old = out.read_text() if keep_from is not None and out.is_file() else ""
    if keep_from is not None and keep_from in old:
        if lines and lines[-1].strip():
            lines.append("")  # a heading right under a table row would become one of its rows
        lines.append(old[old.index(keep_from) :].rstrip("\n") + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    out.write_text(text)
    print(text)
    return text


#: The columns of a seeded table: the six recalls and rSum.
RECALL_COLUMNS = (
    ("i2t R@1", "i2t_r1"),
    ("i2t R@5", "i2t_r5"),
    ("i2t R@10", "i2t_r10"),
    ("t2i R@1", "t2i_r1"),
    ("t2i R@5", "t2i_r5"),
    ("t2i R@10", "t2i_r10"),
    ("rSum", "rsum"),
)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def seeded_table(
    per_seed: Mapping[str, Sequence[Mapping]], extra: Sequence[tuple[str, str, str]] = ()
) -> list[str]:
    """A Markdown table of ``mean +- std`` over seeds: one row per label, the recalls, rSum and ``extra``.

    ``per_seed[label]`` holds one metric dict per seed; ``extra`` adds columns ``(header, key, format)``.
    """
    header = ["model", *(h for h, _ in RECALL_COLUMNS), *(h for h, _, _ in extra), "seeds"]
    rows = []
    for label, runs in per_seed.items():
        cells = [label]
        for _, key in RECALL_COLUMNS:
            m, sd = mean_std([r[key] for r in runs])
            cells.append(f"{m:.1f} +- {sd:.1f}")
        for _, key, fmt in extra:
            m, sd = mean_std([r[key] for r in runs])
            cells.append(f"{m:{fmt}} +- {sd:{fmt}}")
        cells.append(str(len(runs)))
        rows.append(cells)
    return markdown_table(header, "l" + "r" * (len(header) - 1), rows)


def claim_reading(
    per_seed: Mapping[str, Sequence[Mapping]],
    method: str,
    baseline: str,
    claim: str,
    key: str = "rsum",
) -> str:
    """A sentence read off the numbers: does ``method`` beat ``baseline`` on ``key``, by how much, on how many seeds.

    The seeds are paired (same data, initialisation and order for both rows of one seed).
    """
    a, b = [float(r[key]) for r in per_seed[method]], [float(r[key]) for r in per_seed[baseline]]
    diffs = [x - y for x, y in zip(a, b)]
    m, sd = mean_std(diffs)
    wins = sum(d > 0 for d in diffs)
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    verdict = (
        "reproduces"
        if wins == len(diffs) and m > 0
        else "does not reproduce"
        if wins == 0
        else "is not settled (mixed across seeds)"
    )
    return (
        f"**{claim}** {method}: {key} {ma:.1f} +- {sa:.1f}; {baseline}: {mb:.1f} +- {sb:.1f}; paired difference "
        f"{m:+.1f} +- {sd:.1f} ({', '.join(f'{d:+.1f}' for d in diffs)} on seeds in order), higher on "
        f"{wins} of {len(diffs)} seeds: the claim {verdict} here."
    )


QUICK_HELP = "a tiny smoke run (seconds); prints its table, writes no page"


def add_quick_argument(p, out: str) -> None:
    """``--out`` (the page, default ``out``) and ``--quick`` on parser ``p``."""
    p.add_argument("--out", default=out)
    p.add_argument("--quick", action="store_true", help=QUICK_HELP)


def add_compare_arguments(p, out: str) -> None:
    """The budget flags of a script that trains as ``imtm compare`` does (defaults:
    :class:`imtm.compare.CompareSettings`), then ``--out`` and ``--quick``."""
    from imtm.compare import CompareSettings

    d = CompareSettings()
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--n-train", type=int, default=d.n_train)
    p.add_argument("--n-test", type=int, default=d.n_test)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--embed-dim", type=int, default=d.embed_dim)
    add_quick_argument(p, out)


def compare_settings(args, seed: int):
    """The :class:`imtm.compare.CompareSettings` of the flags of :func:`add_compare_arguments`, for one
    seed (the word embeddings as wide as the joint space, as in the comparison's defaults)."""
    from dataclasses import replace

    from imtm.compare import CompareSettings

    return replace(
        CompareSettings(),
        seed=seed,
        epochs=args.epochs,
        n_train=args.n_train,
        n_test=args.n_test,
        batch_size=args.batch_size,
        lr=args.lr,
        embed_dim=args.embed_dim,
        word_dim=args.embed_dim,
    )


def quick_regions_sizes(args) -> None:
    """Shrink the parsed ``args`` of a regions-view reading script to its ``--quick`` run (one seed)."""
    args.seeds, args.epochs, args.n_train, args.n_test = [0], 1, 16, 8
    args.embed_dim, args.batch_size = 16, 8


def page_command(script: str, argv: Sequence[str]) -> str:
    """The command that made a page: ``python benchmarks/<script>`` and ``argv`` without
    ``--quick`` and ``--out PATH`` (where the page goes is not how it was made).

    Example:
        >>> page_command("x.py", ["--seeds", "0,1", "--out", "/tmp/p.md", "--quick"])
        'python benchmarks/x.py --seeds 0,1'
    """
    given = list(argv)
    for flag in ("--quick", "--out"):
        while flag in given:
            at = given.index(flag)
            del given[at : at + (2 if flag == "--out" else 1)]
    return ("python benchmarks/" + script + " " + " ".join(given)).strip()
