"""imtm.contract: value specs, parameter constraints, and how Component enforces them."""

from __future__ import annotations

import math
from numbers import Integral, Real

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone

import imtm
from imtm.component import COMPONENT_REGISTRY, VALUE_NAMES, Loss, load_components
from imtm.contract import (
    VALUE_SPECS,
    InstanceOf,
    Interval,
    InvalidParameterError,
    Options,
    Satisfies,
    ValueSpec,
    check_params,
    check_value,
    parameter_constraints,
    register_value,
    side_of,
    spec,
)


# ---------------------------------------------------------------------- constraints
def _interval_oracle(x, left, right, closed):
    """The plain definition, written out."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return False
    lo_ok = left is None or (x >= left if closed in ("both", "left") else x > left)
    hi_ok = right is None or (x <= right if closed in ("both", "right") else x < right)
    return lo_ok and hi_ok


@settings(max_examples=200, deadline=None)
@given(
    x=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.booleans()),
    left=st.one_of(st.none(), st.integers(-3, 3)),
    width=st.one_of(st.none(), st.integers(0, 4)),
    closed=st.sampled_from(["both", "left", "right", "neither"]),
)
def test_interval_agrees_with_its_definition(x, left, width, closed):
    right = None if width is None else (0 if left is None else left) + width
    assert Interval(Real, left, right, closed=closed).is_satisfied_by(x) == _interval_oracle(
        x, left, right, closed
    )


def test_interval_of_ints_refuses_floats_and_bools():
    c = Interval(Integral, 1, None, closed="left")
    assert c.is_satisfied_by(1) and c.is_satisfied_by(10**12)
    assert not any(c.is_satisfied_by(v) for v in (0, 1.0, True, "1", None))
    assert (
        c.describe() == "a positive int" and Interval(int, 0, None).describe() == "an integer >= 0"
    )
    assert Interval(float, 0, 1, closed="right").describe() == "a finite number in (0, 1]"
    for bad in c.bad_values():
        assert not c.is_satisfied_by(bad), bad


def test_interval_declaration_errors():
    with pytest.raises(TypeError, match="kind must be Integral or Real"):
        Interval(str, 0, 1)
    with pytest.raises(ValueError, match="closed must be"):
        Interval(Real, 0, 1, closed="open")


def test_check_value_messages_say_what_where_and_suggest():
    with pytest.raises(
        InvalidParameterError,
        match=r"^Blk: pooling must be one of \['lse', 'max'\], got 'mx'\. Did you mean 'max'\?$",
    ):
        check_value("mx", [Options({"max", "lse"})], name="pooling", where="Blk")
    with pytest.raises(ValueError, match=r"k must be a positive int or None, got 0"):
        check_value(0, [Interval(int, 1, None), None], name="k", where="Blk")
    with pytest.raises(TypeError, match=r"flag must be True or False, got 1"):
        check_value(1, ["boolean"], name="flag", where="Blk")
    with pytest.raises(InvalidParameterError, match=r"dtype must be a dtype, got 'float'"):
        check_value("float", [InstanceOf(torch.dtype)], name="dtype", where="Blk")
    with pytest.raises(InvalidParameterError, match=r"n must be even, got 3"):
        check_value(3, [Satisfies(lambda v: v % 2 == 0, "even")], name="n", where="Blk")
    check_value(None, [Interval(int, 1, None), None], name="k", where="Blk")
    check_value(torch.float32, [InstanceOf(torch.dtype)], name="dtype", where="Blk")
    with pytest.raises(TypeError, match="unknown parameter constraint"):
        check_value(1, ["positive"], name="x", where="Blk")


# ---------------------------------------------------------------------- blocks that declare constraints
class Scale(imtm.Component):
    requires = ("scores",)
    provides = ("scores",)
    _parameter_constraints = {
        "factor": [Interval(Real, 0, None, closed="neither")],
        "mode": [Options({"mul", "div"})],
    }

    def __init__(self, factor=2.0, mode="mul", *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.factor = factor
        self.mode = mode
        self.checks = 0

    def validate(self):
        self.checks += 1
        return super().validate()

    def forward(self, scores):
        return scores * self.factor if self.mode == "mul" else scores / self.factor


class ScaleLoss(Loss):
    requires = ("scores",)
    provides = ("scale_loss",)

    def __init__(self, weight=1.0, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.weight = weight

    def forward(self, scores):
        return scores.mean()


def test_validate_checks_the_declared_constraints_first():
    with pytest.raises(
        InvalidParameterError, match=r"Scale: factor must be a finite number > 0, got -1"
    ):
        Scale(factor=-1).validate()
    with pytest.raises(ValueError, match="Did you mean 'mul'"):
        Scale(mode="mull").validate()
    assert Scale().validate().checks == 1
    assert parameter_constraints(ScaleLoss) == {"weight": parameter_constraints(Loss)["weight"]}
    with pytest.raises(
        ValueError, match=r"ScaleLoss: weight must be a finite number >= 0, got nan"
    ):
        ScaleLoss(weight=float("nan")).validate()


def test_a_block_validates_on_its_first_call_and_after_a_change_not_on_every_call():
    block = Scale()
    x = torch.randn(2, 3)
    block(x)
    block(x)
    assert block.checks == 1  # once, not per forward
    block.set_params(factor=3.0)
    torch.testing.assert_close(block(x), 3.0 * x)
    assert block.checks == 2
    block.factor = -1.0  # a plain attribute store counts too
    with pytest.raises(ValueError, match="factor must be a finite number > 0"):
        block(x)
    bad = Scale(factor=0.0)
    with pytest.raises(ValueError, match="factor must be"):
        bad(x)


def test_a_clone_of_a_checked_block_is_checked_and_a_matcher_validates_every_block():
    block = Scale()
    block.validate()
    copy = clone(block)
    copy(torch.randn(2, 2))
    assert copy.checks == 0  # same values: nothing to check again
    from imtm.components import GlobalCosine
    from imtm.matcher import Matcher

    m = Matcher(components=[GlobalCosine(requires=("images", "texts")), Scale(factor=-2.0)])
    with pytest.raises(
        ValueError, match=r"Matcher: block 'scale': Scale: factor must be a finite number > 0"
    ):
        m.validate()


def test_a_constraint_on_no_argument_is_a_declaration_error():
    class Typo(Scale):
        _parameter_constraints = {"factr": [Interval(Real, 0, None)]}

    with pytest.raises(TypeError, match=r"Typo._parameter_constraints names \['factr'\]"):
        check_params(Typo())


# ---------------------------------------------------------------------- value specs
def test_every_value_a_built_in_block_reads_or_writes_is_in_the_vocabulary():
    load_components()
    missing = {}
    for name, cls in COMPONENT_REGISTRY.items():
        if not cls.__module__.startswith("imtm."):
            continue
        names = tuple(cls.requires) + (() if issubclass(cls, Loss) else tuple(cls.provides))
        for value in names:
            if value not in VALUE_SPECS:
                missing.setdefault(value, []).append(name)
    assert not missing, (
        f"value names outside imtm.contract.VALUE_SPECS (declare them in `values`): {missing}"
    )


def test_vocabulary_specs_are_consistent():
    for name, value in VALUE_SPECS.items():
        assert value.name == name and VALUE_NAMES[name] == value.doc
        if value.kind == "tokens":
            assert value.batch_axis() in ("Bi", "Bt"), name
        if value.side == "image":
            assert value.batch_axis() in ("Bi", None), name
        if value.side == "text":
            assert value.batch_axis() in ("Bt", None), name
    assert spec("scores").shape == ("Bi", "Bt") and spec("nope") is None
    assert side_of("image_ids") == frozenset({"text"}) and side_of("images") == frozenset({"image"})
    with pytest.raises(KeyError, match="Did you mean 'scores'"):
        side_of("scoers")


def test_a_block_declares_a_new_value_next_to_its_class():
    new = ValueSpec(
        "region_boxes_test", "image", "tensor", ("Bi", "N", 4), "(Bi, N, 4) boxes of every region"
    )

    class Boxes(imtm.Component):
        requires = ("image_tokens",)
        provides = ("region_boxes_test",)
        values = (new,)

        def forward(self, tokens):
            return tokens.feats[..., :4]

    assert VALUE_SPECS["region_boxes_test"] is new and "region_boxes_test" in VALUE_NAMES
    register_value(new)  # the same spec again is fine
    with pytest.raises(ValueError, match="already in the vocabulary"):
        register_value(ValueSpec("region_boxes_test", "text", "tensor", None, "other"))
    with pytest.raises(ValueError, match="side must be one of"):
        ValueSpec("x", "left", "tensor", None, "")
    with pytest.raises(ValueError, match="kind must be one of"):
        ValueSpec("x", "image", "array", None, "")
    from imtm.testing import check_outputs

    values = {"image_tokens": imtm.Tokens(torch.randn(2, 3, 5))}
    check_outputs(Boxes(), values)
    with pytest.raises(AssertionError, match=r"'region_boxes_test' must be a \(Bi, N, 4\) tensor"):
        check_outputs(Boxes(), values, torch.zeros(2, 3, 5))
    VALUE_SPECS.pop("region_boxes_test")
    VALUE_NAMES.pop("region_boxes_test")


def test_the_pipeline_plan_takes_batch_sides_from_the_specs():
    from imtm.engine.graph import BATCH_VALUES

    assert BATCH_VALUES == {n: side_of(n) for n in ("images", "texts", "image_ids", "positives")}


def test_the_vocabulary_table_in_docs_design_is_current():
    from pathlib import Path

    from imtm.contract import vocabulary_table

    load_components()
    text = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    start, end = (
        text.index("<!-- vocabulary: begin -->\n"),
        text.index("\n<!-- vocabulary: end -->"),
    )
    shown = text[start + len("<!-- vocabulary: begin -->\n") : end]
    assert shown == vocabulary_table(), (
        "docs/design.md's vocabulary table is stale: paste imtm.contract.vocabulary_table() (after "
        "imtm.component.load_components()) between its markers"
    )


def test_the_docs_build_the_block_table_from_the_classes():
    """docs/design.md's catalogue of blocks is rendered at build time from the block classes."""
    import importlib.util
    from pathlib import Path

    from imtm.testing import block_classes

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "mkdocs_blocks", root / "tools" / "mkdocs_blocks.py"
    )
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    assert "tools/mkdocs_blocks.py" in (root / "mkdocs.yml").read_text()
    page = (root / "docs" / "design.md").read_text()
    assert page.count(hook.MARKER) == 1
    rendered = hook.render(page)
    rows = [line for line in rendered.splitlines() if line.startswith("| `")]
    names = {row.split("`")[1] for row in rows}
    assert {cls.__name__ for cls in block_classes()} <= names
    assert "| `TopKAggregation` | visual_phrases, text_phrase | scores_intra |" in rendered
    assert "`TopKAggregation(k=2)`" in rendered  # its first example, read from the class
