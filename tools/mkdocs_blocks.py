"""A MkDocs hook: the documentation's table of blocks, read from the block classes at build time.

A page holding the line ``<!-- blocks: generated -->`` gets, in its place, the table
``imtm.contract.blocks_table(imtm.testing.block_classes())`` renders: every block of the
package with what it reads and writes, the arguments its ``_parameter_constraints`` cover and
its first example (its ``_examples``). Nothing is pasted into the repository, so a new block
shows up without an edit of the documentation.
"""

from __future__ import annotations

MARKER = "<!-- blocks: generated -->"


def render(markdown: str) -> str:
    """``markdown`` with the marker line replaced by the table of blocks."""
    if MARKER not in markdown:
        return markdown
    from imtm.contract import blocks_table
    from imtm.testing import block_classes

    return markdown.replace(MARKER, blocks_table(block_classes()))


def on_page_markdown(markdown: str, page, config, files) -> str:
    return render(markdown)
