"""The Markdown pages the ablation scripts write to docs/results/ (one layout for all five).

A page is a title, paragraphs about the run, the R@K table of :func:`imtm.metrics.format_table`,
then more blocks (paragraphs, or lists of lines such as a second table), each followed by a
blank line. The scripts import it as ``from _results import ...`` (``python benchmarks/x.py``
puts this folder on the path).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from imtm.metrics import format_table

__all__ = ["binding_note", "binding_timing_table", "markdown_table", "page", "write_page"]

Block = str | Sequence[str]


def binding_note(detail: str = "") -> str:
    """The paragraph that says what the binding-accuracy column measures (``detail`` inside the brackets)."""
    return ("Binding accuracy: for images that differ only by two objects' swapped colours, how often a caption "
            f"scores its own image above the twin (50 = chance{'; ' + detail if detail else ''}).")


def markdown_table(header: Sequence[str], align: str, rows: Sequence[Sequence]) -> list[str]:
    """Lines of a Markdown table; ``align`` has one letter per column, ``l`` (``---``) or ``r`` (``---:``)."""
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align must give 'l' or 'r' for each of the {len(header)} columns, got {align!r}")
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def binding_timing_table(rows: Sequence[tuple[str, float, float, float]]) -> list[str]:
    """The per-model table of fit time, scoring time and binding accuracy: rows ``(label, fit_s, eval_s, binding)``."""
    return markdown_table(
        ["model", "fit (s)", "scoring + eval (s)", "binding accuracy"], "lrrr",
        [(label, f"{fit_s:.0f}", f"{eval_s:.1f}", f"{binding:.1f}") for label, fit_s, eval_s, binding in rows],
    )


def page(title: str, intro: Sequence[Block], results: Mapping, after: Sequence[Block] = ()) -> list[str]:
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
        lines.append(old[old.index(keep_from):].rstrip("\n") + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    out.write_text(text)
    print(text)
    return text
