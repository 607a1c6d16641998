"""The code on docs/robustness.md runs: the 'property-test your own block' example is a real test."""

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "robustness.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_own_block_example_runs_and_its_tests_pass():
    blocks = [b for b in python_blocks(PAGE.read_text()) if "component_inputs" in b]
    assert len(blocks) == 1, "docs/robustness.md should hold one component_inputs example"
    namespace: dict = {"__name__": "robustness_example"}
    exec(compile(blocks[0], str(PAGE), "exec"), namespace)
    tests = [name for name in namespace if name.startswith("test_")]
    assert tests == ["test_max_cosine_contract", "test_max_cosine_battery"]
    for name in tests:
        namespace[name]()


def test_the_example_would_catch_a_broken_block():
    # The same example with a block whose padding leaks into its scores must fail.
    block = [b for b in python_blocks(PAGE.read_text()) if "component_inputs" in b][0]
    leaky = block.replace(
        "masked_fill(~images.mask[:, None, :, None], -2.0)",
        "masked_fill(images.mask[:, None, :, None] & False, -2.0)",
    )
    assert leaky != block
    namespace: dict = {"__name__": "robustness_example_broken"}
    exec(compile(leaky, str(PAGE), "exec"), namespace)
    with pytest.raises(AssertionError):
        namespace["test_max_cosine_battery"]()
