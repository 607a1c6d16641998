"""The conformance battery on every block of imtm, on the examples each class declares next to it.

``parametrize_with_checks`` given a block class reads its ``_examples`` (imtm.contract), builds
each configuration and gives it ``imtm.testing.example_inputs``: one test id per check of each
configuration, and no table here names a block. A check a configuration does not meet is
skipped only where its ``Example.skip`` says why (and ``padding`` where it promises nothing).
"""

from imtm.testing import block_classes, parametrize_with_checks


def test_every_block_is_in_the_battery():
    names = [cls.__name__ for cls in block_classes()]
    assert len(names) >= 49 and {"GlobalCosine", "PatchSlimming", "HFTextEncoder"} <= set(names)


@parametrize_with_checks(block_classes())
def test_conformance(block, check):
    check(block)
