"""CONTRIBUTING.md's "adding a block" page runs: its block passes the battery and its own tests."""

import re
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_example_block_and_its_tests_run():
    block_src, test_src = _python_blocks()[:2]
    module = types.ModuleType("mean_max_example")
    sys.modules["mean_max_example"] = module
    try:
        exec(compile(block_src, "CONTRIBUTING.md (block)", "exec"), module.__dict__)
        tests: dict = {}
        # The page imports the block from its export line; here it comes from the page itself.
        test_src = test_src.replace(
            "from imtm.components import MeanMax", "from mean_max_example import MeanMax"
        )
        exec(compile(test_src, "CONTRIBUTING.md (tests)", "exec"), tests)
    finally:
        sys.modules.pop("mean_max_example", None)
    marker = tests["test_conformance"].pytestmark[0]
    ids = [p.id for p in marker.args[1]]
    # Both examples the class declares, every check of each (read by parametrize_with_checks).
    assert ids[0] == "MeanMax()-contract" and len(ids) == 22
    assert "MeanMax(temperature=0.5)-padding" in ids
    for param in marker.args[1]:
        block, check = param.values
        tests["test_conformance"](block, check)
    tests["test_against_a_loop_over_pairs"]()
    tests["test_bad_temperature"]()
    from imtm.component import COMPONENT_REGISTRY

    COMPONENT_REGISTRY.pop("MeanMax", None)  # a page example, not a block of the package


def test_the_page_names_the_three_places_a_block_touches():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    for part in (
        "**1. The file**",
        "**2. The test file**",
        "**3. The export line**",
        "docs/design.md",
    ):
        assert part in text
