"""benchmarks/_results.py: the one layout of the docs/results/*.md pages the ablation scripts write."""

import importlib.util
from pathlib import Path

import pytest

# benchmarks/ is not a package: load the module from its file, as the scripts' own folder would.
_spec = importlib.util.spec_from_file_location(
    "_results", Path(__file__).resolve().parents[2] / "benchmarks" / "_results.py"
)
_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_results)
binding_note, binding_timing_table = _results.binding_note, _results.binding_timing_table
markdown_table, page, write_page = _results.markdown_table, _results.page, _results.write_page

ROW = {
    "i2t_r1": 10.0,
    "i2t_r5": 20.0,
    "i2t_r10": 30.0,
    "t2i_r1": 5.0,
    "t2i_r5": 15.0,
    "t2i_r10": 25.0,
    "rsum": 105.0,
}

# The layout the scripts wrote before they shared this module (title, paragraphs, R@K table, blocks).
EXPECTED = """# T

Intro paragraph.

| model | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rSum |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| a | 10.0 | 20.0 | 30.0 | 5.0 | 15.0 | 25.0 | 105.0 |

Binding accuracy: for images that differ only by two objects' swapped colours, how often a caption \
scores its own image above the twin (50 = chance; x).

| model | fit (s) | scoring + eval (s) | binding accuracy |
| --- | ---: | ---: | ---: |
| a | 12 | 3.5 | 61.2 |
"""


def test_page_layout():
    lines = page(
        "T",
        ["Intro paragraph."],
        {"a": ROW},
        [binding_note("x"), binding_timing_table([("a", 12.4, 3.46, 61.25)])],
    )
    assert "\n".join(lines) == EXPECTED


def test_markdown_table_alignment_and_errors():
    assert markdown_table(["a", "b"], "lr", [(1, "x")]) == [
        "| a | b |",
        "| --- | ---: |",
        "| 1 | x |",
    ]
    with pytest.raises(ValueError, match="align must give 'l' or 'r' for each of the 2 columns"):
        markdown_table(["a", "b"], "l", [])


def test_write_page_keeps_the_notes_section(tmp_path, capsys):
    out = tmp_path / "sub" / "page.md"
    assert write_page(out, ["# new", ""], keep_from="## Notes") == "# new\n"
    out.write_text("# old\n\n## Notes\n\nkept\n\n")
    text = write_page(out, ["# new", ""], keep_from="## Notes")
    assert text == out.read_text() == "# new\n\n## Notes\n\nkept\n"
    assert write_page(out, ["# newer", ""]) == "# newer\n"  # no keep_from: nothing kept
    assert "# newer" in capsys.readouterr().out
