"""The documentation site: maths typeset at build time (no network), pages that link into the API.

CI builds the whole site with ``mkdocs build --strict``; these tests check the pieces that a
successful build does not: that no formula reaches the reader as raw TeX, that no page loads
a script from the network, and that the narrative pages and the index point at the API reference.
"""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT / "tools"))


def _nav_pages() -> list[str]:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def walk(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from walk(value)

    return list(walk(config["nav"]))


def test_no_page_loads_a_script_or_stylesheet_from_the_network():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    for key in ("extra_javascript", "extra_css"):
        for entry in config.get(key, []):
            assert not re.match(r"(https?:)?//", str(entry)), (key, entry)
            assert (DOCS / entry).is_file(), entry
    assert "tools/mkdocs_katex.py" in config["hooks"]
    assert not (DOCS / "javascripts" / "mathjax.js").exists()


def test_maths_is_typeset_to_mathml_at_build_time():
    pytest.importorskip("pykatex")
    markdown = pytest.importorskip("markdown")
    from mkdocs_katex import typeset

    page = markdown.markdown(
        "Inline $s_{ij} = \\cos(t_i, v_j)$ and a block:\n\n$$\n\\frac{1}{K'} \\sum_k x_k\n$$\n",
        extensions=["pymdownx.arithmatex"],
        extension_configs={"pymdownx.arithmatex": {"generic": True}},
    )
    assert page.count('class="arithmatex"') == 2  # what the hook receives
    out = typeset(page)
    assert "arithmatex" not in out and "\\(" not in out and "\\[" not in out
    assert out.count("<math") == 2 and 'display="block"' in out
    assert '<div class="imtm-math">' in out
    assert "<mfrac>" in out and "<msub>" in out  # typeset, not TeX in a box


def test_a_formula_katex_cannot_parse_stops_the_build_naming_page_and_formula():
    pytest.importorskip("pykatex")
    exceptions = pytest.importorskip("mkdocs.exceptions")
    from mkdocs_katex import typeset

    with pytest.raises(exceptions.PluginError, match=r"chan\.md: KaTeX cannot typeset 'X &= 1'"):
        typeset('<div class="arithmatex">\\[X &= 1\\]</div>', "chan.md")


def test_docstring_maths_with_rows_gets_an_aligned_environment():
    if importlib.util.find_spec("griffe") is None:
        pytest.skip("griffe (the docs extra) is not installed")
    from griffe_example_sections import rewrite

    rows = rewrite("Text.\n\n.. math::\n\n    X &= a \\\\\n    Y &= b\n\nMore.")
    assert "$$\n\\begin{aligned}\nX &= a \\\\\nY &= b\n\\end{aligned}\n$$" in rows
    single = rewrite(".. math::\n\n    S = \\max_j s_j\n")
    assert "aligned" not in single and "$$\nS = \\max_j s_j\n$$" in single
    cases = rewrite(".. math::\n\n    x = \\begin{cases} 1 & a \\\\ 0 & b \\end{cases}\n")
    assert "aligned" not in cases  # the & and \\ belong to the cases environment


def test_every_narrative_page_links_into_the_api_reference():
    pages = [p for p in _nav_pages() if not p.startswith(("api/", "results/")) and p != "index.md"]
    assert "quickstart.md" in pages and "chan.md" in pages
    for page in pages:
        text = (DOCS / page).read_text()
        assert re.search(r"\]\(api/[a-z]+\.md|\]\[imtm\.", text), (
            f"{page} has no link into the API reference"
        )


def test_index_says_what_imtm_is_and_lists_every_api_page_including_viz():
    text = (DOCS / "index.md").read_text()
    assert "PyTorch library for image-text matching" in text and "It is for" in text
    for journey in (
        "**Try it**",
        "**Train a paper's model on your data**",
        "**Lift one block into your code**",
    ):
        assert journey in text
    api_pages = [p for p in _nav_pages() if p.startswith("api/")]
    assert "api/viz.md" in api_pages
    for page in api_pages:
        assert f"]({page})" in text, page


def test_nested_lists_are_indented_enough_to_render_nested():
    # Python-Markdown nests a list only under four spaces; two or three render it flat.
    for page in DOCS.rglob("*.md"):
        in_code = False
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
            if not in_code:
                assert not re.match(r"^ {1,3}([-*+]|\d+\.) ", line), (
                    f"{page.name}:{number}: {line!r}"
                )


def test_no_control_characters_in_sources_and_docs():
    # A "\b" or "\t" read as an escape in a docstring turns \beta into a backspace and "eta",
    # which the docs then show (and KaTeX refuses): keep them out of every source and page.
    bad = re.compile(r"[\x07\x08\x0b\x0c\t]")
    files = [*(ROOT / "imtm").rglob("*.py"), *DOCS.rglob("*.md"), *(ROOT / "tools").rglob("*.py")]
    assert len(files) > 50
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not bad.search(line), f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]!r}"


def test_every_heading_starts_its_own_block():
    # A heading straight under a table row renders as one more row of the table.
    for page in DOCS.rglob("*.md"):
        lines = page.read_text().splitlines()
        in_code = False
        for number, line in enumerate(lines, 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
            if not in_code and re.match(r"#{1,6} ", line) and number > 1:
                assert not lines[number - 2].strip(), (
                    f"{page.name}:{number}: no blank line before {line!r}"
                )


def test_results_notes_kept_on_a_rerun_stay_a_section_of_their_own(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _results import write_page

    out = tmp_path / "r.md"
    out.write_text("# old\n\n| a |\n| --- |\n| 1 |\n## Reading the table\n\nnotes\n")
    text = write_page(
        out, ["# new", "", "| a |", "| --- |", "| 2 |"], keep_from="## Reading the table"
    )
    assert "| 2 |\n\n## Reading the table\n\nnotes\n" in text
